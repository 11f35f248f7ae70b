"""The training loop every method shares: AdamW, cosine warm-up, clipping, AMP, clean-val
selection and per-epoch checkpoints that let an interrupted cell resume (methods.md 2.8-2.9,
protocol.md 6)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from rsnc_bench.engine import distributed
from rsnc_bench.engine.batches import IMAGE_STORAGE, Preprocess, SplitTensors, TrainData, to_batch
from rsnc_bench.engine.embedding_cache import EmbeddingCache
from rsnc_bench.engine.evaluate import evaluate, own_metrics
from rsnc_bench.engine.optim import adamw, cosine_with_warmup, param_groups, set_lr
from rsnc_bench.engine.prefetch import prefetched
from rsnc_bench.engine.signals import PairScores, RowSignals, pair_scores, record_signals
from rsnc_bench.errors import ConfigError, RsncError
from rsnc_bench.methods import EpochContext, Method
from rsnc_bench.paths import atomic_write
from rsnc_bench.progress import bar

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """Harness defaults follow the shared CLIP pipeline (methods.md 2.8-2.9, RRSITR's values in
    3.9); a method's ``train_defaults`` and the user's overrides are applied on top."""

    epochs: int = 50
    batch_size: int = 100
    lr: float = 7e-6
    warmup_steps: int = 200
    weight_decay: float = 0.7
    grad_clip: float = 50.0
    adam_beta2: float = 0.999  # AdamW's second-moment decay (torch's default; CLIP's recipe, NPC and OSA use 0.98)
    adam_eps: float = 1e-8  # AdamW's epsilon (CLIP's recipe, NPC and OSA: 1e-6)
    precision: str = "auto"  # auto: fp16 autocast + GradScaler on CUDA (the reference code's AMP), fp32 on CPU
    device: str = "auto"  # auto: cuda when available
    augment: bool = True  # RandomResizedCrop 0.9-1.0, no flip (methods.md 2.6)
    eval_chunk: int = 1024
    keep_checkpoints: bool = False  # keep best.pt after the cell completes
    checkpoint_seconds: float = 30.0  # write the resume checkpoint after an epoch once this long has passed since the last (0: every epoch)
    step_checkpoint_seconds: float = 600.0  # and within an epoch, after a step, once this long has passed (inf: only after epochs)
    images: str = "auto"  # memory | disk | auto: hold decoded splits in memory, or read them from the memory-mapped image cache
    prefetch: int = 2  # batches a background worker builds ahead of the training step (0: built inline)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train option precision={self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.epochs < 0 or self.batch_size < 2:
            raise ConfigError("train options need epochs >= 0 and batch_size >= 2")
        if self.images not in IMAGE_STORAGE:
            raise ConfigError(f"train option images={self.images!r}; choose one of {', '.join(IMAGE_STORAGE)}")
        if self.prefetch < 0:
            raise ConfigError(f"train option prefetch={self.prefetch}; give 0 (build batches inline) or more, e.g. prefetch=2")
        if not 0.0 < self.adam_beta2 < 1.0:
            raise ConfigError(f"train option adam_beta2={self.adam_beta2}; give a number in (0, 1), e.g. adam_beta2=0.98")
        if not self.step_checkpoint_seconds >= 0:  # inf allowed: never within an epoch
            raise ConfigError(f"train option step_checkpoint_seconds={self.step_checkpoint_seconds}; give seconds >= 0, or inf")
        for name, low, strict in _RANGES:
            value = getattr(self, name)
            if not math.isfinite(value) or value < low or (strict and value == low):
                raise ConfigError(f"train option {name}={value}; give a number {'>' if strict else '>='} {low:g}, e.g. "
                                  f"{name}={getattr(TrainConfig, name):g}")


# (field, lower bound, bound excluded): a NaN learning rate trained nothing, and eval_chunk=0 failed only after training
_RANGES = (("lr", 0.0, True), ("warmup_steps", 0, False), ("weight_decay", 0.0, False), ("grad_clip", 0.0, True),
           ("adam_eps", 0.0, True), ("eval_chunk", 1, False), ("checkpoint_seconds", 0.0, False))


def plain_data(value):
    """``value`` with numpy scalars and arrays turned into Python numbers and tensors, so that
    ``torch.load(weights_only=True)`` reads it back (it accepts tensors and plain containers only)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value] if isinstance(value, list) else tuple(plain_data(v) for v in value)
    return value


def _mean_logs(logs: list[dict[str, float]]) -> dict[str, float]:
    """Each key a method logged, averaged over the steps that logged it."""
    keys = dict.fromkeys(k for step in logs for k in step)
    return {k: float(np.mean([step[k] for step in logs if k in step])) for k in keys}


def _scores_from_plain(saved: dict | None) -> PairScores | None:
    """The selected epoch's ``PairScores`` back from ``best.pt`` (saved as tensors by ``plain_data``)."""
    if saved is None:
        return None
    array = lambda t: None if t is None else np.asarray(t.cpu() if torch.is_tensor(t) else t)  # noqa: E731
    return PairScores(array(saved["clean_score"]), array(saved.get("flagged_noisy")),
                      {name: array(values) for name, values in (saved.get("others") or {}).items()})


class Diverged(RsncError):
    """The loss became NaN or inf."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str) -> tuple[Callable, str]:
    """(autocast context factory, the precision actually used)."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext, "fp32"
    if precision == "auto":
        precision = "fp16"  # the papers' AMP: fp16 autocast with a GradScaler; bf16 is an option
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, device_type="cuda", dtype=dtype), precision


@dataclass
class TrainOutcome:
    history: list[dict]
    selected_epoch: int
    train_seconds: float
    samples: int
    precision: str


class Trainer:
    """Fits one method on one (noisy) train split, selecting the epoch by clean-val mR.

    Method state outside parameters and buffers (self-paced bookkeeping) is saved through
    ``nn.Module.get_extra_state`` / ``set_extra_state``, as part of the state dict.
    ``ckpt_dir`` holds ``last.pt`` (everything needed to resume) and ``best.pt`` (the selected
    weights), written together after an epoch once ``checkpoint_seconds`` have passed since the
    last write; the selected weights are also kept in memory. ``fingerprint`` identifies the cell:
    a ``last.pt`` from another config is ignored.
    The clean-ness signals the losses hand back (``LossOutput.clean`` ...) are kept per train
    row in ``signals``, saved with the weights, and given to ``on_epoch(scores, entry)``, which
    lets the caller add per-epoch records (detection metrics). ``captions`` (the train rows') and
    the backbone's tokenizer reach the method through ``EpochContext``. ``embeddings`` lets a method
    that does not train reuse its encoded val split across cells.
    """

    def __init__(self, method: Method, config: TrainConfig, train: TrainData, rows: np.ndarray, val: SplitTensors,
                 seed: int, ckpt_dir: Path, fingerprint: str, on_epoch: Callable[[PairScores | None, dict], None] | None = None,
                 captions: Sequence[str] = (), embeddings: EmbeddingCache | None = None):
        self.method, self.config, self.train, self.rows, self.val = method, config, train, rows, val
        self.embeddings = embeddings
        self.seed, self.ckpt_dir, self.fingerprint, self.captions = seed, Path(ckpt_dir), fingerprint, captions
        self.on_epoch = on_epoch or (lambda scores, entry: None)
        self.signals = RowSignals()
        self._plain = Preprocess(method.backbone, augment=False)  # for EpochContext.batch_of
        self.device = resolve_device(config.device)
        self.autocast, self.precision = autocast_for(self.device, config.precision)
        self.method.to(self.device)
        self._best: dict | None = None  # the selected epoch's state dict, in memory
        self._best_scores: PairScores | None = None  # and its per-row clean-ness scores

    # --- public -------------------------------------------------------------------------
    def fit(self) -> TrainOutcome:
        cfg = self.config
        if not self.method.capabilities.trains or cfg.epochs == 0:
            return self._evaluate_only()
        steps = self.train.steps(self.rows, cfg.batch_size)
        if steps == 0:
            raise ConfigError(f"{len(self.rows)} train rows make no full batch of {cfg.batch_size}; lower batch_size")
        groups = param_groups(self.method, cfg.weight_decay, self.method.param_groups())
        optimizer = adamw(groups, cfg.lr, cfg.adam_beta2, cfg.adam_eps)
        scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        order_gen = torch.Generator().manual_seed(self.seed)
        augment_gen = torch.Generator().manual_seed(self.seed + 1)
        state = {"epoch": 0, "step": 0, "history": [], "best_epoch": 0, "best_mr": -math.inf, "train_seconds": 0.0, "samples": 0}
        self.signals.ensure(self.train.n_rows)  # one entry per manifest row, seen or not
        state = self._resume(state, optimizer, scaler, order_gen, augment_gen)
        self._best_unsaved, self._saved_at = False, time.perf_counter()
        preprocess = Preprocess(self.method.backbone, augment=cfg.augment, generator=augment_gen)
        total = steps * cfg.epochs
        epochs = bar(range(state["epoch"] + 1, cfg.epochs + 1), desc="epochs", unit="ep", leave=False, initial=state["epoch"], total=cfg.epochs)
        for epoch in epochs:
            # this epoch's progress: resumed from a checkpoint written within it, else from its start
            progress = state.pop("partial", None) or {"steps": 0, "losses": [], "logs": [], "waited": 0.0, "seconds": 0.0, "position": None}
            at_start = order_gen.get_state(), augment_gen.get_state()  # a checkpoint within the epoch replays it from here
            self.method.train()
            self.method.start_epoch(EpochContext(epoch, cfg.epochs, len(self.rows), steps, self.device, self.captions,
                                                 getattr(self.method.backbone, "tokenizer", None), self.signals,
                                                 self._batch_of if self.train.random_access else None, progress["steps"]))
            preprocess.skip(progress["steps"], cfg.batch_size)  # the crops of the steps taken before the interruption
            raws = self.train.epoch_batches(self.rows, cfg.batch_size, order_gen, progress["position"])
            built = ((raw.position, to_batch(raw, preprocess, self.device)) for raw in raws)
            save_within = lambda: self._checkpoint({**state, "partial": progress}, optimizer, scaler, at_start)  # noqa: E731
            with contextlib.closing(prefetched(built, cfg.prefetch)) as stream:
                lr = self._train_epoch(stream, epoch, steps, total, state, optimizer, scaler, progress, save_within)
            state["train_seconds"] += progress["seconds"]
            state["samples"] += steps * cfg.batch_size
            val = self._validate()
            scores = pair_scores(self.signals)
            entry = {"epoch": epoch, "loss": float(np.mean(progress["losses"])), "lr": lr, "seconds": progress["seconds"],
                     "data_seconds": progress["waited"], "val": val.as_dict(), "logs": _mean_logs(progress["logs"])}
            self.on_epoch(scores, entry)
            state["history"].append(entry)
            if val.mr > state["best_mr"]:
                state["best_mr"], state["best_epoch"] = val.mr, epoch
                self._best, self._best_unsaved = copy.deepcopy(self.method.state_dict()), True
                self._best_scores = scores
            state["epoch"] = epoch
            self._agree_across_ranks()
            epochs.set_postfix(loss=f"{entry['loss']:.3f}", val_mR=f"{val.mr:.2f}")
            if epoch < cfg.epochs and time.perf_counter() - self._saved_at >= cfg.checkpoint_seconds:
                self._checkpoint(state, optimizer, scaler, (order_gen.get_state(), augment_gen.get_state()))
        if cfg.keep_checkpoints and self._best_unsaved:
            self._save_best(state["best_epoch"])
        return TrainOutcome(state["history"], state["best_epoch"], state["train_seconds"], state["samples"], self.precision)

    def load_selected(self) -> None:
        """Put the best-val weights back into the method (after ``fit``)."""
        if self._best is not None:
            self.method.load_state_dict(self._best)
            return
        path = self.ckpt_dir / "best.pt"
        if path.exists():
            saved = self._load(path)
            if saved is None:
                raise RsncError(f"{path}: the selected epoch's weights are unreadable or from another run; rerun the cell with --force")
            self.method.load_state_dict(saved["model"])
            self._best_scores = _scores_from_plain(saved.get("scores"))

    def selected_scores(self) -> PairScores | None:
        """The per-row clean-ness scores at the end of the selected epoch (after ``fit``, and
        ``load_selected`` when that epoch came before an interruption), beside whose detection
        metrics they are reported."""
        return self._best_scores

    def clear_resume_state(self) -> None:
        if not distributed.is_main():
            return
        (self.ckpt_dir / "last.pt").unlink(missing_ok=True)
        if not self.config.keep_checkpoints:
            (self.ckpt_dir / "best.pt").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.ckpt_dir.rmdir()

    # --- internals ----------------------------------------------------------------------
    def _train_epoch(self, stream, epoch: int, steps: int, total: int, state: dict, optimizer, scaler, progress: dict,
                     save_within: Callable[[], None]) -> float:
        """The epoch's remaining steps over the (resume position, batch) pairs of ``stream``, kept in
        ``progress`` (steps, losses, logs, seconds, seconds waiting for batches, the data's position),
        with a checkpoint within the epoch (``save_within``) once ``step_checkpoint_seconds`` have
        passed since the last; returns the last step's lr."""
        cfg, lr = self.config, 0.0
        started, before = time.perf_counter(), progress["seconds"]
        batches = iter(bar(stream, desc=f"epoch {epoch}", total=steps, initial=progress["steps"], unit="batch", leave=False))
        while True:
            asked = time.perf_counter()
            item = next(batches, None)
            progress["waited"] += time.perf_counter() - asked
            if item is None:
                progress["seconds"] = before + time.perf_counter() - started
                return lr
            position, batch = item
            lr = batch.lr = set_lr(optimizer, cfg.lr, cosine_with_warmup(state["step"], total, cfg.warmup_steps))
            with self.autocast():
                out = self.method.training_loss(batch)
            if not torch.isfinite(out.loss):
                raise Diverged(f"the loss became {out.loss.item()} at epoch {epoch}, step {state['step'] + 1}; lower lr or use precision=fp32")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out.loss).backward()
            distributed.average_gradients(p.grad for p in self.method.parameters())  # data-parallel: the global batch's gradient
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            record_signals(self.signals, batch.rows, out)
            progress["losses"].append(out.loss.item())
            progress["logs"].append(out.logs)
            progress["steps"] += 1
            progress["position"] = position
            state["step"] += 1
            if progress["steps"] < steps and time.perf_counter() - self._saved_at >= cfg.step_checkpoint_seconds:
                progress["seconds"] = before + time.perf_counter() - started
                save_within()

    def _batch_of(self, rows: torch.Tensor):
        """Train rows as a Batch, un-augmented (``EpochContext.batch_of``)."""
        return to_batch(self.train.raw_rows(rows), self._plain, self.device)

    def _agree_across_ranks(self) -> None:
        """Data-parallel ranks hold the same weights and signals after an epoch, as they apply the same
        averaged gradients and decide on the same gathered features; should a kernel's rounding ever
        make them differ, rank 0's state is taken, with a notice, rather than training on apart."""
        if not distributed.active():
            return
        state = {"model": self.method.state_dict(), "signals": self.signals.state()}
        if distributed.ranks_agree(state):
            return
        tqdm.write("data-parallel ranks hold different weights or signals after this epoch; continuing from rank 0's")
        synced = distributed.broadcast({name: plain_data(value) for name, value in state.items()})
        self.method.load_state_dict(synced["model"])
        self.signals.load(synced["signals"])

    def _validate(self):
        """Clean-val metrics of the method's own scorer (what selects the epoch)."""
        return own_metrics(evaluate(self.method, self.val, self.device, self.config.eval_chunk, self.method.scorers()[:1], self.embeddings))

    def _evaluate_only(self) -> TrainOutcome:
        val = self._validate()
        entry = {"epoch": 0, "loss": None, "lr": 0.0, "seconds": 0.0, "val": val.as_dict()}
        self.on_epoch(None, entry)
        return TrainOutcome([entry], 0, 0.0, 0, self.precision)

    def _checkpoint(self, state: dict, optimizer, scaler, generators: tuple) -> None:
        """Write ``last.pt`` (everything a resumed run needs; ``generators``: the order and crop
        generators' states to resume with), after ``best.pt`` when the best epoch is not on disk yet."""
        if self._best_unsaved:  # before last.pt: a resumed run must find the best its state names
            self._save_best(state["best_epoch"])
        self._save("last.pt", {
            "fingerprint": self.fingerprint, "state": state, "model": self.method.state_dict(), "signals": self.signals.state(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "order_gen": generators[0], "augment_gen": generators[1],
            "torch_rng": torch.get_rng_state(),
        })
        self._best_unsaved, self._saved_at = False, time.perf_counter()

    def _save_best(self, epoch: int) -> None:
        self._save("best.pt", {"fingerprint": self.fingerprint, "epoch": epoch, "model": self._best,
                               "scores": None if self._best_scores is None else dataclasses.asdict(self._best_scores)})

    def _save(self, name: str, payload: dict) -> None:
        if not distributed.is_main():  # rank 0 writes what every rank resumes from
            return
        atomic_write(self.ckpt_dir / name, lambda fh: torch.save(plain_data(payload), fh))

    def _load(self, path: Path) -> dict | None:
        """A checkpoint this cell wrote, or None (with a notice). Loaded with ``weights_only``, so a
        file planted in a results folder cannot run code; then checked against the fingerprint."""
        try:
            saved = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as error:  # noqa: BLE001 (unsafe pickles, truncated files: never trusted)
            tqdm.write(f"ignoring {path}: not a checkpoint rsnc-bench wrote ({type(error).__name__}); nothing in it was run")
            return None
        if not isinstance(saved, dict) or saved.get("fingerprint") != self.fingerprint:
            tqdm.write(f"ignoring {path}: it belongs to another configuration of this cell")
            return None
        return saved

    def _resume(self, state, optimizer, scaler, order_gen, augment_gen) -> dict:
        path = self.ckpt_dir / "last.pt"
        if not path.exists():
            return state
        saved = self._load(path)
        if saved is None:
            return state
        self.method.load_state_dict(saved["model"])
        self.signals.load(saved.get("signals") or {})
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        order_gen.set_state(saved["order_gen"])
        augment_gen.set_state(saved["augment_gen"])
        if "torch_rng" in saved:  # a method's draws from torch's generator continue where they were
            torch.set_rng_state(saved["torch_rng"].cpu())
        partial = saved["state"].get("partial")
        within = f", step {partial['steps']} of epoch {saved['state']['epoch'] + 1}" if partial else ""
        tqdm.write(f"resuming from epoch {saved['state']['epoch']}{within} ({path})")
        return saved["state"]
