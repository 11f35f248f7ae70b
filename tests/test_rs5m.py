"""RS5M streamed from tar shards: the layout, the sharding plan, the shuffle buffer, mid-epoch
resume, noise by row id and the errors, on tiny releases written in the real layout."""

from __future__ import annotations

import io
import itertools
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from rsnc_bench.cli import app
from rsnc_bench.data import load_dataset
from rsnc_bench.data.rs5m import RS5MOptions, read_metafile
from rsnc_bench.data.shards import ShardError, ShardImageError, iter_shard, split_member
from rsnc_bench.data.stream import RowLabels, ShardStream, StreamConfig, StreamState, batched, shuffled
from rsnc_bench.engine.detection import detection_metrics
from rsnc_bench.errors import ConfigError, DataFormatError, DatasetNotFoundError, ManifestError
from rsnc_bench.noise import make_manifest
from tests.rs5m_shards import add_member, colour, image_name, write_release

OPTIONS = dict(val_rows=3, test_rows=4, canvas=32, shuffle_buffer=8)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("rs5m") / "release")


@pytest.fixture(scope="module")
def dataset(release):
    return load_dataset("rs5m", release.root, options=OPTIONS)


def all_names(release) -> list[str]:
    return release.names["pub11", "train"] + release.names["rs3", "train"]


def slot_names(stream: ShardStream, epoch: int, world: int, workers: int) -> dict[tuple[int, int], list[str]]:
    return {(r, w): [s.img_name for s in stream.raw_slot(epoch, r, world, w, workers)]
            for r in range(world) for w in range(workers)}


# --- layout and reading -----------------------------------------------------------------------

def test_train_rows_are_the_train_metafiles_and_val_test_the_first_val_rows(release, dataset):
    train = dataset["train"]
    assert list(train.images) == all_names(release) and train.n_rows == 48
    assert list(train.captions) == release.captions["pub11", "train"] + release.captions["rs3", "train"]
    assert train.captions[0].endswith('"quoted"')  # CSV quoting read back verbatim
    for split, rows in (("val", range(0, 3)), ("test", range(3, 7))):
        expected = [release.names[s, "val"][i] for s in ("pub11", "rs3") for i in rows]
        assert list(dataset[split].images) == expected
        for i in range(dataset[split].n_images):  # copied out of the val shards, readable as files
            with Image.open(dataset[split].image_path(i)) as image:
                assert image.size[0] >= 20
    assert "first 3 rows" in dataset.val_provenance["rule"]


def test_every_train_sample_is_streamed_once_with_its_own_pixels_size_and_caption(release, dataset):
    stream = dataset.stream(seed=3)
    samples = list(stream.rank_samples(StreamState(0)))
    assert sorted(s.row for s in samples) == list(range(48))
    for s in samples:
        subset, i = ("pub11", s.image) if s.image < 24 else ("rs3", s.image - 24)
        assert s.row == s.image and s.clean and s.caption == dataset["train"].captions[s.row]
        h, w = s.size
        assert s.pixels.shape == (3, 32, 32) and s.pixels.dtype == torch.uint8
        expected = torch.tensor(colour(subset, "train", i), dtype=torch.int16)
        assert (s.pixels[:, h // 2, w // 2].to(torch.int16) - expected).abs().max() <= 3
        assert s.pixels[:, h:, :].sum() == 0 and s.pixels[:, :, w:].sum() == 0  # padded bottom / right


def test_images_larger_than_the_canvas_are_shrunk_keeping_their_aspect(tmp_path):
    release = write_release(tmp_path / "big", n_train=4, n_val=8, shards=1, subsets=("rs3",), sizes=(50, 90))
    data = load_dataset("rs5m", release.root, options=dict(OPTIONS, subsets="rs3"))
    for s in data.stream(0).rank_samples(StreamState(0)):
        assert max(s.size) == 32 and min(s.size) >= 32 * 50 // 90


def test_sixteen_bit_greyscale_is_scaled_by_its_bit_depth(tmp_path):
    release = write_release(tmp_path / "g16", n_train=2, n_val=8, shards=1, subsets=("rs3",))
    out = io.BytesIO()
    Image.fromarray(np.full((10, 12), 40000, dtype=np.uint16)).save(out, format="PNG")
    shard = release.root / "rs3-train-0000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, name in enumerate(release.names["rs3", "train"]):
            add_member(tar, f"k{i}.img_content", out.getvalue())
            add_member(tar, f"k{i}.img_name", name.encode())
            add_member(tar, f"k{i}.caption", b"c")
    data = load_dataset("rs5m", release.root, options=dict(OPTIONS, subsets="rs3"))
    sample = next(data.stream(0).rank_samples(StreamState(0)))
    assert sample.size == (10, 12) and int(sample.pixels[0, 0, 0]) == round(40000 / 257)


def test_metafiles_without_a_header_give_the_same_rows(tmp_path, release):
    bare = write_release(tmp_path / "bare", header=False)
    assert read_metafile(bare.root / "pub11_train_intermediate.csv").names == read_metafile(release.root / "pub11_train_intermediate.csv").names
    assert read_metafile(release.root / "rs3_val_intermediate.csv").lines[0] == 2


def test_webdataset_keys_are_cut_at_the_first_dot_of_the_base_name():
    assert split_member("a/b/000123.img_name") == ("a/b/000123", "img_name")
    assert split_member("000123.img_content") == ("000123", "img_content")


# --- sharding over ranks and workers ---------------------------------------------------------------

@pytest.mark.parametrize("world, workers", [(1, 1), (2, 1), (1, 3), (2, 2), (4, 3)])
def test_each_sample_is_read_by_exactly_one_rank_and_worker(release, dataset, world, workers):
    stream = dataset.stream(seed=5)
    for epoch in (0, 1):
        slots = slot_names(stream, epoch, world, workers)
        read = Counter(itertools.chain.from_iterable(slots.values()))
        assert sorted(read) == sorted(all_names(release)) and set(read.values()) == {1}
        if world * workers <= 6:  # at least one shard per slot: nobody is idle
            assert all(slots.values())
        assert slots == slot_names(dataset.stream(seed=5), epoch, world, workers)  # a function of its inputs only
    assert slot_names(stream, 0, 2, 2) != slot_names(stream, 1, 2, 2)  # a new plan each epoch


def test_more_slots_than_shards_cut_shards_by_sample_position(dataset):
    stream = dataset.stream(seed=5)
    plan = stream.units(0, world_size=4, workers=3)  # 12 slots, 6 shards: each shard in two parts
    assert all(len(units) == 1 and units[0].parts == 2 for units in plan)
    assert Counter((u.shard, u.part) for units in plan for u in units) == Counter({(s, p): 1 for s in stream.shards for p in (0, 1)})


def test_a_dataloader_with_workers_returns_the_ranks_order(dataset):
    stream = dataset.stream(seed=2)
    for state in (StreamState(1, 0), StreamState(1, 7)):
        expected = [s.row for s in stream.rank_samples(state, rank=1, world_size=2, workers=2)]
        loader = torch.utils.data.DataLoader(stream.as_dataset(state, rank=1, world_size=2, workers=2), batch_size=None, num_workers=2)
        assert [s.row for s in loader] == expected
    single = torch.utils.data.DataLoader(stream.as_dataset(StreamState(0), workers=1), batch_size=None, num_workers=0)
    assert [s.row for s in single] == [s.row for s in stream.rank_samples(StreamState(0))]
    with pytest.raises(ConfigError, match="num_workers=2"):
        list(torch.utils.data.DataLoader(stream.as_dataset(StreamState(0), workers=2), batch_size=None, num_workers=0))


# --- shuffle buffer and resume ---------------------------------------------------------------------

def test_the_shuffle_buffer_is_seeded_and_bounded(dataset):
    def order(seed, buffer):
        stream = ShardStream(dataset.train_shards, dataset.image_rows, RowLabels(dataset["train"].captions), StreamConfig(seed, buffer, 32))
        return [s.img_name for s in stream.raw_slot(0)]

    assert order(1, 8) == order(1, 8)
    assert order(1, 8) != order(2, 8) and sorted(order(1, 8)) == sorted(order(2, 8))
    plan = dataset.stream(seed=1).units(0)[0]  # no buffer: the epoch plan's shards, samples as stored
    assert order(1, 0) == [s.img_name for unit in plan for s in iter_shard(unit.shard)]
    assert order(1, 0) != order(1, 8)
    pulled = []

    def source():
        for i in range(100):
            pulled.append(i)
            yield i

    first = next(shuffled(source(), 10, np.random.RandomState(0)))
    assert len(pulled) == 11 and first in range(11)  # at most the buffer is held when the first comes out
    out = list(shuffled(range(100), 10, np.random.RandomState(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))


@pytest.mark.parametrize("world, rank, workers", [(1, 0, 1), (2, 1, 2), (3, 0, 2)])
def test_resume_mid_epoch_yields_exactly_the_rest_without_decoding_the_skipped(dataset, world, rank, workers):
    stream = dataset.stream(seed=9)
    full = [(s.row, s.caption) for s in stream.rank_samples(StreamState(2), rank, world, workers)]
    assert full
    decoded = []
    plain = stream.sample
    stream.sample = lambda raw: decoded.append(raw) or plain(raw)
    for k in (1, len(full) // 2, len(full) - 1, len(full)):
        decoded.clear()
        rest = [(s.row, s.caption) for s in stream.rank_samples(StreamState(2, k), rank, world, workers)]
        assert rest == full[k:] and len(decoded) == len(full) - k
    with pytest.raises(ConfigError, match="past the end"):
        stream.resume_plan(StreamState(2, len(full) + 1), rank, world, workers)


def test_threads_decode_ahead_in_the_same_order(dataset):
    stream = dataset.stream(seed=4)
    plain = [(s.row, s.pixels.sum().item()) for s in stream.rank_samples(StreamState(0))]
    threaded = [(s.row, s.pixels.sum().item()) for s in stream.rank_samples(StreamState(0), threads=2)]
    assert threaded == plain


def test_batches_drop_the_incomplete_last_one(dataset):
    batches = list(batched(dataset.stream(0).rank_samples(StreamState(0)), 10))
    assert len(batches) == 4 and batches[0].images.shape == (10, 3, 32, 32) and batches[0].sizes.shape == (10, 2)
    assert len(list(batched(dataset.stream(0).rank_samples(StreamState(0)), 10, limit=2))) == 2


# --- noise by row id ---------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["rrsitr", "shuffle", "ncr", "hard"])
def test_noise_is_applied_by_row_with_the_manifests_clean_flags(dataset, protocol):
    train = dataset["train"]
    manifest = make_manifest(train, "rs5m", protocol, 0.5, 42)
    assert manifest.n_noisy > 10
    samples = list(dataset.stream(seed=1, manifest=manifest).rank_samples(StreamState(0), workers=2))
    assert sorted(s.row for s in samples) == list(range(train.n_rows))
    for s in samples:
        assert s.image == manifest.assigned_image[s.row]  # the row's image is the one streamed
        assert s.caption == train.captions[manifest.caption_row[s.row]]
        assert s.clean == bool(manifest.clean[s.row])
    clean = np.zeros(train.n_rows, dtype=bool)
    clean[[s.row for s in samples]] = [s.clean for s in samples]
    assert (clean == manifest.clean).all()
    # a detector that knew the streamed flags scores perfectly against the manifest
    assert detection_metrics(clean.astype(float), manifest.clean).auroc == 1.0


def test_a_manifest_for_other_rows_is_refused(dataset, tmp_path):
    other = write_release(tmp_path / "other", n_train=10)
    manifest = make_manifest(load_dataset("rs5m", other.root, options=OPTIONS)["train"], "rs5m", "shuffle", 0.4, 1)
    with pytest.raises(ManifestError, match="other train data"):
        dataset.stream(0, manifest)
    with pytest.raises(ConfigError, match="exactly one row"):
        RowLabels(["a", "b"], assigned_image=[0, 0])


# --- errors ------------------------------------------------------------------------------------------

def test_not_found_says_what_to_put_where(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("rs5m", tmp_path)
    message = str(info.value)
    for part in ("pub11-train-NNNN.tar", "rs3-val-NNNN.tar", "pub11_train_intermediate.csv", "rs3_val_intermediate.csv", str(tmp_path)):
        assert part in message
    assert "\n" not in message
    result = CliRunner().invoke(app, ["noise", "make", "-d", "rs5m", "--data-root", str(tmp_path), "-r", "0.2"])
    assert result.exit_code == 2 and "pub11_train_intermediate.csv" in result.output


def test_missing_shards_and_options_are_one_line_errors(tmp_path):
    release = write_release(tmp_path / "r", shards=3)
    (release.root / "rs3-train-0001.tar").unlink()
    with pytest.raises(DatasetNotFoundError, match="rs3-train-0001.tar is missing"):
        load_dataset("rs5m", release.root, options=OPTIONS)
    assert load_dataset("rs5m", release.root, options=dict(OPTIONS, subsets="pub11"))["train"].n_rows == 24
    with pytest.raises(ConfigError, match="subsets"):
        RS5MOptions(subsets="pub11+sentinel")
    with pytest.raises(ConfigError, match="val_rows"):
        load_dataset("rs5m", release.root, options=dict(subsets="pub11", val_rows=10, test_rows=10))


def rewrite_member(shard: Path, member: str, data: bytes | None) -> None:
    """The shard with one member's bytes replaced (or the member dropped, with None)."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:
        for name, content in members:
            if name != member:
                add_member(tar, name, content)
            elif data is not None:
                add_member(tar, name, data)


def first_member(shard: Path, ext: str) -> str:
    with tarfile.open(shard) as tar:
        return next(m.name for m in tar if m.name.endswith(ext))


def test_a_corrupt_image_member_names_the_shard_and_member(tmp_path):
    release = write_release(tmp_path / "r")
    shard = release.root / "pub11-train-0001.tar"
    member = first_member(shard, ".img_content")
    rewrite_member(shard, member, b"\xff\xd8 not a jpeg")
    stream = load_dataset("rs5m", release.root, options=OPTIONS).stream(0)
    with pytest.raises(ShardImageError) as info:
        list(stream.rank_samples(StreamState(0)))
    assert str(shard) in str(info.value) and member in str(info.value) and "\n" not in str(info.value)


def test_a_truncated_shard_or_a_missing_member_names_the_shard(tmp_path):
    release = write_release(tmp_path / "r")
    shard = release.root / "rs3-train-0000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError) as info:
        list(iter_shard(shard))
    assert str(shard) in str(info.value) and "member" in str(info.value) and "\n" not in str(info.value)
    other = release.root / "rs3-train-0001.tar"
    member = first_member(other, ".img_name")
    rewrite_member(other, member, None)
    with pytest.raises(ShardError, match=rf"{member}: sample .* has no \.img_name member"):
        list(iter_shard(other))


def test_a_sample_missing_from_the_metafile_names_the_shard_and_member(tmp_path):
    release = write_release(tmp_path / "r")
    shard = release.root / "pub11-train-0002.tar"
    member = first_member(shard, ".img_name")
    rewrite_member(shard, member, image_name("pub11", "train", 999).encode())
    stream = load_dataset("rs5m", release.root, options=OPTIONS).stream(0)
    with pytest.raises(DataFormatError, match=rf"pub11-train-0002.tar: member {member.rsplit('.', 1)[0]}.img_name: image .* is in no row"):
        list(stream.rank_samples(StreamState(0)))


def test_val_images_must_be_in_the_val_shards(tmp_path):
    release = write_release(tmp_path / "r", shards=1)
    shard = release.root / "rs3-val-0000.tar"
    rewrite_member(shard, first_member(shard, ".img_name"), b"elsewhere.jpg")
    with pytest.raises(DatasetNotFoundError, match="1 of the 14 val/test images are in no val shard"):
        load_dataset("rs5m", release.root, options=OPTIONS)


# --- through a full cell -------------------------------------------------------------------------------

def test_stream_train_data_keeps_the_trainers_rows_and_replays_an_epoch_from_its_generator(dataset):
    from rsnc_bench.backbones import BackboneConfig, build_backbone
    from rsnc_bench.engine.stream_data import StreamTrainData

    manifest = make_manifest(dataset["train"], "rs5m", "shuffle", 0.5, 42)
    backbone = build_backbone(BackboneConfig("tiny-b32"))
    data = StreamTrainData(dataset.stream(3, manifest), backbone.tokenize)
    clean_rows = np.flatnonzero(manifest.clean)  # the oracle's rows
    assert data.n_rows == 48 and data.steps(clean_rows, 4) == len(clean_rows) // 4 and not data.random_access
    batches = list(data.epoch_batches(clean_rows, 4, torch.Generator().manual_seed(7)))
    assert len(batches) == len(clean_rows) // 4
    seen = torch.cat([b.rows for b in batches])
    assert set(seen.tolist()) <= set(clean_rows.tolist()) and len(set(seen.tolist())) == len(seen)
    assert batches[0].text.shape[0] == 4 and batches[0].images.shape == (4, 3, 32, 32)
    again = list(data.epoch_batches(clean_rows, 4, torch.Generator().manual_seed(7)))
    assert all(torch.equal(a.rows, b.rows) and torch.equal(a.images, b.images) for a, b in zip(batches, again))
    other = list(data.epoch_batches(clean_rows, 4, torch.Generator().manual_seed(8)))
    assert not all(torch.equal(a.rows, b.rows) for a, b in zip(batches, other))
    with pytest.raises(ConfigError, match="streamed from shards"):
        data.raw_rows(torch.tensor([0, 1]))


def test_a_streamed_cell_completes_with_detection_metrics(tmp_path, release):
    from rsnc_bench.backbones import BackboneConfig
    from rsnc_bench.engine.cell import CellSpec, run_cell
    from rsnc_bench.store import CellKey, ResultStore

    key = CellKey("rrsitr", "rs5m", "tiny-b32", "rrsitr", 0.4, 42, 3)
    spec = CellSpec(key, BackboneConfig("tiny-b32"), data_root=str(release.root), train_options=("epochs=2", "batch_size=16"),
                    dataset_options=tuple(f"{k}={v}" for k, v in OPTIONS.items()))
    doc = run_cell(spec, ResultStore(tmp_path / "runs"))
    assert doc["status"] == "complete", doc.get("error")
    assert doc["detection"]["n_scored"] == 48 and doc["detection"]["n_noisy"] == doc["noise"]["n_noisy"] > 0
    assert [e["epoch"] for e in doc["history"]] == [1, 2] and doc["test"]["mr"] >= 0
    assert doc["config"]["dataset"]["splits"] == {"train": [48, 48], "val": [6, 6], "test": [8, 8]}
    assert not list((tmp_path / "runs" / "cache").rglob("train-*"))  # the train images were streamed, never cached


def test_data_check_streams_every_train_shard(release, tmp_path):
    args = ["data", "check", "-d", "rs5m", "--data-root", str(release.root)] + [a for k, v in OPTIONS.items() for a in ("-o", f"{k}={v}")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "train: 48 images streamed from 6 shards and decoded" in result.output and "test: 8 images decoded" in result.output


def _ddp_epoch(rank: int, root: str, out: str, port: int) -> None:
    import os

    import torch.distributed as dist

    from rsnc_bench.engine.stream_data import StreamTrainData

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RSNC_BENCH_CACHE=str(Path(out) / "cache"))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        data = StreamTrainData(load_dataset("rs5m", root, options=OPTIONS).stream(3), lambda caps: torch.zeros(len(caps), 5, dtype=torch.long))
        batches = list(data.epoch_batches(np.arange(48), 8, torch.Generator().manual_seed(1)))
        torch.save([(b.rows, b.images) for b in batches], f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_read_their_shares_and_get_the_same_global_batches(release, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_epoch, args=(str(release.root), str(tmp_path), port), nprocs=2)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert len(first) == len(second) == 6
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    rows = torch.cat([b[0] for b in first]).tolist()
    assert sorted(rows) == list(range(48))  # every row once per epoch over the two ranks' shares


def test_an_image_listed_in_two_metafiles_names_both_lines():
    from rsnc_bench.data.rs5m import Metafile, name_index

    pub11 = Metafile(Path("pub11_train_intermediate.csv"), ("a.jpg", "b.jpg"), ("c1", "c2"), (2, 3))
    rs3 = Metafile(Path("rs3_train_intermediate.csv"), ("c.jpg", "b.jpg"), ("c3", "c4"), (2, 3))
    with pytest.raises(DataFormatError, match=r"rs3_train_intermediate.csv:3: image 'b.jpg' is listed again \(first at pub11_train_intermediate.csv:3\)"):
        name_index([pub11, rs3])


def test_rows_not_trained_on_are_read_past_without_decoding(dataset, monkeypatch):
    from rsnc_bench.data import stream as stream_module
    from rsnc_bench.engine.stream_data import StreamTrainData

    decoded = []
    real = stream_module.decode_sample
    monkeypatch.setattr(stream_module, "decode_sample", lambda raw, canvas: decoded.append(raw.img_name) or real(raw, canvas))
    train = StreamTrainData(dataset.stream(3), lambda captions: torch.zeros(len(captions), 4, dtype=torch.long))
    rows = np.arange(0, train.n_rows, 2)  # every other row, as the oracle keeps the clean ones
    batches = list(train.epoch_batches(rows, 8, torch.Generator().manual_seed(0)))
    seen = torch.cat([b.rows for b in batches])
    assert len(batches) == len(rows) // 8 and set(seen.tolist()) <= set(rows.tolist())
    assert len(decoded) < train.n_rows and len(decoded) >= len(seen)
    names = dataset.splits["train"].images
    assert all(names.index(name) % 2 == 0 for name in decoded)  # no image of a skipped row was decoded
