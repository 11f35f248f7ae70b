"""Noise protocols, manifests and import."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rsnc_bench.data.split import Split
from rsnc_bench.errors import ConfigError, DataFormatError, ManifestError, UnknownNameError
from rsnc_bench.noise import NoiseManifest, import_noisy_csv, make_manifest

from .layouts import write_csv


def make_split(n_images: int, per_image: int = 5, text=lambda r: f"caption {r}", classes=None) -> Split:
    img_of = np.repeat(np.arange(n_images), per_image)
    return Split("train", Path("/nowhere"), tuple(f"img_{i}.jpg" for i in range(n_images)),
                 tuple(classes or [""] * n_images), tuple(text(r) for r in range(len(img_of))), img_of)


def rrsitr_reference(captions: list[str], rate: float):
    """The loop of protocol.md 4.1, written out with caption strings (independent of rsnc_bench)."""
    state = np.random.RandomState(42)
    n = len(captions)
    for r in (0.2, 0.4, 0.6, 0.8):
        k = int(n * r)
        rows = state.choice(n, size=k, replace=False)
        moved = [captions[j] for j in rows]
        state.shuffle(moved)
        noisy = list(captions)
        for t in range(k):
            noisy[rows[t]] = moved[t]
        if r == rate:
            return noisy, rows


ANCHORS = {
    9830: {0.2: [6641, 6442, 6829, 7616], 0.4: [3799, 6469, 9132, 812], 0.6: [4924, 1227, 7045, 8033], 0.8: [4446, 1073, 3225, 3784]},
    19305: {0.2: [9937, 5500, 15330, 7284], 0.4: [16911, 14021, 4464, 5370], 0.6: [12694, 9655, 700, 15540], 0.8: [7040, 14544, 17699, 13441]},
}


@pytest.mark.parametrize("n", sorted(ANCHORS))
def test_rrsitr_reproduces_the_reference_files_and_anchors(n):
    split = make_split(n // 5)
    for rate, anchor in ANCHORS[n].items():
        expected, rows = rrsitr_reference(list(split.captions), rate)
        assert rows[:4].tolist() == anchor
        manifest = make_manifest(split, "x", "rrsitr", rate, 42)
        assert list(manifest.apply(split).captions) == expected
        assert int((manifest.caption_row != np.arange(n)).sum()) <= int(n * rate)
        assert manifest.realized_rate <= rate


def test_rrsitr_rates_are_sequential_so_40_is_not_a_superset_of_20():
    split = make_split(400)
    noisy = {r: set(np.flatnonzero(~make_manifest(split, "x", "rrsitr", r, 42).clean)) for r in (0.2, 0.4)}
    assert not noisy[0.2] <= noisy[0.4]
    assert make_manifest(split, "x", "rrsitr", 0.0, 42).n_noisy == 0


@pytest.mark.parametrize("protocol", ["shuffle", "ncr", "hard", "rrsitr"])
def test_deterministic_per_seed_and_independent_of_global_rng(protocol):
    split = make_split(60, classes=[f"c{i % 3}" for i in range(60)])
    np.random.seed(1), random.seed(1), torch.manual_seed(1)
    first = make_manifest(split, "x", protocol, 0.4, 7)
    np.random.seed(999), random.seed(5), torch.manual_seed(3)
    np.random.rand(100)
    second = make_manifest(split, "x", protocol, 0.4, 7)
    assert first.content_hash == second.content_hash
    assert make_manifest(split, "x", protocol, 0.4, 8).content_hash != first.content_hash


def test_shuffle_chooses_exactly_int_n_r_rows_nested_across_rates():
    split = make_split(200)
    n = split.n_rows
    chosen = {r: set(np.random.RandomState(3).permutation(n)[: int(n * r)]) for r in (0.2, 0.6)}
    for rate in (0.2, 0.6):
        m = make_manifest(split, "x", "shuffle", rate, 3)
        moved = set(np.flatnonzero(m.caption_row != np.arange(n)))
        assert moved <= chosen[rate] and len(chosen[rate]) == int(n * rate)
        assert sorted(m.caption_row[list(chosen[rate])]) == sorted(chosen[rate])  # shuffled among themselves
        assert int(n * rate) - 10 <= m.n_noisy <= int(n * rate)
    low = set(np.flatnonzero(~make_manifest(split, "x", "shuffle", 0.2, 3).clean))
    assert low <= chosen[0.6]


def test_ncr_moves_images_not_captions():
    split = make_split(100)
    m = make_manifest(split, "x", "ncr", 0.5, 0)
    assert np.array_equal(m.caption_row, np.arange(split.n_rows))
    assert sorted(m.assigned_image.tolist()) == sorted(split.img_of.tolist())
    assert 230 <= m.n_noisy <= 250 and m.realized_rate <= 0.5


def test_hard_noise_uses_same_class_captions_and_falls_back():
    classes = ["airport"] * 10 + ["beach"] * 10 + ["lonely"] + [""] * 3
    split = make_split(len(classes), classes=classes)
    m = make_manifest(split, "x", "hard", 0.6, 5)
    assert m.n_noisy == int(split.n_rows * 0.6)  # every chosen row gets another image's caption
    noisy = np.flatnonzero(~m.clean)
    own_class = np.array(classes)[m.assigned_image[noisy]]
    caption_class = np.array(classes)[m.orig_image[noisy]]
    paired = (own_class == "airport") | (own_class == "beach")
    assert np.array_equal(own_class[paired], caption_class[paired])
    assert len(noisy[~paired]) > 0  # the one-image class and unknown classes fell back


def test_clean_flags_come_from_identity_even_with_duplicate_strings():
    split = make_split(50, text=lambda r: "the same caption .")
    m = make_manifest(split, "x", "shuffle", 0.6, 1)
    assert m.apply(split).captions == split.captions  # a text diff would see no noise at all
    assert m.n_noisy > 100
    assert np.array_equal(m.clean, split.img_of[m.caption_row] == split.img_of)


def test_rate_outside_unit_interval_and_unknown_protocol():
    split = make_split(5)
    for rate in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"outside \[0, 1\)"):
            make_manifest(split, "x", "shuffle", rate, 0)
    with pytest.raises(UnknownNameError, match="did you mean 'shuffle'"):
        make_manifest(split, "x", "shufle", 0.2, 0)


def test_manifest_round_trip_and_overwrite_rules(tmp_path):
    split = make_split(30)
    m = make_manifest(split, "x", "rrsitr", 0.4, 42)
    path = tmp_path / "m.json"
    assert m.save(path) == "written"
    loaded = NoiseManifest.load(path)
    for field in ("caption_row", "orig_image", "assigned_image", "clean"):
        assert np.array_equal(getattr(loaded, field), getattr(m, field))
    assert (loaded.dataset, loaded.protocol, loaded.seed, loaded.rate, loaded.images) == ("x", "rrsitr", 42, 0.4, m.images)
    assert loaded.content_hash == m.content_hash and loaded.realized_rate == m.realized_rate
    loaded.check_split(split)
    assert m.save(path) == "unchanged"
    other = make_manifest(split, "x", "rrsitr", 0.4, 43)
    with pytest.raises(ManifestError, match="exists with other content"):
        other.save(path)
    assert NoiseManifest.load(path).content_hash == m.content_hash  # nothing overwritten
    assert other.save(path, force=True) == "written"


def test_tampered_or_foreign_manifests_are_refused(tmp_path):
    split = make_split(30)
    m = make_manifest(split, "x", "shuffle", 0.4, 0)
    path = tmp_path / "m.json"
    m.save(path)
    doc = json.loads(path.read_text())
    doc["rows"]["clean"][0] = 1 - doc["rows"]["clean"][0]
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="hash does not match"):
        NoiseManifest.load(path)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not a JSON manifest"):
        NoiseManifest.load(path)
    with pytest.raises(ManifestError, match="other train data"):
        m.check_split(make_split(31))


def test_noise_leaves_val_and_test_untouched(synthetic):
    before = {s: synthetic[s].content_hash() for s in ("val", "test")}
    m = make_manifest(synthetic["train"], "synthetic", "rrsitr", 0.6, 42)
    noisy = m.apply(synthetic["train"])
    assert noisy.captions != synthetic["train"].captions
    assert {s: synthetic[s].content_hash() for s in ("val", "test")} == before
    with pytest.raises(ManifestError):
        m.apply(synthetic["val"])


def write_noisy_csv(path: Path, split: Split, manifest: NoiseManifest) -> Path:
    noisy = manifest.apply(split)
    rows = [(f"/home/author/RSITMD/images/{split.images[i]}", noisy.captions[r]) for r, i in enumerate(split.img_of)]
    return write_csv(path, rows)


def test_import_recovers_the_manifest_from_a_noisy_csv(tmp_path):
    split = make_split(300)
    m = make_manifest(split, "x", "rrsitr", 0.6, 42)
    imported = import_noisy_csv(write_noisy_csv(tmp_path / "NC-06.csv", split, m), split, "x", 0.6)
    assert np.array_equal(imported.clean, m.clean)
    assert np.array_equal(imported.orig_image, m.orig_image)
    assert imported.realized_rate == m.realized_rate and imported.protocol == "import"


def test_import_counts_a_caption_moved_within_its_image_as_clean(tmp_path):
    split = make_split(2, per_image=2, text=lambda r: ["a", "b", "c", "d"][r])  # image 0: a b, image 1: c d
    write_csv(tmp_path / "n.csv", [("img_0.jpg", "b"), ("img_0.jpg", "a"), ("img_1.jpg", "c"), ("img_1.jpg", "a")])
    m = import_noisy_csv(tmp_path / "n.csv", split, "x")
    assert m.clean.tolist() == [True, True, True, False]
    assert m.caption_row.tolist() == [1, 0, 2, 0]  # "a" used twice: copied noise reuses row 0


def test_import_errors_name_file_and_line(tmp_path):
    split = make_split(3, per_image=1)
    write_csv(tmp_path / "short.csv", [("img_0.jpg", "caption 0")])
    with pytest.raises(DataFormatError, match="has 1 rows but the clean train split has 3"):
        import_noisy_csv(tmp_path / "short.csv", split, "x")
    write_csv(tmp_path / "wrong.csv", [("img_0.jpg", "caption 0"), ("img_9.jpg", "caption 1"), ("img_2.jpg", "caption 2")])
    with pytest.raises(DataFormatError, match=r"wrong.csv:3: row 1 names image"):
        import_noisy_csv(tmp_path / "wrong.csv", split, "x")
    write_csv(tmp_path / "new.csv", [("img_0.jpg", "caption 0"), ("img_1.jpg", "an invented caption"), ("img_2.jpg", "caption 2")])
    with pytest.raises(DataFormatError, match=r"new.csv:3: row 1 caption 'an invented caption' is not a caption"):
        import_noisy_csv(tmp_path / "new.csv", split, "x")
