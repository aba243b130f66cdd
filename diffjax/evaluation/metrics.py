"""Sample-quality metrics on Inception features: FID, sFID, IS, KID, improved precision/recall.

All metrics take NumPy feature arrays (from :func:`diffjax.evaluation.inception.
compute_activations`): ``pool`` [N, 2048] for FID/KID/precision/recall, ``spatial``
[N, 2023] for sFID, ``logits_unbiased`` [N, 1008] for the Inception Score. Definitions follow
ADM's evaluator (guided-diffusion ``evaluations/evaluator.py``), so numbers are comparable with
published ADM-style tables when the features come from the same network and preprocessing:

* FID / sFID: Frechet distance between Gaussians fitted to the features (mean, unbiased
  covariance ``np.cov``), computed in float64.
* IS: exp(E_x KL(p(y|x) || p(y))) per chunk of ``split_size`` samples, averaged over chunks.
* KID: unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets
  (Binkowski et al. 2018; 100 subsets of 1000 by default).
* Precision / recall (Kynkaanniemi et al. 2019), k = 3: a point is covered by a set if it lies
  within the k-th nearest-neighbour radius (self excluded) of some point of that set;
  distances are squared Euclidean, as ADM. Computed in float32 blocks with JAX.

Reference statistics are .npz files with ``mu``, ``sigma`` (pool features) and optionally
``mu_s``, ``sigma_s`` (spatial features): the layout of ADM's reference batches, which also
hold the reference images as ``arr_0`` (uint8 [N, H, W, 3]).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.evaluation import convert_inception, inception


class MetricError(ValueError):
    """A metric cannot be computed from what it was given; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class GaussianStats:
    """Mean mu: [D] and covariance sigma: [D, D] (float64) of a feature set."""

    mu: np.ndarray
    sigma: np.ndarray

    def __post_init__(self):
        mu, sigma = np.atleast_1d(self.mu), np.atleast_2d(self.sigma)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"GaussianStats needs mu [D] and sigma [D, D], got {mu.shape} "
                             f"and {sigma.shape}")
        object.__setattr__(self, "mu", mu.astype(np.float64))
        object.__setattr__(self, "sigma", sigma.astype(np.float64))

    @classmethod
    def from_features(cls, features: np.ndarray) -> GaussianStats:
        """features: [N, D] (N >= 2) -> mean and unbiased covariance (rows are samples)."""
        feats = _features(features, "features", min_rows=2).astype(np.float64)
        return cls(feats.mean(axis=0), np.cov(feats, rowvar=False))


def _features(x: np.ndarray, name: str, min_rows: int = 1) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] < min_rows:
        raise ValueError(f"{name} must be a [N, D] array with N >= {min_rows}, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf; check the images and the Inception weights")
    return x


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _similar_symmetric(s_a: np.ndarray, s_b: np.ndarray) -> np.ndarray:
    """A symmetric PSD matrix with the spectrum of s_a @ s_b (both symmetric PSD [D, D]).

    R^T s_b R with s_a = R R^T. A Cholesky factor of whichever matrix is positive definite
    (~10x cheaper than an eigendecomposition); the symmetric square root if both are
    singular (fewer samples than dimensions). The spectrum is symmetric in s_a, s_b.
    """
    for first, second in ((s_a, s_b), (s_b, s_a)):
        try:
            root = np.linalg.cholesky(first)
        except np.linalg.LinAlgError:
            continue
        inner = root.T @ second @ root
        return (inner + inner.T) / 2
    root = _psd_sqrt(s_a)
    inner = root @ s_b @ root
    return (inner + inner.T) / 2


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2}).

    tr((S_a S_b)^{1/2}) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix R^T S_b R, where S_a = R R^T (see ``_similar_symmetric``); it has
    the same spectrum as S_a S_b. This needs no complex arithmetic or diagonal offset, even
    for rank-deficient covariances.
    """
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}; "
                         "compare statistics of the same Inception layer")
    eig = np.linalg.eigvalsh(_similar_symmetric(a.sigma, b.sigma))
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * tr_covmean)


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets [N, D], [M, D] (pool features: FID; spatial: sFID)."""
    return frechet_distance(GaussianStats.from_features(features_a),
                            GaussianStats.from_features(features_b))


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """Inception Score from classifier logits [N, K] (ADM: ``logits_unbiased``, K = 1008).

    Over consecutive chunks of ``split_size`` rows: exp(mean_x KL(p(y|x) || mean_x p(y|x))),
    then the mean over chunks. Computed from log-softmax in float64, so confident
    (one-hot) predictions are exact. Ranges from 1 to K.
    """
    logits = _features(logits, "logits").astype(np.float64)
    logp = logits - _logsumexp(logits, axis=1)
    scores = []
    for start in range(0, len(logp), split_size):
        part = logp[start:start + split_size]
        log_marginal = _logsumexp(part, axis=0) - np.log(len(part))
        kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores))


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    return m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of x: [m, D], y: [n, D] with k(a, b) = (a.b / D + 1)^3 (float64).

    sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
    - 2 sum_{i, j} k(x_i, y_j) / (m n).
    """
    x = _features(x, "x", min_rows=2).astype(np.float64)
    y = _features(y, "y", min_rows=2).astype(np.float64)
    d, m, n = x.shape[1], len(x), len(y)
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float(sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2.0 * k_xy.mean())


def kernel_inception_distance(features_a: np.ndarray, features_b: np.ndarray, *,
                              num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation of the unbiased polynomial MMD^2 over subsets.

    Each of ``num_subsets`` draws min(subset_size, N_a, N_b) rows without replacement from
    each set (NumPy generator seeded by ``seed``). features: [N_a, D], [N_b, D].
    """
    a, b = _features(features_a, "features_a", 2), _features(features_b, "features_b", 2)
    size = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    mmds = [polynomial_mmd2_unbiased(a[rng.choice(len(a), size, replace=False)],
                                     b[rng.choice(len(b), size, replace=False)])
            for _ in range(num_subsets)]
    return float(np.mean(mmds)), float(np.std(mmds))


@functools.partial(jax.jit, static_argnames="k")
def _knn_radius_block(rows: jax.Array, ref: jax.Array, k: int) -> jax.Array:
    """Squared distance from each row [b, D] to its (k+1)-th nearest point of ref [N, D]."""
    neg_top, _ = jax.lax.top_k(-_sq_dists(rows, ref), k + 1)
    return -neg_top[:, k]


@jax.jit
def _covered_block(rows: jax.Array, ref: jax.Array, ref_radii: jax.Array) -> jax.Array:
    """Whether each row [b, D] lies within some ref point's radius: [b] bool."""
    return jnp.any(_sq_dists(rows, ref) <= ref_radii[None, :], axis=1)


def _sq_dists(u: jax.Array, v: jax.Array) -> jax.Array:
    """Pairwise squared Euclidean distances [b, N] (float32, clipped at 0)."""
    uv = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST)
    d = jnp.sum(u * u, axis=1)[:, None] - 2.0 * uv + jnp.sum(v * v, axis=1)[None, :]
    return jnp.maximum(d, 0.0)


def _map_rows(fn, rows: np.ndarray, block: int, *args) -> np.ndarray:
    """Apply fn(row_block, *args) over fixed-size (padded) row blocks; concatenate."""
    n = len(rows)
    block = min(block, n)
    outs = []
    for start in range(0, n, block):
        chunk = rows[start:start + block]
        pad = block - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), chunk.dtype)])
        outs.append(np.asarray(fn(jnp.asarray(chunk), *args))[:block - pad])
    return np.concatenate(outs)


def manifold_radii(features: np.ndarray, k: int = 3, block_size: int = 1000) -> np.ndarray:
    """Squared distance of each point [N, D] to its k-th nearest other point: [N] float32."""
    feats = _features(features, "features", min_rows=k + 1).astype(np.float32)
    ref = jnp.asarray(feats)
    return _map_rows(functools.partial(_knn_radius_block, k=k), feats, block_size, ref)


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3,
                     block_size: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN radii.

    precision: fraction of fake points inside the real manifold (union of balls around real
    points with their k-NN radii); recall: fraction of real points inside the fake manifold.
    real: [N, D], fake: [M, D], each with more than k points.
    """
    real = _features(real, "real", min_rows=k + 1).astype(np.float32)
    fake = _features(fake, "fake", min_rows=k + 1).astype(np.float32)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    radii_real = jnp.asarray(manifold_radii(real, k, block_size))
    radii_fake = jnp.asarray(manifold_radii(fake, k, block_size))
    precision = _map_rows(_covered_block, fake, block_size, jnp.asarray(real), radii_real)
    recall = _map_rows(_covered_block, real, block_size, jnp.asarray(fake), radii_fake)
    return float(np.mean(precision)), float(np.mean(recall))


def save_reference_stats(path: str, stats: GaussianStats,
                         spatial: GaussianStats | None = None) -> None:
    """Write ``mu``, ``sigma`` (and ``mu_s``, ``sigma_s`` for sFID) to an .npz file."""
    arrays = {"mu": stats.mu, "sigma": stats.sigma}
    if spatial is not None:
        arrays.update(mu_s=spatial.mu, sigma_s=spatial.sigma)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _open_npz(path: str):
    if not os.path.isfile(path):
        raise ValueError(f"reference file {path!r} not found")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"reference file {path!r} is not a readable .npz "
                         f"({type(e).__name__})") from None


def load_reference_stats(path: str) -> tuple[GaussianStats, GaussianStats | None]:
    """Read (pool stats, spatial stats or None) from an .npz with mu/sigma[/mu_s/sigma_s].

    Works on ADM's reference batches (``VIRTUAL_imagenet64_labeled.npz`` etc.) and on files
    from :func:`save_reference_stats`.
    """
    with _open_npz(path) as data:
        keys = set(data.files)
        if not {"mu", "sigma"} <= keys:
            raise ValueError(f"reference file {path!r} has no 'mu'/'sigma' (keys: "
                             f"{sorted(keys)}); compute them from its images with "
                             "compute_activations and GaussianStats.from_features")
        stats = GaussianStats(data["mu"], data["sigma"])
        spatial = (GaussianStats(data["mu_s"], data["sigma_s"])
                   if {"mu_s", "sigma_s"} <= keys else None)
    return stats, spatial


def load_reference_images(path: str, key: str = "arr_0") -> np.ndarray:
    """The images [N, H, W, 3] (uint8 in ADM's files) stored under ``key`` in an .npz."""
    with _open_npz(path) as data:
        if key not in data.files:
            raise ValueError(f"reference file {path!r} has no {key!r} array (keys: "
                             f"{sorted(data.files)})")
        images = data[key]
    if images.ndim != 4:
        raise ValueError(f"{path!r}[{key!r}] must be images [N, H, W, C], got {images.shape}")
    return images


def compute_metrics(sample: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None,
                    *, reference_stats: GaussianStats | None = None,
                    reference_spatial_stats: GaussianStats | None = None,
                    k: int = 3, kid_subsets: int = 100, kid_subset_size: int = 1000,
                    seed: int = 0) -> dict[str, float]:
    """All metrics of a sample set against a reference, as ADM's evaluator reports them.

    sample / reference: feature dicts of :func:`compute_activations` (``pool``, ``spatial``,
    ``logits_unbiased``). Precomputed reference statistics (e.g. from ADM's .npz, computed on
    more images than ``reference`` holds) take precedence for FID/sFID; precision, recall and
    KID need ``reference`` features. Returns keys among ``inception_score``, ``fid``,
    ``sfid``, ``precision``, ``recall``, ``kid``, ``kid_std``.
    """
    out = {"inception_score": inception_score(sample["logits_unbiased"])}
    ref_pool = reference_stats
    if ref_pool is None and reference is not None:
        ref_pool = GaussianStats.from_features(reference["pool"])
    ref_spatial = reference_spatial_stats
    if ref_spatial is None and reference is not None and "spatial" in reference:
        ref_spatial = GaussianStats.from_features(reference["spatial"])
    if ref_pool is not None:
        out["fid"] = frechet_distance(GaussianStats.from_features(sample["pool"]), ref_pool)
    if ref_spatial is not None and "spatial" in sample:
        out["sfid"] = frechet_distance(GaussianStats.from_features(sample["spatial"]),
                                       ref_spatial)
    if reference is not None:
        out["precision"], out["recall"] = precision_recall(reference["pool"], sample["pool"],
                                                           k=k)
        out["kid"], out["kid_std"] = kernel_inception_distance(
            reference["pool"], sample["pool"], num_subsets=kid_subsets,
            subset_size=kid_subset_size, seed=seed)
    return out


METRICS = {
    "fid": fid_from_features,
    "sfid": fid_from_features,
    "inception_score": inception_score,
    "kid": kernel_inception_distance,
    "precision_recall": precision_recall,
}


def main(argv: list[str] | None = None) -> None:
    """CLI like ADM's evaluator: metrics of a sample .npz against a reference .npz.

    ``python -m diffjax.evaluation.metrics REF.npz SAMPLE.npz --inception inception_fid.npz``
    Both files hold images as ``arr_0`` (uint8 [N, H, W, 3]); the reference may also hold
    ``mu``/``sigma``/``mu_s``/``sigma_s``, used for FID/sFID when present (ADM's files).
    """
    parser = argparse.ArgumentParser(description="FID, sFID, IS, KID, precision/recall.")
    parser.add_argument("ref_batch", help="reference .npz (arr_0 images [+ mu, sigma, ...])")
    parser.add_argument("sample_batch", help="sample .npz (arr_0 images)")
    parser.add_argument("--inception", required=True, help="converted weights (.npz/.msgpack)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--preprocessing", default="tf1", choices=inception.PREPROCESSING)
    parser.add_argument("--size", type=int, default=inception.INPUT_SIZE,
                        help="network input size (299 for the standard metrics)")
    args = parser.parse_args(argv)
    params = convert_inception.load_inception_params(args.inception)
    ref_images = load_reference_images(args.ref_batch)
    sample_images = load_reference_images(args.sample_batch)
    with _open_npz(args.ref_batch) as data:
        has_stats = {"mu", "sigma"} <= set(data.files)
    ref_stats, ref_spatial = load_reference_stats(args.ref_batch) if has_stats else (None, None)

    def acts(images):
        return inception.compute_activations(params, images, batch_size=args.batch_size,
                                             size=args.size, preprocessing=args.preprocessing)

    results = compute_metrics(acts(sample_images), acts(ref_images),
                              reference_stats=ref_stats, reference_spatial_stats=ref_spatial)
    for name, value in results.items():
        print(f"{name}: {value:.6g}")


if __name__ == "__main__":
    main()
