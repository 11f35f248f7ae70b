"""The bad-input corpus: every command, given broken files, images, names, numbers, paths, YAML,
weights, manifests or result files, prints one line naming the file and the fix, exits 2
without a traceback, and writes nothing.

Each case builds its input in a fresh folder from a small valid RSICD-like dataset and returns
the command line; the folder is snapshotted before and after the command.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from rsnc_bench.cli import app

from .layouts import five, write_amfmn, write_image, write_karpathy, write_nwpu
from .test_cli import assert_user_error, runner

TRAIN = [(f"airport_{i}.jpg", "train", five(f"airport {i}")) for i in range(6)]
TEST = [(f"beach_{i}.jpg", "test", five(f"beach {i}")) for i in range(3)]
RUN = ["--backbone", "tiny-vit", "--methods", "zeroshot", "--noise", "0.4", "--seeds", "1"]


def rsicd(root: Path, images=None) -> Path:
    """A valid RSICD Karpathy layout (train, val carved, test) under ``root``."""
    return write_karpathy(root, "dataset_rsicd.json", "RSICD_images", images or TRAIN + TEST)


def json_of(root: Path) -> Path:
    return root / "dataset_rsicd.json"


def edit_json(root: Path, change: Callable[[dict], None]) -> Path:
    doc = json.loads(json_of(root).read_text())
    change(doc)
    json_of(root).write_text(json.dumps(doc))
    return root


def check(root: Path, *extra: str) -> list:
    return ["data", "check", "-d", "rsicd", "--data-root", root, *extra]


def run_rsicd(root: Path, *extra: str) -> list:
    return ["run", "--datasets", "rsicd", "--data-root", root, *RUN, "--out", root.parent / "runs", *extra]


def csv_rsicd(t: Path, text: str) -> Path:
    root = t / "data"
    (root / "RSICD_images").mkdir(parents=True)
    for name in ("a_1.jpg", "b_1.jpg", "c_1.jpg"):
        write_image(root / "RSICD_images" / name)
    (root / "rsicd_test.csv").write_text(text)
    return root


def grid_file(t: Path, text: str | bytes) -> Path:
    path = t / "grid.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def a_file(path: Path, text: str = "not a folder") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def manifest(t: Path, seed: int = 42) -> Path:
    """A valid manifest of the dataset at t/data, made with `noise make`."""
    root = rsicd(t / "data")
    result = runner.invoke(app, [str(a) for a in ["noise", "make", "-d", "rsicd", "--data-root", root, "-r", "0.4", "-s", seed, "--out", t / "noise"]])
    assert result.exit_code == 0, result.output
    return next((t / "noise").rglob(f"*-s{seed}.json"))


class Planted:
    """A pickle that creates ``marker`` when a loader that runs code unpickles it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def planted_weights(t: Path) -> Path:
    torch.save({"state_dict": Planted(t / "pwned")}, t / "weights.pt")
    return t / "weights.pt"


def image_16bit_float(t: Path) -> Path:
    root = rsicd(t / "data")
    Image.fromarray(np.full((32, 32), 7.5, dtype=np.float32)).save(root / "RSICD_images" / "beach_0.tif")
    return edit_json(root, lambda d: d["images"][-3].update(filename="beach_0.tif"))


def symlink_out(t: Path) -> Path:
    root = rsicd(t / "data")
    write_image(t / "elsewhere" / "secret.jpg")
    target = root / "RSICD_images" / "beach_0.jpg"
    target.unlink()
    target.symlink_to(t / "elsewhere" / "secret.jpg")
    return root


def changed_after_noise(t: Path) -> Path:
    manifest_path = manifest(t)
    (t / "runs" / "noise").mkdir(parents=True)
    os.replace(manifest_path.parent, t / "runs" / "noise" / manifest_path.parent.name)
    return edit_json(t / "data", lambda d: [entry["sentences"][0].update(raw="edited") for entry in d["images"][:len(TRAIN)]])


def complete_cell_with_changed_manifest(t: Path) -> list:
    root = rsicd(t / "data")
    args = run_rsicd(root, "-t", "epochs=0")
    assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    path = next((t / "runs" / "noise").rglob("*.json"))
    os.replace(manifest(t / "other", seed=7), path)  # another manifest under the cell's manifest's name
    return args


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[Path], list]
    fragments: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


def case(id: str, args: Callable[[Path], list], *fragments: str, env: dict | None = None) -> Case:
    return Case(id, args, fragments, tuple((env or {}).items()))


CASES = [
    # --- formats: Karpathy JSON ---------------------------------------------------------------
    case("json-truncated", lambda t: check(overwrite(rsicd(t / "data"), "dataset_rsicd.json", b'{"images": [')), "dataset_rsicd.json", "malformed JSON", "fix the file"),
    case("json-no-images-key", lambda t: check(edit_json(rsicd(t / "data"), lambda d: d.pop("images"))), "no 'images' field", "every entry needs"),
    case("json-bad-split", lambda t: check(edit_json(rsicd(t / "data"), lambda d: d["images"][0].update(split="training"))), "images[0].split is 'training'", "use one of"),
    case("json-sentences-not-list", lambda t: check(edit_json(rsicd(t / "data"), lambda d: d["images"][1].update(sentences="x"))), "images[1].sentences is str", "fix that entry"),
    case("json-parent-name", lambda t: check(edit_json(rsicd(t / "data"), lambda d: d["images"][0].update(filename="../x.jpg"))), "escapes the image folder", "relative to the image folder"),
    case("json-absolute-name", lambda t: check(edit_json(rsicd(t / "data"), lambda d: d["images"][0].update(filename="/etc/passwd"))), "escapes the image folder"),
    case("json-empty-name", lambda t: check(edit_json(rsicd(t / "data"), lambda d: d["images"][0].update(filename=" "))), "empty or missing image file name"),
    case("json-duplicate-entry", lambda t: check(rsicd(t / "data", TRAIN + [("airport_0.jpg", "train", five("again"))] + TEST)), "images[6] names 'airport_0.jpg' in the train split, as images[0] does", "one entry"),
    case("json-train-test-leakage", lambda t: check(rsicd(t / "data", TRAIN + [("airport_0.jpg", "test", five("leak"))] + TEST)), "airport_0.jpg is in both the train and the test split", "one split"),
    case("json-latin1", lambda t: check(edit_bytes(rsicd(t / "data"), b"airport 0 caption 0", "caf\u00e9s".encode("latin-1"))), "dataset_rsicd.json", "not UTF-8", "re-save the file as UTF-8"),
    case("json-no-rows", lambda t: check(edit_json(rsicd(t / "data"), lambda d: d.update(images=[]))), "hold no caption rows", "check the files"),
    case("json-missing", lambda t: check((t / "data").mkdir() or t / "data"), "dataset_rsicd.json", "put the rsicd release there"),
    case("json-layout-suggestion", lambda t: check(write_amfmn(t / "data", "rsicd", "RSICD_images", [("a_1.jpg", five("a"))], [("b_1.jpg", five("b"))])), "--layout amfmn"),
    # --- images --------------------------------------------------------------------------------
    case("image-missing", lambda t: check(unlink(rsicd(t / "data"), "RSICD_images/beach_1.jpg")), "1 of 3 test images", "missing", "--image-dir"),
    case("image-corrupt", lambda t: check(overwrite(rsicd(t / "data"), "RSICD_images/beach_1.jpg", b"not a jpeg")), "beach_1.jpg", "cannot read image", "replace the file"),
    case("image-truncated", lambda t: check(truncate(rsicd(t / "data"), "RSICD_images/airport_2.jpg")), "airport_2.jpg", "cannot read image"),
    case("image-float-out-of-range", lambda t: check(image_16bit_float(t)), "beach_0.tif", "floating-point image", "convert it to 8-bit RGB"),
    case("image-symlink-out", lambda t: check(symlink_out(t)), "beach_0.jpg", "symlink out of the image folder", "--image-dir"),
    case("image-dir-missing", lambda t: check(rsicd(t / "data"), "--image-dir", t / "nowhere"), "no image folder", "nowhere"),
    # --- formats: CSV, AMFMN, NWPU -------------------------------------------------------------
    case("csv-unterminated-quote", lambda t: check(csv_rsicd(t, 'filename,title\na_1.jpg,"a caption\nb_1.jpg,two\nc_1.jpg,three\n'), "--layout", "csv"),
         "rsicd_test.csv:2", "still open at line 4", "close or remove that quote"),
    case("csv-stray-quote", lambda t: check(csv_rsicd(t, 'filename,title\na_1.jpg,one\nb_1.jpg,"two\nc_1.jpg,three\n' + "c_1.jpg,x\n" * 100), "--layout", "csv"),
         "rsicd_test.csv:3", "close or remove that quote"),
    case("csv-field-count", lambda t: check(csv_rsicd(t, "filename,title\na_1.jpg,one,two\n"), "--layout", "csv"), "rsicd_test.csv:2", "3 fields", "quote captions"),
    case("csv-no-filename-column", lambda t: check(csv_rsicd(t, "file,title\na_1.jpg,one\n"), "--layout", "csv"), "rsicd_test.csv:1", "no 'filename' column"),
    case("csv-empty", lambda t: check(csv_rsicd(t, ""), "--layout", "csv"), "rsicd_test.csv", "is empty", "header line"),
    case("amfmn-count-mismatch", lambda t: check(extra_line(write_amfmn(t / "data", "rsicd", "RSICD_images", [("a_1.jpg", five("a"))], [("b_1.jpg", five("b"))])), "--layout", "amfmn"),
         "train_caps.txt", "6 caption lines", "5 captions per name"),
    case("amfmn-half-pair", lambda t: check(unlink(write_amfmn(t / "data", "rsicd", "RSICD_images", [("a_1.jpg", five("a"))], [("b_1.jpg", five("b"))]), "rsicd_precomp/test_filename.txt"), "--layout", "amfmn"),
         "test_filename.txt", "is missing", "test_caps.txt needs it"),
    case("nwpu-top-level-list", lambda t: check(nwpu_list(t), "-d", "nwpu"), "dataset_nwpu.json", "not an object keyed by class"),
    case("nwpu-duplicate-entry", lambda t: check(write_nwpu(t / "data", {"airport": [("airport_1.jpg", "train", five("a")), ("airport_1.jpg", "train", five("b"))]}), "-d", "nwpu"),
         "dataset_nwpu.json", "as ['airport'][0] does"),
    # --- names and numbers ----------------------------------------------------------------------
    case("check-unknown-dataset", lambda t: ["data", "check", "-d", "rsicdd"], "unknown dataset 'rsicdd'"),
    case("check-unknown-option", lambda t: check(rsicd(t / "data"), "-o", "n_train=3"), "unknown option 'n_train'"),
    case("check-bad-layout", lambda t: check(rsicd(t / "data"), "--layout", "coco"), "has no layout 'coco'", "karpathy"),
    case("run-unknown-method", lambda t: ["run", "--methods", "clip-fx", "--out", t / "runs"], "unknown method 'clip-fx'"),
    case("run-lr-nan", lambda t: ["run", *RUN, "-t", "lr=nan", "--out", t / "runs"], "lr=nan", "e.g. lr="),
    case("run-eval-chunk-0", lambda t: ["run", *RUN, "-t", "eval_chunk=0", "--out", t / "runs"], "eval_chunk=0", ">= 1"),
    case("run-negative-weight-decay", lambda t: ["run", *RUN, "-t", "weight_decay=-1", "--out", t / "runs"], "weight_decay=-1"),
    case("run-batch-size-1", lambda t: ["run", *RUN, "-t", "batch_size=1", "--out", t / "runs"], "batch_size >= 2"),
    case("run-precision", lambda t: ["run", *RUN, "-t", "precision=fp8", "--out", t / "runs"], "precision='fp8'", "bf16"),
    case("run-epochs-not-int", lambda t: ["run", *RUN, "-t", "epochs=2.5", "--out", t / "runs"], "epochs='2.5'", "int"),
    case("run-backbone-option-typo", lambda t: run_rsicd(rsicd(t / "data"), "-b", "nrom=rs5m"), "unknown option 'nrom'", "norm"),
    case("run-backbone-option-value", lambda t: run_rsicd(rsicd(t / "data"), "-b", "norm=rs6m"), "unknown norm 'rs6m'"),
    case("run-method-option-form", lambda t: ["run", *RUN, "-m", "logit_scale=3", "--out", t / "runs"], "method:name=value"),
    case("run-workers", lambda t: ["run", *RUN, "--workers", "-1", "--out", t / "runs"], "workers=-1"),
    case("run-device", lambda t: ["run", *RUN, "--device", "tpu:0", "--out", t / "runs"], "--device 'tpu:0'", "cuda:N"),
    case("run-seed-range", lambda t: ["run", *RUN, "--seeds", "-3", "--out", t / "runs"], "train seed -3 is outside"),
    case("run-layout", lambda t: run_rsicd(rsicd(t / "data"), "--layout", "amfmn"), "rsicd_precomp", "not found"),
    case("run-data-root", lambda t: run_rsicd(t / "nowhere"), "nowhere/dataset_rsicd.json", "--data-root"),
    case("run-dataset-leakage", lambda t: run_rsicd(rsicd(t / "data", TRAIN + [("airport_0.jpg", "test", five("leak"))] + TEST)), "train/test leakage"),
    case("run-corrupt-image", lambda t: run_rsicd(overwrite(rsicd(t / "data"), "RSICD_images/beach_2.jpg", b"GIF89a")), "beach_2.jpg", "cannot read image", "replace the file"),
    case("run-missing-image", lambda t: run_rsicd(unlink(rsicd(t / "data"), "RSICD_images/airport_3.jpg")), "images listed in", "missing"),
    case("noise-seed", lambda t: ["noise", "make", "--seed", "-5", "--out", t / "noise"], "noise seed -5 is outside"),
    case("noise-rate", lambda t: ["noise", "make", "-r", "1.5", "--out", t / "noise"], "outside [0, 1)"),
    case("noise-rate-text", lambda t: ["noise", "make", "-r", "0.2,x", "--out", t / "noise"], "comma-separated list of numbers"),
    case("noise-protocol", lambda t: ["noise", "make", "-p", "shufle", "--out", t / "noise"], "unknown", "shufle"),
    case("report-metric", lambda t: ["report", "--out", (t / "runs").mkdir() or t / "runs", "--metric", "r@1"], "r@1"),
    case("pretrain-recipe", lambda t: ["pretrain", "tiny-clipp"], "no pretraining recipe named 'tiny-clipp'"),
    # --- paths -----------------------------------------------------------------------------------
    case("run-out-is-file", lambda t: ["run", *RUN, "--out", a_file(t / "runs")], "--out", "is a file, not a folder"),
    case("run-out-under-file", lambda t: ["run", *RUN, "--out", a_file(t / "runs") / "sub"], "is a file, not a folder"),
    case("noise-out-is-file", lambda t: ["noise", "make", "--out", a_file(t / "noise")], "--out", "is a file"),
    case("noise-show-folder", lambda t: ["noise", "show", t], "cannot be read", "manifest JSON file"),
    case("noise-show-missing", lambda t: ["noise", "show", t / "m.json"], "no such manifest", "noise make"),
    case("noise-import-missing", lambda t: ["noise", "import", t / "NC-06.csv"], "NC-06.csv not found"),
    case("noise-import-folder", lambda t: ["noise", "import", t], "is a folder"),
    case("report-dir-is-file", lambda t: ["report", "--out", (t / "runs").mkdir() or t / "runs", "--report-dir", a_file(t / "rep")], "--report-dir", "is a file"),
    case("report-out-missing", lambda t: ["report", "--out", t / "runs"], "not found", "rsnc-bench run"),
    case("check-cache-dir-is-file", lambda t: check(rsicd(t / "data"), "--cache-dir", a_file(t / "cache")), "--cache-dir", "is a file"),
    case("data-home-is-file", lambda t: ["run", *RUN, "--out", t / "runs"], "$RSNC_BENCH_DATA", "is a file", env={"RSNC_BENCH_DATA": "{t}/home-file"}),
    case("cache-home-is-file", lambda t: run_rsicd(rsicd(t / "data"), "--backbone", "tiny-clip"), "$RSNC_BENCH_CACHE", "is a file", env={"RSNC_BENCH_CACHE": "{t}/home-file"}),
    # --- YAML ------------------------------------------------------------------------------------
    case("yaml-not-utf8", lambda t: ["run", "--config", grid_file(t, "methods: [caf\u00e9]\n".encode("latin-1")), "--out", t / "runs"], "grid.yaml", "re-save it as UTF-8"),
    case("yaml-alias-bomb", lambda t: ["run", "--config", grid_file(t, 'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nmethods: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n'), "--out", t / "runs"],
         "grid.yaml, line 2", "aliases", "write the values out"),
    case("yaml-syntax", lambda t: ["run", "--config", grid_file(t, "methods: [clip-ft\n")], "grid.yaml", "not valid YAML"),
    case("yaml-not-mapping", lambda t: ["run", "--config", grid_file(t, "- clip-ft\n")], "grid.yaml", "a grid file is a mapping"),
    case("yaml-unknown-key", lambda t: ["run", "--config", grid_file(t, "noize: [0.2]\n")], "unknown key 'noize'"),
    case("yaml-empty-out", lambda t: ["run", "--config", grid_file(t, "out:\n")], "out is empty"),
    case("yaml-workers-text", lambda t: ["run", "--config", grid_file(t, "workers: many\n")], "workers must be a whole number"),
    # --- weights ---------------------------------------------------------------------------------
    case("weights-junk", lambda t: run_rsicd(rsicd(t / "data"), "--pretrained", a_file(t / "w.pt", "junk")), "w.pt", "cannot load as open_clip weights"),
    case("weights-planted-pickle", lambda t: run_rsicd(rsicd(t / "data"), "--pretrained", planted_weights(t)), "weights.pt", "cannot load"),
    case("weights-missing", lambda t: run_rsicd(rsicd(t / "data"), "--pretrained", t / "RemoteCLIP.pt"), "RemoteCLIP.pt not found"),
    case("weights-on-preset", lambda t: run_rsicd(rsicd(t / "data"), "--backbone", "tiny-clip", "--pretrained", a_file(t / "w.pt")), "tiny-clip brings its own weights"),
    # --- manifests and result files --------------------------------------------------------------
    case("manifest-tampered", lambda t: ["noise", "show", tamper(manifest(t))], "hash does not match"),
    case("manifest-not-json", lambda t: ["noise", "show", a_file(t / "m.json", "{")], "m.json", "not a JSON manifest"),
    case("manifest-other-data", lambda t: run_rsicd(changed_after_noise(t)), "rrsitr-r0.4-s42.json", "made for other train data", "make it again"),
    case("result-manifest-changed", complete_cell_with_changed_manifest, "changed since", "restore it"),
    case("report-references-yaml", lambda t: ["report", "--out", (t / "runs").mkdir() or t / "runs", "--references", grid_file(t, "x: [1\n")], "grid.yaml, line 2", "not valid YAML"),
    case("report-references-shape", lambda t: ["report", "--out", (t / "runs").mkdir() or t / "runs", "--references", grid_file(t, "x: 1\n")], "grid.yaml", "references:"),
    case("report-split", lambda t: ["report", "--out", (t / "runs").mkdir() or t / "runs", "--split", "bogus"], "unknown split 'bogus'"),
    case("report-out-is-a-result-file", lambda t: ["report", "--out", a_file(t / "runs" / "cell.json", "{}")], "cell.json not found", "rsnc-bench run"),
]


def nwpu_list(t: Path) -> Path:
    (t / "data" / "NWPU_images").mkdir(parents=True)
    return a_file(t / "data" / "dataset_nwpu.json", "[]").parent


def edit_bytes(root: Path, old: bytes, new: bytes) -> Path:
    path = json_of(root)
    path.write_bytes(path.read_bytes().replace(old, new))
    return root


def unlink(root: Path, relpath: str) -> Path:
    (root / relpath).unlink()
    return root


def overwrite(root: Path, relpath: str, data: bytes) -> Path:
    (root / relpath).write_bytes(data)
    return root


def truncate(root: Path, relpath: str) -> Path:
    path = root / relpath
    path.write_bytes(path.read_bytes()[:200])
    return root


def extra_line(root: Path) -> Path:
    with open(root / "rsicd_precomp" / "train_caps.txt", "a") as fh:
        fh.write("one caption too many\n")
    return root


def tamper(path: Path) -> Path:
    path.write_text(path.read_text().replace('"seed": 42', '"seed": 43'))
    return path


def snapshot(folder: Path) -> dict:
    """Every file (size, time) and folder under ``folder``."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "folder"
            for p in folder.rglob("*") if not p.is_symlink()}


def test_the_corpus_is_large():
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(bad, tmp_path, monkeypatch):
    for name, value in bad.env:
        value = value.format(t=tmp_path)
        a_file(Path(value))
        monkeypatch.setenv(name, value)
    args = [str(a) for a in bad.args(tmp_path)]
    before = snapshot(tmp_path)
    result = runner.invoke(app, args)
    assert_user_error(result, *bad.fragments)
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "pwned").exists()  # no pickle ran
