"""Data set parsers, registered by name (see :func:`register_dataset`)."""

from . import cuhk01, cuhk03, ilids, market1501, msmt17, partitions, prid2011, viper
from .base import (
    DatasetError,
    ImageRecord,
    ReidDataset,
    available_datasets,
    build_dataset,
    register_dataset,
)

__all__ = [
    "DatasetError",
    "ImageRecord",
    "ReidDataset",
    "available_datasets",
    "build_dataset",
    "cuhk01",
    "cuhk03",
    "ilids",
    "market1501",
    "msmt17",
    "partitions",
    "prid2011",
    "register_dataset",
    "viper",
]
