"""OSA (methods-npc-osa.md section 3): the weights and the loss by hand, the guard, beta's recipe,
a frozen and pristine estimator, and the behaviour the paper claims with an oracle estimator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rsnc_bench.backbones import BackboneConfig, Features, build_backbone
from rsnc_bench.engine.cell import CellSpec, run_cell
from rsnc_bench.engine.detection import detection_metrics
from rsnc_bench.errors import ConfigError
from rsnc_bench.methods import METHODS, Batch, EpochContext
from rsnc_bench.store import CellKey, ResultStore
from rsnc_builtin_methods.osa import Osa, OsaConfig, code_weights, osa_loss, paper_weights, random_pair_beta

from .conftest import TINY_SYNTHETIC

CPU = torch.device("cpu")


def test_weights_by_hand():
    d = torch.tensor([0.10, 0.05, 0.02, 0.0])  # s = (0.30, 0.25, 0.22, 0.19), beta = 0.20
    torch.testing.assert_close(code_weights(d), torch.tensor([0.0, 0.1875, 0.0384, 0.0]))  # x = (1, .5, .2, 0): the top pair gets 0
    torch.testing.assert_close(paper_weights(d), torch.tensor([0.009, 0.002375, 0.000392, 0.0]))


def test_loss_by_hand_on_two_rows():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # CE of row 1 both ways: log(1 + e^-1) = 0.313262
    d = torch.tensor([0.30, 0.25]) - 0.20
    assert osa_loss(logits, code_weights(d)).item() == pytest.approx(0.029368, abs=1e-6)
    assert osa_loss(logits, paper_weights(d)).item() == pytest.approx(0.000943, abs=1e-6)


class ConstantEncoder(nn.Module):
    """Every image embeds as ``u`` and every caption as ``v`` (for beta), or each row as given."""

    image_size, embed_dim = 8, 3

    def __init__(self, u, v):
        super().__init__()
        self.u, self.v = torch.tensor(u), torch.tensor(v)

    def tokenize(self, texts):
        return torch.zeros(len(texts), 5, dtype=torch.long)

    def encode_image(self, images, tokens=False):
        return Features(self.u.expand(len(images), -1))

    def encode_text(self, text, tokens=False):
        return Features(self.v.expand(len(text), -1))


def test_beta_follows_the_random_pair_recipe():
    u, v = [1.0, 2.0, 0.0], [2.0, 1.0, 1.0]
    expected = sum(a * b for a, b in zip(u, v)) / math.sqrt(5) / math.sqrt(6)
    assert random_pair_beta(ConstantEncoder(u, v), 4, 0, CPU) == pytest.approx(expected, rel=1e-6)
    backbone = build_backbone(BackboneConfig("tiny-vit"))
    first, second = (random_pair_beta(backbone, 16, 99, CPU) for _ in range(2))
    assert first == second and -1 < first < 1  # seeded: bit-identical
    assert random_pair_beta(backbone, 16, 98, CPU) != first


def small_batch(backbone, n: int = 6) -> Batch:
    torch.manual_seed(1)
    rows = torch.arange(n)
    text = backbone.tokenize([f"caption number {i} of a harbour" for i in range(n)])
    return Batch(torch.randn(n, 3, backbone.image_size, backbone.image_size), text, rows, rows)


def test_the_estimator_stays_frozen_and_pristine_across_training_and_resume():
    torch.manual_seed(0)
    method = Osa(build_backbone(BackboneConfig("tiny-vit")), OsaConfig(beta_pairs=8)).train()
    pristine = [p.detach().clone() for p in method.estimator.parameters()]
    method.start_epoch(EpochContext(1, 1, 6, 1, CPU))
    assert not any(p is q for p in method.parameters() for q in method.estimator.parameters())  # not trained by the harness
    assert not any(k.startswith("estimator") for k in method.state_dict())
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-2)
    start = [p.detach().clone() for p in method.backbone.parameters()]
    batch = small_batch(method.backbone)
    method.beta = -1.0  # every pair above beta, so every step has a gradient
    for _ in range(3):
        optimizer.zero_grad()
        method.training_loss(batch).loss.backward()
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(method.estimator.parameters(), pristine))
    assert not all(torch.equal(p, q) for p, q in zip(method.backbone.parameters(), start))
    torch.manual_seed(0)
    resumed = Osa(build_backbone(BackboneConfig("tiny-vit")), OsaConfig(beta_pairs=8))  # as a resumed cell builds it
    resumed.load_state_dict(method.state_dict())
    assert resumed.beta == -1.0  # beta comes back from the checkpoint
    assert all(torch.equal(p, q) for p, q in zip(resumed.estimator.parameters(), pristine))  # the initial model, not the trained one


def test_a_batch_with_no_pair_above_beta_trains_nothing_and_stays_finite():
    torch.manual_seed(0)
    method = Osa(build_backbone(BackboneConfig("tiny-vit"))).train()
    method.beta = 2.0  # above any cosine
    out = method.training_loss(small_batch(method.backbone))
    assert out.loss.item() == 0.0 and torch.isfinite(out.loss) and out.flagged.all()
    out.loss.backward()  # the graph survives


def test_an_oracle_estimator_zeroes_every_noisy_row_and_flags_exactly_them():
    """The paper's claim, with an estimator that knows the truth: clean pairs cosine about 0.3, noisy 0.1, beta 0.2."""
    clean = torch.tensor([True, False, True, True, False, True])

    class Oracle(nn.Module):
        def encode_image(self, images, tokens=False):
            return Features(torch.tensor([[1.0, 0.0]]).expand(len(images), -1))

        def encode_text(self, text, tokens=False):
            row = text[:, 0]
            s = torch.where(clean[row], 0.3 - 0.01 * row, 0.1)  # distinct clean cosines: only the top one gets 0
            return Features(torch.stack([s, (1 - s.square()).sqrt()], 1))

    torch.manual_seed(0)
    method = Osa(build_backbone(BackboneConfig("tiny-vit")), OsaConfig(beta=0.2)).train()
    object.__setattr__(method, "estimator", Oracle())
    batch = small_batch(method.backbone)
    batch.text[:, 0] = batch.rows  # the oracle reads the row from the first token
    out = method.training_loss(batch)
    weight = out.others["train_weight"]
    assert (weight[~clean] == 0).all() and (weight[clean] > 0).sum() == clean.sum() - 1
    metrics = detection_metrics(out.clean.numpy(), clean.numpy(), out.flagged.numpy())
    assert metrics.flag_precision == 1.0 and metrics.flag_recall == 1.0 and metrics.auroc == 1.0


def test_osa_trains_in_a_cell_with_its_recipe_and_reports_detection(tmp_path, synthetic_root):
    key = CellKey("osa", "synthetic", "tiny-vit", "shuffle", 0.4, 0, 1)
    options = tuple(f"{k}={v}" for k, v in TINY_SYNTHETIC.items())
    doc = run_cell(CellSpec(key, data_root=str(synthetic_root), dataset_options=options,
                            train_options=("epochs=2", "batch_size=16"), method_options=("beta_pairs=16",)), ResultStore(tmp_path))
    assert doc["status"] == "complete", doc.get("traceback") or doc["error"]
    train = doc["config"]["train"]
    assert (train["augment"], train["adam_beta2"], train["adam_eps"]) == (False, 0.98, 1e-6)  # the reference recipe
    logs = doc["history"][-1]["logs"]
    assert -1 < logs["beta"] < 1 and 0 <= logs["below_beta"] <= 1 and logs["logit_scale"] > 0
    assert doc["detection"]["n_scored"] > 0 and 0 <= doc["detection"]["auroc"] <= 1 and "train_weight" in doc["history"][-1]["detection_others"]


def test_config_errors_and_registration():
    with pytest.raises(ConfigError, match="choose one of code, paper"):
        OsaConfig(scoring="median")
    assert METHODS.get("osa").train_defaults["lr"] == 1e-5 and METHODS.entry("osa").role is None
