"""diffjax.data: grain input pipelines (IDX files, TFDS data sources, image folders).

Public API:
  make_train_iterator, make_eval_iterator, dataset_info, prefetch_to_mesh,
  iterator_from_config (ConfigDict adapter for the trainer)                 (pipeline.py)
  SOURCES, make_source                                                      (sources.py)
"""

from diffjax.data.pipeline import (
    build_dataset,
    dataset_info,
    iterator_from_config,
    make_eval_iterator,
    make_train_iterator,
    prefetch_to_mesh,
)
from diffjax.data.sources import SOURCES, make_source

__all__ = [
    "SOURCES",
    "build_dataset",
    "dataset_info",
    "iterator_from_config",
    "make_eval_iterator",
    "make_source",
    "make_train_iterator",
    "prefetch_to_mesh",
]
