"""Negative log-likelihood in bits/dim over a test split: the full VLB, batched and sharded.

For a discrete-time model with T steps, -log2 p(x0) <= L_prior + sum_{t=1}^{T-1} L_t + L_0
(Ho et al. 2020, Nichol & Dhariwal 2021), every term evaluated at its own timestep by
:func:`diffjax.diffusion.losses.nll_bpd` (one ``lax.scan`` over the T timesteps). The
conventions are iDDPM's: images are 8-bit data mapped to [-1, 1] by x / 127.5 - 1 (the data
pipeline's output), L_0 is the discretised Gaussian decoder over the 256 bins of width 2/255
(edge bins open), and bits/dim divide by H * W * C and ln 2. The bound of each test image uses
one draw of the diffusion noise per timestep, so the reported mean is an unbiased estimate of
the expected bound; its standard error is std(ddof=1) / sqrt(N) over the N test images.

Class-conditional models are evaluated at each image's true label: the number is the
conditional bound -log2 p(x0 | y).

Batches are split over the mesh's ``data`` axis (``jax.make_array_from_process_local_data``,
each process passing its own rows); the per-image results come back replicated, so every
process gets the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
import tqdm

from diffjax import hugepages, parallel
from diffjax.diffusion import losses
from diffjax.evaluation.features import gather_mask


@dataclasses.dataclass(frozen=True)
class NLLResult:
    """bits/dim: mean and its standard error over ``per_example`` ([N] float64)."""

    bpd: float
    stderr: float
    per_example: np.ndarray

    @property
    def num_examples(self) -> int:
        return len(self.per_example)

    @classmethod
    def from_values(cls, values: np.ndarray) -> NLLResult:
        v = np.asarray(values, np.float64)
        if v.ndim != 1 or len(v) == 0:
            raise ValueError(f"NLL needs at least one example, got values of shape {v.shape}")
        se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
        return cls(float(v.mean()), se, v)


def make_nll_fn(model_fn: Callable, ds, mesh, *, prediction: str, variance_type: str,
                conditional: bool, clip_denoised: bool = False,
                timestep_map: np.ndarray | None = None, param_sharding: Any = None) -> Callable:
    """A jitted ``(params, x0 [B,H,W,C], labels [B], key) -> total bits/dim [B]`` (replicated).
    ``param_sharding``: how it takes params (a Sharding or a tree of them; default replicated).

    clip_denoised: x0_hat clipped to [-1, 1] before the posterior mean of every VLB term
    (guided-diffusion's ``image_nll.py`` defaults to True; ``--mode eval`` follows
    ``eval.nll_clip_denoised``).

    model_fn(params, x_in, c_noise, cond) -> model output ([B,H,W,C], or [B,H,W,2C] for a
    learned variance); ``cond`` is the labels when ``conditional`` else None. x0 and labels
    are sharded over the mesh's ``data`` axis; B must be a multiple of its size.
    """
    data, rep = parallel.data_sharding(mesh), parallel.replicated(mesh)

    def run(params, x0, labels, key):
        out = losses.nll_bpd(functools.partial(model_fn, params), ds, x0, key,
                             prediction=prediction, variance_type=variance_type,
                             clip_denoised=clip_denoised,
                             cond=labels if conditional else None, timestep_map=timestep_map)
        return out["total_bpd"]

    return jax.jit(run, in_shardings=(param_sharding or rep, data, data, rep), out_shardings=rep)


def evaluate_nll(nll_fn: Callable, params, batches: Iterable[dict[str, np.ndarray]], key, mesh,
                 *, max_examples: int = 0, total_batches: int | None = None,
                 progress: bool = True) -> NLLResult:
    """bits/dim of every valid image of ``batches`` (or of the first ``max_examples`` > 0).

    batches: this process's batches {"image": [b, H, W, C] in [-1, 1], "label": [b] int32,
      "mask": [b] bool} as ``diffjax.data.make_eval_iterator`` yields them (padding rows have
      mask False); every process must yield the same number of batches.
    Batch i uses the noise of ``fold_in(key, i)`` for all its timesteps' draws.
    """
    data = parallel.data_sharding(mesh)
    values: list[np.ndarray] = []
    count = 0
    bar = tqdm.tqdm(total=total_batches, desc="nll (bits/dim)", unit="batch",
                    disable=not progress or jax.process_index() != 0)
    pending = None
    for i, batch in enumerate(batches):
        x = jax.make_array_from_process_local_data(data, np.asarray(batch["image"], np.float32))
        y = jax.make_array_from_process_local_data(data, np.asarray(batch["label"], np.int32))
        current = (nll_fn(params, x, y, jax.random.fold_in(key, i)), gather_mask(batch["mask"]))
        if i == 0:  # what compiling freed goes back to the system
            hugepages.release_freed_memory()
        count += int(current[1].sum())
        if pending is not None:
            values.append(_fetch(*pending, bar))
        pending = current
        if max_examples > 0 and count >= max_examples:
            break
    if pending is not None:
        values.append(_fetch(*pending, bar))
    bar.close()
    if not values:
        raise ValueError("the NLL evaluation got no batches; check eval.split")
    out = np.concatenate(values)
    return NLLResult.from_values(out[:max_examples] if max_examples > 0 else out)


def _fetch(bpd: jax.Array, mask: np.ndarray, bar) -> np.ndarray:
    values = np.asarray(bpd, np.float64)[mask]
    bar.update(1)
    if len(values):
        bar.set_postfix(bpd=f"{values.mean():.3f}")
    return values
