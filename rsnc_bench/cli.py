"""The ``rsnc-bench`` command line: a thin layer over the library.

User errors (``RsncError``) print one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import List, Optional

import typer

from rsnc_bench import __version__
from rsnc_bench.backbones import TRAIN_HINTS
from rsnc_bench.config import check_seed, parse_assignments, parse_floats
from rsnc_bench.data import DATASETS, Dataset, get_dataset
from rsnc_bench.data.datasets import DatasetSpec
from rsnc_bench.data.images import SplitImages
from rsnc_bench.data.rs5m import StreamedDataset
from rsnc_bench.data.stream import StreamState
from rsnc_bench.errors import ConfigError, RsncError
from rsnc_bench.grid_config import GridConfig, load_grid
from rsnc_bench.methods import METHODS
from rsnc_bench.noise import PROTOCOLS, NoiseManifest, check_rate, import_noisy_csv, make_manifest, manifest_path
from rsnc_bench.paths import readable_file, remove_stale_temporaries, writable_folder
from rsnc_bench.registry import first_line

app = typer.Typer(help="Benchmark for remote-sensing image-text retrieval under noisy correspondence.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
noise_app = typer.Typer(help="Make, inspect and import noise manifests.", no_args_is_help=True)
list_app = typer.Typer(help="List what is registered.", no_args_is_help=True)
data_app = typer.Typer(help="Check datasets and prepare their image caches.", no_args_is_help=True)
app.add_typer(noise_app, name="noise")
app.add_typer(list_app, name="list")
app.add_typer(data_app, name="data")


def user_errors(command):
    """Turn an RsncError (or an OSError) into one line on stderr and exit status 2."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RsncError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # what the file system refused where no check caught it first (a full disk)
            where = f"{exc.filename}: " if exc.filename else ""
            typer.echo(f"error: {where}{exc.strerror or exc}; check that path's space and permissions", err=True)
            raise typer.Exit(2) from None
    return wrapper


# --- shared options ----------------------------------------------------------------------------
DatasetOpt = typer.Option("synthetic", "--dataset", "-d", help="Registered dataset name (see `list datasets`).")
DataRootOpt = typer.Option(None, "--data-root", help="Folder holding the dataset; default $RSNC_BENCH_DATA/<name> or ./data/<name>.")
LayoutOpt = typer.Option(None, "--layout", help="File layout (karpathy, amfmn, csv, nwpu); default: the dataset's own.")
ImageDirOpt = typer.Option(None, "--image-dir", help="Image folder, if not the layout's default under the root.")
DatasetOptsOpt = typer.Option(None, "--dataset-opt", "-o", help="Dataset option name=value (e.g. synthetic's n_train=400); repeatable.")


def load_for_cli(name: str, options: Optional[List[str]], data_root, layout, image_dir) -> tuple[DatasetSpec, Dataset]:
    """Load a dataset from the shared options and print where it came from and its splits."""
    spec = get_dataset(name, **parse_assignments(DATASETS.get(name).Options, options))
    data = spec.load(data_root, layout=layout, image_dir=image_dir)
    typer.echo(f"{spec.name} ({data.layout} layout, {data.root})")
    for line in data.summary():
        typer.echo(f"  {line}")
    return spec, data


@noise_app.command("make")
@user_errors
def noise_make(
    dataset: str = DatasetOpt,
    data_root: Optional[Path] = DataRootOpt,
    layout: Optional[str] = LayoutOpt,
    image_dir: Optional[Path] = ImageDirOpt,
    dataset_opt: Optional[List[str]] = DatasetOptsOpt,
    protocol: str = typer.Option("rrsitr", "--protocol", "-p", help="Noise protocol (see `list noise`)."),
    rates: str = typer.Option("0.2,0.4,0.6,0.8", "--rate", "-r", help="Comma-separated noise rates in [0, 1)."),
    seed: int = typer.Option(42, "--seed", "-s", help="Noise seed (separate from any training seed)."),
    out: Path = typer.Option(Path("noise"), "--out", help="Folder for the manifests."),
    force: bool = typer.Option(False, "--force", help="Replace existing manifests that differ."),
):
    """Inject noise into a dataset's train split and save one manifest per rate.

    Examples:
      rsnc-bench noise make                       (synthetic, rrsitr, 0.2..0.8, seed 42)
      rsnc-bench noise make -d rsicd --data-root ../shared/data/rsicd-subset -p shuffle -r 0.2,0.6
    """
    values = [check_rate(r) for r in parse_floats(rates, "noise rates")]
    check_seed(seed, "noise seed")
    PROTOCOLS.get(protocol)
    writable_folder(out, "--out")
    spec, data = load_for_cli(dataset, dataset_opt, data_root, layout, image_dir)
    if "train" not in data.splits:
        raise RsncError(f"dataset {spec.name!r} has no train split in this layout; noise goes into train rows only")
    train = data["train"]
    folder = out / spec.label(layout)
    typer.echo(f"{'rate':>6} {'realized':>9} {'noisy rows':>16}  manifest")
    for rate in values:
        manifest = make_manifest(train, spec.name, protocol, rate, seed)
        path = manifest_path(folder, protocol, rate, seed)
        status = manifest.save(path, force=force)
        typer.echo(f"{rate:6.2f} {manifest.realized_rate:9.4f} {manifest.n_noisy:7d} / {manifest.n_rows:<7d} {path} ({status})")


@noise_app.command("show")
@user_errors
def noise_show(
    manifest_path: Path = typer.Argument(..., help="A manifest JSON written by `noise make` or `noise import`."),
    examples: int = typer.Option(5, "--examples", "-n", help="How many noisy rows to list."),
):
    """Verify a manifest and print its summary and a few noisy rows.

    Example: rsnc-bench noise show noise/synthetic-s0-80-50-150-128px-dup30/rrsitr-r0.6-s42.json
    """
    m = NoiseManifest.load(manifest_path)
    typer.echo(f"{manifest_path}: verified (hash {m.content_hash[:16]})")
    nominal = "-" if m.rate is None else f"{m.rate:g}"
    typer.echo(f"  dataset {m.dataset} | protocol {m.protocol} | seed {m.seed} | nominal rate {nominal}")
    typer.echo(f"  {m.n_rows} train rows over {len(m.images)} images | {m.n_noisy} noisy | realized rate {m.realized_rate:.4f}")
    if m.source:
        typer.echo(f"  imported from {m.source}")
    typer.echo(f"  clean train data hash {m.train_hash[:16]}")
    for row in [int(r) for r in (~m.clean).nonzero()[0][:examples]]:
        typer.echo(f"  row {row}: paired with {m.images[m.assigned_image[row]]}, caption of "
                   f"{m.images[m.orig_image[row]]} (clean row {m.caption_row[row]})")


@noise_app.command("import")
@user_errors
def noise_import(
    noisy_csv: Path = typer.Argument(..., help="Noisy filename,title CSV with the clean train file's rows, in order."),
    dataset: str = DatasetOpt,
    data_root: Optional[Path] = DataRootOpt,
    layout: Optional[str] = LayoutOpt,
    image_dir: Optional[Path] = ImageDirOpt,
    dataset_opt: Optional[List[str]] = DatasetOptsOpt,
    rate: Optional[float] = typer.Option(None, "--rate", help="The file's nominal noise rate, if known (e.g. 0.6 for NC-06)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Manifest path; default noise/<dataset>/import-<file>.json."),
    force: bool = typer.Option(False, "--force", help="Replace an existing manifest that differs."),
):
    """Recover a manifest (clean flags, realized rate) from an external noisy CSV.

    Example: rsnc-bench noise import RSITMD-NC-06.csv -d rsitmd --layout csv --data-root data/rsitmd --rate 0.6
    """
    readable_file(noisy_csv, "the noisy CSV")
    if out is not None:
        writable_folder(out.parent, "--out's folder")
    spec, data = load_for_cli(dataset, dataset_opt, data_root, layout, image_dir)
    if "train" not in data.splits:
        raise RsncError(f"dataset {spec.name!r} has no train split in this layout; a noisy file replaces train rows")
    manifest = import_noisy_csv(noisy_csv, data["train"], spec.name, rate)
    path = out or Path("noise") / spec.label(layout) / f"import-{noisy_csv.stem}.json"
    status = manifest.save(path, force=force)
    typer.echo(f"{noisy_csv}: {manifest.n_noisy} of {manifest.n_rows} rows noisy, realized rate "
               f"{manifest.realized_rate:.4f} -> {path} ({status})")


@data_app.command("check")
@user_errors
def data_check(
    dataset: str = DatasetOpt,
    data_root: Optional[Path] = DataRootOpt,
    layout: Optional[str] = LayoutOpt,
    image_dir: Optional[Path] = ImageDirOpt,
    dataset_opt: Optional[List[str]] = DatasetOptsOpt,
    size: int = typer.Option(224, "--size", help="Resize images to this many pixels (shorter side, centre crop)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Also store the decoded images here for later runs."),
):
    """Load a dataset, report its splits and blank captions, and decode every image.

    Example: rsnc-bench data check -d rsicd --data-root ../shared/data/rsicd-subset --cache-dir cache
    """
    if cache_dir is not None:
        writable_folder(cache_dir, "--cache-dir")
    spec, data = load_for_cli(dataset, dataset_opt, data_root, layout, image_dir)
    if cache_dir is not None:
        remove_stale_temporaries(cache_dir)
    for split in data.splits.values():
        if split.name == "train" and isinstance(data, StreamedDataset):  # RS5M: read every train shard through once
            streamed = sum(1 for _ in data.stream(0).rank_samples(StreamState(0)))
            missing = f"; {split.n_rows - streamed} metafile rows have no sample in the shards" if streamed < split.n_rows else ""
            typer.echo(f"  train: {streamed} images streamed from {len(data.train_shards)} shards and decoded{missing}")
            continue
        images = SplitImages(split, size, cache_dir)
        if cache_dir is None:
            for i in range(len(images)):
                images[i]
        typer.echo(f"  {split.name}: {len(images)} images decoded at {size} px{' and cached' if cache_dir else ''}")


# --- run and report ------------------------------------------------------------------------------
_GRID_DEFAULTS = GridConfig()
_DEFAULT_NOTES = {"methods": "every registered method", "device": "every visible GPU, one cell each, else the CPU"}


def _default(name: str) -> str:
    """' [default: ...]' for a grid field, read from GridConfig; the bracket is escaped because
    rich reads an unescaped [...] in help text as markup and drops it."""
    value = getattr(_GRID_DEFAULTS, name)
    shown = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    note = f" ({_DEFAULT_NOTES[name]})" if name in _DEFAULT_NOTES else ""
    return f" \\[default: {shown}{note}]"


def _preset_lines() -> str:
    return "\n".join(f"        {name}: " + ", ".join(f"{k} {v:g}" for k, v in hints.items()) for name, hints in TRAIN_HINTS.items())


RUN_HELP = f"""Train and evaluate every missing cell of a grid, then print the leaderboard.

    With no arguments: every method fine-tuned from the built-in pretrained CPU backbone
    (tiny-clip, built by `rsnc-bench pretrain` on first use) on the synthetic dataset, noise
    0.0 / 0.4 / 0.8 with the rrsitr noise protocol (noise seed 42), train seeds 3, 13, 25.

    Examples:
      rsnc-bench run
      rsnc-bench run --methods clip-ft,oracle --noise 0.2,0.6 --seeds 3,13,25
      rsnc-bench run --datasets rsicd --data-root ../shared/data/rsicd-subset --methods clip-ft --noise 0,0.6
      rsnc-bench run --backbone ViT-B-32-quickgelu --pretrained RemoteCLIP-ViT-B-32.pt --methods zeroshot --datasets rsicd
      rsnc-bench run --config benchmarks/grids/rsicd-subset.yaml --seeds 3
      rsnc-bench run --config my-grid.yaml --launcher slurm --slurm-partition gpu --slurm-gpus 1 --slurm-time 240

    Non-paper defaults (docs/fidelity.md lists every component, paper / reference code / here):
      training budget of the CPU presets, over each method's paper budget:
{_preset_lines()}
      ebaker, iebaker: EBA bank of one epoch of real similarities (bank_size=0; papers 200000, N(0,1) start);
        KER masks every sub-token of a keyword (ker_faithful_offset=false; the code's off-by-one is an option)
      pmpguard: reconstructed (no public code); rrsitr-calibrated: a non-paper RRSITR variant
      every method: epoch selected on clean val (EBAKER's code evaluates test every epoch); evaluation in fp32
    """


def run(config: Optional[Path] = None, **values) -> None:
    """Train and evaluate every missing cell of a grid, then print the leaderboard (help: RUN_HELP)."""
    from tqdm.auto import tqdm

    from rsnc_bench.engine import distributed
    from rsnc_bench.results import summary_line

    grid = load_grid(config, {name: value for name, value in values.items() if value not in (None, [], ())})  # given ones only
    if distributed.launched_by_torchrun() and grid.launcher != "inline":
        raise ConfigError(f"--launcher {grid.launcher} submits cells as jobs; under torchrun, run without --launcher")
    if grid.launcher == "inline":
        from rsnc_bench.grid import run_grid

        (docs, skipped, elsewhere), unfinished = run_grid(grid, on_done=lambda doc: tqdm.write(summary_line(doc))), []
        if not distributed.is_main():  # rank 0 reports for a data-parallel run
            return
    else:  # through submitit (rsnc_bench/launch.py)
        from rsnc_bench.launch import launch_grid

        launched = launch_grid(grid, on_done=lambda doc: typer.echo(summary_line(doc)), echo=typer.echo)
        if not launched.waited:  # a Slurm array: it reports into the store, which `report` reads while it runs
            return
        docs, skipped, elsewhere, unfinished = launched.docs, launched.skipped, launched.elsewhere, launched.unfinished
    failed = sum(doc["status"] != "complete" for doc in docs)
    beside = f", {elsewhere} run by another runner on this folder" if elsewhere else ""
    left = f", {len(unfinished)} in jobs that did not finish (rerun to resume them)" if unfinished else ""
    typer.echo(f"{len(docs)} cells run ({failed} failed), {skipped} already complete{beside}{left}")
    _write_report(Path(grid.out))
    if failed or unfinished:
        raise typer.Exit(1)


def _run_parameters() -> list[inspect.Parameter]:
    """`run`'s options: --config, then one per GridConfig field, from the field's CliFlag."""
    hints = typing.get_type_hints(GridConfig)
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
        None, "--config", "-c", help="YAML grid file; command-line values override it."))]
    for field in dataclasses.fields(GridConfig):
        flag, kind = field.metadata["cli"], hints[field.name]
        names = flag.names
        if kind is bool:
            annotation, names = Optional[bool], (f"{names[0]}/--no-{names[0][2:]}", *names[1:])
        elif typing.get_origin(kind) is tuple:
            annotation = Optional[List[str]] if flag.repeat else Optional[str]
        else:
            annotation = Optional[int] if kind is int else Optional[str]
        default = "" if field.default in (None, ()) or kind is bool else _default(field.name)
        option = typer.Option(None, *names, help=flag.help + default)
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=option))
    return params


run.__signature__ = inspect.Signature(_run_parameters())
app.command("run", help=RUN_HELP)(user_errors(run))


@app.command("pretrain")
@user_errors
def pretrain_command(
    name: str = typer.Argument("tiny-clip", help="Preset to build (see `list backbones`)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when a verified checkpoint is cached."),
):
    """Build, or verify, the built-in pretrained backbone's checkpoint (offline, a few minutes on a CPU).

    It is kept in $RSNC_BENCH_CACHE/pretrained/<name> (default ~/.cache/rsnc-bench) and reused;
    `run` builds it on first use too. The folder is an ordinary open_clip checkpoint:

      rsnc-bench pretrain
      rsnc-bench run --backbone tiny-b32 --pretrained ~/.cache/rsnc-bench/pretrained/tiny-clip/open_clip_pytorch_model.bin
    """
    from rsnc_bench.pretrain import checkpoint_record, ensure_checkpoint

    folder = ensure_checkpoint(name, force)
    record = checkpoint_record(folder)
    typer.echo(f"{name}: {folder} (sha256 {record['sha256'][:16]}, built in {record['seconds']} s "
               f"with {record['torch_threads']} threads)")


@app.command("report")
@user_errors
def report(
    out: Path = typer.Option(Path("runs"), "--out", help="Result folder written by `rsnc-bench run`."),
    report_dir: Optional[Path] = typer.Option(None, "--report-dir", help="Folder for the report (default: <out>/report)."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated methods or wildcards; 'ebaker' also keeps 'ebaker+sar' (default: all)."),
    datasets: Optional[str] = typer.Option(None, "--datasets", help="Comma-separated datasets or wildcards (default: all)."),
    backbones: Optional[str] = typer.Option(None, "--backbones", help="Comma-separated backbones or wildcards (default: all)."),
    metric: str = typer.Option("mr", "--metric", help="Leaderboard metric: mr, rsum, i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5 or t2i_r10."),
    rate: Optional[float] = typer.Option(None, "--rate", help="Noise rate of the recall heatmap and the ROC curves (default: the highest present)."),
    references: Optional[Path] = typer.Option(None, "--references", help="YAML of reported numbers (default: the shipped RRSITR / sanity-band file)."),
    no_references: bool = typer.Option(False, "--no-references", help="Show no reported numbers."),
    compare_to: str = typer.Option("baseline", "--compare-to", help="Method the significance test compares every other with: "
                                   "'baseline' = the plain fine-tune (clip-ft, by its recorded role), 'best' = the best by the metric, or a name."),
    split: str = typer.Option("test", "--split", help="Metrics of this split: test, val or test_last."),
):
    """Rebuild the report (tables, plots, report.html) from every result in the folder.

    Writes into <out>/report: tables.md (the leaderboard and every other table), tables.tex
    (booktabs), results.csv (tidy), runs.csv, plots/*.png|pdf and report.html.

    Examples:
      rsnc-bench report --out runs
      rsnc-bench report --out runs --methods 'clip-ft,rrsitr*' --metric rsum --rate 0.4
      rsnc-bench report --out runs --datasets rsitmd --references my-papers.yaml --report-dir paper/
    """
    from rsnc_bench.report import ReportOptions

    if not out.is_dir():
        raise RsncError(f"result folder {out} not found; run `rsnc-bench run --out {out}` first")
    writable_folder(report_dir or out / "report", "--report-dir")
    options = ReportOptions(methods=_patterns(methods), datasets=_patterns(datasets), backbones=_patterns(backbones),
                            metric=metric, rate=rate, references=references, use_references=not no_references,
                            compare_to=compare_to, split=split, report_dir=report_dir)
    _write_report(out, options)


def _patterns(text: Optional[str]) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def _write_report(out: Path, options=None) -> None:
    """The one report path of `run` and `report`: the report folder, whose all-metrics tables (the
    leaderboard) are printed."""
    from rsnc_bench.report import write_report
    from rsnc_bench.report.tables import to_markdown
    from rsnc_bench.store import ResultStore

    store = ResultStore(out)
    docs = list(store.iter_results())
    for problem in store.problems:
        typer.echo(f"warning: {problem}", err=True)
    made = write_report(out, options, docs, store.problems)
    leaderboard = [to_markdown(table) for table in made.tables if table.section == "detailed"]
    typer.echo("\n".join(leaderboard) if leaderboard else "No complete results yet.\n")
    typer.echo(f"leaderboard: {made.files['markdown']}, {made.files['csv']} ({len(docs)} results)")
    for plot in made.plots:
        if plot.skipped:
            typer.echo(f"plot {plot.name} not drawn: {plot.skipped}")
    incomplete = f"; {made.n_missing} missing and {made.n_failed} failed cells listed" if made.n_missing + made.n_failed else ""
    typer.echo(f"report: {made.html} ({len(made.tables)} tables, {sum(p.png is not None for p in made.plots)} plots{incomplete})")


@list_app.command("datasets")
@user_errors
def list_datasets(pattern: str = typer.Argument("*", help="Wildcard filter, e.g. 'rs*'.")):
    """Registered datasets, their layouts and a summary."""
    for name, cls in DATASETS.items():
        if name in DATASETS.names(pattern):
            typer.echo(f"{name:10s} layouts: {', '.join(cls.layouts)} (default {cls.default_layout}) - {first_line(cls.__doc__)}")


@list_app.command("noise")
@user_errors
def list_noise(pattern: str = typer.Argument("*", help="Wildcard filter.")):
    """Registered noise protocols."""
    for name in PROTOCOLS.names(pattern):
        typer.echo(f"{name:8s} {first_line(PROTOCOLS.get(name).__doc__)}")


@list_app.command("methods")
@user_errors
def list_methods(pattern: str = typer.Argument("*", help="Wildcard filter.")):
    """Registered methods (built-in and from installed plugins)."""
    names = METHODS.names(pattern)
    if not names:
        typer.echo("no methods registered yet")
    width = max(map(len, names), default=0)
    for name in names:
        typer.echo(f"{name:{width}s}  {first_line(METHODS.entry(name).doc)}")


@list_app.command("backbones")
@user_errors
def list_backbones(pattern: str = typer.Argument("*", help="Wildcard filter, e.g. 'ViT-B*'.")):
    """Backbones: presets, families and every open_clip architecture (weights from local files)."""
    from rsnc_bench.backbones import describe_backbones

    for name, summary in describe_backbones(pattern):
        typer.echo(f"{name:28s} {summary}")


@app.callback(invoke_without_command=True)
def root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")):
    if version:
        typer.echo(f"rsnc-bench {__version__}")
        raise typer.Exit()


def main() -> None:
    app()
