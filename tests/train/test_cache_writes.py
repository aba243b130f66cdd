"""The multi-process tests' processes other than 0 write their compilation caches
(``cache_writes``, which the driver and ``main_cli.py`` enable): without it process 1 of every
2-process test compiles all its programs afresh in every launch."""

import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import distributed

_spec = importlib.util.spec_from_file_location(
    "cache_writes", os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache_writes.py"))
cache_writes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cache_writes)


def test_a_process_other_than_0_writes_its_entries():
    # Patched on the installed JAX (False: its private write function changed, and every
    # multi-process test would compile process 1's programs in every run again).
    assert cache_writes.enable()
    cache_dir = jax.config.jax_compilation_cache_dir
    # A program no other test (nor an earlier run) compiled: its name and constant are new.
    salt = int.from_bytes(os.urandom(4), "little") / 2**32

    def cache_writes_probe(x):
        return x * salt + 1.0

    before = set(glob.glob(os.path.join(cache_dir, "jit_cache_writes_probe-*")))
    saved = distributed.global_state.process_id
    distributed.global_state.process_id = 1
    try:
        out = jax.jit(cache_writes_probe)(jnp.float32(2.0))
    finally:
        distributed.global_state.process_id = saved
    np.testing.assert_allclose(out, 2.0 * salt + 1.0, rtol=1e-6)
    written = set(glob.glob(os.path.join(cache_dir, "jit_cache_writes_probe-*"))) - before
    assert len(written) == 1, written
