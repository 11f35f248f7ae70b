"""Training throughput of the harness's clip-ft against open_clip_train (issue 18, benchmark 2).

    python benchmarks/train_vs_open_clip.py            # batch 100, 3 + 15 steps, 3 interleaved rounds (3-5 min)
    python benchmarks/train_vs_open_clip.py --quick    # 2 + 5 steps, one round, --workers 1 only

open_clip_train ships in the open_clip_torch wheel; its data module also imports braceexpand and
webdataset, which the harness does not need:

    pip install braceexpand webdataset                 # or: pip install -e '.[bench]'

The figure is samples per second of rsnc-bench's clip-ft step over open_clip_train's (target:
>= 1.3x), on one torch thread each (``--threads``), best round of each side, the sides run in
their own processes and interleaved (ours, open_clip_train, ours, ...) so that load from other
processes hits both alike. Warm-up steps are not timed on either side.

Equal on both sides:
- the model: the ``tiny-b32`` preset (rsnc_bench/backbones/presets/tiny-b32), registered with
  open_clip in open_clip_train's process by ``open_clip.add_model_config``; random init, fp32;
- the images and captions: the first ``n`` training images of the RSICD subset
  (/work/shared/data/rsicd-subset, or ``--data-root``) as the harness loads them, with their 5
  captions each, exported for open_clip_train as a tab-separated CSV (``filepath``, ``title``,
  absolute paths) in a temporary folder; ``n`` makes the CSV exactly one epoch of the timed steps;
- batch size, number of steps, the loss (symmetric InfoNCE), AdamW with the same lr and weight
  decay and no warm-up, gradient clipping at 50 (``--grad-clip-norm 50``, the harness's value);
- the augmentation: RandomResizedCrop to 56 px at scale 0.9-1.0, ratio 3/4-4/3, bicubic, no flip,
  then the OpenAI mean/std.

Not equal, and part of what is measured:
- data: open_clip_train decodes each JPEG, crops it with PIL and tokenises its caption per
  sample and step in its DataLoader worker(s); the harness decodes and tokenises once before
  training (the "setup" seconds in the JSON, not in the step) and crops a batch of in-memory
  uint8 images in one batched resample;
- workers: open_clip_train's ``--workers 1`` (the figure with the target) builds batches in a
  background DataLoader process, which can use the other core; clip-ft's counterpart is the
  trainer's background batch thread, ``StepRunner.prefetch`` (benchmarks/step_runner.py), 2
  batches ahead (``--prefetch``); where the step runner has no ``prefetch`` the batch is built
  inline and the figure's note says so. ``--workers 0`` (context) is compared with clip-ft building
  its batch inline: both sides then do everything on the main thread;
- the step itself: the harness's AdamW is fused and its text tower skips all-padding token
  columns (exact under the causal mask); clip-ft's logit scale is fixed, open_clip_train's is
  learnt and clamped; open_clip_train runs a cosine lr schedule and logs every step (how its
  per-step time is read: ``--log-every-n-steps 1``, samples/s of each logged step); the harness
  step records the per-row signals and the loss.

Results go to ``benchmarks/results/train_vs_open_clip.json``; without open_clip_train's imports or
the RSICD subset, the JSON says so (value None) instead of failing.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from figures import Figure, save, table  # benchmarks/, on sys.path when a script here runs

NAME = "train_vs_open_clip"
BENCHMARK = "2 training vs open_clip_train"
ARCH, METHOD = "tiny-b32", "clip-ft"
TARGET = 1.3
LR, WEIGHT_DECAY, GRAD_CLIP = 1e-5, 0.1, 50.0  # StepRunner's lr and decay, the trainer's clipping
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsicd-subset"
INSTALL = "pip install braceexpand webdataset (open_clip_train itself ships in open_clip_torch)"
PRESET = Path(__file__).resolve().parents[1] / "rsnc_bench" / "backbones" / "presets" / ARCH / "open_clip_config.json"


def missing_tools() -> list[str]:
    return [m for m in ("open_clip_train", "braceexpand", "webdataset") if importlib.util.find_spec(m) is None]


def train_images(root: Path, n_images: int):
    """The first ``n_images`` images of the RSICD subset's train split as the harness loads it, 5 captions each."""
    from rsnc_bench.data import load_dataset

    train = load_dataset("rsicd", root)["train"]
    if train.n_images < n_images:
        raise SystemExit(f"{root}: {train.n_images} train images, {n_images} needed; use fewer --steps or a smaller --batch-size")
    return train.select_images(np.arange(n_images), "train")


def write_inputs(split, folder: Path) -> None:
    """open_clip_train's inputs: the CSV (one row per caption, absolute image paths) and the preset's model config."""
    with open(folder / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "title"])
        for row, image in enumerate(split.img_of):
            writer.writerow([str(split.image_path(int(image)).resolve()), split.captions[row]])
    (folder / "model").mkdir()
    model_cfg = json.loads(PRESET.read_text(encoding="utf-8"))["model_cfg"]
    (folder / "model" / f"{ARCH}.json").write_text(json.dumps(model_cfg))


def ours(root: Path, n_images: int, batch: int, warmup: int, steps: int, prefetch: int) -> dict:
    """clip-ft's step as the harness takes it, ``warmup`` untimed steps then ``steps`` timed: first
    with the batch built inline, then (where the step runner has it) with the trainer's background
    batch worker ``prefetch`` batches ahead."""
    from step_runner import StepRunner  # benchmarks/, on sys.path when a script here runs

    from rsnc_bench.backbones import BackboneConfig, build_backbone
    from rsnc_bench.methods import METHODS

    split = train_images(root, n_images)
    started = time.perf_counter()
    torch.manual_seed(0)
    cls = METHODS.get(METHOD)
    runner = StepRunner(METHOD, cls(build_backbone(BackboneConfig(ARCH)), cls.config_type()), split, batch, GRAD_CLIP, split.captions)
    setup = time.perf_counter() - started  # the model built, the split decoded and tokenised once
    out = {"setup_s": setup, "parameters": sum(p.numel() for p in runner.method.parameters())}
    modes = ["inline"] + (["prefetch"] if prefetch and hasattr(runner, "prefetch") else [])
    for mode in modes:
        if mode == "prefetch":
            runner.prefetch(prefetch)
        runner.seconds(warmup)
        runner.times = dict.fromkeys(runner.times, 0.0)
        seconds = runner.seconds(steps)
        out[mode] = {"samples_per_s": steps * batch / seconds, "step_ms": 1000 * seconds / steps, "data_share": runner.times["data"] / seconds}
    if getattr(runner, "stream", None) is not None:
        runner.stream.close()  # stops the background worker before the interpreter exits
    return out


STEP_LINE = re.compile(r"Data \(t\): ([0-9.]+) Batch \(t\): ([0-9.]+), ([0-9.eE+-]+)/s,")


def open_clip_train(folder: Path, batch: int, warmup: int, steps: int, workers: int) -> dict:
    """open_clip_train's main on the CSV for one epoch; each step's samples/s read from its log."""
    import open_clip
    from open_clip_train.main import main as train_main

    open_clip.add_model_config(folder / "model")
    name = f"run-{time.time_ns()}"
    train_main(["--train-data", str(folder / "train.csv"), "--csv-img-key", "filepath", "--csv-caption-key", "title",
                "--model", ARCH, "--batch-size", str(batch), "--epochs", "1", "--precision", "fp32", "--workers", str(workers),
                "--lr", str(LR), "--wd", str(WEIGHT_DECAY), "--warmup", "0", "--grad-clip-norm", str(GRAD_CLIP), "--seed", "0",
                "--logs", str(folder / "logs"), "--name", name, "--save-frequency", "0", "--report-to", "",
                "--log-every-n-steps", "1"])
    lines = STEP_LINE.findall((folder / "logs" / name / "out.log").read_text(encoding="utf-8"))
    if len(lines) < warmup + steps:
        raise SystemExit(f"open_clip_train logged {len(lines)} steps, {warmup + steps} expected")
    timed = lines[warmup: warmup + steps]
    step_s = [batch / float(rate) for _, _, rate in timed]  # samples/s has 6 digits; Batch (t) only 3 decimals
    data_s = sum(float(data) for data, _, _ in timed)
    model = open_clip.create_model(ARCH)
    return {"samples_per_s": steps * batch / sum(step_s), "step_ms": 1000 * sum(step_s) / steps, "data_share": data_s / sum(step_s),
            "parameters": sum(p.numel() for p in model.parameters()), "workers": workers}


def run_side(args: argparse.Namespace, side: str, folder: Path, workers: int = 0) -> dict:
    command = [sys.executable, __file__, "--side", side, "--folder", str(folder), "--data-root", str(args.data_root),
               "--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--threads", str(args.threads), "--workers", str(workers), "--prefetch", str(args.prefetch)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{side} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def label(workers: int) -> str:
    how = "each with one background batch worker" if workers else "each building its batches on the main thread"
    return f"{METHOD} samples/s over open_clip_train's, {how} (its --workers {workers})"


def compare(workers: list[int], runs: dict) -> list[Figure]:
    """One figure per open_clip_train --workers setting, against clip-ft's matching mode (its
    background batch worker against --workers > 0, inline against 0); the first carries the target."""
    figures = []
    parameters = {r["parameters"] for rows in runs.values() for r in rows}
    same = "same parameter count" if len(parameters) == 1 else f"PARAMETER COUNTS DIFFER: {sorted(parameters)}"
    for i, w in enumerate(workers):
        mode = "prefetch" if w and all("prefetch" in r for r in runs["ours"]) else "inline"
        mine = max((r[mode] for r in runs["ours"]), key=lambda r: r["samples_per_s"])
        theirs = max(runs[f"open_clip_train_workers_{w}"], key=lambda r: r["samples_per_s"])
        ratio = mine["samples_per_s"] / theirs["samples_per_s"]
        paired = [r[mode]["samples_per_s"] / t["samples_per_s"] for r, t in zip(runs["ours"], runs[f"open_clip_train_workers_{w}"])]
        how = {"inline": "batch built inline", "prefetch": "batches built ahead by its worker"}[mode]
        note = (f"{METHOD} ({how}) {mine['samples_per_s']:.0f}/s, {mine['step_ms']:.0f} ms a step, data {100 * mine['data_share']:.0f} %; "
                f"open_clip_train {theirs['samples_per_s']:.0f}/s, {theirs['step_ms']:.0f} ms, waiting on data {100 * theirs['data_share']:.0f} %; "
                f"best of {len(runs['ours'])} rounds each (round by round: {', '.join(f'{x:.2f}' for x in paired)}); {same}")
        first = i == 0
        figures.append(Figure(BENCHMARK, label(w), ratio, "x", f">= {TARGET:g}" if first else "", (ratio >= TARGET) if first else None, note))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 warm-up + 5 timed steps, one round, --workers 1 only")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT, help="the RSICD subset (karpathy layout)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, on both sides")
    parser.add_argument("--steps", type=int, default=15, help="timed steps")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each side's best counts")
    parser.add_argument("--oc-workers", default="1,0", help="open_clip_train's --workers settings; the first carries the target")
    parser.add_argument("--prefetch", type=int, default=2, help="batches clip-ft's background worker builds ahead (0: inline only)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument("--side", choices=("ours", "open_clip_train"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.steps, args.rounds, args.oc_workers = 2, 5, 1, "1"
    n_images = math.ceil((args.warmup + args.steps) * args.batch_size / 5)
    if args.side:
        torch.set_num_threads(args.threads)
        if args.side == "ours":
            row = ours(args.data_root, n_images, args.batch_size, args.warmup, args.steps, args.prefetch)
        else:
            row = open_clip_train(args.folder, args.batch_size, args.warmup, args.steps, args.workers)
        print(json.dumps(row))
        return

    workers = [int(w) for w in args.oc_workers.split(",")]
    setup = {"torch": torch.__version__, "threads": args.threads, "model": ARCH, "method": METHOD, "precision": "fp32",
             "batch_size": args.batch_size, "warmup_steps": args.warmup, "timed_steps": args.steps, "rounds": args.rounds,
             "prefetch": args.prefetch, "images": n_images, "captions": 5 * n_images, "data_root": str(args.data_root), "quick": args.quick}
    missing = missing_tools()
    note = None
    if missing:
        note = f"not installed: {', '.join(missing)}; {INSTALL}"
    elif not (args.data_root / "dataset_rsicd.json").is_file():
        note = f"RSICD subset not found at {args.data_root} (give --data-root)"
    runs: dict = {}
    if note:
        figures = [Figure(BENCHMARK, label(w), None, "x", f">= {TARGET:g}" if i == 0 else "", None, note) for i, w in enumerate(workers)]
    else:
        from importlib.metadata import version

        setup["open_clip_torch"] = version("open_clip_torch")
        runs = {"ours": [], **{f"open_clip_train_workers_{w}": [] for w in workers}}
        with tempfile.TemporaryDirectory(prefix="rsnc-vs-open-clip-") as tmp:
            folder = Path(tmp)
            write_inputs(train_images(args.data_root, n_images), folder)
            for _ in range(args.rounds):  # interleaved: ours, open_clip_train (each --workers), ours, ...
                runs["ours"].append(run_side(args, "ours", folder))
                for w in workers:
                    runs[f"open_clip_train_workers_{w}"].append(run_side(args, "open_clip_train", folder, w))
        figures = compare(workers, runs)
    path = save(NAME, setup, figures, runs=runs)
    print(f"{setup}\n")
    print(table(figures))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
