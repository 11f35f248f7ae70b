"""EBAKER / iEBAKER against methods.md section 4: the similarity bank and its threshold, elimination
that keeps eliminated pairs as negatives, the bank-size guard, and a short noisy training run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rsnc_bench.engine.cell import CellSpec, run_cell
from rsnc_bench.errors import ConfigError
from rsnc_bench.methods import METHODS, Batch, EpochContext
from rsnc_bench.store import CellKey, ResultStore
from rsnc_builtin_methods.ebaker import Ebaker, EbakerConfig, SimilarityBank, anchored_ce, eba_loss, keep_anchors

from .token_stub import TokenBackbone, token_batch


def ctx(epoch: int, n_rows: int = 10, captions=(), tokenizer=None) -> EpochContext:
    return EpochContext(epoch, 10, n_rows, 1, torch.device("cpu"), captions, tokenizer)


def test_threshold_is_the_drop_ratio_quantile_of_real_entries():
    bank = SimilarityBank(100)
    assert bank.threshold(0.01) is None  # nothing real yet: no threshold, nothing eliminated
    bank.push(torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7]))
    bank.push(torch.tensor([0.2, 0.8, 0.4, 0.6, 1.0]))
    assert bank.threshold(0.2) == pytest.approx(0.3)  # ascending[floor(0.2 * 10)] of the 10 real values, not of 100
    assert bank.threshold(0.0) == pytest.approx(0.1)
    assert keep_anchors(torch.tensor([0.25, 0.3, 0.5]), 0.3).tolist() == [False, False, True]  # "keep if > Th"


def test_bank_is_fifo():
    bank = SimilarityBank(4)
    bank.push(torch.tensor([1.0, 2.0, 3.0]))
    bank.push(torch.tensor([4.0, 5.0, 6.0]))
    assert sorted(bank.values.tolist()) == [3.0, 4.0, 5.0, 6.0] and bank.real == 4
    restored = SimilarityBank.from_state(bank.state())
    restored.push(torch.tensor([7.0]))
    assert sorted(restored.values.tolist()) == [4.0, 5.0, 6.0, 7.0]


def test_the_papers_random_bank_is_a_no_op_on_one_dataset():
    """methods.md 4.4: 200k N(0, 1) entries put the 1 % threshold near -2.3, below any real cosine."""
    bank = SimilarityBank(200_000, random_init=True, generator=torch.Generator().manual_seed(0))
    bank.push(torch.full((20_000,), 0.3))
    assert bank.threshold(0.01) == pytest.approx(-2.33, abs=0.1) and bank.real == 20_000
    assert keep_anchors(torch.tensor([0.05, 0.3]), bank.threshold(0.01)).all()


def test_empty_mask_keeps_the_best_pair_only_when_asked():
    assert keep_anchors(torch.tensor([0.1, 0.4, 0.2]), 0.5).tolist() == [False, True, False]
    assert keep_anchors(torch.tensor([0.1, 0.4, 0.2]), 0.5, keep_best=False).tolist() == [False, False, False]


@pytest.mark.parametrize("method, kept", [("ebaker", 0), ("iebaker", 1)])
def test_the_empty_mask_fallback_is_iebakers_only(method, kept):
    """iEBAKER's code keeps the best pair when none survives; EBAKER's has no fallback, and its
    batch then contributes no alignment loss (not a NaN that would stop the run)."""
    cls = METHODS.get(method)
    assert cls.config_type().empty_mask == ("keep_best" if kept else "skip")
    m = cls(TokenBackbone(), cls.config_type(ker_weight=0, drop_epoch=0)).train()
    m.start_epoch(ctx(1))
    m.thresholds = {"global": 1e9, "local": 1e9}  # above every positive: nothing survives
    out = m.training_loss(token_batch(list(range(10))))
    assert torch.isfinite(out.loss) and out.logs["eliminated"] == pytest.approx(1 - kept / 10)
    assert (out.loss.item() == 0) == (kept == 0)
    out.loss.backward()  # the graph survives an empty mask


def test_eliminated_pairs_stay_negatives():
    s = torch.tensor([[0.9, 0.2, 0.1], [0.3, 0.4, 0.2], [0.1, 0.5, 0.8]], requires_grad=True)
    keep = torch.tensor([True, False, True])
    eba_loss(s, torch.zeros(3, 3), keep, keep, scale=20.0).backward()
    assert s.grad[1, 1] == 0  # its own (suspect) positive is never pulled together
    assert s.grad[0, 1] != 0 and s.grad[2, 1] != 0  # its image is a negative for captions 0 and 2
    assert s.grad[1, 0] != 0 and s.grad[1, 2] != 0  # its caption is a negative for images 0 and 2


def test_anchored_ce_by_hand():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    keep = torch.tensor([True, False, True])
    ce = lambda row, t: -row[t] + math.log(sum(math.exp(v) for v in row))  # noqa: E731
    want = (ce([2.0, 0.0, 1.0], 0) + ce([1.0, 1.0, 1.0], 2)) / 2
    assert anchored_ce(logits, keep).item() == pytest.approx(want, rel=1e-6)
    assert F.cross_entropy(logits, torch.arange(3)).item() != pytest.approx(want)


@pytest.mark.parametrize("eba", ["joint", "split"])
def test_elimination_starts_at_the_drop_epoch_and_is_scored(eba):
    method = Ebaker(TokenBackbone(), EbakerConfig(eba=eba, ker_weight=0, drop_epoch=1, drop_ratio=0.3)).train()
    method.start_epoch(ctx(1))
    out = method.training_loss(token_batch(list(range(10))))
    assert out.logs["eliminated"] == 0 and not out.flagged.any()  # 0-based epoch 0 < drop_epoch
    positive = out.clean
    method.start_epoch(ctx(2))
    assert method.thresholds["global"] == pytest.approx(sorted(positive.tolist())[3], rel=1e-5)  # floor(0.3 * 10)
    out = method.training_loss(token_batch(list(range(10))))
    assert out.flagged.sum() == 4 and set(out.others) == ({"local"} if eba == "split" else set())
    assert (out.clean[out.flagged] <= method.thresholds["global"] + 1e-6).all()
    restored = Ebaker(TokenBackbone(), EbakerConfig(eba=eba, ker_weight=0))
    restored.load_state_dict(method.state_dict())
    assert restored.thresholds == method.thresholds and restored.banks["global"].real == 10  # one epoch of pairs


def test_bank_size_guard_and_the_non_paper_drop_ratio():
    method = Ebaker(TokenBackbone(), EbakerConfig(ker_weight=0, bank_size=200_000))
    with pytest.warns(UserWarning, match="bank_size=0 sizes it to one epoch"):
        method.start_epoch(ctx(1))
    sized = Ebaker(TokenBackbone(), EbakerConfig(ker_weight=0))
    sized.start_epoch(ctx(1, n_rows=10))
    assert len(sized.banks["global"].values) == 10
    assert EbakerConfig(noise_estimate=0.6).effective_drop_ratio == 0.6 and EbakerConfig().effective_drop_ratio == 0.01
    with pytest.raises(ConfigError, match="choose one of split, joint"):
        EbakerConfig(eba="both")


def test_paper_defaults():
    ebaker, iebaker = METHODS.get("ebaker"), METHODS.get("iebaker")
    assert ebaker.config_type().eba == "joint" and iebaker.config_type().eba == "split"
    cfg = iebaker.config_type()
    assert (cfg.drop_ratio, cfg.drop_epoch, cfg.ker_weight, cfg.fusion_alpha, cfg.sar) == (0.01, 4, 0.5, 0.6, False)
    assert ebaker.train_defaults["epochs"] == 7 and ebaker.train_defaults["lr"] == 1.5e-5


def reference_training_loss(method: Ebaker, batch: Batch) -> torch.Tensor:
    """The EBAKER objective at epoch 1 (nothing eliminated) the straightforward way: separate
    text-tower calls for the caption and its masked copy, the local score in its direct form, the
    KER head through nn.MultiheadAttention at every position and F.cross_entropy on full logits."""
    from rsnc_builtin_methods.keywords import mlm_loss

    backbone, head = method.backbone, method.ker
    texts, images = backbone.encode_text(batch.text, tokens=True), backbone.encode_image(batch.images, tokens=True)
    s_global = F.normalize(texts.embedding, dim=-1) @ F.normalize(images.embedding, dim=-1).T
    t, v = F.normalize(texts.tokens, dim=-1), F.normalize(images.tokens, dim=-1)
    scale = math.exp(2.996)  # global logit scale and kappa, both ~20
    s_local = scale * (torch.einsum("apd,bqd->abpq", t, v).square().sum((2, 3)) + 1e-6).sqrt()
    target = torch.arange(len(s_global))
    ce = lambda logits: F.cross_entropy(logits, target)  # noqa: E731
    alignment = ce(scale * s_global) + ce(scale * s_global.T) + ce(s_local) + ce(s_local.T)
    masked = backbone.encode_text(method.ker_ids[batch.rows], tokens=True).tokens
    image = head.ln_pre_i(images.tokens)
    x = head.cross_attn(head.ln_pre_t(masked), image, image, need_weights=False)[0]
    for block in head.blocks:
        h = block.ln_1(x)
        x = x + block.attn(h, h, h, need_weights=False)[0]
        x = x + block.mlp(block.ln_2(x))
    return alignment + 0.5 * mlm_loss(head.mlm(head.ln_post(x)), method.ker_labels[batch.rows])


@pytest.mark.parametrize("method_name", ["ebaker", "iebaker"])
def test_training_loss_equals_the_straightforward_computation(method_name):
    """The optimised training step (one text-tower call for both sequences, the packed Gram local
    score, the pruned KER head, the fused vocabulary cross-entropy) against the reference: loss and
    every parameter's gradient, on a real open_clip backbone and tokenizer."""
    from rsnc_bench.backbones import BackboneConfig, build_backbone

    torch.manual_seed(0)
    cls = METHODS.get(method_name)
    method = cls(build_backbone(BackboneConfig("tiny-vit")), cls.config_type()).train()
    captions = ["many planes are parked near the airport terminal", "a red roof beside green trees",
                "two storage tanks next to a road", "a runway near a large airport with planes"]
    method.start_epoch(ctx(1, n_rows=4, captions=captions, tokenizer=method.backbone.tokenizer))
    rows = torch.arange(4)
    batch = Batch(torch.randn(4, 3, 48, 48), method.backbone.tokenize(captions), rows, rows)
    assert int((method.ker_labels != 0).sum()) >= 8
    params = [p for p in method.parameters() if p.requires_grad]
    got = method.training_loss(batch).loss
    want = reference_training_loss(method, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(torch.autograd.grad(got, params, allow_unused=True), torch.autograd.grad(want, params, allow_unused=True)):
        assert (g is None) == (w is None)
        if g is not None:  # float rounding, relative to the largest entry of the parameter's gradient
            assert (g - w).abs().max() <= 1e-5 * w.abs().max() + 1e-8


@pytest.mark.parametrize("method_name", ["ebaker", "iebaker"])
def test_optimiser_trajectory_equals_the_straightforward_computations(method_name):
    """Three steps of the harness's optimiser (fused AdamW with weight decay, clipping at 50) from
    one start: the optimised training step moves every parameter as the straightforward objective
    does, up to float rounding: the two displacements differ by under 0.5 % of the distance moved
    (about 0.05 % measured). Left out: the attention key biases, whose gradient is zero in exact
    arithmetic (a softmax is shift-invariant), so AdamW turns the rounding noise of either
    computation into steps of about lr there."""
    import copy

    from rsnc_bench.backbones import BackboneConfig, build_backbone
    from rsnc_bench.engine.optim import adamw, param_groups

    torch.manual_seed(0)
    cls = METHODS.get(method_name)
    fast = cls(build_backbone(BackboneConfig("tiny-vit")), cls.config_type()).train()
    captions = ["many planes are parked near the airport terminal", "a red roof beside green trees",
                "two storage tanks next to a road", "a runway near a large airport with planes"]
    fast.start_epoch(ctx(1, n_rows=4, captions=captions, tokenizer=fast.backbone.tokenizer))
    slow = copy.deepcopy(fast)
    start = [p.detach().clone() for p in slow.parameters()]
    runs = [(fast, lambda batch: fast.training_loss(batch).loss), (slow, lambda batch: reference_training_loss(slow, batch))]
    optimisers = [adamw(param_groups(method, 0.7), 1e-3) for method, _ in runs]
    rows, text = torch.arange(4), fast.backbone.tokenize(captions)
    for step in range(3):
        batch = Batch(torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(step)), text, rows, rows)
        for (method, loss_of), optimiser in zip(runs, optimisers):
            optimiser.zero_grad(set_to_none=True)
            loss_of(batch).backward()
            torch.nn.utils.clip_grad_norm_(method.parameters(), 50.0)
            optimiser.step()
    for (name, a), b, a0 in zip(fast.named_parameters(), slow.parameters(), start):
        a, b = a.detach(), b.detach()
        if name.endswith("in_proj_bias"):  # [query | key | value] biases: drop the key third
            third = len(a) // 3
            a, b, a0 = (torch.cat([t[:third], t[2 * third:]]) for t in (a, b, a0))
        moved = (b - a0).norm()  # 0 for a parameter the loss does not use (the backbone's logit scale): then equal
        assert (a - b).norm() <= 5e-3 * moved, name


def test_restricted_vocabulary_is_an_option_off_by_default():
    """NON-PAPER ker_vocab="labels": the MLM softmax over the token ids that occur as labels."""
    from rsnc_bench.backbones import BackboneConfig, build_backbone

    assert EbakerConfig().ker_vocab == "full" and METHODS.get("iebaker").config_type().ker_vocab == "full"
    with pytest.raises(ConfigError, match="choose one of full, labels"):
        EbakerConfig(ker_vocab="keywords")
    torch.manual_seed(0)
    method = Ebaker(build_backbone(BackboneConfig("tiny-vit")), EbakerConfig(ker_vocab="labels")).train()
    captions = ["planes near the airport", "a red roof near trees"]
    method.start_epoch(ctx(1, n_rows=2, captions=captions, tokenizer=method.backbone.tokenizer))
    labels = method.ker_labels[method.ker_labels != 0]
    assert method.ker_vocab_ids.tolist() == sorted(set(labels.tolist()))
    rows = torch.arange(2)
    out = method.training_loss(Batch(torch.randn(2, 3, 48, 48), method.backbone.tokenize(captions), rows, rows))
    assert 0 < out.logs["mlm"] < math.log(len(method.ker_vocab_ids)) + 1  # a softmax over a handful of ids, not 49,408


SYNTHETIC_300 = ("n_train=300", "n_val=40", "n_test=60", "image_size=48")


# kappa = 1: the paper's local scale of 20 collapses the random-init tiny towers under noise
# (docs/methods/rrsitr.md), which leaves nothing for the elimination to find. KER runs in iebaker only, to keep it short.
@pytest.mark.slow
@pytest.mark.parametrize("method, options", [("ebaker", ("ker_weight=0",)), ("iebaker", ("sar=true",))])
def test_eliminated_rows_are_mostly_noisy_on_synthetic_at_noise_0_6(tmp_path, method, options):
    key = CellKey(method, "synthetic", "tiny-vit", "shuffle", 0.6, 42, 3)
    spec = CellSpec(key, data_root=str(tmp_path / "data"), dataset_options=SYNTHETIC_300,
                    method_options=("local_scale=1", "drop_epoch=3", "drop_ratio=0.05", *options))
    doc = run_cell(spec, ResultStore(tmp_path / "runs"))
    assert doc["status"] == "complete", doc.get("traceback")
    history = doc["history"]
    eliminated = [e["logs"]["eliminated"] for e in history]
    assert eliminated[:3] == [0, 0, 0] and min(eliminated[3:]) > 0  # from 0-based epoch 3 on
    last = history[-1]["detection"]
    assert last["n_flagged"] > 0 and last["flag_precision"] > 0.75 and last["auroc"] > 0.6  # base rate 0.6
    if method == "iebaker":
        assert "mlm" in history[-1]["logs"] and "local" in history[-1]["detection_others"]
        assert set(doc["test_variants"]) == {"sar"} and doc["test_variants"]["sar"]["mr"] > 0
