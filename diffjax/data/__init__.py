"""diffjax.data: grain input pipelines (IDX files, TFDS data sources, image folders).

Public API:
  make_train_iterator, make_eval_iterator, dataset_info, prefetch_to_mesh,
  SOURCES, make_source                                                      (sources.py)
  DataError                                                                 (errors.py)
"""

from diffjax.data.pipeline import (
    build_dataset,
    dataset_info,
    make_eval_iterator,
    make_train_iterator,
    prefetch_to_mesh,
)
from diffjax.data.errors import DataError
from diffjax.data.sources import SOURCES, make_source

__all__ = [
    "DataError",
    "SOURCES",
    "build_dataset",
    "dataset_info",
    "make_eval_iterator",
    "make_source",
    "make_train_iterator",
    "prefetch_to_mesh",
]
