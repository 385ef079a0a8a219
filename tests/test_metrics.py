"""The ADM evaluator's table (Inception Score, FID, sFID, precision, recall) against an independent numpy
re-implementation of openai/guided-diffusion `evaluations/evaluator.py`, on the same features: stand-in
feature functions (fast), and the real FID Inception architecture in NVIDIA's and pytorch-fid's file layouts
with seeded random weights. Tests that fail when the IS bias is applied or the spatial features are flattened
NCHW; the reference batch in ADM's layout; `uvit fid --metrics` and `uvit fid ref --metrics` on the CLI."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from train_fixtures import TORCHRUN_2
from typer.testing import CliRunner

import uvit_cli.fid.features as fid_features
from uvit_cli.cli import app
from uvit_cli.errors import ConfigError, DataError, WeightsNotFoundError
from uvit_cli.fid import compute_fid, fid_from_generator, make_ref_stats
from uvit_cli.fid.features import Collector
from uvit_cli.fid.manifold import precision_recall
from uvit_cli.fid.metrics import default_mode, parse_metrics
from uvit_cli.inception import FIDInception, load_inception

runner = CliRunner()


# --------------------------------------------------------------------------------------------------
# ADM's evaluator in numpy (openai/guided-diffusion, evaluations/evaluator.py), written from its code


def adm_statistics(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Evaluator.compute_statistics: np.mean(axis=0), np.cov(rowvar=False)."""
    return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


def adm_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float:
    """FIDStatistics.frechet_distance: scipy sqrtm of the product, eps on the diagonals if not finite."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def low_rank_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance of np.mean/np.cov statistics of n, m < D features, exactly: the nonzero
    eigenvalues of S1 S2 are those of (X Yᵀ)(Y Xᵀ) (n x n), X, Y the centred features / sqrt(n - 1). Equal to
    `adm_frechet` (tested above at small D) without scipy's sqrtm, which takes 10-26 s at D = 2048."""
    x = (a - a.mean(0)).astype(np.float64) / np.sqrt(len(a) - 1)
    y = (b - b.mean(0)).astype(np.float64) / np.sqrt(len(b) - 1)
    xy = x @ y.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(xy @ xy.T), 0, None)).sum()
    diff = a.mean(0).astype(np.float64) - b.mean(0)
    return float(diff @ diff + (x * x).sum() + (y * y).sum() - 2 * tr_sqrt)


def adm_inception_score(pool: np.ndarray, w: np.ndarray, split_size: int = 5000) -> float:
    """Evaluator.compute_inception_score: softmax(pool @ W) (`_create_softmax_graph`: the MatMul's weight,
    no bias), chunks of split_size, exp(mean KL), mean over chunks."""
    logits = pool.astype(np.float64) @ w.astype(np.float64)
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _to16(x: np.ndarray) -> np.ndarray:
    """A float32 result cast to float16 (TF's half ops accumulate in float32)."""
    return np.asarray(x, np.float64).astype(np.float32).astype(np.float16)


def adm_pairwise(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """DistanceBlock: `_batch_pairwise_distances` on features cast to float16, each op's result float16;
    float32 when the float16 block is not finite (tf.cond on is_finite). Sums of products accumulate in
    float64 before the cast, and the float32 path is float64 rounded to float32 (as uvit does)."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        norm_u = _to16((u16 * u16).astype(np.float64).sum(1))  # tf.reduce_sum(tf.square(U), 1)
        norm_v = _to16((v16 * v16).astype(np.float64).sum(1))
        mm = _to16(u16.astype(np.float64) @ v16.astype(np.float64).T)
        d16 = np.maximum(norm_u[:, None] - np.float16(2) * mm + norm_v[None, :], np.float16(0))
    if np.isfinite(d16).all():
        return d16.astype(np.float32)
    u64, v64 = u.astype(np.float64), v.astype(np.float64)
    d = (u64**2).sum(1)[:, None] - 2 * u64 @ v64.T + (v64**2).sum(1)[None, :]
    return np.maximum(d, 0).astype(np.float32)


def adm_radii(feats: np.ndarray, block: int, k: int = 3) -> np.ndarray:
    """ManifoldEstimator.manifold_radii: row blocks against every column block, np.partition, [:, k]."""
    n = len(feats)
    radii = np.zeros(n, np.float32)
    for b1 in range(0, n, block):
        rows = feats[b1 : b1 + block]
        dist = np.concatenate([adm_pairwise(rows, feats[b2 : b2 + block]) for b2 in range(0, n, block)], 1)
        radii[b1 : b1 + block] = np.partition(dist, np.arange(k + 1), axis=1)[:, k]
    return radii


def adm_precision_recall(ref: np.ndarray, samples: np.ndarray, block: int) -> tuple[float, float]:
    """Evaluator.compute_prec_recall -> ManifoldEstimator.evaluate_pr with DistanceBlock.less_thans."""
    radii_1, radii_2 = adm_radii(ref, block), adm_radii(samples, block)
    f1_status = np.zeros(len(ref), bool)
    f2_status = np.zeros(len(samples), bool)
    for b1 in range(0, len(ref), block):
        for b2 in range(0, len(samples), block):
            d = adm_pairwise(ref[b1 : b1 + block], samples[b2 : b2 + block])
            f1_status[b1 : b1 + block] |= (d <= radii_2[None, b2 : b2 + block]).any(1)
            f2_status[b2 : b2 + block] |= (d <= radii_1[b1 : b1 + block, None]).any(0)
    return float(f2_status.mean()), float(f1_status.mean())  # (precision, recall)


# --------------------------------------------------------------------------------------------------
# Stand-in features: pool (16), spatial (12), logits (10) from one pass, deterministic


_G = torch.Generator().manual_seed(0)
_W_POOL = torch.randn(48, 16, generator=_G)
_W_SPATIAL = torch.randn(48, 12, generator=_G)
_W_LOGITS = torch.randn(16, 10, generator=_G)


def standin(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B,3,H,W) in [0,255] -> the dict FIDInception.outputs returns, tiny: 4x4 pool, projections, ReLU."""
    p = torch.nn.functional.adaptive_avg_pool2d(x.double() / 255, 4).flatten(1)
    pool = torch.relu(p @ _W_POOL.double()).float()
    return {"pool": pool, "spatial": torch.relu(p @ _W_SPATIAL.double()).float(), "logits": pool @ _W_LOGITS}


def _standin_numpy(images: np.ndarray) -> dict[str, np.ndarray]:
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32))
    return {k: v.numpy() for k, v in standin(x).items()}


def _images(n: int, seed: int, size: int = 16, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, (n, size, size, 3), dtype=np.uint8)


KW = {"features": standin, "feature_dim": 16, "device": "cpu", "mode": "legacy_tensorflow"}


def _adm_batch(path: Path, images: np.ndarray, feats: dict[str, np.ndarray]) -> Path:
    """A reference batch in ADM's layout: arr_0 uint8 NHWC + mu/sigma (pool) + mu_s/sigma_s (spatial)."""
    mu, sigma = adm_statistics(feats["pool"])
    mu_s, sigma_s = adm_statistics(feats["spatial"])
    np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    return path


# --------------------------------------------------------------------------------------------------
# Every metric against the numpy evaluator


def test_the_adm_table_matches_the_evaluator_on_the_same_features(tmp_path):
    """Samples (.npz, ADM's sample batch) against a reference batch in ADM's layout: IS, FID, sFID,
    precision and recall equal the numpy evaluator's on the same features; PR's reference is the batch's
    arr_0 images, measured here."""
    samples, ref_images = _images(40, 1), _images(30, 2, high=230)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    fs, fr = _standin_numpy(samples), _standin_numpy(ref_images)
    ref = _adm_batch(tmp_path / "VIRTUAL_ref.npz", ref_images, fr)
    r = compute_fid(tmp_path / "samples.npz", ref, metrics="all", batch_size=7, **KW)

    assert r.metrics["fid"] == pytest.approx(
        adm_frechet(*adm_statistics(fs["pool"]), *adm_statistics(fr["pool"])), rel=1e-5
    )
    want_sfid = adm_frechet(*adm_statistics(fs["spatial"]), *adm_statistics(fr["spatial"]))
    assert r.metrics["sfid"] == pytest.approx(want_sfid, rel=1e-5)  # ADM's float32 np.mean: ~1e-6
    want_is = adm_inception_score(fs["pool"], _W_LOGITS.numpy())
    assert r.metrics["inception_score"] == pytest.approx(want_is, rel=1e-5)  # float32 logits: <= 1.2e-6 apart
    p, rc = adm_precision_recall(fr["pool"], fs["pool"], block=10_000)
    assert (r.metrics["precision"], r.metrics["recall"]) == (p, rc)
    assert 0 < p < 1 and 0 < rc < 1  # a comparison that can fail
    s = r.stamp
    assert s["metrics"] == ["fid", "sfid", "is", "pr"] and s["mode"] == "legacy_tensorflow"
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert s[key] == r.metrics[key]
    assert (
        s["protocol"]["precision_recall"]["k"] == 3 and s["protocol"]["inception_score"]["split_size"] == 5000
    )
    assert s["protocol"]["precision_recall"]["reference_features"] == "arr_0 images"
    line = r.summary()
    assert (
        line.startswith("FID ")
        and " sFID " in line
        and " IS " in line
        and " precision " in line
        and " recall " in line
    )


def test_a_reference_made_by_uvit_serves_every_metric_and_gives_the_same_numbers(tmp_path):
    """`uvit fid ref IMAGES --metrics all` stores mu/sigma, mu_s/sigma_s and the pool features: measuring
    against it equals measuring against the ADM batch of the same images."""
    samples, ref_images = _images(40, 1), _images(30, 2, high=230)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "ref_images.npz", arr_0=ref_images)
    made = make_ref_stats(tmp_path / "ref_images.npz", tmp_path / "ours", metrics="all", **KW)
    assert made.stamp["stored"] == ["mu", "sigma", "mu_s", "sigma_s", "pool_features"]
    fr = _standin_numpy(ref_images)
    with np.load(made.path) as f:
        np.testing.assert_allclose(f["pool_features"], fr["pool"], rtol=1e-6)
        np.testing.assert_allclose(f["mu_s"], fr["spatial"].mean(0), rtol=1e-6)
        np.testing.assert_allclose(f["sigma_s"], np.cov(fr["spatial"], rowvar=False), rtol=1e-5, atol=1e-9)
    # the reference's logits are float64 products, ours float32 ones (as the TF graph's): 1.2e-6 apart
    assert made.stamp["inception_score"] == pytest.approx(
        adm_inception_score(fr["pool"], _W_LOGITS.numpy()), rel=1e-5
    )
    adm = _adm_batch(tmp_path / "adm.npz", ref_images, fr)
    a = compute_fid(tmp_path / "samples.npz", made.path, metrics="all", **KW)
    b = compute_fid(tmp_path / "samples.npz", adm, metrics="all", **KW)
    for k in ("fid", "sfid"):  # ADM's np.mean of float32 features is float32 (mu 3.5e-7 from ours): 1.2e-6
        assert a.metrics[k] == pytest.approx(b.metrics[k], rel=1e-5)
    assert (a.metrics["precision"], a.metrics["recall"]) == (b.metrics["precision"], b.metrics["recall"])
    assert a.stamp["protocol"]["precision_recall"]["reference_features"] == "pool_features"


def test_inception_score_chunks_by_image_index_whatever_the_order_or_rank():
    """11,000 predictions: chunks 0-4999, 5000-9999, 10000-10999 as ADM splits its arr_0, however the
    batches arrive and however ranks share them (sums per chunk add)."""
    rng = np.random.default_rng(0)
    pool = np.maximum(rng.standard_normal((11_000, 16)), 0).astype(np.float32)
    w = rng.standard_normal((16, 10)).astype(np.float32) * 2
    logits = torch.from_numpy(pool) @ torch.from_numpy(w)
    want = adm_inception_score(pool, w)
    one_chunk = adm_inception_score(pool, w, split_size=11_000)
    assert abs(want - one_chunk) > 1e-4  # the split matters: the test can see a wrong chunking
    ranks = []
    for r in range(3):  # rank r holds images r::3, in batches of 700 taken in reverse order
        col = Collector(("is",))
        idx = np.arange(r, 11_000, 3)
        for i in reversed(range(0, len(idx), 700)):
            sel = idx[i : i + 700]
            col.add({"pool": torch.from_numpy(pool[sel]), "logits": logits[sel]}, sel)
        ranks.append(col)
    sums = [sum(c.is_sums[j] for c in ranks) for j in range(3)]
    from uvit_cli.fid.metrics import ISChunks

    got = ISChunks(*(s.numpy() for s in sums)).score()
    assert got == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("block", [10_000, 32])
def test_precision_recall_equal_the_evaluator_float16_and_float32(block):
    """Blocks of `block` rows and columns (ADM: 10,000) change nothing; float16 emulation is the evaluator's
    DistanceBlock, bit for bit on these features."""
    rng = np.random.default_rng(block)
    mix = rng.standard_normal((64, 64))
    ref = np.maximum(rng.standard_normal((150, 64)) @ mix * 0.5 + 1.0, 0).astype(np.float32)
    samples = np.maximum(rng.standard_normal((120, 64)) @ mix * 0.6 + 1.1, 0).astype(np.float32)
    p, r, fallbacks = precision_recall(ref, samples, block=block)
    assert (p, r) == adm_precision_recall(ref, samples, block) and fallbacks == 0
    assert 0 < p < 1 and 0 < r < 1
    # float32: the metric without ADM's rounding; it may differ by a few borderline points only
    p32, r32, _ = precision_recall(ref, samples, block=block, float16=False)
    assert abs(p32 - p) <= 0.03 and abs(r32 - r) <= 0.03


def test_precision_recall_fall_back_to_float32_per_block_as_the_evaluator():
    """Features too large for float16 (norms above 65504) in one row block only: that block is float32,
    the others stay float16, as tf.cond decides per DistanceBlock call."""
    rng = np.random.default_rng(5)
    ref = np.maximum(rng.standard_normal((64, 32)) + 1, 0).astype(np.float32)
    samples = np.maximum(rng.standard_normal((64, 32)) + 1, 0).astype(np.float32)
    ref[:20] *= 80.0  # |u|^2 ~ 32 * 80^2 * 2 > 65504: not finite in float16
    got = precision_recall(ref, samples, block=32)
    assert got[:2] == adm_precision_recall(ref, samples, block=32)
    assert got[2] > 0


def test_float16_changes_only_a_few_points_in_a_thousand_on_inception_like_features():
    """ADM's float16 distances vs exact ones on 2048-d pool-like features (non-negative, low intrinsic
    dimension, norms of a few hundred): precision and recall move by a few thousandths at most."""
    rng = np.random.default_rng(7)
    mix = rng.standard_normal((24, 2048)) * 0.12

    def feats(n: int, scale: float) -> np.ndarray:
        return np.maximum(rng.standard_normal((n, 24)) * scale @ mix + 0.35, 0).astype(np.float32)

    ref, samples = feats(800, 1.0), feats(800, 1.15)
    assert 200 < float((ref**2).sum(1).mean()) < 2000  # |u|^2 where float16 has a spacing of 0.125-1
    p16, r16, _ = precision_recall(ref, samples)
    p32, r32, _ = precision_recall(ref, samples, float16=False)
    assert 0.2 < p16 < 0.98 and 0.2 < r16 < 0.98
    assert abs(p16 - p32) <= 0.01 and abs(r16 - r32) <= 0.01


# --------------------------------------------------------------------------------------------------
# The real network: spatial features in NHWC, IS without the bias, in NVIDIA's and pytorch-fid's layouts


@pytest.fixture(scope="module")
def real_format(tmp_path_factory):
    """A seeded random FID Inception with a classifier head whose bias is large, saved with NVIDIA's key
    names (`layers.*`, `output.weight`, `output.bias`), and its independent features of 10 images:
    pool from `forward`, spatial from a hook on `layers.mixed_6.conv` (TF's `mixed_6/conv`, (B,192,17,17))
    taken [..., :7] in NHWC as ADM's `_create_feature_graph` does."""
    from uvit_cli.inception import tf_bilinear_resize

    d = tmp_path_factory.mktemp("real_format")
    torch.manual_seed(3)
    net = FIDInception().eval()
    images = _images(10, 11, size=24)
    spatial: list[torch.Tensor] = []
    hook = net.layers.mixed_6.conv.register_forward_hook(lambda m, i, o: spatial.append(o))
    pools = []
    with torch.no_grad():
        for half in (images[:5], images[5:]):  # the batches `uvit fid` forms of two 5-image npz files
            x = torch.from_numpy(half.transpose(0, 3, 1, 2).astype(np.float32))
            pools.append(net((tf_bilinear_resize(x) - 128) / 128).numpy())
    hook.remove()
    pool = np.concatenate(pools)
    nchw = torch.cat(spatial).numpy()  # (B, 192, 17, 17)
    # A head whose logits vary between these images (random rows minus their component along the mean pool
    # vector, which would give every image the same class), and a bias that would dominate them.
    g = torch.Generator().manual_seed(4)
    mean = torch.from_numpy(pool.mean(0)) / float(np.linalg.norm(pool.mean(0)))
    w = torch.randn(1008, 2048, generator=g) * 8
    w -= (w @ mean)[:, None] * mean[None, :]
    bias = torch.randn(1008, generator=g) * 20
    sd = dict(net.state_dict()) | {"output.weight": w, "output.bias": bias}
    torch.save(sd, d / "inception-2015-12-05.pt")
    feats = {
        "pool": pool,
        "spatial": nchw.transpose(0, 2, 3, 1)[..., :7].reshape(len(images), -1),  # ADM: NHWC [..., :7]
        "spatial_nchw": nchw[:, :7].reshape(len(images), -1),  # the wrong order
    }
    weights = d / "inception-2015-12-05.pt"
    return {"weights": weights, "images": images, "feats": feats, "w": w, "bias": bias, "net": net}


def test_spatial_features_are_mixed_6_conv_flattened_nhwc(real_format):
    m = load_inception(real_format["weights"])
    x = torch.from_numpy(real_format["images"][:3].transpose(0, 3, 1, 2).astype(np.float32))
    from uvit_cli.fid.features import inception_features

    with torch.no_grad():
        out = inception_features(m, "legacy_tensorflow", spatial=True)(x)
    assert out["spatial"].shape == (3, 2023)
    np.testing.assert_allclose(
        out["spatial"].numpy(), real_format["feats"]["spatial"][:3], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(out["pool"].numpy(), real_format["feats"]["pool"][:3], rtol=1e-5, atol=1e-6)
    assert np.abs(real_format["feats"]["spatial_nchw"][:3] - out["spatial"].numpy()).max() > 1e-3


def test_the_adm_table_with_the_real_network_and_an_adm_reference_batch(real_format, tmp_path):
    """Samples 0-4 against an ADM batch of images 5-9 whose mu_s/sigma_s are the evaluator's (NHWC):
    every number equals the numpy evaluator on the independently extracted features. A reference whose
    spatial statistics were flattened NCHW gives another sFID, and an IS with the bias another score: the
    comparisons below see both mistakes."""
    images, f = real_format["images"], real_format["feats"]
    np.savez(tmp_path / "samples.npz", arr_0=images[:5])
    ref = _adm_batch(tmp_path / "ref.npz", images[5:], {"pool": f["pool"][5:], "spatial": f["spatial"][5:]})
    r = compute_fid(
        tmp_path / "samples.npz", ref, metrics="all", mode="legacy_tensorflow",
        inception_weights=real_format["weights"], device="cpu",
    )  # fmt: skip
    ps, pr_ = f["pool"][:5], f["pool"][5:]
    assert r.metrics["fid"] == pytest.approx(low_rank_frechet(ps, pr_), rel=1e-5)
    sfid = low_rank_frechet(f["spatial"][:5], f["spatial"][5:])
    assert r.metrics["sfid"] == pytest.approx(sfid, rel=1e-5)
    wrong_sfid = low_rank_frechet(f["spatial_nchw"][:5], f["spatial"][5:])  # NCHW samples, ADM's NHWC ref
    assert abs(wrong_sfid - sfid) > 1e-2 * sfid
    w = real_format["w"].numpy().T  # (2048, 1008): the TF MatMul's weight
    want_is = adm_inception_score(ps, w)
    # our logits are float32 products (as the TF graph's), the reference's float64: ~1e-6 apart
    assert r.metrics["inception_score"] == pytest.approx(want_is, rel=1e-4)
    with_bias = adm_inception_score(
        np.concatenate([ps, np.ones((5, 1), np.float32)], 1),
        np.concatenate([w, real_format["bias"].numpy()[None]]),
    )
    assert abs(with_bias - want_is) > 1e-2 * want_is
    assert (r.metrics["precision"], r.metrics["recall"]) == adm_precision_recall(pr_, ps, 10_000)
    assert r.stamp["inception"]["classifier_head"] is True


def test_pytorch_fid_layout_gives_the_same_inception_score(real_format, tmp_path):
    """pytorch-fid's `.pth` carries the head as `fc.weight`/`fc.bias` (torchvision names); converted, it
    gives NVIDIA's file's numbers."""
    net = real_format["net"]
    m = load_inception(real_format["weights"])
    assert torch.equal(m.logits_weight, real_format["w"])
    # pytorch-fid names: build the state dict back from ours with gamma = 1 (what convert_pytorch_fid folds)
    back = _to_pytorch_fid(net.state_dict())
    back |= {"fc.weight": real_format["w"], "fc.bias": real_format["bias"]}
    torch.save(back, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    m2 = load_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    assert torch.equal(m2.logits_weight, real_format["w"])
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        a, b = m.outputs(x, logits=True), m2.outputs(x, logits=True)
    torch.testing.assert_close(a["logits"], b["logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a["logits"], a["pool"] @ real_format["w"].T)  # no bias


def _to_pytorch_fid(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `layers.*` state dict in pytorch-fid's torchvision names (BN gamma 1, as the TF graph's)."""
    import uvit_cli.inception.weights as inc  # the torchvision names live beside the loaders

    names = {}
    for tv, ours in inc._TV_STEM.items():
        names[ours] = tv
    for tv_block, block in inc._TV_BLOCKS.items():
        table = {"Mixed_6a": inc._TV_BRANCH_B, "Mixed_7b": inc._TV_BRANCH_E, "Mixed_7c": inc._TV_BRANCH_E}
        for branch, ours in table.get(tv_block, inc._TV_BRANCH).items():
            names.setdefault(f"{block}.{ours}", f"{tv_block}.{branch}")
    out = {}
    for k, v in sd.items():
        prefix, leaf = k[len("layers.") :].rsplit(".", 1)
        tv = names[prefix]
        if leaf == "weight":
            out[f"{tv}.conv.weight"] = v
            out[f"{tv}.bn.weight"] = torch.ones(v.shape[0])
        else:
            out[f"{tv}.bn.{ {'beta': 'bias', 'mean': 'running_mean', 'var': 'running_var'}[leaf] }"] = v
    return out


def test_weights_without_the_head_serve_every_metric_but_is(real_format, tmp_path):
    sd = {
        f"net.{k}": v for k, v in real_format["net"].state_dict().items()
    }  # fid-helper's default_1.pt layout
    torch.save(sd, tmp_path / "default_1.pt")
    assert load_inception(tmp_path / "default_1.pt").logits_weight is None
    np.savez(tmp_path / "s.npz", arr_0=real_format["images"][:4])
    f = real_format["feats"]
    ref = _adm_batch(
        tmp_path / "ref.npz", real_format["images"][5:], {"pool": f["pool"][5:], "spatial": f["spatial"][5:]}
    )
    kw = {"mode": "legacy_tensorflow", "inception_weights": tmp_path / "default_1.pt", "device": "cpu"}
    with pytest.raises(WeightsNotFoundError, match="no classifier head.*drop `is`"):
        compute_fid(tmp_path / "s.npz", ref, metrics="is", **kw)
    r = compute_fid(tmp_path / "s.npz", ref, metrics="sfid,pr", **kw)
    assert set(r.metrics) == {"sfid", "precision", "recall"}


# --------------------------------------------------------------------------------------------------
# Requests: names, modes, references that lack what a metric needs


def test_metric_names_and_modes():
    assert parse_metrics("all") == ("fid", "sfid", "is", "pr")
    assert parse_metrics(" pr, FID ,is") == ("fid", "is", "pr")
    assert parse_metrics(["clip", "all"]) == ("fid", "sfid", "is", "pr", "clip")
    with pytest.raises(ConfigError, match="unknown metric 'kid'.*fid, sfid, is, pr, clip"):
        parse_metrics("fid,kid")
    with pytest.raises(ConfigError, match="no metric"):
        parse_metrics(" , ")
    assert default_mode(("fid",)) == "clean" and default_mode(("fid", "pr")) == "legacy_tensorflow"


def test_references_lacking_what_a_metric_needs_are_one_line(tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=_images(8, 1))
    f = _standin_numpy(_images(8, 2))
    np.savez(tmp_path / "fid_only.npz", mu=f["pool"].mean(0), sigma=np.cov(f["pool"], rowvar=False))
    with pytest.raises(
        DataError, match=r"no `mu_s`/`sigma_s`.*uvit fid ref IMAGES --metrics sfid --out REF.npz"
    ):
        compute_fid(tmp_path / "samples.npz", tmp_path / "fid_only.npz", metrics="sfid", **KW)
    with pytest.raises(DataError, match=r"no `pool_features` nor `arr_0` images.*--metrics pr"):
        compute_fid(tmp_path / "samples.npz", tmp_path / "fid_only.npz", metrics="fid,pr", **KW)
    np.savez(
        tmp_path / "spatial_only.npz", mu_s=f["spatial"].mean(0), sigma_s=np.cov(f["spatial"], rowvar=False)
    )
    with pytest.raises(DataError, match="no `mu`/`sigma`"):
        compute_fid(tmp_path / "samples.npz", tmp_path / "spatial_only.npz", metrics="fid", **KW)
    r = compute_fid(tmp_path / "samples.npz", tmp_path / "spatial_only.npz", metrics="sfid", **KW)
    assert set(r.metrics) == {"sfid"} and np.isnan(r.fid) and "fid" not in r.stamp
    with pytest.raises(ConfigError, match="--mode legacy_tensorflow"):
        compute_fid(
            tmp_path / "samples.npz",
            tmp_path / "spatial_only.npz",
            metrics="sfid",
            **(KW | {"mode": "clean"}),
        )
    with pytest.raises(ConfigError, match="no CLIP image encoder"):
        compute_fid(tmp_path / "samples.npz", tmp_path / "fid_only.npz", metrics="fid,clip", **KW)


def test_clip_score_hook_averages_the_scorer_over_a_sample_folder(tmp_path):
    """`--metrics clip` calls the scorer with each image (its own size) and its prompt from samples.jsonl."""
    from PIL import Image

    d = tmp_path / "samples"
    d.mkdir()
    imgs = _images(5, 3)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(d / f"{i:05d}.png")
    (d / "samples.jsonl").write_text(
        "".join(json.dumps({"index": i, "prompt": f"p{i}"}) + "\n" for i in range(5))
    )
    seen = []

    def scorer(images, prompts):
        seen.extend(zip([im.shape for im in images], prompts, strict=True))
        return np.array([float(p[1:]) for p in prompts])

    f = _standin_numpy(_images(8, 2))
    np.savez(tmp_path / "ref.npz", mu=f["pool"].mean(0), sigma=np.cov(f["pool"], rowvar=False))
    r = compute_fid(
        d,
        tmp_path / "ref.npz",
        metrics="fid,clip",
        clip_score=scorer,
        batch_size=2,
        **(KW | {"mode": "clean"}),
    )
    assert r.metrics["clip_score"] == pytest.approx(2.0) and r.stamp["clip_score"] == pytest.approx(2.0)
    assert sorted(seen) == [((16, 16, 3), f"p{i}") for i in range(5)]
    np.savez(tmp_path / "s.npz", arr_0=imgs)
    with pytest.raises(DataError, match="CLIP score needs prompts"):
        compute_fid(tmp_path / "s.npz", tmp_path / "ref.npz", metrics="clip", clip_score=scorer, **KW)


def test_generated_images_carry_their_index_into_is_chunks_and_pr_order(monkeypatch, tmp_path):
    """fid_from_generator on rank r of 3 streams indices r::3: the chunks and kept features are placed by
    index, so the pieces reassemble the single-process state exactly."""
    imgs = _images(12, 4)
    whole = Collector(("is", "pr"))
    fid_features.batches_stats(
        [imgs[:5], imgs[5:]], standin, "legacy_tensorflow", torch.device("cpu"), collector=whole
    )
    parts = []
    for r in range(3):
        monkeypatch.setattr(fid_features, "rank_world", lambda r=r: (r, 3))
        col = Collector(("is", "pr"))
        fid_features.batches_stats(
            [imgs[r::3]], standin, "legacy_tensorflow", torch.device("cpu"), collector=col
        )
        parts.append(col)
    monkeypatch.setattr(fid_features, "rank_world", lambda: (0, 1))
    kept = np.concatenate([c.kept[0] for c in parts])[
        np.argsort(np.concatenate([c.kept_index[0] for c in parts]))
    ]
    np.testing.assert_array_equal(kept, np.concatenate(whole.kept))
    for j in range(3):
        torch.testing.assert_close(sum(c.is_sums[j] for c in parts), whole.is_sums[j], rtol=1e-12, atol=1e-12)


TORCHRUN_SCRIPT = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
from test_metrics import KW
from uvit_cli.fid import compute_fid
torch.set_num_threads(1)
r = compute_fid({samples!r}, {ref!r}, metrics="all", batch_size=3, **KW)
if r.is_main:
    json.dump(r.stamp, open({out!r}, "w"))
"""


@pytest.mark.slow  # two processes import torch: ~10 s on a busy 2-core box
def test_two_torchrun_processes_give_the_single_process_table(tmp_path):
    """Ranks share the samples and the reference's arr_0, sum the statistics and IS chunks, gather the
    pool features for precision/recall: the numbers equal one process's."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    np.savez(tmp_path / "samples.npz", arr_0=_images(23, 1))
    ref = _adm_batch(tmp_path / "ref.npz", _images(17, 2, high=230), _standin_numpy(_images(17, 2, high=230)))
    script = tmp_path / "run.py"
    script.write_text(
        TORCHRUN_SCRIPT.format(
            tests=str(Path(__file__).parent),
            samples=str(tmp_path / "samples.npz"),
            ref=str(ref),
            out=str(tmp_path / "two.json"),
        )
    )
    proc = subprocess.run(
        [*TORCHRUN_2, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    one = compute_fid(tmp_path / "samples.npz", ref, metrics="all", batch_size=3, **KW)
    assert two["world_size"] == 2 and two["num_images"] == 23
    for k in ("fid", "sfid", "inception_score"):
        assert two[k] == pytest.approx(one.metrics[k], rel=1e-6)
    assert (two["precision"], two["recall"]) == (one.metrics["precision"], one.metrics["recall"])


def test_fid_from_generator_defaults_to_fid_alone(tmp_path):
    f = _standin_numpy(_images(8, 2))
    np.savez(tmp_path / "ref.npz", mu=f["pool"].mean(0), sigma=np.cov(f["pool"], rowvar=False))
    r = fid_from_generator([_images(6, 1)], tmp_path / "ref.npz", **(KW | {"mode": "clean"}))
    assert set(r.metrics) == {"fid"} and r.stamp["metrics"] == ["fid"] and r.summary().startswith("FID ")


# --------------------------------------------------------------------------------------------------
# CLI


class _TinyInception(torch.nn.Module):
    """The CLI's Inception replaced: 2048 pool, 2023 spatial and 1008 logits, non-negative features."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(48, 2048, generator=g)
        self.ws = torch.randn(48, 2023, generator=g)
        self.logits_weight = torch.randn(1008, 2048, generator=g) * 0.05

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x)["pool"]

    def outputs(self, x, *, spatial=False, logits=False):
        p = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        out = {"pool": torch.relu(p @ self.w)}
        if spatial:
            out["spatial"] = torch.relu(p @ self.ws)
        if logits:
            out["logits"] = out["pool"] @ self.logits_weight.T
        return out


def spy_on_streamed_images(monkeypatch) -> list[np.ndarray]:
    """The images `fid.features.batches_stats` receives, one array per call (they still reach the statistics)."""
    seen = []
    stats_fn = fid_features.batches_stats

    def spy(batches, *args, **kw):
        got = [np.asarray(b) for b in batches]
        seen.append(np.concatenate(got))
        return stats_fn(iter(got), *args, **kw)

    monkeypatch.setattr(fid_features, "batches_stats", spy)
    return seen


@pytest.fixture()
def tiny_inception(monkeypatch, tmp_path):
    import uvit_cli.inception as inc

    weights = tmp_path / "inception.pt"
    weights.write_bytes(b"tiny stand-in")
    monkeypatch.setenv("UVIT_INCEPTION", str(weights))
    monkeypatch.setattr(inc, "load_inception", lambda path: _TinyInception())
    return weights


def test_cli_metrics_all_with_a_reference_made_by_uvit_fid_ref(tmp_path, tiny_inception):
    from PIL import Image

    for name, seed in (("s", 1), ("r", 2)):
        (tmp_path / name).mkdir()
        for i, im in enumerate(_images(6, seed)):
            Image.fromarray(im).save(tmp_path / name / f"{i}.png")
    s, r, ref, plain = (str(tmp_path / n) for n in ("s", "r", "ref.npz", "plain.npz"))

    def fid(*args: str):
        return runner.invoke(app, ["fid", *args], terminal_width=300)

    res = fid("ref", r, "--out", ref, "--metrics", "all")
    assert res.exit_code == 0, res.output
    assert (
        "(mu, sigma, mu_s, sigma_s, pool_features)" in res.output and "mode legacy_tensorflow" in res.output
    )
    res = fid(s, ref, "--metrics", "all", "--json", str(tmp_path / "s.json"))
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("FID "))
    assert (
        all(f" {k} " in line for k in ("sFID", "IS", "precision", "recall"))
        and "mode legacy_tensorflow" in line
    )
    stamp = json.loads((tmp_path / "s.json").read_text())
    assert {"fid", "sfid", "inception_score", "precision", "recall"} <= set(stamp)
    assert stamp["mode"] == "legacy_tensorflow"
    # an ADM metric in another mode, and a reference without spatial statistics: one line each
    res = fid(s, ref, "--metrics", "sfid", "--mode", "clean", "--no-json")
    assert res.exit_code == 2 and "use --mode legacy_tensorflow" in res.output, res.output
    assert res.output.strip().count("\n") == 0
    assert fid("ref", r, "--out", plain, "--mode", "legacy_tensorflow").exit_code == 0
    res = fid(s, plain, "--metrics", "sfid", "--no-json")
    assert res.exit_code == 2 and "`mu_s`/`sigma_s`" in res.output and "--metrics sfid" in res.output, (
        res.output
    )


def test_entries_that_are_not_regular_files_are_skipped_and_named(tmp_path, tiny_inception):
    """A named pipe, a socket's stand-in (another pipe) or a broken link among the images is never opened: the
    folder is measured without it and `uvit fid` names the first few in one warning line."""
    from PIL import Image

    from uvit_cli.fid.images import list_images, scan_images

    d = tmp_path / "s"
    (d / "sub").mkdir(parents=True)
    for i, im in enumerate(_images(6, 1)):
        Image.fromarray(im).save(d / f"{i}.png")
    os.mkfifo(d / "pipe.png")
    os.mkfifo(d / "sub" / "pipe2.png")
    os.mkfifo(d / "notes")  # no image extension: still not a stray file to refuse, only skipped
    (d / "gone.png").symlink_to(tmp_path / "nowhere.png")
    listing = scan_images(d)
    assert listing.images == list_images(d) == [d / f"{i}.png" for i in range(6)]
    assert listing.skipped == [
        (d / "gone.png", "a broken symbolic link"),
        (d / "notes", "a named pipe"),
        (d / "pipe.png", "a named pipe"),
        (d / "sub" / "pipe2.png", "a named pipe"),
    ]
    for args in (["ref", str(d), "--out", str(tmp_path / "ref.npz")], [str(d), str(tmp_path / "ref.npz")]):
        res = runner.invoke(app, ["fid", *args], terminal_width=300)
        assert res.exit_code == 0, res.output
        warnings = [ln for ln in res.output.splitlines() if ln.startswith("warning:") and "regular" in ln]
        assert warnings == [
            f"warning: {d}: skipped 4 entries that are not regular files, never opened: gone.png (a broken "
            "symbolic link); notes (a named pipe); pipe.png (a named pipe), and 1 more"
        ], res.output
        assert "images 6" in res.output
    # a folder of nothing but such entries says so in its one error line
    (tmp_path / "empty").mkdir()
    os.mkfifo(tmp_path / "empty" / "p.png")
    res = runner.invoke(app, ["fid", str(tmp_path / "empty"), str(tmp_path / "ref.npz")], terminal_width=300)
    assert res.exit_code == 2 and "no images in" in res.output and "skipped 1 entry that" in res.output


def test_cli_help_shows_the_metrics():
    res = runner.invoke(app, ["fid", "compare", "--help"], terminal_width=200)
    assert res.exit_code == 0 and "--metrics" in res.output and "sfid" in res.output and "all" in res.output
    res = runner.invoke(app, ["fid", "--help"], terminal_width=200)
    assert res.exit_code == 0 and "--metrics" in res.output and "precision" in res.output
    for sub in ("ref", "generate"):
        assert "--metrics" in runner.invoke(app, ["fid", sub, "--help"], terminal_width=200).output


def test_cli_pack_writes_an_adm_sample_batch(tmp_path):
    """`uvit fid pack FOLDER --out S.npz`: arr_0 uint8 NHWC in sorted file order, readable the way ADM's
    evaluator reads it (zip member arr_0.npy, .npy header 1.0, raw rows: `open_npz_array`)."""
    import zipfile

    from PIL import Image

    imgs = _images(5, 9, size=8)
    (tmp_path / "s").mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / "s" / f"{i:05d}.png")
    res = runner.invoke(app, ["fid", "pack", str(tmp_path / "s"), "--out", str(tmp_path / "S.npz")])
    assert res.exit_code == 0 and "(5, 8, 8, 3)" in res.output, res.output
    with zipfile.ZipFile(tmp_path / "S.npz") as z, z.open("arr_0.npy") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        rows = np.frombuffer(f.read(), dtype).reshape(shape)
    assert shape == (5, 8, 8, 3) and not fortran and dtype == np.uint8
    np.testing.assert_array_equal(rows, imgs)
    Image.fromarray(_images(1, 3, size=9)[0]).save(tmp_path / "s" / "zz.png")
    res = runner.invoke(app, ["fid", "pack", str(tmp_path / "s"), "--out", str(tmp_path / "T.npz")])
    assert res.exit_code == 2 and "zz.png: 9x9" in res.output and not (tmp_path / "T.npz").exists()


def test_a_checkpoint_gives_the_table_of_the_images_it_generates(tmp_path, monkeypatch):
    """`uvit fid --ckpt ... --metrics all` (fid_from_checkpoint) equals `uvit fid` of the same images saved as
    an npz in index order: IS chunks and kept features follow the generated indices."""
    from encoder_fixtures import randomize_
    from test_fid_generate import class_toml

    from uvit_cli.config import load_preset
    from uvit_cli.fid.generated import fid_from_checkpoint
    from uvit_cli.model import UViT
    from uvit_cli.sample import SamplerSpec

    (tmp_path / "tiny_class.toml").write_text(class_toml("tiny_class"))
    preset = load_preset(tmp_path / "tiny_class.toml")
    torch.save(randomize_(UViT(**preset.model.model_dump()), seed=2).state_dict(), tmp_path / "nnet_ema.pth")
    ref_images = _images(12, 2, size=8)
    ref = _adm_batch(tmp_path / "ref.npz", ref_images, _standin_numpy(ref_images))
    seen = spy_on_streamed_images(monkeypatch)
    spec = SamplerSpec(ckpt=tmp_path / "nnet_ema.pth", preset=str(tmp_path / "tiny_class.toml"), seed=3)
    r = fid_from_checkpoint(ref, spec, n=9, metrics="all", **KW)
    assert r.stamp["metrics"] == ["fid", "sfid", "is", "pr"]
    np.savez(tmp_path / "gen.npz", arr_0=seen[0])
    again = compute_fid(tmp_path / "gen.npz", ref, metrics="all", **KW)
    for k in ("fid", "sfid", "inception_score"):  # float32 features of other batch shapes: ~1e-7
        assert r.metrics[k] == pytest.approx(again.metrics[k], rel=1e-5)
    assert (r.metrics["precision"], r.metrics["recall"]) == (
        again.metrics["precision"],
        again.metrics["recall"],
    )
