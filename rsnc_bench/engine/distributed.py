"""One cell data-parallel over the processes ``torchrun`` starts (``torchrun --nproc-per-node N -m
rsnc_bench run ...``).

Every rank builds the same global batch (the same seeded order and crops), and the encoders are
sharded: each rank encodes its contiguous share of the rows, and the features are gathered with
their gradients (open_clip's ``gather_with_grad`` without ``local_loss``), so that every rank
computes the method's loss, per-row clean-ness signals and state updates (RRSITR's self-paced
split, EBA's similarity bank, PMPGuard's boundary) on the whole batch, identically. After each
backward the gradients are averaged over the ranks; as every rank's loss is the same global loss,
the gather's backward sums its gradient over the ranks, and the average is the single-process
gradient of the global batch. A method needs no change unless it runs a backward of its own (NPC's
siamese step): it calls ``average_gradients`` on what that backward gives.

Rank 0 alone writes (results, checkpoints, manifests, caches); every rank reads the checkpoints to
resume. Without a process group (any plain run) every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist

from rsnc_bench.backbones.base import DualEncoder, Features
from rsnc_bench.errors import ConfigError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start_from_env(device: str = "auto") -> str | None:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``PORT``): NCCL with one GPU per local rank, gloo on CPUs. Returns this rank's
    device (None when not launched by torchrun)."""
    if not launched_by_torchrun():
        return None
    if not active():
        cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    if device not in ("auto", "cpu"):
        raise ConfigError(f"--device {device} with torchrun: each rank takes its own GPU (cuda:LOCAL_RANK); use --device auto, cuda or cpu")
    return "cpu"


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """The block on rank 0, then on the other ranks (what rank 0 builds, they find built)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if not active():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- sharded encoders ----------------------------------------------------------------------------


class _GatherRows(torch.autograd.Function):
    """[n_local, ...] -> the ranks' rows stacked. Backward: the gathered gradient summed over the
    ranks (each computes the same loss), this rank's rows of it."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        ctx.rows = len(local)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start: start + ctx.rows]


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's ``local`` stacked in rank order (same shape on every rank), with gradients."""
    if torch.is_grad_enabled() and local.requires_grad:
        return _GatherRows.apply(local)
    sent = local.to(torch.uint8) if local.dtype == torch.bool else local.contiguous()  # gloo has no bool
    parts = [torch.empty_like(sent) for _ in range(world_size())]
    dist.all_gather(parts, sent)
    return torch.cat(parts).to(local.dtype)


def share(n: int) -> tuple[int, int, int]:
    """(start, stop, per) of this rank's contiguous share of ``n`` rows; ``per`` is every rank's
    padded share, ceil(n / world)."""
    per = -(-n // world_size())
    start = min(n, rank() * per)
    return start, min(n, start + per), per


def _sharded(encode):
    """``encode(x, tokens)`` computed on this rank's rows of ``x`` and gathered: the same Features
    as the whole batch encoded in one process. A share short of ``per`` rows (the last ranks when
    the rows do not divide) is padded with copies of row 0, dropped after the gather."""

    def encode_shared(x: torch.Tensor, tokens: bool = False) -> Features:
        n = len(x)
        start, stop, per = share(n)
        local = x[start:stop]
        if stop - start < per:
            local = torch.cat([local, x[:1].expand(per - (stop - start), *x.shape[1:])])
        features = encode(local, tokens=tokens)
        gathered = {name: None if value is None else gather_rows(value)[:n] for name, value in vars(features).items()}
        return type(features)(**gathered)

    return encode_shared


@contextlib.contextmanager
def sharded_encoders(module: torch.nn.Module):
    """Within the block, every ``DualEncoder`` of ``module`` (the backbone, and those a method holds
    outside its modules: NPC's siamese copy, OSA's estimator) encodes its share of the rows on each
    rank and gathers the rest."""
    if not active():
        yield
        return
    held = [m for value in vars(module).values() if isinstance(value, torch.nn.Module) for m in value.modules()]  # held outside the module
    encoders = list({id(m): m for m in [*module.modules(), *held] if isinstance(m, DualEncoder)}.values())
    for encoder in encoders:
        encoder.encode_image = _sharded(encoder.encode_image)
        encoder.encode_text = _sharded(encoder.encode_text)
    try:
        yield
    finally:
        for encoder in encoders:
            del encoder.encode_image, encoder.encode_text  # the class's methods again


# --- gradients and state ------------------------------------------------------------------------


def average_gradients(tensors: Iterable[torch.Tensor | None]) -> None:
    """Average gradients over the ranks, in place, in one all-reduce. ``tensors`` are gradients
    (None skipped: every rank skips the same, as every rank runs the same code on the same batch)."""
    if not active():
        return
    grads = [g for g in tensors if g is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, part in zip(grads, torch.split(flat, [g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def _checksum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Two float64 numbers that differ when any value differs (sum and sum of squares)."""
    total = torch.zeros(2, dtype=torch.float64)
    for t in tensors:
        t = torch.nan_to_num(t.detach().double().cpu(), nan=0.5, posinf=1.5, neginf=-1.5)  # unseen rows' signals are NaN
        total += torch.stack([t.sum(), (t * t).sum()])
    return total


def ranks_agree(state: dict[str, Any]) -> bool:
    """Whether every rank holds the same ``state`` (tensors nested in dicts and lists), by checksum."""
    if not active():
        return True
    mine = _checksum(_tensors(state))
    parts = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(parts, mine)
    return all(torch.equal(p, parts[0]) for p in parts)


def _tensors(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, np.ndarray):
        return [torch.from_numpy(value)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []
