"""The built-in pretrained backbone: deterministic pretraining, an ordinary open_clip checkpoint,
a verified cache that rebuilds when absent, stale or corrupt, and a pretrained start."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from rsnc_bench import pretrain
from rsnc_bench.backbones import BackboneConfig, build_backbone
from rsnc_bench.data.synthetic import SOURCE_CLASSES, draw_image

from .conftest import TINY_RECIPE
from .test_cli import assert_user_error, run


def _weights(encoder) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in encoder.model.state_dict().items()}


def test_pretraining_is_deterministic_per_seed_and_moves_the_weights():
    first, again = pretrain.pretrain(TINY_RECIPE), pretrain.pretrain(TINY_RECIPE)
    other = pretrain.pretrain(dataclasses.replace(TINY_RECIPE, seed=TINY_RECIPE.seed + 1))
    a, b, c = _weights(first), _weights(again), _weights(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    torch.manual_seed(TINY_RECIPE.seed)
    untrained = _weights(build_backbone(BackboneConfig(TINY_RECIPE.arch)))
    assert not torch.equal(a["visual.conv1.weight"], untrained["visual.conv1.weight"])


def test_source_domain_shifts_classes_and_phrasing():
    classes = {draw_image(7, i, 64, 0.0, domain="source")[0] for i in range(80)}
    assert classes <= set(SOURCE_CLASSES) and {"roundabout", "solarfarm", "greenhouses"} & classes
    assert not classes & {"beach", "pond", "playground", "storagetanks"}
    captions = [c for i in range(40) for c in draw_image(7, i, 64, 0.0, domain="source")[2]]
    target = [c for i in range(40) for c in draw_image(7, i, 64, 0.0)[2]]
    assert not set(captions) & set(target)


def test_checkpoint_round_trips_through_pretrained_file(tiny_cache):
    folder = pretrain.ensure_checkpoint("tiny-clip")
    preset = build_backbone(BackboneConfig("tiny-clip"))
    loaded = build_backbone(BackboneConfig("tiny-b32", pretrained=str(folder / pretrain.WEIGHTS_NAME)))
    local = build_backbone(BackboneConfig(f"local-dir:{folder}"))
    text = preset.tokenize(["an airport with two planes ."])
    images = torch.randn(2, 3, preset.image_size, preset.image_size)
    with torch.no_grad():
        for other in (loaded, local):
            assert torch.equal(preset.encode_text(text).embedding, other.encode_text(text).embedding)
            assert torch.equal(preset.encode_image(images).embedding, other.encode_image(images).embedding)
    assert preset.provenance["sha256"] == pretrain.sha256_file(folder / pretrain.WEIGHTS_NAME)


def test_cache_is_reused_then_rebuilt_when_corrupt_or_absent(tiny_cache, capsys):
    folder = pretrain.ensure_checkpoint("tiny-clip")
    weights = folder / pretrain.WEIGHTS_NAME
    stamp = weights.stat().st_mtime_ns
    capsys.readouterr()
    pretrain.ensure_checkpoint("tiny-clip")
    assert weights.stat().st_mtime_ns == stamp and "building" not in capsys.readouterr().err  # reused, silently

    good = weights.read_bytes()
    weights.write_bytes(good[:-100])  # truncated
    pretrain.ensure_checkpoint("tiny-clip")
    err = capsys.readouterr().err
    assert "does not match its sha256" in err and "building" in err
    assert weights.read_bytes() == good  # rebuilt, and deterministic

    record = json.loads((folder / pretrain.RECORD_NAME).read_text())
    record["recipe"]["epochs"] += 1
    (folder / pretrain.RECORD_NAME).write_text(json.dumps(record))
    pretrain.ensure_checkpoint("tiny-clip")
    assert "another recipe" in capsys.readouterr().err

    shutil.rmtree(folder)
    pretrain.ensure_checkpoint("tiny-clip")
    assert "not built yet" in capsys.readouterr().err and weights.read_bytes() == good


def test_pretrain_command_and_its_errors(tiny_cache):
    result = run("pretrain")
    assert result.exit_code == 0 and "tiny-clip:" in result.output and "sha256" in result.output
    assert_user_error(run("pretrain", "tiny-clop"), "no pretraining recipe named 'tiny-clop'")
    assert_user_error(run("run", "--backbone", "tiny-clip", "--pretrained", __file__, "--methods", "zeroshot"),
                      "tiny-clip brings its own weights")


@pytest.mark.slow
def test_zero_shot_from_the_preset_is_clearly_above_chance(tiny_cache, tmp_path, synthetic_root, monkeypatch):
    """A tiny end-to-end run in the pretrained regime: zero-shot mR well above chance."""
    from .conftest import LEARNING_RECIPE, TINY_SYNTHETIC
    monkeypatch.setenv("RSNC_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.RECIPES, "tiny-clip", LEARNING_RECIPE)
    out = tmp_path / "runs"
    options = [a for k, v in TINY_SYNTHETIC.items() for a in ("-o", f"{k}={v}")]
    result = run("run", "--backbone", "tiny-clip", "--methods", "zeroshot", "--noise", "0", "--data-root", synthetic_root,
                 *options, "--out", out)
    assert result.exit_code == 0, result.output
    doc = json.loads(next(out.rglob("zeroshot/*.json")).read_text())
    n_test = TINY_SYNTHETIC["n_test"]
    chance = 100 * (1 + 5 + 10) / 3 / n_test  # recall@K of a random ranking is about K / n_test both ways
    assert doc["test"]["mr"] > 1.6 * chance, (doc["test"]["mr"], chance)
    record = pretrain.checkpoint_record(tmp_path / "cache" / "pretrained" / "tiny-clip")
    assert doc["config"]["backbone_weights"]["sha256"] == record["sha256"]
