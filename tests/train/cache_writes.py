"""Lets every process of a multi-process test run write JAX's persistent compilation cache.

JAX writes cache entries from process 0 alone (``jax._src.compiler._cache_write``: "Not
writing persistent cache entry since process_id != 0", so that the hosts of a pod do not
contend for one shared directory), and on CPU a program's cache key differs between the
processes (each one's topology and device assignment enter it). So, left alone, process 1 of
every 2-process test compiles all of its programs afresh in every launch, cached or not: most
of what such a test costs. The test processes each keep a cache directory of their own, so
nothing contends; :func:`enable` makes the other processes write theirs too. The programs
compiled and run are the same: only whether process 1 finds them on its next launch changes.

Test code only (it reaches into JAX's private compiler module); where that module's
``_cache_write`` is not the one this was written against, it leaves JAX as it is and the
tests only run slower.
"""

from __future__ import annotations

import inspect

_PARAMETERS = ["cache_key", "compile_time_secs", "module_name", "backend", "executable",
               "host_callbacks"]


def enable() -> bool:
    """Makes processes other than 0 write the entries that process 0 would write; whether it
    could (False: JAX's private write function has another signature, nothing changed)."""
    # Imported here: JAX's private modules are only touched when a test process asks.
    from jax._src import compilation_cache, compiler, config, distributed

    write = compiler._cache_write
    if getattr(write, "_every_process", False):
        return True
    if list(inspect.signature(write).parameters) != _PARAMETERS:
        return False

    def every_process_write(cache_key, compile_time_secs, module_name, backend, executable,
                            host_callbacks):
        if distributed.global_state.process_id == 0 or host_callbacks:
            return write(cache_key, compile_time_secs, module_name, backend, executable,
                         host_callbacks)
        # JAX's other checks: the minimum compile time here, the minimum entry size and an
        # absent cache in put_executable_and_time.
        if compile_time_secs < config.persistent_cache_min_compile_time_secs.value:
            return None
        try:
            compilation_cache.put_executable_and_time(
                cache_key, module_name, executable, backend, int(compile_time_secs))
        except Exception as e:  # a cache that cannot be written costs time, not the test
            print(f"cache_writes: entry for {module_name} not written: {e!r}")

    every_process_write._every_process = True
    compiler._cache_write = every_process_write
    return True
