"""NPC, Negative Pre-aware Cross-modal matching (Zhang, Li, Ye; AAAI 2024; ZhangXu0963/NPC@823d781),
on the harness (methods-npc-osa.md section 2).

Before training, a memory bank is built once from the initial model (section 2.4): per-row InfoNCE
losses in row order, a two-component Gaussian mixture on them, the "strict clean set" of rows
whose lower-component posterior exceeds 0.9, and for every image and every row its nearest clean
row (by image and by caption embedding). Each step (section 2.2):

1. the memory batches P^I (each row's image entry) and P^T (its text entry) are scored with the
   base model A: L_0, and, in the paper's objective, L_MB with gradient;
2. a siamese copy A' <- A takes one AdamW step on the batch (its own optimiser, whose moments
   persist across steps, section 2.5);
3. the memory batches are scored again with A': L_1 (no gradient);
4. r_i = 1/2 (L^I_0 / L^I_1 + L^T_0 / L^T_1); w_i = tanh(r_i) where r_i < 1, else 1;
5. the base loss: ``objective="paper"`` (default, the paper's intent): mean_i w_i l_i + L_MB;
   ``code_faithful=true``: the released code's mean(L_0) (no gradient) + mean(w) x mean(l)
   (``main_NPC.py:183-184``).

l_i is the symmetric per-pair InfoNCE under CLIP's learnable logit scale. Memory losses and r
are computed in fp32.

Work per step: the numbers of the steps above taken literally, to fp32 rounding (tested against
that computation), with less work:
- each distinct memory row is built once;
- when the backbone's forward is a function of each sample alone (no batch norm, no random
  draws), each distinct memory image and caption is encoded once per model: P^I's and P^T's
  losses are gathered from one forward, the same one under A (L_0) and A' (L_1), so r is exactly
  1 when A' = A;
- where, in addition, no autocast is active, A' = A when A''s gradient is taken, so it comes
  from A's own graph of the batch instead of a forward of A'; and the code's base gradient,
  mean(w) x the plain gradient, is mean(w) / 2 x A''s, handed to the trainer's backward
  without a second pass through the batch;
- A''s AdamW is fused where torch has it.

The Gaussian mixture is this module's own EM (sklearn is not a dependency):
``GaussianMixture(2, max_iter=100, tol=1e-2, reg_covar=5e-4)`` of ``get_memorybank.py:51``,
started at the quartiles instead of k-means (deterministic; the reference sets no seed).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rsnc_bench.engine import distributed
from rsnc_bench.engine.optim import adamw
from rsnc_bench.engine.retrieval import cosine
from rsnc_bench.errors import ConfigError
from rsnc_bench.methods import METHODS, REFERENCE_LOG_SCALE, Batch, EpochContext, LossOutput, Method, MethodConfig, learnable_log_scale

BATCH_STATISTICS = (torch.nn.modules.batchnorm._BatchNorm,)  # layers whose output depends on the rest of the batch in training


@dataclass(frozen=True)
class NpcConfig(MethodConfig):
    code_faithful: bool = False  # true: the released code's reduction (batch-mean weights, a gradient-free memory term)
    clean_posterior: float = 0.9  # the strict clean set: lower-component posterior above this (get_memorybank.py:59)
    bank_dot_product: bool = False  # true: the code's neighbours by dot product with un-normalised bank keys
    bank_batch_size: int = 256  # rows per batch of the bank's loss pass (the reference's loader batch is unknown, section 2.11 item 11)
    siamese_weight_decay: float = 0.2  # A''s AdamW, on every parameter as in the code (main_NPC.py:88)
    siamese_beta2: float = 0.98
    siamese_eps: float = 1e-6

    def __post_init__(self):
        if self.bank_batch_size < 2:
            raise ConfigError(f"npc option bank_batch_size={self.bank_batch_size}; give at least 2, e.g. 256")
        if not 0.0 < self.clean_posterior < 1.0:
            raise ConfigError(f"npc option clean_posterior={self.clean_posterior}; give a number in (0, 1), e.g. 0.9")


def confidence_weights(r: torch.Tensor) -> torch.Tensor:
    """w = tanh(r) where r < 1, else 1 (main_NPC.py:181-182)."""
    return torch.where(r < 1, torch.tanh(r), torch.ones_like(r))


def impact_ratio(before_image, after_image, before_text, after_text) -> torch.Tensor:
    """r = 1/2 (L^I_0 / L^I_1 + L^T_0 / L^T_1); a memory loss that falls to 0 gives r = inf (w = 1), never NaN."""
    ratio = lambda before, after: torch.where(after > 0, before / after.clamp_min(1e-30), torch.full_like(before, math.inf))  # noqa: E731
    return (ratio(before_image, after_image) + ratio(before_text, after_text)) / 2


def npc_objective(losses: torch.Tensor, weights: torch.Tensor, memory: torch.Tensor, code_faithful: bool) -> torch.Tensor:
    """The base loss from per-row batch losses l_i, weights w_i and per-row memory losses
    (L^I + L^T): the paper's mean(w l) + mean(memory), or the code's mean(memory, detached) + mean(w) mean(l)."""
    if code_faithful:
        return memory.detach().mean() + weights.mean() * losses.mean()
    return (weights * losses).mean() + memory.mean()


def pair_losses(text: torch.Tensor, image: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """l_i = 1/2 (CE_i2t(i) + CE_t2i(i)) on exp(log_scale) x cosine, in fp32 (rows = texts)."""
    logits = log_scale.float().exp() * cosine(text, image)
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")) / 2


def lower_component_posterior(x: np.ndarray, max_iter: int = 100, tol: float = 1e-2, reg_covar: float = 5e-4) -> np.ndarray:
    """Posterior of the lower-mean component of a two-component 1-D Gaussian mixture fitted by EM
    (sklearn's defaults of get_memorybank.py:51; started at the quartiles)."""
    x = np.asarray(x, dtype=np.float64)
    mean, var, prior = np.quantile(x, [0.25, 0.75]), np.full(2, x.var() + reg_covar), np.full(2, 0.5)
    previous = -math.inf

    def responsibilities():
        log_p = -0.5 * ((x[:, None] - mean) ** 2 / var + np.log(2 * math.pi * var)) + np.log(prior)
        top = log_p.max(1, keepdims=True)
        norm = top[:, 0] + np.log(np.exp(log_p - top).sum(1))
        return np.exp(log_p - norm[:, None]), norm.mean()

    for _ in range(max_iter):
        resp, bound = responsibilities()
        weight = resp.sum(0) + 10 * np.finfo(np.float64).eps
        mean = (resp * x[:, None]).sum(0) / weight
        var = (resp * (x[:, None] - mean) ** 2).sum(0) / weight + reg_covar
        prior = weight / len(x)
        if abs(bound - previous) < tol:
            break
        previous = bound
    return responsibilities()[0][:, int(np.argmin(mean))]


class GivenGradient(torch.autograd.Function):
    """0, whose gradient with respect to ``params`` is ``scale`` x ``grads`` (x the incoming
    gradient): a gradient already computed, handed to the trainer's backward without a second
    pass through the graph it came from."""

    @staticmethod
    def forward(ctx, scale: torch.Tensor, grads: tuple, *params: torch.Tensor) -> torch.Tensor:
        ctx.scale, ctx.grads = scale, grads
        return scale.new_zeros(())

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        factor = ctx.scale * upstream
        return (None, None, *(None if g is None else g * factor for g in ctx.grads))


def distinct_images(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's distinct images and, per row, its image's index among them. Rows of one image id
    share it once their pixels are checked equal; if any are not, every row keeps its own."""
    ids, image_of = torch.unique(batch.image_ids, return_inverse=True)
    order = torch.arange(len(image_of), device=image_of.device)
    first = torch.full_like(ids, len(image_of)).scatter_reduce_(0, image_of, order, "amin")
    repeated = first[image_of] != order
    if repeated.any() and not torch.equal(batch.images[repeated], batch.images[first[image_of[repeated]]]):
        return batch.images, order
    return batch.images[first], image_of


def draws_random_numbers(encoder, batch: Batch) -> bool:
    """Whether a forward of ``encoder`` on the batch's first row draws from torch's default
    generators, as dropout does (in its current mode); the generators are left as they were."""
    device = batch.images.device
    cuda = device.type == "cuda"
    before = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if cuda else [])
    with torch.no_grad():
        encoder.encode_text(batch.text[:1])
        encoder.encode_image(batch.images[:1])
    after = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if cuda else [])
    torch.set_rng_state(before[0])
    if cuda:
        torch.cuda.set_rng_state(before[1], device)
    return any(not torch.equal(a, b) for a, b in zip(before, after))


def nearest_clean(queries: torch.Tensor, keys: torch.Tensor, clean_rows: torch.Tensor, dot_product: bool) -> torch.Tensor:
    """For each query, the clean row whose key is nearest: cosine, or (the code's) the normalised
    query's dot product with the un-normalised key. Ties go to the lower row."""
    q = F.normalize(queries.float(), dim=-1)
    k = keys[clean_rows].float()
    k = k if dot_product else F.normalize(k, dim=-1)
    return clean_rows[(q @ k.T).argmax(1)]


@METHODS.register("npc")
class Npc(Method):
    """NPC (AAAI 2024): a siamese look-ahead step weights each pair by its negative impact on a clean memory bank (paper objective)."""

    config_type = NpcConfig
    # the released recipe (README.md:195; params.py; main_NPC.py:84-190): AdamW (0.9, 0.98), eps 1e-6, clip 10, no
    # augmentation; bf16 autocast on a GPU (the siamese backward has no GradScaler for fp16; fp32 on the CPU either way)
    train_defaults = {"epochs": 5, "batch_size": 256, "lr": 2e-7, "warmup_steps": 500, "weight_decay": 0.2, "grad_clip": 10.0,
                      "augment": False, "adam_beta2": 0.98, "adam_eps": 1e-6, "precision": "bf16"}

    def __init__(self, backbone, config: NpcConfig | None = None):
        super().__init__(backbone, config)
        siamese = copy.deepcopy(backbone)
        object.__setattr__(self, "siamese", siamese)  # not a submodule: the trainer neither steps nor saves it
        cfg = self.config
        params = [p for p in siamese.parameters() if p.requires_grad]
        group = {"params": params, "weight_decay": cfg.siamese_weight_decay}
        self.siamese_optimizer = adamw([group], 0.0, cfg.siamese_beta2, cfg.siamese_eps)  # fused, as the trainer's for A
        self.bank: dict[str, torch.Tensor] | None = None  # image_entry [n_images], text_entry [n_rows], clean_prob [n_rows]
        self.batch_of = None
        self._per_sample: dict[bool, bool] = {}  # training mode -> whether the backbone's forward is per sample

    @staticmethod
    def log_scale(encoder) -> torch.Tensor:
        """CLIP's learnable log logit scale of ``encoder`` (the references' model.logit_scale), else ln 100, fixed."""
        scale = learnable_log_scale(encoder)
        return scale if scale is not None else torch.tensor(REFERENCE_LOG_SCALE)

    def losses(self, encoder, batch: Batch) -> torch.Tensor:
        text, image = encoder.encode_text(batch.text).embedding, encoder.encode_image(batch.images).embedding
        return pair_losses(text, image, self.log_scale(encoder).to(text.device))

    # --- the memory bank (section 2.4) ---------------------------------------------------------
    def start_epoch(self, ctx: EpochContext) -> None:
        self.siamese.to(ctx.device)
        for param, state in self.siamese_optimizer.state.items():  # moments resumed while A' was still on the CPU
            for key, value in state.items():  # (fused AdamW wants its step counts beside the parameters too)
                if torch.is_tensor(value) and value.device != param.device:
                    state[key] = value.to(param.device)
        self.batch_of = ctx.batch_of
        if self.bank is None:
            if ctx.batch_of is None:
                raise ConfigError("npc needs the trainer's batch_of (any train rows as a batch) to build its memory bank")
            self.bank = self.build_bank(ctx.batch_of, len(ctx.captions), self.config.bank_batch_size)

    @torch.no_grad()
    def build_bank(self, batch_of, n_rows: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Once, from the initial model in evaluation mode: losses in row order in batches of
        ``batch_size``, the mixture's clean set, each image's and each row's nearest clean row."""
        was_training = self.training
        self.eval()
        losses, texts, images, image_ids = [], [], [], []
        try:
            for start in range(0, n_rows, batch_size):
                batch = batch_of(torch.arange(start, min(n_rows, start + batch_size)))
                text = self.backbone.encode_text(batch.text).embedding.float()
                image = self.backbone.encode_image(batch.images).embedding.float()
                losses.append(pair_losses(text, image, self.log_scale(self.backbone)).cpu())
                texts.append(text.cpu())
                images.append(image.cpu())
                image_ids.append(batch.image_ids.cpu())
        finally:
            self.train(was_training)
        clean_prob = torch.from_numpy(lower_component_posterior(torch.cat(losses).numpy()))
        clean_rows = torch.nonzero(clean_prob > self.config.clean_posterior).squeeze(1)
        if not len(clean_rows):  # no row passes: the lower component's rows
            clean_rows = torch.nonzero(clean_prob > 0.5).squeeze(1)
        text, image, image_ids = torch.cat(texts), torch.cat(images), torch.cat(image_ids)
        first_row = {int(g): i for i, g in reversed(list(enumerate(image_ids.tolist())))}  # each image's first row
        image_rows = torch.tensor([first_row[g] for g in range(int(image_ids.max()) + 1)])
        dot = self.config.bank_dot_product
        return {"image_entry": nearest_clean(image[image_rows], image, clean_rows, dot),
                "text_entry": nearest_clean(text, text, clean_rows, dot), "clean_prob": clean_prob}

    # --- one step (section 2.2) -----------------------------------------------------------------
    def training_loss(self, batch: Batch) -> LossOutput:
        if torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16:
            raise ConfigError("npc's siamese step runs its own backward, which fp16 would need a second GradScaler for: "
                              "use -t precision=bf16 or precision=fp32")
        cfg, bank, device = self.config, self.bank, batch.images.device.type
        # the memory batches P^I (each row's image entry), then P^T (its text entry): each distinct row built once
        entries = torch.cat([bank["image_entry"][batch.image_ids.cpu()], bank["text_entry"][batch.rows.cpu()]])
        rows, slot = torch.unique(entries, return_inverse=True)
        memory = self.batch_of(rows)
        per_sample = self.per_sample(memory)
        # A' = A when its gradient is taken, so A's graph of the batch is A''s, unless autocast casts A's forward
        shared = per_sample and not torch.is_autocast_enabled(device) and all(
            a.requires_grad == s.requires_grad for a, s in zip(self.backbone.parameters(), self.siamese.parameters()))
        score = self.memory_scorer(memory, slot.to(memory.rows.device), len(batch.rows), per_sample)
        with torch.autocast(device, enabled=False):  # the memory losses and r in fp32
            with torch.set_grad_enabled(not cfg.code_faithful):  # the paper's L_MB trains A; the code's is a constant
                before_image, before_text = score(self.backbone)
            losses = self.losses(self.backbone, batch) if shared else None  # no autocast to leave: A's batch loss now
            # the code's base gradient is mean(w) x the plain one (section 2.3 step 7) = mean(w) / 2 x A''s: the batch's
            # graph is not needed again
            grads = self.look_ahead(batch, losses, keep_graph=not cfg.code_faithful)
            with torch.no_grad():
                after_image, after_text = score(self.siamese)
            r = impact_ratio(before_image.detach(), after_image, before_text.detach(), after_text)
        weights = confidence_weights(r)
        if losses is None:
            losses = self.losses(self.backbone, batch)
        if grads is not None and cfg.code_faithful:  # the same value; A's gradient (mean(w) / 2) x A''s without a backward
            params = [a for a, s in zip(self.backbone.parameters(), self.siamese.parameters()) if s.requires_grad]
            loss = npc_objective(losses.detach(), weights, before_image + before_text, True) \
                + GivenGradient.apply(weights.mean() / 2, grads, *params)
        else:
            loss = npc_objective(losses, weights, before_image + before_text, cfg.code_faithful)
        logs = {"weight": weights.mean().item(), "negative_impact": (r < 1).float().mean().item(),
                "memory_loss": (before_image + before_text).mean().item(), "logit_scale": self.log_scale(self.backbone).exp().item()}
        # clean-ness signal (methods-npc-osa.md 2.6): r, flagged at r < 1; w and the mixture's clean posterior
        others = {"weight": weights, "gmm_clean_prob": bank["clean_prob"][batch.rows.cpu()].to(r.device)}
        return LossOutput(loss, r, r < 1, others, logs)

    def per_sample(self, memory: Batch) -> bool:
        """Whether the backbone's forward, in its current mode, gives each sample's embedding from
        that sample alone: no batch statistics and no random draws (dropout). Checked once per mode."""
        mode = self.backbone.training
        if mode not in self._per_sample:
            self._per_sample[mode] = not any(isinstance(m, BATCH_STATISTICS) for m in self.backbone.modules()) \
                and not draws_random_numbers(self.backbone, memory)
        return self._per_sample[mode]

    def memory_scorer(self, memory: Batch, slot: torch.Tensor, n: int, per_sample: bool):
        """``score(encoder)`` -> (per-row losses of P^I, of P^T): row i of P^I is memory row
        ``slot[i]``, of P^T ``slot[n + i]``. Per sample, one forward of the distinct captions and
        images serves both (the same forward under A and A'); otherwise each memory batch is
        encoded as the algorithm states it (its batch statistics, its own random draws)."""
        if per_sample:
            text, text_of = torch.unique(memory.text, dim=0, return_inverse=True)
            images, image_of = distinct_images(memory)
            picks = [(text_of[slot[:n]], image_of[slot[:n]]), (text_of[slot[n:]], image_of[slot[n:]])]
            forwards = [(text, images, picks)]
        else:
            forwards = [(memory.text[part], memory.images[part], [(None, None)]) for part in (slot[:n], slot[n:])]

        def score(encoder) -> list[torch.Tensor]:
            out = []
            for text, images, pairs in forwards:
                t, i = encoder.encode_text(text).embedding, encoder.encode_image(images).embedding
                scale = self.log_scale(encoder).to(t.device)
                out += [pair_losses(t if rows_t is None else t[rows_t], i if rows_i is None else i[rows_i], scale) for rows_t, rows_i in pairs]
            return out
        return score

    def look_ahead(self, batch: Batch, losses: torch.Tensor | None = None, keep_graph: bool = True) -> tuple | None:
        """A' <- A, then one AdamW step of A' on the batch (the code's mean CE_i2t + mean CE_t2i, one
        backward). ``losses``: A's per-row batch losses, computed as A''s forward would be (same
        weights, inputs and mode, no autocast, no random draws): A''s gradient is taken from their
        graph (kept for A's backward if ``keep_graph``) instead of a forward of A', and returned
        (per trainable parameter of A, None where the loss does not reach it)."""
        paired = [(a, s) for a, s in zip(self.backbone.parameters(), self.siamese.parameters()) if s.requires_grad]
        grads = None
        if losses is not None:
            grads = torch.autograd.grad(2 * losses.mean(), [a for a, _ in paired], retain_graph=keep_graph, allow_unused=True)
            distributed.average_gradients(grads)  # data-parallel: the global batch's gradient (a no-op in one process)
        with torch.no_grad():
            for mine, base in zip(self.siamese.state_dict().values(), self.backbone.state_dict().values()):
                mine.copy_(base)
        # A''s mode follows A's, so that L_0 and L_1 differ by the step only (the reference's A' is in
        # evaluation mode; attention's evaluation fast path rounds differently, which moves r off 1)
        self.siamese.train(self.backbone.training)
        for group in self.siamese_optimizer.param_groups:
            group["lr"] = batch.lr
        self.siamese_optimizer.zero_grad(set_to_none=True)
        if losses is None:
            (2 * self.losses(self.siamese, batch).mean()).backward()
            distributed.average_gradients(s.grad for _, s in paired)
        else:
            for (_, mine), grad in zip(paired, grads):
                mine.grad = grad  # None where the loss does not reach the parameter: AdamW skips it, as after backward
        self.siamese_optimizer.step()
        self.siamese_optimizer.zero_grad(set_to_none=True)  # A''s gradient is spent
        return grads

    # Resume and best.pt carry the bank and the siamese optimiser's moments (its weights come from A each step).
    def get_extra_state(self):
        return {"bank": self.bank, "siamese_optimizer": self.siamese_optimizer.state_dict()}

    def set_extra_state(self, state) -> None:
        self.bank = None if state["bank"] is None else {name: values.cpu() for name, values in state["bank"].items()}
        self.siamese_optimizer.load_state_dict(state["siamese_optimizer"])
