"""Datasets, partitioners and per-hospital splits."""

from fedpriv.data.datasets import Dataset, available_datasets, load_dataset, register_dataset
from fedpriv.data.partition import (
    Partitioner,
    available_partitioners,
    create_partitioner,
    register_partitioner,
)
from fedpriv.data.splits import FederatedSplit, HospitalSplit, make_split, split_for

__all__ = [
    "Dataset",
    "FederatedSplit",
    "HospitalSplit",
    "Partitioner",
    "available_datasets",
    "available_partitioners",
    "create_partitioner",
    "load_dataset",
    "make_split",
    "register_dataset",
    "register_partitioner",
    "split_for",
]
