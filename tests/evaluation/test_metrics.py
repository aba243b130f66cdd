"""Tests of FID/sFID, IS, KID, precision/recall, reference-stat files and compute_activations.

References are independent: scipy.linalg.sqrtm for the Frechet distance, closed forms for
commuting covariances and confident predictions, and naive float64 loops for KID and
precision/recall.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffjax import hugepages
from diffjax.evaluation import features, inception
from diffjax.evaluation import metrics as M

EPS64 = np.finfo(np.float64).eps


def _spd(rng, d, cond=10.0):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * np.geomspace(1.0, cond, d)) @ q.T


# ---------------------------------------------------------------- FID


def test_fid_of_a_set_against_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(300, 16)) * np.arange(1, 17)
    stats = M.GaussianStats.from_features(x)
    lam = np.linalg.eigvalsh(stats.sigma)
    # tr((S S)^{1/2}) from eigenvalues of S^2: each computed to ~ D eps lam_max^2, so each
    # sqrt is off by at most D eps lam_max^2 / (2 lam_min); 10x margin.
    tol = 10 * 16 * (16 * EPS64 * lam.max() ** 2 / (2 * lam.min()))
    assert abs(M.fid_from_features(x, x)) <= tol


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    d = 12
    a = M.GaussianStats(rng.normal(size=d), _spd(rng, d))
    b = M.GaussianStats(rng.normal(size=d), _spd(rng, d, cond=100.0))
    covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma).real
    ref = (np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma) + np.trace(b.sigma)
           - 2 * np.trace(covmean))
    np.testing.assert_allclose(M.frechet_distance(a, b), ref, rtol=1e-10)


def test_frechet_distance_closed_form_commuting_covariances():
    rng = np.random.default_rng(2)
    d = 10
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    ea, eb = rng.uniform(0.1, 5.0, d), rng.uniform(0.1, 5.0, d)
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    # Commuting covariances (shared eigenvectors): W2^2 = |dmu|^2 + sum (sqrt ea - sqrt eb)^2.
    closed = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(ea) - np.sqrt(eb)) ** 2)
    got = M.frechet_distance(M.GaussianStats(mu_a, (q * ea) @ q.T),
                             M.GaussianStats(mu_b, (q * eb) @ q.T))
    np.testing.assert_allclose(got, closed, rtol=1e-10)
    got_diag = M.frechet_distance(M.GaussianStats(mu_a, np.diag(ea)),
                                  M.GaussianStats(mu_b, np.diag(eb)))
    np.testing.assert_allclose(got_diag, closed, rtol=1e-10)


def test_fid_from_features_uses_mean_and_unbiased_cov():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 6))
    y = rng.normal(size=(40, 6)) @ _spd(rng, 6) + 1.0
    ref = M.frechet_distance(M.GaussianStats(x.mean(0), np.cov(x.T)),
                             M.GaussianStats(y.mean(0), np.cov(y.T)))
    assert M.fid_from_features(x, y) == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError, match="dimensions differ"):
        M.fid_from_features(x, y[:, :5])
    with pytest.raises(ValueError, match="NaN"):
        M.fid_from_features(np.full((3, 6), np.nan), y)


# ---------------------------------------------------------------- IS


def test_inception_score_uniform_is_one():
    assert M.inception_score(np.zeros((20, 1008))) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_confident_balanced_is_num_classes():
    k = 10
    logits = 1000.0 * np.eye(k)[np.arange(60) % k]
    assert M.inception_score(logits) == pytest.approx(k, rel=1e-12)
    # Chunks of 20 are balanced too: the mean over chunks is still k.
    assert M.inception_score(logits, split_size=20) == pytest.approx(k, rel=1e-12)


def test_inception_score_confident_imbalanced_is_exp_entropy():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    q = np.bincount(labels) / len(labels)
    got = M.inception_score(1000.0 * np.eye(5)[labels])
    np.testing.assert_allclose(got, np.exp(-np.sum(q * np.log(q))), rtol=1e-12)


def test_inception_score_matches_numpy_reference():
    logits = np.random.default_rng(4).normal(size=(30, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in (p[:12], p[12:24], p[24:]):
        kl = np.sum(part * (np.log(part) - np.log(part.mean(0))), axis=1)
        scores.append(np.exp(kl.mean()))
    np.testing.assert_allclose(M.inception_score(logits, split_size=12), np.mean(scores),
                               rtol=1e-12)


# ---------------------------------------------------------------- KID


def _naive_mmd2(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n))
    return sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2 * sxy / (m * n)


def test_kid_unbiased_mmd_matches_naive_loops():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(9, 5)) + 0.3
    np.testing.assert_allclose(M.polynomial_mmd2_unbiased(x, y), _naive_mmd2(x, y),
                               rtol=1e-10)


def test_kid_full_subsets_equal_full_estimate():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(15, 4)), rng.normal(size=(15, 4)) * 1.5
    # subset_size > N: every subset is a permutation of the whole set, and MMD^2_u is
    # permutation invariant, so each subset gives the full-set estimate.
    full = _naive_mmd2(x, y)
    mean, std = M.kernel_inception_distance(x, y, num_subsets=4, subset_size=50)
    np.testing.assert_allclose(mean, full, rtol=1e-10)
    assert std <= 1e-10 * abs(full)


def test_kid_estimator_is_unbiased_for_equal_distributions():
    rng = np.random.default_rng(7)
    vals = np.array([M.polynomial_mmd2_unbiased(rng.normal(size=(10, 3)),
                                                rng.normal(size=(10, 3)))
                     for _ in range(300)])
    # Population MMD^2 is 0; the mean of 300 independent estimates is within 4 SE of it
    # (the biased V-statistic would be off by ~(E k(x,x) - E k(x,x')) / 5, many SEs).
    assert abs(vals.mean()) < 4 * vals.std(ddof=1) / np.sqrt(len(vals))


# ---------------------------------------------------------------- precision / recall


def _naive_pr(real, fake, k):
    def sq(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_real = np.sort(sq(real, real), axis=1)[:, k]
    r_fake = np.sort(sq(fake, fake), axis=1)[:, k]
    precision = np.mean([(sq(f[None], real)[0] <= r_real).any() for f in fake])
    recall = np.mean([(sq(r[None], fake)[0] <= r_fake).any() for r in real])
    return precision, recall


def test_precision_recall_identical_sets_is_one():
    x = np.random.default_rng(8).normal(size=(40, 8)).astype(np.float32)
    assert M.precision_recall(x, x, k=3, block_size=16) == (1.0, 1.0)


def test_precision_recall_matches_naive_and_disjoint_is_zero():
    rng = np.random.default_rng(9)
    real = rng.normal(size=(37, 4))
    fake = rng.normal(size=(29, 4)) * 0.6 + 0.8
    got = M.precision_recall(real, fake, k=3, block_size=16)
    ref = _naive_pr(real, fake, 3)
    assert 0.0 < ref[0] < 1.0 and 0.0 < ref[1] < 1.0  # a case that can fail either way
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(M.manifold_radii(real, 3, block_size=10),
                               np.sort(((real[:, None] - real[None]) ** 2).sum(-1), 1)[:, 3],
                               rtol=1e-5)
    assert M.precision_recall(real, fake + 100.0) == (0.0, 0.0)


# ---------------------------------------------------------------- files


def test_reference_stats_roundtrip_and_adm_layout(tmp_path):
    rng = np.random.default_rng(10)
    pool = M.GaussianStats(rng.normal(size=5), _spd(rng, 5))
    spatial = M.GaussianStats(rng.normal(size=3), _spd(rng, 3))
    M.save_reference_stats(str(tmp_path / "a.npz"), pool, spatial)
    got_pool, got_spatial = M.load_reference_stats(str(tmp_path / "a.npz"))
    np.testing.assert_array_equal(got_pool.sigma, pool.sigma)
    np.testing.assert_array_equal(got_spatial.mu, spatial.mu)
    M.save_reference_stats(str(tmp_path / "b.npz"), pool)
    assert M.load_reference_stats(str(tmp_path / "b.npz"))[1] is None
    # ADM's reference batch layout: arr_0 images plus mu/sigma/mu_s/sigma_s.
    imgs = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "adm.npz", arr_0=imgs, mu=pool.mu, sigma=pool.sigma,
             mu_s=spatial.mu, sigma_s=spatial.sigma)
    adm_pool, adm_spatial = M.load_reference_stats(str(tmp_path / "adm.npz"))
    np.testing.assert_array_equal(adm_spatial.sigma, spatial.sigma)
    np.testing.assert_array_equal(M.load_reference_images(str(tmp_path / "adm.npz")), imgs)


def test_reference_file_errors(tmp_path):
    np.savez(tmp_path / "imgs.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="no 'mu'/'sigma'"):
        M.load_reference_stats(str(tmp_path / "imgs.npz"))
    with pytest.raises(ValueError, match="not found"):
        M.load_reference_stats(str(tmp_path / "missing.npz"))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable"):
        M.load_reference_stats(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="no 'images'"):
        M.load_reference_images(str(tmp_path / "imgs.npz"), key="images")


def test_compute_metrics_keys_and_values():
    rng = np.random.default_rng(11)
    ref = {"pool": rng.normal(size=(30, 6)), "spatial": rng.normal(size=(30, 4)),
           "logits_unbiased": rng.normal(size=(30, 5))}
    smp = {"pool": rng.normal(size=(25, 6)) + 0.5, "spatial": rng.normal(size=(25, 4)),
           "logits_unbiased": rng.normal(size=(25, 5))}
    out = M.compute_metrics(smp, ref, kid_subsets=3)
    assert set(out) == {"inception_score", "fid", "sfid", "precision", "recall", "kid",
                        "kid_std"}
    assert out["fid"] == pytest.approx(M.fid_from_features(smp["pool"], ref["pool"]))
    assert out["sfid"] == pytest.approx(M.fid_from_features(smp["spatial"], ref["spatial"]))
    stats_only = M.compute_metrics(smp, None,
                                   reference_stats=M.GaussianStats.from_features(ref["pool"]))
    assert set(stats_only) == {"inception_score", "fid"}
    assert stats_only["fid"] == pytest.approx(out["fid"])


# ---------------------------------------------------------------- activations


def _toy_apply(params, x):
    """A cheap stand-in network: per-image channel means and one pixel, scaled."""
    return {"pool": x.mean(axis=(1, 2)) * params["s"], "pixel": x[:, 3, 5, :]}


def test_compute_activations_batches_pads_and_shards():
    rng = np.random.default_rng(12)
    imgs = rng.integers(0, 256, size=(11, 12, 10, 3), dtype=np.uint8)
    params = {"s": jnp.float32(2.0)}
    x = np.asarray(inception.preprocess_images(jnp.asarray(imgs), size=16))
    ref = {"pool": x.mean(axis=(1, 2)) * 2.0, "pixel": x[:, 3, 5, :]}
    got = inception.compute_activations(params, imgs, batch_size=4, size=16,
                                        apply_fn=_toy_apply, progress=False)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-6)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    batches = [imgs[:3], imgs[3:10], imgs[10:]]  # uneven batches; 5 -> padded to 8
    got_sh = inception.compute_activations(params, iter(batches), batch_size=5, size=16,
                                           sharding=sharding, apply_fn=_toy_apply,
                                           progress=True)
    for k in ref:
        np.testing.assert_allclose(got_sh[k], ref[k], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no images"):
        inception.compute_activations(params, iter([]), apply_fn=_toy_apply, progress=False)


def test_feature_loops_hand_back_freed_memory_after_their_first_batch(monkeypatch):
    """compute_activations and FeatureNet (both of its loops) call
    hugepages.release_freed_memory once, after their first batch (the one that compiled the
    network): an InceptionV3 pass kept ~126 MB of freed memory resident otherwise."""
    events = []
    monkeypatch.setattr(hugepages, "release_freed_memory", lambda: events.append("release"))

    def recording(fn):
        def call(*args):
            events.append("batch")
            return fn(*args)
        return call

    jitted = inception._jitted_step
    monkeypatch.setattr(inception, "_jitted_step", lambda *a: recording(jitted(*a)))
    imgs = np.random.default_rng(14).integers(0, 256, size=(11, 12, 10, 3), dtype=np.uint8)
    got = inception.compute_activations({"s": jnp.float32(2.0)}, imgs, batch_size=4, size=16,
                                        apply_fn=_toy_apply, progress=False)
    assert got["pool"].shape == (11, 3)
    assert events == ["batch", "release", "batch", "batch"]
    net = features.FeatureNet.__new__(features.FeatureNet)  # the loops only, no network
    net.image_shape, net.batch_size, net._params, net._data = (4, 4, 1), 2, None, None
    net._fn = recording(lambda p, x: (np.asarray(x).reshape(len(x), -1), np.zeros((len(x), 2))))
    events.clear()
    feats, _ = net(np.zeros((5, 4, 4, 1), np.float32))
    assert feats.shape == (5, 16) and events == ["batch", "release", "batch", "batch"]
    events.clear()
    monkeypatch.setattr(jax, "make_array_from_process_local_data", lambda sharding, x: x)
    batches = [{"image": np.zeros((2, 4, 4, 1), np.float32), "mask": np.ones(2, bool)}] * 3
    assert net.of_local_batches(iter(batches)).shape == (6, 16)
    assert events == ["batch", "release", "batch", "batch"]


def test_compute_activations_with_inception_sharded_equals_single_device():
    params = inception.init_params(jax.random.key(0))
    imgs = np.random.default_rng(13).integers(0, 256, size=(5, 75, 75, 3), dtype=np.uint8)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    got = inception.compute_activations(params, imgs, batch_size=5, size=75,
                                        sharding=NamedSharding(mesh, PartitionSpec("data")),
                                        progress=False)
    # Same shapes as the CLI test below, so the single-device program compiles once.
    ref = inception.compute_activations(params, imgs, batch_size=5, size=75, progress=False)
    assert got["pool"].shape == (5, 2048) and got["logits"].shape == (5, 1008)
    assert got["spatial"].shape == (5, 3 * 3 * 7)  # mixed_6/conv is 3x3 at 75x75 input
    for k in ("pool", "logits", "logits_unbiased", "spatial"):
        assert np.abs(ref[k]).max() > 0.1
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-5 * np.abs(ref[k]).max())


def test_frechet_distance_singular_covariances_match_scipy():
    rng = np.random.default_rng(15)
    x, y = rng.normal(size=(4, 9)), rng.normal(size=(6, 9)) + 0.2  # ranks 3 and 5 of 9
    a, b = M.GaussianStats.from_features(x), M.GaussianStats.from_features(y)
    ref = (np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma) + np.trace(b.sigma)
           - 2 * np.trace(scipy.linalg.sqrtm(a.sigma @ b.sigma).real))
    # Zero eigenvalues of S_a S_b come out as ~eps * |S|^2, whose square roots add
    # ~sqrt(eps) * |S| each to the trace (for scipy's sqrtm as for ours).
    tol = 10 * 9 * np.sqrt(EPS64) * max(np.abs(a.sigma).max(), np.abs(b.sigma).max())
    assert abs(M.frechet_distance(a, b) - ref) < tol
    assert abs(M.frechet_distance(b, a) - ref) < tol
    full = M.GaussianStats(np.zeros(9), _spd(rng, 9))
    assert M.frechet_distance(a, full) == pytest.approx(M.frechet_distance(full, a), rel=1e-12)


def test_cli_on_adm_style_files(tmp_path, capsys):
    from diffjax.evaluation import convert_inception

    params = inception.init_params(jax.random.key(1))
    convert_inception.save_inception_params(params, str(tmp_path / "w.npz"))
    rng = np.random.default_rng(14)
    ref = rng.integers(0, 256, size=(5, 75, 75, 3), dtype=np.uint8)
    smp = rng.integers(0, 256, size=(5, 75, 75, 3), dtype=np.uint8)
    # ADM's reference layout: images plus statistics (here full-rank made-up ones, standing
    # for statistics of a larger set), which take precedence over the images' for FID/sFID.
    ref_pool, ref_spatial = (M.GaussianStats(rng.normal(size=d) * 0.1, np.eye(d) + b @ b.T / d)
                             for d, b in ((2048, rng.normal(size=(2048, 8))),
                                          (63, rng.normal(size=(63, 8)))))
    np.savez(tmp_path / "ref.npz", arr_0=ref, mu=ref_pool.mu, sigma=ref_pool.sigma,
             mu_s=ref_spatial.mu, sigma_s=ref_spatial.sigma)
    np.savez(tmp_path / "smp.npz", arr_0=smp)
    argv = [str(tmp_path / "ref.npz"), str(tmp_path / "smp.npz"), "--inception",
            str(tmp_path / "w.npz"), "--size", "75", "--batch-size", "5"]
    M.main(argv)
    printed = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert set(printed) == {"inception_score", "fid", "sfid", "precision", "recall", "kid",
                            "kid_std"}
    acts = {name: inception.compute_activations(params, imgs, batch_size=5, size=75,
                                                progress=False) for name, imgs in
            (("ref", ref), ("smp", smp))}
    assert float(printed["inception_score"]) == pytest.approx(
        M.inception_score(acts["smp"]["logits_unbiased"]), rel=1e-5)
    assert float(printed["sfid"]) == pytest.approx(M.frechet_distance(
        M.GaussianStats.from_features(acts["smp"]["spatial"]), ref_spatial), rel=1e-5)
    assert float(printed["recall"]) == pytest.approx(
        M.precision_recall(acts["ref"]["pool"], acts["smp"]["pool"])[1])
    assert float(printed["fid"]) > 0
