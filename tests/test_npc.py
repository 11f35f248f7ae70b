"""NPC (methods-npc-osa.md section 2): the weight rule and the two reductions by hand, identity at
a zero look-ahead step, the siamese copy's isolation, the memory bank's mixture and neighbours,
a cell, and (slow) the paper's premise on the synthetic target."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rsnc_bench.backbones import BackboneConfig, build_backbone
from rsnc_bench.engine.cell import CellSpec, run_cell
from rsnc_bench.errors import ConfigError
from rsnc_bench.methods import METHODS, Batch, EpochContext
from rsnc_bench.store import CellKey, ResultStore
from rsnc_builtin_methods.npc import (
    Npc,
    NpcConfig,
    confidence_weights,
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
    """Train rows as batches (what EpochContext.batch_of gives), from fixed tensors."""

    def __init__(self, backbone, n: int = 8, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=g)
        self.text = backbone.tokenize([f"caption {i} of a harbour with {i % 3} ships" for i in range(n)])

    def __call__(self, rows) -> Batch:
        rows = torch.as_tensor(rows)
        return Batch(self.images[rows], self.text[rows], rows, rows)


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
