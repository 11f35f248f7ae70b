"""A fused linear layer + cross-entropy for large vocabularies (KER's 49,408-way MLM head):
``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)`` with the [n, V] logits, their
softmax and their gradient in one buffer, reused between steps on the CPU. The same math, equal
up to float rounding (tests/test_keywords.py)."""

from __future__ import annotations

import torch


class LogitWorkspace:
    """One reusable [rows, vocab] buffer for ``linear_cross_entropy`` on the CPU, where a fresh
    100+ MB tensor each step costs as much in page faults as the softmax over it. A forward takes
    the buffer (or allocates one when it is out or too small); the backward gives it back. A second
    backward through the same graph (``retain_graph``) is refused once a later forward has taken it."""

    def __init__(self):
        self.free: torch.Tensor | None = None
        self.takes = 0
        self.weight_bias: torch.Tensor | None = None  # [vocab, D + 1], rewritten by every forward

    def with_bias_column(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """[weight | bias] in a kept buffer (used within one forward only)."""
        shape = (weight.shape[0], weight.shape[1] + 1)
        buf = self.weight_bias
        if buf is None or buf.shape != shape or buf.dtype != weight.dtype or buf.device != weight.device:
            buf = self.weight_bias = torch.empty(shape, dtype=weight.dtype, device=weight.device)
        return torch.cat([weight, bias.unsqueeze(1)], dim=1, out=buf)

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


class _LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(hidden_i W^T + b, label_i), fused: one [n, V] buffer holds the logits, then (in
    place, on the CPU) their softmax, then the logits' gradient softmax - onehot, which the backward
    multiplies into the two matrix products. No log-softmax tensor, no zero-filled NLL gradient, no
    softmax backward pass. The logits are computed in ``dtype`` (the autocast dtype under AMP, as
    ``nn.Linear`` would) and the softmax in fp32, as ``F.cross_entropy(logits.float(), labels)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, dtype, workspace, needs_grad):
        device = hidden.device
        with torch.autocast(device.type, enabled=False):
            h = h1 = hidden.to(dtype)
            w = w1 = weight.to(dtype)
            in_place = device.type == "cpu" and dtype == torch.float32 and workspace is not None
            if bias is not None:  # the bias as an extra input column: one matrix product, no broadcast copy
                h1 = torch.cat([h, h.new_ones(len(h), 1)], dim=1)
                w1 = workspace.with_bias_column(w, bias.to(dtype)) if in_place else torch.cat([w, bias.to(dtype).unsqueeze(1)], dim=1)
            n, vocab = len(h), len(w)
            buffer = workspace.take(n, vocab, dtype, device) if in_place else None
            logits = torch.mm(h1, w1.t(), out=buffer[:n]) if in_place else torch.mm(h1, w1.t())
            if in_place:
                probs = torch._softmax(logits, 1, False, out=logits)
            else:
                probs = torch.softmax(logits, dim=1, dtype=torch.float32)
            rows = torch.arange(n, device=device)
            target = probs[rows, labels]
            loss = -torch.log(target)
            small = target < UNDERFLOW  # -log would lose the value: recompute those rows' logits
            if bool(small.any()):
                z = (h1[small] @ w1.t()).float()
                loss[small] = torch.logsumexp(z, dim=1) - z[torch.arange(len(z), device=device), labels[small]]
            loss = loss.mean()
        ctx.dtype, ctx.has_bias, ctx.workspace, ctx.buffer, ctx.stamp = dtype, bias is not None, workspace if in_place else None, buffer, None
        if needs_grad:
            probs[rows, labels] -= 1.0  # d(loss) / d(logits) = (softmax - onehot) / n
            ctx.save_for_backward(h1, w, probs)
        elif in_place:
            workspace.give_back(buffer)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.stamp is not None and ctx.workspace.takes != ctx.stamp:
            raise RuntimeError("linear_cross_entropy: a second backward through this graph after a later forward reused its buffer")
        h1, w, g = ctx.saved_tensors
        n, dim = len(h1), w.shape[1]
        scale = grad_loss.float() / n
        if g.dtype == ctx.dtype:  # fp32: scale the small operands, not the [n, V] gradient
            grad_h, grad_w1 = (g @ w) * scale.to(g.dtype), (h1 * scale.to(h1.dtype)).t() @ g
        else:  # the fp32 gradient in the logits' dtype, as autograd would cast it
            g = (g * scale).to(ctx.dtype)
            grad_h, grad_w1 = g @ w, h1.t() @ g
        if ctx.buffer is not None:
            ctx.stamp, ctx.buffer = ctx.workspace.give_back(ctx.buffer), None
        # grad_w1 is [D (+1), V]: h1^T G runs faster than G^T h1 with G row-major [n, V]
        grad_bias = grad_w1[dim] if ctx.has_bias else None
        return grad_h, grad_w1[:dim].t().contiguous(), grad_bias, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                         workspace: LogitWorkspace | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)`` (mean over the n rows of
    ``hidden`` [n, D]), fused so the [n, V] logits are one buffer (see ``_LinearCrossEntropy``); the
    same math, equal up to float rounding (tested against that expression)."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, dtype, workspace, needs_grad)
