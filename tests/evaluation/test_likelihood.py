"""The batched, sharded NLL evaluator: exact denoiser on Gaussian data vs the analytic bound."""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import hugepages, parallel
from diffjax.diffusion import losses as L
from diffjax.evaluation import likelihood


def _load_oracle():
    """The exact Gaussian reverse process and its expected bound from the diffusion tests."""
    path = os.path.join(os.path.dirname(__file__), "..", "diffusion", "test_losses.py")
    spec = importlib.util.spec_from_file_location("diffjax_tests_losses_oracle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ORACLE = _load_oracle()
N, BATCH, SHAPE = 60, 16, (4, 4, 8)  # 4 batches of 16, the last with 12 valid rows


def _batches(x0: np.ndarray, seen: list[int]):
    """Eval-iterator-like batches with a padded, masked last batch; counts what is consumed."""
    for start in range(0, len(x0), BATCH):
        rows = x0[start:start + BATCH]
        mask = np.zeros(BATCH, bool)
        mask[:len(rows)] = True
        image = np.full((BATCH, *SHAPE), -1.0, np.float32)
        image[:len(rows)] = rows
        seen.append(start)
        yield {"image": image, "label": np.zeros(BATCH, np.int32), "mask": mask}


@pytest.fixture(scope="module")
def setup():
    ds = ORACLE.DS
    model, var_x0 = ORACLE.exact_gaussian_oracle(ds)
    x0 = ORACLE.MU + ORACLE.S0 * np.random.default_rng(7).standard_normal((N, *SHAPE))
    x0 = np.asarray(x0.astype(np.float32), np.float64)
    assert np.abs(x0).max() < 1 - 1 / 255  # no edge bins in play
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    fn = likelihood.make_nll_fn(lambda p, *a: model(*a), ds, mesh, prediction="eps",
                                variance_type="learned_range", conditional=False)
    return ds, model, var_x0, x0, mesh, fn


def test_sharded_batched_nll_of_exact_denoiser_matches_analytic_bound(setup):
    """Mean bits/dim over the split vs the analytic expected bound of the same images.

    Tolerance as the diffusion test: 5 standard errors of the mean residual (estimated from
    the N images) plus float32 rounding of T = 1000 KL terms (1000 * 4e-6 nats / ln 2)."""
    ds, _, var_x0, x0, mesh, fn = setup
    seen: list[int] = []
    result = likelihood.evaluate_nll(fn, {}, _batches(x0, seen), jax.random.key(3), mesh,
                                     total_batches=4, progress=False)
    assert result.num_examples == N and len(seen) == 4
    expected = ORACLE.expected_bound_nats(ds, x0.reshape(N, -1), var_x0).mean(1) / math.log(2)
    resid = result.per_example - expected
    tol = 5 * resid.std(ddof=1) / math.sqrt(N) + 1000 * 4e-6 / math.log(2)
    assert abs(resid.mean()) < tol, (resid.mean(), tol)
    assert result.bpd == pytest.approx(result.per_example.mean(), rel=1e-12)
    assert result.stderr == pytest.approx(result.per_example.std(ddof=1) / math.sqrt(N),
                                          rel=1e-12)
    # Sensitivity: the same means with the fixed-small variance give a clearly larger bound.
    _, model, *_ = setup
    fixed_fn = likelihood.make_nll_fn(lambda p, *a: model(*a)[..., :SHAPE[-1]], ds, mesh,
                                      prediction="eps", variance_type="fixed_small",
                                      conditional=False)
    fixed = likelihood.evaluate_nll(fixed_fn, {}, _batches(x0, []), jax.random.key(3), mesh,
                                    progress=False)
    assert fixed.bpd > result.bpd + 5 * tol


def test_sharded_evaluator_equals_single_device_nll_bpd_per_image(setup):
    """Each valid image gets exactly the bound nll_bpd gives its batch on one device with the
    batch's key fold_in(key, i); padding rows are dropped; max_examples stops early."""
    ds, model, _, x0, mesh, fn = setup
    key = jax.random.key(5)
    seen: list[int] = []
    result = likelihood.evaluate_nll(fn, {}, _batches(x0, seen), key, mesh, max_examples=20,
                                     progress=False)
    assert result.num_examples == 20 and len(seen) == 2
    single = jax.jit(lambda x, k: L.nll_bpd(model, ds, x, k, prediction="eps",
                                            variance_type="learned_range")["total_bpd"])
    direct = [np.asarray(single(jnp.asarray(b["image"]), jax.random.fold_in(key, i)))[b["mask"]]
              for i, b in enumerate(_batches(x0, []))]
    np.testing.assert_allclose(result.per_example, np.concatenate(direct)[:20], rtol=2e-6)


def test_nll_hands_back_freed_memory_after_its_first_batch(setup, monkeypatch):
    """hugepages.release_freed_memory runs once, after the first batch (the one that compiled
    the T-term program), as in the other evaluation loops."""
    *_, x0, mesh, fn = setup
    events = []
    monkeypatch.setattr(hugepages, "release_freed_memory", lambda: events.append("release"))

    def recording(*args):
        events.append("batch")
        return fn(*args)

    result = likelihood.evaluate_nll(recording, {}, _batches(x0, []), jax.random.key(3), mesh,
                                     progress=False)
    assert result.num_examples == N
    assert events == ["batch", "release", "batch", "batch", "batch"]


def test_nll_result_needs_examples():
    with pytest.raises(ValueError, match="at least one example"):
        likelihood.NLLResult.from_values(np.zeros(0))
