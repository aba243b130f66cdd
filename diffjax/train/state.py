"""The train state: step, parameters, EMA parameters, optimiser state, RNG, timestep history.

Everything a resumed run needs to continue exactly is in this pytree, so one orbax item
saves it. The model's ``apply`` and the optimiser are not part of it: they are closed over by
the train step, built once from the config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from diffjax import parallel

# iDDPM's loss-second-moment resampler keeps the last HISTORY losses of every timestep.
HISTORY = 10


@flax.struct.dataclass
class TrainState:
    """step: [] int32; rng: [2] uint32 raw key; ema_params: one tree per EMA decay;
    loss_history: [T, HISTORY] float32 and loss_count: [T] int32 (timestep resampler)."""

    step: jax.Array
    params: Any
    ema_params: tuple[Any, ...]
    opt_state: optax.OptState
    rng: jax.Array
    loss_history: jax.Array
    loss_count: jax.Array


def create_train_state(
    init_fn: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    seed: int,
    num_ema: int,
    num_timesteps: int,
) -> TrainState:
    """A fresh state. ``init_fn(key) -> params``; jit it with ``out_shardings`` to create the
    state already placed (see :func:`create_sharded_state`)."""
    key = jax.random.PRNGKey(seed)
    init_key, rng = jax.random.split(key)
    params = init_fn(init_key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=tuple(params for _ in range(num_ema)),
        opt_state=tx.init(params),
        rng=rng,
        loss_history=jnp.zeros((num_timesteps, HISTORY), jnp.float32),
        loss_count=jnp.zeros((num_timesteps,), jnp.int32),
    )


def create_sharded_state(
    init_fn: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    seed: int,
    num_ema: int,
    num_timesteps: int,
    sharding: jax.sharding.Sharding,
) -> TrainState:
    """The state created directly on the devices with ``sharding``: one Sharding for every
    array, or a tree of them matching the state (:func:`diffjax.parallel.state_sharding`)."""
    make = lambda: create_train_state(init_fn, tx, seed, num_ema, num_timesteps)  # noqa: E731
    return jax.jit(make, out_shardings=sharding,
                   compiler_options=parallel.init_compiler_options())()


def state_shapes(
    init_fn: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    seed: int,
    num_ema: int,
    num_timesteps: int,
) -> TrainState:
    """Shapes and dtypes of the state (``jax.eval_shape``: nothing allocated)."""
    return jax.eval_shape(lambda: create_train_state(init_fn, tx, seed, num_ema, num_timesteps))


def with_sharding(shapes: Any, sharding: Any) -> Any:
    """``shapes`` as ShapeDtypeStructs placed by ``sharding`` (one, or a matching tree)."""
    if isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.tree.map(lambda _: sharding, shapes)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, sharding
    )


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """One step of the exponential moving average: ema <- decay * ema + (1 - decay) * params."""
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)


def param_count(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
