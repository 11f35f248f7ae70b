"""`rsnc-bench run` and `report`: grids from flags and YAML, clear errors, the leaderboard."""

from __future__ import annotations

from pathlib import Path

import pytest

from rsnc_bench.errors import ConfigError
from rsnc_bench.grid import expand
from rsnc_bench.grid_config import load_grid
from rsnc_bench.methods import METHODS

from .test_cli import TINY, assert_user_error, run


@pytest.mark.slow
def test_run_then_report_writes_one_json_per_cell_and_a_leaderboard(tmp_path, synthetic_root):
    out = tmp_path / "runs"
    result = run("run", "--backbone", "tiny-vit", "--methods", "zeroshot,clip-ft", "--noise", "0,0.4", "--seeds", "3", "--data-root", synthetic_root,
                 *TINY, "-t", "epochs=1", "-t", "batch_size=16", "--out", out)
    assert result.exit_code == 0, result.output
    results = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json") if "noise" not in p.parts)
    assert results == ["grid.json",
        "synthetic/tiny-vit/clip-ft/rrsitr-r0-n42-s3.json", "synthetic/tiny-vit/clip-ft/rrsitr-r0.4-n42-s3.json",
        "synthetic/tiny-vit/zeroshot/rrsitr-r0-n42-s3.json", "synthetic/tiny-vit/zeroshot/rrsitr-r0.4-n42-s3.json",
    ]
    assert "4 cells run (0 failed), 0 already complete" in result.output
    assert "| clip-ft " in result.output and "| clip-ft " in (out / "report" / "tables.md").read_text()  # printed, and a report section
    assert not (out / "leaderboard.md").exists()  # one layout: the report's
    again = run("run", "--backbone", "tiny-vit", "--methods", "zeroshot,clip-ft", "--noise", "0,0.4", "--seeds", "3", "--data-root", synthetic_root,
                *TINY, "-t", "epochs=1", "-t", "batch_size=16", "--out", out)
    assert "0 cells run (0 failed), 4 already complete" in again.output
    (out / "report" / "tables.md").unlink()
    report = run("report", "--out", out)
    assert report.exit_code == 0 and (out / "report" / "tables.md").exists() and "| zeroshot " in report.output
    assert (out / "report" / "report.html").is_file() and "report: " in report.output


@pytest.mark.parametrize("args, fragments", [
    (["--methods", "clip-fx"], ["unknown method 'clip-fx'", "clip-ft"]),
    (["--datasets", "rsicdd"], ["unknown dataset 'rsicdd'"]),
    (["--backbone", "ViT-B-23"], ["unknown backbone 'ViT-B-23'"]),
    (["--backbone", "tiny-b32", "--pretrained", "/nowhere/RemoteCLIP-ViT-B-32.pt"], ["/nowhere/RemoteCLIP-ViT-B-32.pt", "not found"]),
    (["--noise", "0.2,x"], ["noise"]),
    (["--noise", "1.5"], ["outside [0, 1)"]),
    (["-t", "epochz=3"], ["unknown option 'epochz'"]),
    (["-m", "clip-ft:scale=3"], ["unknown option 'scale'"]),
    (["-o", "n_trian=3"], ["unknown option 'n_trian'"]),
    (["--config", "missing.yaml"], ["missing.yaml", "not found"]),
    (["--seeds", ","], ["seeds is empty", "--seeds 3"]),
    (["--noise", " "], ["noise is empty", "--noise 0.4"]),
    (["--methods", ","], ["methods is empty", "--methods clip-ft"]),
    (["--seeds", "-1"], ["train seed -1 is outside"]),
    (["--device", "bogus"], ["--device 'bogus' is not a device"]),
    (["--noise-seeds", "4294967296"], ["noise seed 4294967296 is outside"]),
])
def test_bad_run_arguments_fail_before_training(tmp_path, args, fragments):
    out = tmp_path / "runs"
    result = run("run", "--out", out, *args)
    assert_user_error(result, *fragments)
    assert not out.exists() or not list(out.rglob("*.json"))  # nothing ran


def test_yaml_grid_with_command_line_overrides(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("methods: [clip-ft, oracle]\nnoise: [0.2, 0.6]\nseeds: 3,13\ntrain: {epochs: 2}\n"
                    "method_options: {clip-ft: {logit_scale: 10}}\ndataset_options: {n_train: 100}\n")
    grid = load_grid(path, {"noise": "0.8", "seeds": None})
    assert grid.methods == ("clip-ft", "oracle") and grid.noise == (0.8,) and grid.seeds == (3, 13)
    assert grid.train == ("epochs=2",) and grid.method_options == ("clip-ft:logit_scale=10",)
    path.write_text("methods: [clip-ft]\nnoize: [0.2]\n")
    with pytest.raises(ConfigError, match="unknown key 'noize'"):
        load_grid(path)
    path.write_text("methods: [clip-ft\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_grid(path)
    path.write_text("out:\npretrained:\n")  # an empty out used to become a folder named "None"
    with pytest.raises(ConfigError, match="out is empty"):
        load_grid(path)
    path.write_text("pretrained:\n")  # optional keys may stay empty
    assert load_grid(path).pretrained is None


def test_report_on_a_missing_folder(tmp_path):
    assert_user_error(run("report", "--out", tmp_path / "nope"), "not found")


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "benchmarks" / "grids").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_grid_file_expands(path):
    cells = expand(load_grid(path))
    assert cells and all(cell.key.method in METHODS for cell in cells)


def test_rrsitr_paper_grid_is_rrsitrs_protocol():
    cells = expand(load_grid(Path(__file__).parents[1] / "benchmarks" / "grids" / "rrsitr-paper.yaml"))
    assert len(cells) == 3 * 2 * 5 * 5
    assert {c.key.noise_protocol for c in cells} == {"rrsitr"} and {c.key.train_seed for c in cells} == {3, 13, 25, 42, 65}
    rrsitr = next(c for c in cells if c.key.method == "rrsitr").train_config
    assert (rrsitr.epochs, rrsitr.batch_size, rrsitr.lr, rrsitr.warmup_steps, rrsitr.weight_decay) == (50, 100, 7e-6, 200, 0.7)


def test_every_grid_field_is_a_run_option_and_reaches_the_grid(tmp_path, monkeypatch):
    """The options are generated from GridConfig's fields: freeze_image / freeze_text had none."""
    import dataclasses

    import rsnc_bench.cli as cli
    import rsnc_bench.grid as grid_module
    from rsnc_bench.grid_config import GridConfig

    grids = []
    monkeypatch.setattr(grid_module, "run_grid", lambda grid, on_done: (grids.append(grid), ([], 0, 0))[1])
    monkeypatch.setattr(cli, "_write_report", lambda out, options=None: None)
    result = run("run", "--freeze-image", "--no-freeze-text", "--force", "-b", "norm=rs5m", "-b", "x=1", "--workers", "2",
                 "--data-root", tmp_path, "--seeds", "3,13", "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    (grid,) = grids
    assert grid.freeze_image and not grid.freeze_text and grid.force and grid.workers == 2
    assert grid.backbone_options == ("norm=rs5m", "x=1") and grid.seeds == (3, 13) and grid.data_root == str(tmp_path)
    assert grid.backbone_config("tiny-clip").freeze_image
    config = tmp_path / "grid.yaml"  # options not given on the command line leave the YAML's values alone
    config.write_text("train: {epochs: 2}\nbackbone_options: [norm=rs5m]\nquick_gelu: true\nforce: true\n")
    assert run("run", "--config", config, "--out", tmp_path / "runs").exit_code == 0
    assert grids[-1].train == ("epochs=2",) and grids[-1].backbone_options == ("norm=rs5m",) and grids[-1].quick_gelu and grids[-1].force
    shown = run("run", "--help").output
    for field in dataclasses.fields(GridConfig):
        assert field.metadata["cli"].names[0] in shown, field.name
