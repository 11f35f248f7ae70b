"""The command line: the main job, and every bad input as one line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rsnc_bench.cli import app

from .conftest import TINY_SYNTHETIC
from .layouts import five, write_amfmn, write_csv, write_image, write_karpathy

runner = CliRunner()
TINY = [arg for k, v in TINY_SYNTHETIC.items() for arg in ("-o", f"{k}={v}")]


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments: str):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error: ")]
    assert len(error_lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def test_noise_make_show_and_rerun_on_synthetic(tmp_path, synthetic_root):
    out = tmp_path / "noise"
    result = run("noise", "make", "--data-root", synthetic_root, *TINY, "-r", "0.2,0.6", "--out", out)
    assert result.exit_code == 0, result.output
    made = sorted(out.rglob("*.json"))
    assert [p.name for p in made] == ["rrsitr-r0.2-s42.json", "rrsitr-r0.6-s42.json"]
    assert "0.60" in result.output and "(written)" in result.output
    shown = run("noise", "show", made[1])
    assert shown.exit_code == 0 and "verified" in shown.output and "protocol rrsitr" in shown.output
    again = run("noise", "make", "--data-root", synthetic_root, *TINY, "-r", "0.2,0.6", "--out", out)
    assert again.output.count("(unchanged)") == 2


def test_existing_manifest_is_never_overwritten_without_force(tmp_path, synthetic_root):
    out = tmp_path / "noise"
    assert run("noise", "make", "--data-root", synthetic_root, *TINY, "-r", "0.2", "--out", out).exit_code == 0
    path = next(out.rglob("*.json"))
    before = path.read_bytes()
    path.write_bytes(before.replace(b'"seed": 42', b'"seed": 43'))  # now a different (tampered) file
    tampered = path.read_bytes()
    result = run("noise", "make", "--data-root", synthetic_root, *TINY, "-r", "0.2", "--out", out)
    assert_user_error(result, "exists with other content", "--force")
    assert path.read_bytes() == tampered
    assert_user_error(run("noise", "show", path), "hash does not match")
    assert run("noise", "make", "--data-root", synthetic_root, *TINY, "-r", "0.2", "--out", out, "--force").exit_code == 0
    assert path.read_bytes() == before


def test_list_commands():
    assert "rsicd" in run("list", "datasets").output and "synthetic" in run("list", "datasets").output
    assert "rrsitr" in run("list", "noise").output and "hard" in run("list", "noise", "h*").output
    assert run("list", "methods").exit_code == 0


def rsicd_json(root: Path, entries: list) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "RSICD_images").mkdir(exist_ok=True)
    (root / "dataset_rsicd.json").write_text(json.dumps({"images": entries}))
    return root


def entry(name: str, split: str = "train") -> dict:
    return {"filename": name, "split": split, "sentences": [{"raw": c} for c in five(name)]}


def bad_inputs(tmp: Path) -> dict[str, tuple[list, tuple[str, ...]]]:
    """name -> (arguments, fragments the one error line must contain)."""
    cases: dict[str, tuple[list, tuple[str, ...]]] = {}
    cases["missing root"] = (["-d", "rsicd", "--data-root", tmp / "absent"], ("not found", "dataset_rsicd.json"))
    (tmp / "empty").mkdir()
    cases["missing file"] = (["-d", "rsicd", "--data-root", tmp / "empty"], ("no json file at", "dataset_rsicd.json"))
    bad_json = tmp / "badjson"
    rsicd_json(bad_json, [])
    (bad_json / "dataset_rsicd.json").write_text('{"images": [\n  {"filename": "a_1.jpg",,}\n]}')
    cases["malformed json"] = (["-d", "rsicd", "--data-root", bad_json], ("dataset_rsicd.json:2:", "malformed JSON"))
    no_key = rsicd_json(tmp / "nokey", [{"filename": "a_1.jpg", "sentences": []}])
    cases["json missing key"] = (["-d", "rsicd", "--data-root", no_key], ("images[0] has no 'split'",))
    escape = rsicd_json(tmp / "escape", [entry("../../etc/passwd")])
    cases["escaping name"] = (["-d", "rsicd", "--data-root", escape], ("escapes the image folder",))
    missing_images = rsicd_json(tmp / "noimages", [entry(f"a_{i}.jpg") for i in range(3)] + [entry("t_1.jpg", "test")])
    cases["missing images"] = (["-d", "rsicd", "--data-root", missing_images], ("are missing under", "--image-dir"))
    csv_root = tmp / "csv"
    (csv_root / "RSICD_images").mkdir(parents=True)
    (csv_root / "rsicd_test.csv").write_text('filename,title\na_1.jpg,fine\na_2.jpg,"one",extra\n')
    cases["malformed csv"] = (["-d", "rsicd", "--layout", "csv", "--data-root", csv_root], ("rsicd_test.csv:3:", "fields"))
    amfmn = write_amfmn(tmp / "amfmn", "rsicd", "RSICD_images", [("a_1.jpg", five("a")), ("a_2.jpg", five("b"))], [])
    (amfmn / "rsicd_precomp" / "train_caps.txt").write_text("one\ntwo\nthree\n")
    cases["caption count"] = (["-d", "rsicd", "--layout", "amfmn", "--data-root", amfmn], ("train_caps.txt", "3 caption lines", "2 lines"))
    cases["unknown dataset"] = (["-d", "rsicdd"], ("unknown dataset 'rsicdd'", "did you mean 'rsicd'"))
    cases["unknown protocol"] = (["-p", "rrsitrr"], ("unknown noise protocol", "did you mean 'rrsitr'"))
    cases["unknown layout"] = (["-d", "rsicd", "--layout", "json"], ("has no layout 'json'", "karpathy"))
    cases["rate too high"] = (["-r", "0.2,1.0"], ("noise rate 1.0 is outside [0, 1)",))
    cases["rate not a number"] = (["-r", "0.2,lots"], ("not a comma-separated list",))
    cases["bad dataset option"] = (["-o", "n_train=many"], ("n_train='many' is not a valid int",))
    cases["negative seed"] = (["--seed", "-5"], ("noise seed -5 is outside",))
    return cases


BAD_INPUTS = ["missing root", "missing file", "malformed json", "json missing key", "escaping name", "missing images",
              "malformed csv", "caption count", "unknown dataset", "unknown protocol", "unknown layout", "rate too high",
              "rate not a number", "bad dataset option", "negative seed"]


def test_every_bad_input_case_is_parametrized(tmp_path):
    assert sorted(bad_inputs(tmp_path)) == sorted(BAD_INPUTS)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, case):
    args, fragments = bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    result = run("noise", "make", *args, "--out", out)
    assert_user_error(result, *fragments)
    assert not out.exists()


def test_unreadable_image_is_named_by_data_check(tmp_path):
    images = [(f"airport_{i}.jpg", "train", five(str(i))) for i in range(3)] + [("beach_1.jpg", "test", five("t"))]
    root = write_karpathy(tmp_path / "ds", "dataset_rsicd.json", "RSICD_images", images, image_format="JPEG")
    (root / "RSICD_images" / "airport_1.jpg").write_bytes(b"\xff\xd8 truncated")
    assert_user_error(run("data", "check", "-d", "rsicd", "--data-root", root, "--size", 16), "airport_1.jpg: cannot read image")
    (root / "RSICD_images" / "airport_1.jpg").unlink()
    write_image(root / "RSICD_images" / "airport_1.jpg", fmt="JPEG")
    cache = tmp_path / "cache"
    result = run("data", "check", "-d", "rsicd", "--data-root", root, "--size", 16, "--cache-dir", cache)
    assert result.exit_code == 0 and "cached" in result.output
    assert len(list(cache.glob("*.npy"))) == 3


def test_import_via_cli(tmp_path, synthetic_root):
    from rsnc_bench.data import load_dataset
    train = load_dataset("synthetic", synthetic_root, options=TINY_SYNTHETIC)["train"]
    rows = [(train.images[i], train.captions[(r + 5) % train.n_rows]) for r, i in enumerate(train.img_of)]
    noisy = write_csv(tmp_path / "noisy.csv", rows)
    out = tmp_path / "imported.json"
    result = run("noise", "import", noisy, "--data-root", synthetic_root, *TINY, "--out", out)
    assert result.exit_code == 0, result.output
    assert "realized rate" in result.output and out.exists()
    short = write_csv(tmp_path / "short.csv", rows[:10])
    assert_user_error(run("noise", "import", short, "--data-root", synthetic_root, *TINY, "--out", tmp_path / "x.json"),
                      "short.csv", "has 10 rows")
    assert not (tmp_path / "x.json").exists()


def test_run_help_shows_every_default_and_the_non_paper_ones():
    """rich reads an unescaped [default: ...] as markup and drops it; the defaults must be visible."""
    from rsnc_bench.backbones import TRAIN_HINTS
    from rsnc_bench.grid_config import GridConfig

    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert GridConfig().noise_protocol == "rrsitr"  # the field's protocol (protocol.md 4.1), as the README says
    for shown in ["[default: * (every registered method)]", "[default: synthetic]", "[default: tiny-clip]",
                  "[default: 0.0,0.4,0.8]", "[default: rrsitr]", "[default: 42]", "[default: 3,13,25]", "[default: runs]"]:
        assert shown in text, shown
    for name, hints in TRAIN_HINTS.items():  # every budget value a preset changes
        assert f"{name}: " + ", ".join(f"{k} {v:g}" for k, v in hints.items()) in text
    assert "docs/fidelity.md" in text and "bank_size=0" in text
