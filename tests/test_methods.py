"""The method contract: InfoNCE by hand, the baselines' capabilities, plugin discovery."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rsnc_bench.engine.cell import CellSpec, run_cell
from rsnc_bench.engine.optim import cosine_with_warmup, param_groups
from rsnc_bench.engine.signals import RowSignals, pair_scores, record_signals
from rsnc_bench.errors import ConfigError
from rsnc_bench.methods import METHODS, TRAIN_ROWS, LossOutput, Registered, info_nce
from rsnc_bench.store import CellKey, ResultStore

from .conftest import TINY_SYNTHETIC

TINY_OPTS = tuple(f"{k}={v}" for k, v in TINY_SYNTHETIC.items())
FAST = ("epochs=2", "batch_size=16")


def test_info_nce_matches_a_hand_computed_value():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    image = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # normalised inside: [1, 0], [.7071, .7071]
    c = 1 / math.sqrt(2)
    # logits (scale 1), rows = texts: [[1, c], [0, c]]
    t2i = [-math.log(math.exp(1) / (math.exp(1) + math.exp(c))), -math.log(math.exp(c) / (1 + math.exp(c)))]
    i2t = [-math.log(math.exp(1) / (math.exp(1) + 1)), math.log(2)]  # columns [1, 0] and [c, c]
    expected = [(a + b) / 2 for a, b in zip(t2i, i2t)]
    loss, per_row = info_nce(text, image, scale=1.0)
    assert per_row.tolist() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(sum(expected) / 2, abs=1e-6)


def test_baselines_are_registered_with_their_capabilities():
    assert {"zeroshot", "clip-ft", "oracle"} <= set(METHODS.names())
    assert not METHODS.get("zeroshot").capabilities.trains
    oracle = METHODS.entry("oracle")  # a data variant: clip-ft itself, on the clean rows
    assert oracle.cls is METHODS.get("clip-ft") and oracle.rows == "clean" and METHODS.entry("clip-ft").rows == "all"
    clean = np.array([True, False, True, False])
    assert TRAIN_ROWS[oracle.rows](clean).tolist() == [0, 2] and TRAIN_ROWS["all"](clean).tolist() == [0, 1, 2, 3]
    assert "clean" in oracle.doc and oracle.doc != METHODS.entry("clip-ft").doc
    assert METHODS.get("clip-ft").train_defaults["lr"] == 7e-6  # methods.md 3.9


def test_weight_decay_only_on_matrices_and_warmup_then_cosine():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    groups = param_groups(model, weight_decay=0.7)
    decayed = [p for g in groups if g["weight_decay"] == 0.7 for p in g["params"]]
    assert [tuple(p.shape) for p in decayed] == [(4, 3)]
    assert sum(len(g["params"]) for g in groups) == 4
    assert cosine_with_warmup(0, 100, 10) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 100, 10) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 100, 10) == pytest.approx(0.5)
    assert cosine_with_warmup(100, 100, 10) == pytest.approx(0.0)


def documented_plugin() -> str:
    """The complete plugin of docs/plugins.md, so that the guide's example is what is tested."""
    guide = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text(encoding="utf-8")
    return guide.split("```python\n", 1)[1].split("```", 1)[0]


def test_a_plugin_outside_the_package_is_found_through_its_entry_point(tmp_path, monkeypatch, synthetic_root):
    code = documented_plugin()
    assert len(code.strip().splitlines()) <= 32  # the guide's promise: a complete method in about 25 lines
    (tmp_path / "outside_plugin.py").write_text(code)
    dist = tmp_path / "outside_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: outside-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rsnc_bench.methods]\noutside = outside_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(METHODS, "_discovered", False)  # discover again, as a fresh process would
    monkeypatch.delitem(sys.modules, "outside_plugin", raising=False)
    assert "hinge" in METHODS.names()
    key = CellKey("hinge", "synthetic", "tiny-vit", "shuffle", 0.4, 0, 1)
    doc = run_cell(CellSpec(key, data_root=str(synthetic_root), dataset_options=TINY_OPTS, train_options=FAST,
                            method_options=("margin=0.1",)), ResultStore(tmp_path / "runs"))
    assert doc["status"] == "complete", doc["error"]
    assert doc["config"]["method"]["margin"] == 0.1 and doc["config"]["capabilities"]["role"] is None
    assert doc["detection"]["n_noisy"] > 0 and 0 <= doc["detection"]["auroc"] <= 1


def test_roles_are_declared_by_each_class_and_not_inherited():
    role = lambda name: METHODS.entry(name).role  # noqa: E731
    assert role("clip-ft") == "baseline" and role("oracle") == "upper-bound"
    assert role("rrsitr") is None and role("zeroshot") is None

    class MyVariant(METHODS.get("clip-ft")):  # a subclass is another method, not the baseline
        pass

    assert Registered(MyVariant, "all", "").role is None
    caps = METHODS.entry("iebaker").record()
    assert caps == {"trains": True, "needs_tokens": True, "train_rows": "all", "role": None}
    assert not METHODS.entry("zeroshot").record()["trains"] and METHODS.entry("oracle").record()["train_rows"] == "clean"


def test_the_harness_keeps_the_latest_signals_per_row_and_checks_their_shape():
    signals = RowSignals(n_rows=4)  # rows 1 and (in the first step) 3 not seen: the arrays still cover every row
    record_signals(signals, torch.tensor([0, 2]), LossOutput(torch.tensor(0.0), clean=torch.tensor([0.5, -1.0]),
                                                             flagged=torch.tensor([False, True]), others={"gate": torch.tensor([1.0, 2.0])}))
    np.testing.assert_array_equal(pair_scores(signals).clean_score, [0.5, np.nan, -1.0, np.nan])
    record_signals(signals, torch.tensor([2, 3]), LossOutput(torch.tensor(0.0), clean=torch.tensor([0.25, 3.0]),
                                                             flagged=torch.tensor([False, False]), others={"gate": torch.tensor([5.0, 6.0])}))
    scores = pair_scores(signals)
    np.testing.assert_array_equal(scores.clean_score, [0.5, np.nan, 0.25, 3.0])  # row 2: the later value
    assert scores.flagged_noisy.tolist() == [False, False, False, False]
    np.testing.assert_array_equal(scores.others["gate"], [1.0, np.nan, 5.0, 6.0])
    assert pair_scores(RowSignals()) is None  # no signal given: no detection
    with pytest.raises(ConfigError, match="one value per batch row"):
        record_signals(signals, torch.tensor([0, 1]), LossOutput(torch.tensor(0.0), clean=torch.tensor([1.0])))
    with pytest.raises(ConfigError, match="give clean too"):
        record_signals(signals, torch.tensor([0]), LossOutput(torch.tensor(0.0), flagged=torch.tensor([True])))
