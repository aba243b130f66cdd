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


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "long: runs for tens of seconds (processes of its own, a full-size model); "
        "scheduled first")


def pytest_collection_modifyitems(config, items):
    """The tests marked ``long`` go first, in their collection order: pytest-xdist hands out
    the first tests in turn to its workers, so each starts on long ones, and the short tests
    fill both workers to the end instead of one worker finishing a long test alone. (Tests
    that only reuse what a long one builds, :func:`built_once`, stay where they are, after it.)"""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
