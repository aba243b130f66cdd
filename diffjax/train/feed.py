"""Feeding batches to the devices ahead of the step, without losing the data position.

:class:`DeviceFeeder` reads ``depth`` batches ahead from a grain iterator and places them on
the mesh (``jax.make_array_from_process_local_data``), so the host-to-device copy of the
next batch overlaps the running step (JAX dispatches steps asynchronously). Reading ahead
moves the grain iterator past batches the step has not consumed yet; the feeder therefore
remembers the iterator state *before* each batch it holds, and its ``get_state`` is the
position of the first batch not yet consumed. That is what a checkpoint must record so a
resumed run sees exactly the next unseen batch.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from typing import Any

import jax


class DeviceFeeder:
    """Iterator of global, sharded batches with a checkpointable consumed position.

    Args:
      iterator: a grain ``DatasetIterator`` (``get_state() -> dict``) yielding dicts of
        process-local NumPy arrays.
      sharding: where the global batch goes (the ``data`` sharding of the mesh).
      depth: how many batches to hold on the devices ahead of the step.
    """

    def __init__(self, iterator: Any, sharding: jax.sharding.Sharding, depth: int = 2):
        self._it, self._sharding, self._depth = iterator, sharding, depth
        self._queue: collections.deque[tuple[Any, Any]] = collections.deque()

    def _fill(self) -> None:
        while len(self._queue) < self._depth:
            before = self._it.get_state()
            local = next(self._it)
            batch = jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(self._sharding, x), local)
            self._queue.append((before, batch))

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        self._fill()
        _, batch = self._queue.popleft()
        self._fill()
        return batch

    def get_state(self) -> bytes:
        """The iterator position of the next batch the step will consume (JSON bytes)."""
        state = self._queue[0][0] if self._queue else self._it.get_state()
        return json.dumps(state).encode()

    def set_state(self, state: bytes) -> None:
        self._queue.clear()
        self._it.set_state(json.loads(state.decode()))

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore; batches are read lazily."""

    def snapshot(self) -> _Snapshot:
        """A frozen copy of the current position, safe to hand to an asynchronous save."""
        return _Snapshot(self.get_state())


class _Snapshot:
    """A saved position that quacks like an iterator for grain's checkpoint handler."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state
