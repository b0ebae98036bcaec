"""Datasets, the federation's schema, partitioners and per-hospital splits."""

from fedpriv.data.datasets import Dataset, available_datasets, load_dataset, register_dataset
from fedpriv.data.partition import (
    Partitioner,
    available_partitioners,
    create_partitioner,
    register_partitioner,
)
from fedpriv.data.schema import Schema, builtin_schema, load_schema
from fedpriv.data.splits import FederatedSplit, HospitalSplit, dataset_for, make_split, split_for

__all__ = [
    "Dataset",
    "FederatedSplit",
    "HospitalSplit",
    "Partitioner",
    "Schema",
    "available_datasets",
    "available_partitioners",
    "builtin_schema",
    "create_partitioner",
    "dataset_for",
    "load_dataset",
    "load_schema",
    "make_split",
    "register_dataset",
    "register_partitioner",
    "split_for",
]
