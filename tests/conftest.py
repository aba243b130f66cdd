"""Shared test set-up: 8 fake CPU devices, the XLA options ``python -m diffjax.main`` runs
with (``parallel.xla_defaults``), and JAX's persistent compilation cache.

XLA_FLAGS must be set before JAX initialises its backends, which happens lazily on first
use, so setting it here (at collection time) is early enough.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from diffjax import parallel  # noqa: E402

parallel.xla_defaults()

_CACHE = os.environ.get(
    "DIFFJAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "diffjax-jax-tests")
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
# Every program is kept, as `python -m diffjax.main` keeps them: a test's subprocesses and the
# other worker then read even the small ones (checkpoint digests, eager operations).
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
# The `python -m diffjax.main` subprocesses of the tests use the same cache (main reads this
# variable), not the user's own ~/.cache/diffjax.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
