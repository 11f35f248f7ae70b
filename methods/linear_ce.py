"""A fused linear layer + cross-entropy for large vocabularies (KER's 49,408-way MLM head):
``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)`` with the [n, V] logits, their
softmax and their gradient in one buffer, reused between steps on the CPU. The same math, equal
up to float rounding (tests/test_keywords.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LogitWorkspace:
    """One reusable [rows, vocab] buffer for ``vocab_cross_entropy`` on the CPU, where a fresh
    100+ MB tensor each step costs as much in page faults as the softmax over it. A forward takes
    the buffer (or allocates one when it is out or too small); the backward gives it back. A second
    backward through the same graph (``retain_graph``) is refused once a later forward has taken it."""

    def __init__(self):
        self.free: torch.Tensor | None = None
        self.takes = 0

    def take(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        self.takes += 1
        buf, self.free = self.free, None
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(rows + rows // 4 + 1, cols, dtype=dtype, device=device)  # room for the next batches' counts
        return buf

    def give_back(self, buf: torch.Tensor) -> int:
        self.free = buf
        return self.takes

    def __deepcopy__(self, memo):
        return LogitWorkspace()


UNDERFLOW = 1e-30  # a target probability below this has its loss recomputed from the logits (fp32 tiny is 1.2e-38)


class _VocabCrossEntropy(torch.autograd.Function):
    """mean_i CE(W h_i + b, y_i) over a large vocabulary, with the gradient's products laid out for
    the CPU (``vocab_cross_entropy``). One [n, V] buffer holds the logits, then (in place) their
    softmax, then the logits' gradient softmax - onehot; the backward multiplies it into the three
    products the loss needs: G W (hidden), G^T h (weight) and 1^T G (bias).

    The layouts, each the faster one measured at KER's shape on one CPU thread ([~400, 64] rows
    against a [49,408, 64] weight): the bias enters the logits through ``addmm`` (no [V, D + 1]
    copy of the weight with a bias column every step); the weight's gradient is G^T h, written
    straight in the weight's [V, D] layout (not h^T G, a [D, V] product that then needs a
    transposed copy); the bias gradient is one vector-matrix product over G, not a column sum.
    The logits are computed in ``dtype`` (the autocast dtype under AMP, as ``nn.Linear`` would)
    and the softmax in fp32, as ``F.cross_entropy(logits.float(), labels)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, dtype, workspace, needs_grad):
        device = hidden.device
        with torch.autocast(device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            n, vocab = len(h), len(w)
            in_place = device.type == "cpu" and dtype == torch.float32 and workspace is not None
            buffer = workspace.take(n, vocab, dtype, device) if in_place else None
            if in_place:
                logits = buffer[:n]
                if b is None:
                    torch.mm(h, w.t(), out=logits)
                else:
                    torch.addmm(b, h, w.t(), out=logits)
                probs = torch._softmax(logits, 1, False, out=logits)
            else:
                probs = torch.softmax(F.linear(h, w, b), dim=1, dtype=torch.float32)
            rows = torch.arange(n, device=device)
            target = probs[rows, labels]
            loss = -torch.log(target)
            small = target < UNDERFLOW  # -log would lose the value: those rows' loss from their logits
            if bool(small.any()):
                z = F.linear(h[small], w, b).float()
                loss[small] = torch.logsumexp(z, dim=1) - z[torch.arange(len(z), device=device), labels[small]]
            loss = loss.mean()
        ctx.dtype, ctx.has_bias, ctx.workspace, ctx.buffer, ctx.stamp = dtype, b is not None, workspace if in_place else None, buffer, None
        if needs_grad:
            probs[rows, labels] -= 1.0  # d(loss) / d(logits) = (softmax - onehot) / n
            ctx.save_for_backward(h, w, probs)
        elif in_place:
            workspace.give_back(buffer)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.stamp is not None and ctx.workspace.takes != ctx.stamp:
            raise RuntimeError("vocab_cross_entropy: a second backward through this graph after a later forward reused its buffer")
        h, w, g = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = len(h)
        scale = grad_loss.float() / n
        grad_h = grad_w = grad_b = None
        if g.dtype == ctx.dtype:  # fp32: the scale goes on the small operands, G is only read (a retained graph can run again)
            scale = scale.to(g.dtype)
            if need_h:
                grad_h = (g @ w).mul_(scale)
            if need_w:
                grad_w = g.t() @ (h * scale)
            if need_b and ctx.has_bias:
                grad_b = torch.mv(g.t(), scale.expand(n).contiguous())
        else:  # the fp32 gradient in the logits' dtype, as autograd would cast it
            g = (g * scale).to(ctx.dtype)
            grad_h = g @ w if need_h else None
            grad_w = g.t() @ h if need_w else None
            grad_b = g.sum(0) if need_b and ctx.has_bias else None
        if ctx.buffer is not None:
            ctx.stamp, ctx.buffer = ctx.workspace.give_back(ctx.buffer), None
        return grad_h, grad_w, grad_b, None, None, None, None


def vocab_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                        workspace: LogitWorkspace | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)`` (mean over the n rows of
    ``hidden`` [n, D]) fused, the [n, V] logits, softmax and gradient in one buffer (reused from
    step to step on the CPU when ``workspace`` is given); see ``_VocabCrossEntropy``. The same
    math, equal up to float rounding (tested against that expression)."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _VocabCrossEntropy.apply(hidden, weight, bias, labels, dtype, workspace, needs_grad)
