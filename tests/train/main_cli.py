"""``python -m diffjax.main`` for the multi-process tests, every process writing its own
compilation cache (:mod:`cache_writes`); the same arguments, the same module run as
``__main__``."""

import runpy

import cache_writes  # this script's directory is first on sys.path

cache_writes.enable()
runpy.run_module("diffjax.main", run_name="__main__", alter_sys=True)
