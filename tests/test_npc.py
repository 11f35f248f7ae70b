"""NPC (methods-npc-osa.md section 2): the weight rule and the two reductions by hand, identity at
a zero look-ahead step, the siamese copy's isolation, the memory bank's mixture and neighbours,
a cell, and (slow) the paper's premise on the synthetic target."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from open_clip.transformer import PatchDropout

from rsnc_bench.backbones import BackboneConfig, build_backbone
from rsnc_bench.engine.cell import CellSpec, run_cell
from rsnc_bench.errors import ConfigError
from rsnc_bench.methods import METHODS, Batch, EpochContext
from rsnc_bench.store import CellKey, ResultStore
from rsnc_builtin_methods.npc import (
    Npc,
    NpcConfig,
    confidence_weights,
    distinct_images,
    impact_ratio,
    lower_component_posterior,
    nearest_clean,
    npc_objective,
    pair_losses,
)

from .conftest import TINY_SYNTHETIC

CPU = torch.device("cpu")


def test_the_weight_rule_by_hand():
    r = impact_ratio(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([1.2]), torch.tensor([1.0]))
    assert r.item() == pytest.approx(0.85) and confidence_weights(r).item() == pytest.approx(0.691069, abs=1e-6)
    w = confidence_weights(torch.tensor([0.999, 1.0, 0.5]))
    assert w.tolist() == pytest.approx([0.761174, 1.0, 0.462117], abs=1e-6)  # the jump at r = 1
    r = impact_ratio(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert torch.isinf(r).all() and (confidence_weights(r) == 1).all()  # L_1 = 0: r = inf, w = 1, no NaN


def test_the_two_reductions_by_hand():
    losses = pair_losses(torch.eye(2), torch.eye(2), torch.tensor(0.0))  # cosines eye(2) at scale 1: logits [[1, 0], [0, 1]]
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-1))] * 2, abs=1e-6)
    losses = torch.tensor([math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1))], requires_grad=True)  # logits [[2, 0], [0, 1]]
    w, memory = torch.tensor([0.2, 1.0]), torch.zeros(2, requires_grad=True)
    assert npc_objective(losses, w, memory, code_faithful=False).item() == pytest.approx(0.169324, abs=1e-6)
    code = npc_objective(losses, w, memory, code_faithful=True)
    assert code.item() == pytest.approx(0.132057, abs=1e-6)
    code.backward()
    assert losses.grad.tolist() == pytest.approx([0.6 / 2, 0.6 / 2]) and memory.grad is None  # mean(w) x the plain gradient; no memory gradient


class Rows:
    """Train rows as batches (what EpochContext.batch_of gives), from fixed tensors: row i shows
    image i % n_images with caption i % n_captions."""

    def __init__(self, backbone, n: int = 8, seed: int = 1, n_images: int | None = None, n_captions: int | None = None):
        g = torch.Generator().manual_seed(seed)
        self.image_of = torch.arange(n) % (n_images or n)
        self.images = torch.randn(n_images or n, 3, backbone.image_size, backbone.image_size, generator=g)
        self.text = backbone.tokenize([f"caption {i % (n_captions or n)} of a harbour with {i % 3} ships" for i in range(n)])

    def __call__(self, rows) -> Batch:
        rows = torch.as_tensor(rows)
        return Batch(self.images[self.image_of[rows]], self.text[rows], rows, self.image_of[rows])


def ready(method: Npc, rows: Rows, lr: float):
    n = len(rows.text)
    method.bank = {"image_entry": torch.arange(n).flip(0), "text_entry": torch.arange(n).roll(1), "clean_prob": torch.ones(n)}
    method.start_epoch(EpochContext(1, 1, n, 1, CPU, batch_of=rows))
    batch = rows(torch.arange(n))
    batch.lr = lr
    return batch


@pytest.mark.parametrize("code_faithful", [False, True])
def test_a_zero_look_ahead_step_leaves_every_weight_at_one_and_the_gradient_plain(code_faithful):
    torch.manual_seed(0)
    method = Npc(build_backbone(BackboneConfig("tiny-vit")), NpcConfig(code_faithful=code_faithful)).train()
    rows = Rows(method.backbone)
    batch = ready(method, rows, lr=0.0)
    out = method.training_loss(batch)
    assert (out.clean == 1).all() and (out.others["weight"] == 1).all() and not out.flagged.any()
    params = [p for p in method.backbone.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    plain = method.losses(method.backbone, batch).mean()  # clip-ft's loss under the same learnable scale
    if not code_faithful:  # the paper's L_MB trains A too
        plain = plain + (method.losses(method.backbone, rows(method.bank["image_entry"]))
                         + method.losses(method.backbone, rows(method.bank["text_entry"]))).mean()
    want = torch.autograd.grad(plain, params, allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_the_siamese_copy_is_isolated_and_takes_exactly_one_step():
    torch.manual_seed(0)
    method = Npc(build_backbone(BackboneConfig("tiny-vit"))).train()
    rows = Rows(method.backbone)
    batch = ready(method, rows, lr=1e-3)
    before = {name: p.detach().clone() for name, p in method.backbone.named_parameters()}
    expected = build_backbone(BackboneConfig("tiny-vit"))
    expected.load_state_dict(method.backbone.state_dict())
    optimizer = torch.optim.AdamW(expected.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    (2 * method.losses(expected, batch).mean()).backward()
    optimizer.step()
    method.training_loss(batch)
    assert all(torch.equal(p, before[name]) for name, p in method.backbone.named_parameters())  # only the trainer steps A
    for mine, want in zip(method.siamese.parameters(), expected.parameters()):
        torch.testing.assert_close(mine, want, atol=1e-6, rtol=1e-5)  # A' = A + one AdamW step
    siamese = {id(p) for p in method.siamese.parameters()}
    assert not any(id(p) in siamese for p in method.parameters()) and not any(k.startswith("siamese.") for k in method.state_dict())
    restored = Npc(build_backbone(BackboneConfig("tiny-vit")))
    restored.load_state_dict(method.state_dict())  # the bank and the siamese optimiser's moments come back
    assert torch.equal(restored.bank["text_entry"], method.bank["text_entry"])
    state, saved = restored.siamese_optimizer.state_dict()["state"], method.siamese_optimizer.state_dict()["state"]
    assert state.keys() == saved.keys() and all(torch.equal(state[k]["exp_avg"], saved[k]["exp_avg"]) for k in state)


def stated_step(method: Npc, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, r) of one NPC step as section 2.2 states it, as the method computed it before its
    work was cut (kept here as the reference): P^I and P^T built and encoded as two batches, A'
    copied from A and stepped by a forward and backward of its own, P^I and P^T encoded again by
    A', then A's forward of the batch."""
    cfg, bank = method.config, method.bank
    memory_image, memory_text = method.batch_of(bank["image_entry"][batch.image_ids]), method.batch_of(bank["text_entry"][batch.rows])
    with torch.autocast("cpu", enabled=False):
        with torch.set_grad_enabled(not cfg.code_faithful):
            before_image, before_text = method.losses(method.backbone, memory_image), method.losses(method.backbone, memory_text)
        with torch.no_grad():
            for mine, base in zip(method.siamese.state_dict().values(), method.backbone.state_dict().values()):
                mine.copy_(base)
        method.siamese.train(method.backbone.training)
        for group in method.siamese_optimizer.param_groups:
            group["lr"] = batch.lr
        method.siamese_optimizer.zero_grad(set_to_none=True)
        (2 * method.losses(method.siamese, batch).mean()).backward()
        method.siamese_optimizer.step()
        with torch.no_grad():
            after_image, after_text = method.losses(method.siamese, memory_image), method.losses(method.siamese, memory_text)
        r = impact_ratio(before_image.detach(), after_image, before_text.detach(), after_text)
    losses = method.losses(method.backbone, batch)
    return npc_objective(losses, confidence_weights(r), before_image + before_text, cfg.code_faithful), r


def key_bias(name: str, values: torch.Tensor) -> torch.Tensor | None:
    """The key part of an attention layer's packed q, k, v bias: attention is invariant to it, so
    its gradient is zero up to rounding, which AdamW's normalisation turns into steps of about lr
    whose signs follow the rounding: any other order of summation moves them."""
    return values[len(values) // 3: 2 * len(values) // 3] if name.endswith("in_proj_bias") else None


def assert_same_steps(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], start: dict[str, torch.Tensor], key_bias_atol: float) -> None:
    """Each weight's change from ``start`` the same to rtol 1e-5 of the change's norm (fp32 rounding
    of sums taken in another order), except the attention key biases, held to ``key_bias_atol``."""
    for name, w in want.items():
        g, s = got[name], start[name]
        if key_bias(name, w) is not None:
            torch.testing.assert_close(key_bias(name, g), key_bias(name, w), rtol=0, atol=key_bias_atol, msg=lambda m: f"{name}: {m}")
            d = len(w) // 3
            g, w, s = (torch.cat([x[:d], x[2 * d:]]) for x in (g, w, s))
        error, change = float((g - w).norm()), float((w - s).norm())
        assert error <= 1e-5 * change + 1e-7, f"{name}: the changes differ by {error:.2e}, {error / max(change, 1e-30):.1e} of the change"


@pytest.mark.parametrize("code_faithful", [False, True])
@pytest.mark.parametrize("path", ["shared", "autocast", "dropout"])
def test_the_step_computes_what_the_stated_algorithm_computes(code_faithful, path):
    """Three trainer steps of the method against three of ``stated_step`` (A''s AdamW not fused),
    from the same start, on rows that share images and captions and a bank that maps rows into
    and out of the batch. Same losses, r, A, A' and A''s moments to fp32 rounding (rtol 1e-5:
    distinct inputs encoded once, in other batch shapes, sum in another order), except the
    attention key biases of A' (``key_bias``), held to two of its AdamW steps. Paths: ``shared``
    (the CPU: memory inputs encoded once, A''s gradient from A's graph), ``autocast`` (bf16
    autocast, one step: memory inputs encoded once, A' forwards the batch itself), ``dropout`` (a
    random layer in A: every forward as stated, in the stated order, drawing the same numbers)."""
    # bf16: after a step, weights that differ in the last fp32 bit may round to different bf16 values, so one step
    lr, steps = 1e-3, 1 if path == "autocast" else 3
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        method = Npc(build_backbone(BackboneConfig("tiny-vit")), NpcConfig(code_faithful=code_faithful)).train()
        if path == "dropout":
            method.backbone.model.visual.patch_dropout = PatchDropout(0.3)
        models.append(method)
    method, stated = models
    stated.load_state_dict(method.state_dict())
    stated.siamese_optimizer = torch.optim.AdamW([p for p in stated.siamese.parameters() if p.requires_grad], lr=0.0, betas=(0.9, 0.98),
                                                 eps=1e-6, weight_decay=0.2)
    rows = Rows(method.backbone, n=16, n_images=6, n_captions=10)
    bank = {"image_entry": torch.tensor([3, 9, 9, 14, 0, 5]), "text_entry": torch.tensor([0, 1, 1, 12, 4, 4, 6, 15, 8, 3, 10, 10, 12, 2, 14, 15]),
            "clean_prob": torch.ones(16)}
    for m in models:
        m.bank = {k: v.clone() for k, v in bank.items()}
        m.start_epoch(EpochContext(1, 1, 16, steps, CPU, batch_of=rows))
    # A by SGD: AdamW would turn the rounding noise of a key bias's gradient into steps of lr (``key_bias``)
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0) for m in models]
    start = {name: value.clone() for name, value in method.backbone.state_dict().items()}
    def new_step(batch):
        out = method.training_loss(batch)
        return out.loss, out.clean

    order = torch.Generator().manual_seed(5)
    for _ in range(steps):
        batch = rows(torch.randperm(16, generator=order)[:8])
        batch.lr = lr
        results = []
        for optimizer, step in zip(optimizers, [new_step, lambda b: stated_step(stated, b)]):
            torch.manual_seed(1)  # the same random draws for both, when A draws any
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=path == "autocast"):
                loss, r = step(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            results.append((loss.detach(), r.detach()))
        (loss, r), (want_loss, want_r) = results
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(r, want_r, rtol=1e-5, atol=0)
    assert method.per_sample(rows(torch.arange(2))) == (path != "dropout")
    assert_same_steps(method.backbone.state_dict(), stated.backbone.state_dict(), start, key_bias_atol=1e-7)
    assert_same_steps(method.siamese.state_dict(), stated.siamese.state_dict(), start, key_bias_atol=2 * lr)
    for got, want in zip(method.siamese_optimizer.state.values(), stated.siamese_optimizer.state.values()):
        torch.testing.assert_close(got["exp_avg"], want["exp_avg"], rtol=1e-5, atol=1e-6)
        assert int(got["step"]) == int(want["step"]) == steps


def test_distinct_images_and_the_per_sample_check():
    images = torch.randn(3, 3, 4, 4)
    batch = Batch(images[[0, 1, 0, 2, 1]], torch.zeros(5, 2, dtype=torch.long), torch.arange(5), torch.tensor([7, 3, 7, 9, 3]))
    unique, index = distinct_images(batch)
    assert len(unique) == 3 and torch.equal(unique[index], batch.images)
    batch.images[2] += 1  # an id whose pixels differ (an augmented copy): nothing is shared
    unique, index = distinct_images(batch)
    assert torch.equal(unique, batch.images) and index.tolist() == [0, 1, 2, 3, 4]
    torch.manual_seed(0)
    method = Npc(build_backbone(BackboneConfig("tiny-vit"))).train()
    rows = Rows(method.backbone, n=4)
    assert method.per_sample(rows(torch.arange(2)))
    method.backbone.model.visual.patch_dropout = PatchDropout(0.5)
    method._per_sample.clear()
    state = torch.get_rng_state()
    assert not method.per_sample(rows(torch.arange(2)))  # dropout draws random numbers ...
    assert torch.equal(torch.get_rng_state(), state)  # ... and the check leaves the generator as it was
    assert method.eval().per_sample(rows(torch.arange(2)))  # not in evaluation mode
    method = Npc(build_backbone(BackboneConfig("tiny-vit"))).train()
    method.backbone.model.visual.add_module("norm", torch.nn.BatchNorm1d(4))  # batch statistics
    assert not method.per_sample(rows(torch.arange(2)))


def test_the_mixture_finds_the_lower_mode_and_neighbours_follow_the_keys():
    rng = np.random.RandomState(0)
    losses = np.concatenate([rng.normal(0.5, 0.1, 80), rng.normal(3.0, 0.3, 20)])
    posterior = lower_component_posterior(losses)
    assert ((posterior > 0.9) == (np.arange(100) < 80)).all()
    keys = torch.tensor([[1.0, 0.0], [10.0, 10.0], [0.0, 1.0]])  # row 1 is long: a dot product prefers it
    query = torch.tensor([[1.0, 0.2]])
    clean = torch.tensor([0, 1, 2])
    assert nearest_clean(query, keys, clean, dot_product=False).item() == 0  # cosine: the closest direction
    assert nearest_clean(query, keys, clean, dot_product=True).item() == 1  # the code's un-normalised keys
    assert nearest_clean(query, keys, torch.tensor([1, 2]), dot_product=False).item() == 1  # clean rows only


def test_the_bank_maps_every_image_and_row_to_a_clean_row():
    torch.manual_seed(0)
    method = Npc(build_backbone(BackboneConfig("tiny-vit")), NpcConfig(bank_batch_size=4))
    rows = Rows(method.backbone, n=10)
    bank = method.build_bank(rows, 10, 4)
    clean = set(torch.nonzero(bank["clean_prob"] > 0.9).squeeze(1).tolist()) or set(torch.nonzero(bank["clean_prob"] > 0.5).squeeze(1).tolist())
    assert len(bank["image_entry"]) == 10 and len(bank["text_entry"]) == 10
    assert set(bank["image_entry"].tolist()) <= clean and set(bank["text_entry"].tolist()) <= clean
    assert all(bank["text_entry"][i] == i for i in clean)  # a clean row's text entry is itself


def test_npc_trains_in_a_cell(tmp_path, synthetic_root):
    key = CellKey("npc", "synthetic", "tiny-vit", "shuffle", 0.4, 0, 1)
    options = tuple(f"{k}={v}" for k, v in TINY_SYNTHETIC.items())
    doc = run_cell(CellSpec(key, data_root=str(synthetic_root), dataset_options=options, train_options=("epochs=2", "batch_size=16"),
                            method_options=("bank_batch_size=32",)), ResultStore(tmp_path))
    assert doc["status"] == "complete", doc.get("traceback") or doc["error"]
    assert (doc["config"]["train"]["augment"], doc["config"]["train"]["adam_beta2"]) == (False, 0.98)
    entry = doc["history"][-1]
    assert set(entry["detection_others"]) == {"weight", "gmm_clean_prob"} and 0 <= entry["logs"]["weight"] <= 1
    assert doc["detection"]["n_scored"] > 0


def test_config_errors_and_registration():
    with pytest.raises(ConfigError, match=r"clean_posterior=1.5"):
        NpcConfig(clean_posterior=1.5)
    assert METHODS.get("npc").train_defaults["lr"] == 2e-7 and not METHODS.get("npc").config_type().code_faithful


@pytest.mark.slow
def test_the_papers_premise_on_the_pretrained_synthetic_target(tmp_path, monkeypatch):
    """After epoch 1 at noise 0.4 (tiny-clip pretrained by the tests' learning recipe, fine-tuning
    lr 1e-5): r ranks noisy rows better than chance, and so does the bank's clean posterior."""
    from rsnc_bench import pretrain

    from .conftest import LEARNING_RECIPE

    monkeypatch.setenv("RSNC_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.RECIPES, "tiny-clip", LEARNING_RECIPE)
    key = CellKey("npc", "synthetic", "tiny-clip", "rrsitr", 0.4, 42, 3)
    doc = run_cell(CellSpec(key, backbone=BackboneConfig("tiny-clip"), data_root=str(tmp_path / "data"), train_options=("epochs=1", "lr=1e-5")),
                   ResultStore(tmp_path / "runs"))
    assert doc["status"] == "complete", doc.get("traceback") or doc["error"]
    epoch = doc["history"][0]
    assert epoch["detection"]["auroc"] > 0.5, epoch["detection"]  # 0.545 when written
    assert epoch["detection_others"]["gmm_clean_prob"]["auroc"] > 0.6, epoch["detection_others"]  # 0.720 when written
