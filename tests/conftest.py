from __future__ import annotations

from pathlib import Path

import pytest

from rsnc_bench.data import load_dataset

SHARED_RSICD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsicd-subset"


@pytest.fixture(scope="session")
def rsicd_subset() -> Path:
    if not (SHARED_RSICD / "dataset_rsicd.json").exists():
        pytest.skip(f"real RSICD subset not found at {SHARED_RSICD}")
    return SHARED_RSICD


TINY_SYNTHETIC = dict(n_train=48, n_val=12, n_test=24, image_size=48)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic") / "tiny"


@pytest.fixture(scope="session")
def synthetic(synthetic_root):
    return load_dataset("synthetic", synthetic_root, options=TINY_SYNTHETIC)
