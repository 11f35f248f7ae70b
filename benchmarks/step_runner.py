"""The training step the speed benchmarks time: one method with its optimiser, stepping through
shuffled batches as the trainer does (the method's loss, fused AdamW, gradient clipping; fp32 on
the CPU, the trainer's autocast for ``precision`` on CUDA). Shared by ebaker_speed.py and pmpguard_speed.py."""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch

from rsnc_bench.backbones import BackboneConfig, build_backbone
from rsnc_bench.config import parse_assignments
from rsnc_bench.engine.batches import Preprocess, make_batch, split_tensors, train_batches
from rsnc_bench.engine.optim import adamw, param_groups
from rsnc_bench.engine.prefetch import prefetched
from rsnc_bench.engine.signals import RowSignals, record_signals
from rsnc_bench.engine.trainer import autocast_for
from rsnc_bench.methods import METHODS, EpochContext, Method


class StepRunner:
    """``method`` trained on ``train`` (a Split) at ``batch_size``; ``captions``: the train captions its first epoch sees."""

    def __init__(self, name: str, method: Method, train, batch_size: int, grad_clip: float,
                 captions: list[str] | None = None, seed: int = 0, device: str = "cpu", precision: str = "fp32"):
        self.name, self.method, self.grad_clip = name, method, grad_clip
        self.device = torch.device(device)
        self.autocast, self.precision = autocast_for(self.device, precision)
        self.train = split_tensors(train, method.backbone, None, native=True)
        method.to(self.device)
        self.optimizer = adamw(param_groups(method, 0.1, method.param_groups()), 1e-5)
        method.train()
        plain = Preprocess(method.backbone, augment=False)
        batch_of = lambda rows: make_batch(self.train, torch.as_tensor(rows), self.train.img_of[torch.as_tensor(rows)], plain, self.device)  # noqa: E731
        method.start_epoch(EpochContext(1, 1, self.train.n_rows, self.train.n_rows // batch_size, self.device,
                                        captions or (), getattr(method.backbone, "tokenizer", None), batch_of=batch_of))
        self.preprocess = Preprocess(method.backbone, augment=True, generator=torch.Generator().manual_seed(seed + 1))
        self.batches = list(train_batches(self.train, np.arange(self.train.n_rows), batch_size, torch.Generator().manual_seed(seed)))
        self.batch_size, self.next = batch_size, 0
        self.stream = None  # batches built ahead by a background worker, once ``prefetch`` is called
        self.signals = RowSignals(n_rows=self.train.n_rows)
        self.times = {"data": 0.0, "model": 0.0, "bookkeeping": 0.0}  # seconds, summed over the steps taken

    def batch(self, index: int):
        rows, image_ids = self.batches[index % len(self.batches)]
        batch = make_batch(self.train, rows, image_ids, self.preprocess, self.device)
        batch.lr = 1e-5  # the optimiser's
        return batch

    def prefetch(self, depth: int) -> None:
        """Build the following batches ahead of the step in a background worker, as the trainer does
        (``TrainConfig.prefetch``); the step's data time becomes the time it waits for its batch."""
        self.stream = prefetched((self.batch(i) for i in itertools.count(self.next)), depth) if depth else None

    def step(self) -> None:
        """One step as the trainer takes it: the batch (data), the loss, backward, clipping and the
        optimiser (model), the per-row signals and the logged numbers (bookkeeping), each timed."""
        self.next += 1
        started = time.perf_counter()
        batch = self.batch(self.next - 1) if self.stream is None else next(self.stream)
        data = time.perf_counter()
        with self.autocast():
            out = self.method.training_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the model's time, not its launches
        model = time.perf_counter()
        record_signals(self.signals, batch.rows, out)
        out.loss.item()
        self.times["data"] += data - started
        self.times["model"] += model - data
        self.times["bookkeeping"] += time.perf_counter() - model

    def seconds(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return time.perf_counter() - start


def make_runner(name: str, backbone: str, train, captions, batch_size: int, seed: int = 0, **where) -> StepRunner:
    """``name`` is a method, optionally with options after colons: "ebaker:ker_vocab=labels";
    ``where``: StepRunner's ``device`` and ``precision``."""
    torch.manual_seed(seed)
    method, _, options = name.partition(":")
    cls = METHODS.get(method)
    config = cls.config_type(**parse_assignments(cls.config_type, [o for o in options.split(":") if o]))
    return StepRunner(name, cls(build_backbone(BackboneConfig(backbone)), config), train, batch_size, 50.0, captions, seed, **where)


def step_flops(runner: StepRunner) -> float:
    """Floating-point operations of one training step's loss and backward on the runner's first
    batch: matrix products, convolutions and attention (the CPU attention kernel counted with
    torch's SDPA formulas, which its flop counter does not map); elementwise work is not counted."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    cpu_attention = {  # called with the operator's arguments as shapes
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *_, out_shape=None, **__: sdpa_backward_flop_count(grad, q, k, v),
    }
    batch = runner.batch(0)
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        runner.method.training_loss(batch).loss.backward()
    runner.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()
