"""Datasets: layout readers, the dataset registry, the built-in synthetic data, image loading."""

from rsnc_bench.data import real, rs5m, synthetic  # noqa: F401  (register the datasets)
from rsnc_bench.data.datasets import DATASETS, DatasetSpec, get_dataset, load_dataset
from rsnc_bench.data.split import Dataset, Split

__all__ = ["DATASETS", "Dataset", "DatasetSpec", "Split", "get_dataset", "load_dataset"]
