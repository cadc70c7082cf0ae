"""Data set parsers, registered by name (see :func:`register_dataset`).

HDF5 packs of any of them are read by :class:`hpc_reid.data.packed.PackedDataset`, registered as
"pack".
"""

from hpc_reid.data import packed

from . import (
    cuhk01,
    cuhk03,
    ilids,
    ilidsvid,
    market1501,
    mars,
    msmt17,
    partitions,
    prid2011,
    prid2011_video,
    vehicleid,
    veri776,
    viper,
)
from .base import (
    DatasetError,
    ImageRecord,
    ReidDataset,
    TrackletRecord,
    are_tracklets,
    available_datasets,
    build_dataset,
    register_dataset,
)

__all__ = [
    "DatasetError",
    "ImageRecord",
    "ReidDataset",
    "TrackletRecord",
    "are_tracklets",
    "available_datasets",
    "build_dataset",
    "cuhk01",
    "cuhk03",
    "ilids",
    "ilidsvid",
    "market1501",
    "mars",
    "msmt17",
    "packed",
    "partitions",
    "prid2011",
    "prid2011_video",
    "register_dataset",
    "vehicleid",
    "veri776",
    "viper",
]
