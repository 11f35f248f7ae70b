"""The training step the speed benchmarks time: one method with its optimiser, stepping through
shuffled batches as the trainer does (the method's loss, fused AdamW, gradient clipping, fp32 on
the CPU). Shared by ebaker_speed.py and pmpguard_speed.py."""

from __future__ import annotations

import time

import numpy as np
import torch

from rsnc_bench.engine.batches import Preprocess, make_batch, split_tensors, train_batches
from rsnc_bench.engine.optim import param_groups
from rsnc_bench.engine.signals import RowSignals, record_signals
from rsnc_bench.engine.trainer import adamw
from rsnc_bench.methods import EpochContext, Method


class StepRunner:
    """``method`` trained on ``train`` (a Split) at ``batch_size``; ``captions``: the train captions its first epoch sees."""

    def __init__(self, name: str, method: Method, train, batch_size: int, grad_clip: float,
                 captions: list[str] | None = None, seed: int = 0):
        self.name, self.method, self.grad_clip = name, method, grad_clip
        self.train = split_tensors(train, method.backbone, None, native=True)
        self.optimizer = adamw(param_groups(method, 0.1, method.param_groups()), 1e-5)
        method.train()
        plain = Preprocess(method.backbone, augment=False)
        batch_of = lambda rows: make_batch(self.train, torch.as_tensor(rows), self.train.img_of[torch.as_tensor(rows)], plain, torch.device("cpu"))  # noqa: E731
        method.start_epoch(EpochContext(1, 1, self.train.n_rows, self.train.n_rows // batch_size, torch.device("cpu"),
                                        captions or (), getattr(method.backbone, "tokenizer", None), batch_of=batch_of))
        self.preprocess = Preprocess(method.backbone, augment=True, generator=torch.Generator().manual_seed(seed + 1))
        self.batches = list(train_batches(self.train, np.arange(self.train.n_rows), batch_size, torch.Generator().manual_seed(seed)))
        self.batch_size, self.next = batch_size, 0
        self.signals = RowSignals(n_rows=self.train.n_rows)
        self.times = {"data": 0.0, "model": 0.0, "bookkeeping": 0.0}  # seconds, summed over the steps taken

    def batch(self, index: int):
        rows, image_ids = self.batches[index % len(self.batches)]
        batch = make_batch(self.train, rows, image_ids, self.preprocess, torch.device("cpu"))
        batch.lr = 1e-5  # the optimiser's
        return batch

    def step(self) -> None:
        """One step as the trainer takes it: the batch (data), the loss, backward, clipping and the
        optimiser (model), the per-row signals and the logged numbers (bookkeeping), each timed."""
        self.next += 1
        started = time.perf_counter()
        batch = self.batch(self.next - 1)
        data = time.perf_counter()
        out = self.method.training_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.grad_clip)
        self.optimizer.step()
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
