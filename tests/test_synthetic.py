"""The built-in synthetic dataset: deterministic, grounded, learnable, RSICD-like quirks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rsnc_bench.data import load_dataset
from rsnc_bench.data.images import SplitImages
from rsnc_bench.data.synthetic import CLASSES, draw_image
from rsnc_bench.engine.retrieval import t2i_ceiling
from rsnc_bench.errors import ConfigError

from .conftest import TINY_SYNTHETIC

NOUN = {"airport": "airport", "harbor": "harbor", "residential": "residential", "farmland": "farmland",
        "river": "river", "storagetanks": "industrial", "forest": "forest", "parking": "parking",
        "playground": "playground", "beach": "beach", "pond": "meadow", "bareland": "bare land"}


def test_same_seed_same_files_other_seed_other_files(tmp_path, synthetic, synthetic_root):
    again = load_dataset("synthetic", tmp_path / "again", options=TINY_SYNTHETIC)
    assert (tmp_path / "again" / "dataset_synthetic.json").read_bytes() == (synthetic_root / "dataset_synthetic.json").read_bytes()
    name = synthetic["train"].images[5]
    assert (tmp_path / "again/images" / name).read_bytes() == (synthetic_root / "images" / name).read_bytes()
    other = load_dataset("synthetic", tmp_path / "other", options={**TINY_SYNTHETIC, "seed": 1})
    assert other["train"].captions != again["train"].captions


def test_growing_the_dataset_keeps_earlier_images(tmp_path):
    small = load_dataset("synthetic", tmp_path / "small", options=dict(n_train=6, n_val=2, n_test=2, image_size=32))
    large = load_dataset("synthetic", tmp_path / "large", options=dict(n_train=12, n_val=2, n_test=2, image_size=32))
    assert large["train"].images[:6] == small["train"].images
    assert large["train"].captions[:30] == small["train"].captions
    for name in small["train"].images:
        assert (tmp_path / "large/images" / name).read_bytes() == (tmp_path / "small/images" / name).read_bytes()


def test_read_back_through_the_karpathy_reader(synthetic, synthetic_root):
    doc = json.loads((synthetic_root / "dataset_synthetic.json").read_text())
    assert doc["dataset"] == "synthetic" and {"filename", "imgid", "split", "sentids", "sentences"} <= set(doc["images"][0])
    assert [synthetic[s].n_images for s in ("train", "val", "test")] == [48, 12, 24]
    assert all(n == 5 for n in np.bincount(synthetic["train"].img_of))
    assert set(synthetic["train"].classes) <= set(CLASSES)


def test_captions_name_their_scene_and_some_are_padded_by_duplication(synthetic):
    train = synthetic["train"]
    for image, rows in enumerate(train.rows_of_image()):
        noun = NOUN[train.classes[image]]
        assert all(noun in train.captions[r] and train.captions[r].endswith(" .") for r in rows)
    distinct = [len({train.captions[r] for r in rows}) for rows in train.rows_of_image()]
    assert 0 < sum(d <= 2 for d in distinct) < len(distinct)


def test_counts_in_captions_follow_the_scene():
    # airport captions state how many planes were drawn; different images, different counts
    counts = set()
    for index in range(200):
        cls, _, captions = draw_image(3, index, 48, 0.0)
        if cls == "airport":
            counts |= {c.split(" plane")[0].split()[-1] for c in captions if " plane" in c}
    assert len(counts) >= 3


def test_learnable_but_not_solved_by_the_scene_class(tmp_path):
    ds = load_dataset("synthetic", tmp_path / "probe", options=dict(n_train=240, n_val=12, n_test=120, image_size=32))
    features = {}
    for name in ("train", "test"):
        images = SplitImages(ds[name], 12)
        features[name] = np.stack([images[i].float().numpy().ravel() for i in range(len(images))])
    classes = sorted(set(ds["train"].classes))
    train_cls = np.array(ds["train"].classes)
    centroids = np.stack([features["train"][train_cls == c].mean(0) for c in classes])
    distance = ((features["test"][:, None, :] - centroids[None]) ** 2).sum(-1)
    predicted = np.array(classes)[distance.argmin(1)]
    accuracy = (predicted == np.array(ds["test"].classes)).mean()
    assert accuracy > 0.5  # chance is 1/12: pixels carry the scene
    ceiling = t2i_ceiling(ds["test"].captions, ds["test"].img_of)
    assert 30 < ceiling["t2i_r1"] < 100  # some captions are shared across images, as in RSICD


def test_options_are_typed_and_stamped(tmp_path, synthetic_root):
    with pytest.raises(ConfigError, match="has no option 'size'"):
        load_dataset("synthetic", tmp_path / "x", options={"size": 3})
    with pytest.raises(ConfigError, match="holds synthetic data made with"):
        load_dataset("synthetic", synthetic_root, options={**TINY_SYNTHETIC, "seed": 9})
    with pytest.raises(ConfigError, match=">= 1"):
        load_dataset("synthetic", tmp_path / "y", options={"n_test": 0})


def test_generation_does_not_depend_on_the_python_hash_seed(tmp_path):
    """Captions once depended on set order; two processes with different hash seeds must agree."""
    code = ("import sys; from rsnc_bench.data import load_dataset; "
            "d = load_dataset('synthetic', sys.argv[1], options=dict(n_train=40, n_val=4, n_test=40, image_size=32)); "
            "print([s.content_hash() for s in d.splits.values()])")  # the hash covers every caption
    outputs = [
        subprocess.run([sys.executable, "-c", code, str(tmp_path / seed)], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    ]
    assert outputs[0] == outputs[1]
