"""No silently wrong metric, no input overwritten: statistics that cannot be a covariance are refused in one
line, an output path that is an input is refused before any work, and lock and temporary files never write
through a symlink. CLI cases run `uvit fid` with a tiny stand-in for the Inception (2048 non-negative
features, as the real one gives), so each takes about a second."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from uvit_cli import fileio
from uvit_cli.cli import app
from uvit_cli.errors import ConfigError, DataError
from uvit_cli.fid.stats import FeatureStats, check_stats, frechet_distance, load_ref_stats, save_stats
from uvit_cli.train.lock import LockNotAFile, RunDirLock

D = 2048  # the FID Inception's feature size: what `uvit fid` checks a reference against


def _run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def _error_line(res) -> str:
    lines = [line for line in res.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    return errors[0]


class _TinyInception(torch.nn.Module):
    """(B,3,299,299) about [-1, 1] -> (B, 2048) >= 0: 4x4 average pool, a fixed projection, ReLU."""

    def __init__(self, nan: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(48, D, generator=g)
        if nan:
            self.w[0, 0] = float("nan")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) @ self.w)

    def outputs(self, x: torch.Tensor, *, spatial: bool = False, logits: bool = False) -> dict:
        """FIDInception.outputs: pool, and sFID's 2023 spatial features (the first 2023 pool ones here)."""
        pool = self(x)
        return {"pool": pool, "spatial": pool[:, :2023]} if spatial else {"pool": pool}


@pytest.fixture()
def tiny_inception(monkeypatch, tmp_path):
    """`uvit fid` runs with _TinyInception; returns the (dummy) weights file it is loaded from."""
    import uvit_cli.inception as inc

    weights = tmp_path / "inception.pt"
    weights.write_bytes(b"tiny stand-in")
    monkeypatch.setenv("UVIT_INCEPTION", str(weights))
    monkeypatch.setattr(
        inc, "load_inception", lambda path: _TinyInception(nan=b"nan" in weights.read_bytes())
    )
    return weights


def _images(folder, n: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    for i, im in enumerate(arr):
        Image.fromarray(im).save(folder / f"{i}.png")
    return folder


def _real_looking(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Correlated, non-negative features like Inception pool features (ReLU outputs averaged)."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.1 + 0.3, 0)


# --------------------------------------------------------------------------------------------------
# A metric that is silently wrong


@pytest.mark.parametrize("n", [200, 20])  # full rank, then rank-deficient (n < d: eigenvalues ~ -1e-16)
def test_statistics_of_real_features_pass_the_check(n):
    f = _real_looking(n, 64)
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    for m, s in [(mu, sigma), (mu.astype(np.float32), sigma.astype(np.float32))]:  # as stored by others
        m2, s2 = check_stats(m, s, "real", dim=64, inception=True)
        assert m2.dtype == s2.dtype == np.float64
        assert abs(frechet_distance(m2, s2, m2, s2)) < 1e-7 * np.trace(s2)  # measured 4e-9 (float32)
    ours = FeatureStats.from_features(f[: n // 2]) + FeatureStats.from_features(f[n // 2 :])
    check_stats(*ours.mu_sigma(), "summed", dim=64, inception=True)


def _bad_refs() -> dict[str, tuple[dict, str]]:
    mu, eye = np.full(D, 0.5), np.eye(D)
    indefinite = eye.copy()
    indefinite[7, 7] = -3.2
    asym = eye.copy()
    asym[0, 1] = 0.5
    nan_mu, inf_sigma = mu.copy(), eye.copy()
    nan_mu[3], inf_sigma[2, 2] = np.nan, np.inf
    return {
        "negative definite": ({"mu": mu, "sigma": -eye}, "sigma has a negative eigenvalue -1"),
        "one negative eigenvalue": ({"mu": mu, "sigma": indefinite}, "sigma has a negative eigenvalue -3.2"),
        "asymmetric": ({"mu": mu, "sigma": asym}, r"sigma is not symmetric \(max \|S - S\^T\| = 0.5"),
        "NaN in mu": ({"mu": nan_mu, "sigma": eye}, "mu holds 1 NaN or infinite"),
        "inf in sigma": ({"mu": mu, "sigma": inf_sigma}, "sigma holds 1 NaN or infinite"),
        "sigma of another size": ({"mu": mu, "sigma": np.eye(D - 1)}, "do not fit"),
        "mu of two dimensions": ({"mu": mu[None], "sigma": eye}, "do not fit"),
        "complex sigma": ({"mu": mu, "sigma": eye.astype(np.complex128)}, "complex128 values"),
        "64-d features": ({"mu": mu[:64], "sigma": np.eye(64)}, "dimension 64, but the features .* 2048"),
        "negative mean": ({"mu": -mu, "sigma": eye}, "mu has negative entries"),
    }


@pytest.mark.parametrize("case", list(_bad_refs()))
def test_a_reference_that_cannot_come_from_real_features_is_refused(case, tmp_path, tiny_inception):
    """Before: FID 0.0000 (negative definite: every eigenvalue clipped to 0, the negative distance clamped)
    or some number, exit 0."""
    arrays, message = _bad_refs()[case]
    ref = tmp_path / "ref.npz"
    np.savez(ref, **arrays)
    before = ref.read_bytes()
    res = _run("fid", _images(tmp_path / "s"), ref, "--no-json")
    assert res.exit_code == 2, res.output
    line = _error_line(res)
    assert str(ref) in line and not re.search(r"^FID \d", res.output, re.M)
    assert re.search(message, line), line
    assert ref.read_bytes() == before


def _bad_extras() -> dict[str, tuple[str, dict, str]]:
    ds = 2023
    indefinite = np.eye(ds)
    indefinite[3, 3] = -2.0
    pool = np.full((8, D), 0.5)
    nan_pool = pool.copy()
    nan_pool[2, 5] = np.nan
    return {
        "spatial sigma not a covariance": ("sfid", {"mu_s": np.full(ds, 0.5), "sigma_s": indefinite}, "sigma has a negative eigenvalue -2"),
        "spatial statistics of 2048": ("sfid", {"mu_s": np.full(D, 0.5), "sigma_s": np.eye(D)}, "dimension 2048, but the features .* 2023"),
        "pool features with NaN": ("pr", {"pool_features": nan_pool}, "pool_features holds NaN"),
        "pool features of 64 dims": ("pr", {"pool_features": pool[:, :64]}, r"pool_features is float64 \(8, 64\), want real numbers \(M, 2048\)"),
        "pool features negative": ("pr", {"pool_features": -pool}, "pool_features has negative entries"),
        "three reference images": ("pr", {"pool_features": pool[:3]}, "more than 3"),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_bad_extras()))
def test_adm_parts_of_a_reference_that_cannot_be_real_are_refused(case, tmp_path, tiny_inception):
    """sFID's mu_s/sigma_s and precision/recall's pool_features pass the checks FID's mu/sigma pass."""
    metric, arrays, message = _bad_extras()[case]
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.full(D, 0.5), sigma=np.eye(D), **arrays)
    res = _run("fid", _images(tmp_path / "s"), ref, "--metrics", metric, "--no-json")
    assert res.exit_code == 2, res.output
    line = _error_line(res)
    assert str(ref) in line and re.search(message, line), line
    assert not re.search(r"^(FID|sFID|precision) \d", res.output, re.M)


def test_a_good_reference_still_measures(tmp_path, tiny_inception):
    s = _images(tmp_path / "s")
    assert _run("fid", "ref", s, "--out", tmp_path / "ref.npz").exit_code == 0
    res = _run("fid", s, tmp_path / "ref.npz", "--json", tmp_path / "stamp.json")
    assert res.exit_code == 0, res.output
    assert (
        "FID 0.0000" in res.output
        and abs(json.loads((tmp_path / "stamp.json").read_text())["fid_raw"]) < 1e-6
    )


def test_the_frechet_distance_refuses_what_it_used_to_clamp():
    mu, eye = np.full(8, 0.5), np.eye(8)
    with pytest.raises(DataError, match="negative eigenvalue -1"):
        frechet_distance(mu, -eye, mu, -eye)  # before: -32, shown as FID 0.0000
    with pytest.raises(DataError, match="negative eigenvalue"):
        frechet_distance(mu, eye, mu, -eye)
    assert frechet_distance(mu, eye, mu + 1, 4 * eye) == pytest.approx(8 + 8 + 32 - 2 * 8 * 2)


def test_statistics_uvit_computes_are_checked_before_they_are_written(tmp_path, tiny_inception):
    """Inception weights that give NaN: before, `fid ref` wrote NaN statistics and `fid` failed with a
    traceback from LAPACK (or printed FID nan)."""
    tiny_inception.write_bytes(b"nan")
    s = _images(tmp_path / "s")
    res = _run("fid", "ref", s, "--out", tmp_path / "ref.npz")
    assert res.exit_code == 2 and "NaN" in _error_line(res) and str(tiny_inception) in res.output
    assert not (tmp_path / "ref.npz").exists()
    with pytest.raises(DataError, match="not a covariance"):
        save_stats(tmp_path / "ref.npz", np.zeros(4), -np.eye(4), {})
    assert not (tmp_path / "ref.npz").exists()
    np.savez(tmp_path / "good.npz", mu=np.full(D, 0.5), sigma=np.eye(D))
    res = _run("fid", s, tmp_path / "good.npz", "--no-json")
    assert res.exit_code == 2 and "the features of" in _error_line(res) and "NaN" in res.output


def test_a_reference_made_in_another_mode_is_refused(tmp_path, tiny_inception):
    """Before: a warning and a number from two different feature spaces, exit 0."""
    s = _images(tmp_path / "s")
    assert _run("fid", "ref", s, "--out", tmp_path / "pt.npz", "--mode", "legacy_pytorch").exit_code == 0
    res = _run("fid", s, tmp_path / "pt.npz", "--no-json")  # --mode clean
    assert res.exit_code == 2 and "made with --mode legacy_pytorch" in _error_line(res)
    assert not re.search(r"^FID \d", res.output, re.M)
    with pytest.raises(DataError, match="made with --mode legacy_pytorch"):
        load_ref_stats(tmp_path / "pt.npz", mode="clean")
    assert _run("fid", s, tmp_path / "pt.npz", "--mode", "legacy_pytorch", "--no-json").exit_code == 0


@pytest.mark.parametrize("device", ["nosuchdev", "cuda:7"])
def test_a_device_that_is_not_here_is_one_line(device, tmp_path, tiny_inception):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    s = _images(tmp_path / "s")
    np.savez(tmp_path / "ref.npz", mu=np.full(D, 0.5), sigma=np.eye(D))
    for args in (["fid", s, tmp_path / "ref.npz"], ["fid", "ref", s, "--out", tmp_path / "r2.npz"]):
        res = _run(*args, "--device", device)
        assert res.exit_code == 2 and f"--device {device}" in _error_line(res), res.output
    assert not (tmp_path / "r2.npz").exists()


# --------------------------------------------------------------------------------------------------
# Outputs that overwrite inputs


def _refused_untouched(res) -> None:
    assert res.exit_code == 2, res.output
    assert "same file as" in _error_line(res)
    assert not re.search(r"^(FID \d|wrote )", res.output, re.M)


def test_fid_json_that_is_the_reference_or_the_samples_is_refused(tmp_path, tiny_inception):
    s = _images(tmp_path / "s")
    assert _run("fid", "ref", s, "--out", tmp_path / "R.npz").exit_code == 0
    ref = tmp_path / "R.npz"
    before = ref.read_bytes()
    os.link(ref, tmp_path / "hard.npz")
    (tmp_path / "sym.npz").symlink_to(ref)
    for spelling in (ref, tmp_path / "s" / ".." / "R.npz", tmp_path / "hard.npz", tmp_path / "sym.npz"):
        res = _run("fid", s, ref, "--json", spelling)
        _refused_untouched(res)
        assert "--json is the same file as REF" in res.output
    assert ref.read_bytes() == before
    arr = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "s").glob("*.png"))])
    np.savez(tmp_path / "S.npz", arr_0=arr)
    samples_before = (tmp_path / "S.npz").read_bytes()
    _refused_untouched(_run("fid", tmp_path / "S.npz", ref, "--json", tmp_path / "S.npz"))
    assert (tmp_path / "S.npz").read_bytes() == samples_before
    _refused_untouched(_run("fid", s, ref, "--json", s))  # the samples folder itself


def test_the_default_stamp_path_is_checked_too(tmp_path, tiny_inception):
    """SAMPLES.fid-MODE.json that happens to be the Inception weights file: refused before any work."""
    s = _images(tmp_path / "s")
    assert _run("fid", "ref", s, "--out", tmp_path / "R.npz").exit_code == 0
    weights = tmp_path / "s.fid-clean.json"
    weights.write_bytes(tiny_inception.read_bytes())
    res = _run("fid", s, tmp_path / "R.npz", "--inception-weights", weights)
    _refused_untouched(res)
    assert "default SAMPLES.fid-MODE.json" in res.output and "--inception-weights" in res.output
    assert weights.read_bytes() == b"tiny stand-in"


def test_fid_ref_outputs_that_are_inputs_or_each_other_are_refused(tmp_path, tiny_inception):
    s = _images(tmp_path / "s")
    for out, js in [("X.npz", "X.npz"), ("X", "X.npz")]:  # `--out X` writes X.npz
        _refused_untouched(_run("fid", "ref", s, "--out", tmp_path / out, "--json", tmp_path / js))
        assert not (tmp_path / "X.npz").exists()
    arr = np.zeros((3, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "imgs.npz", arr_0=arr)
    before = (tmp_path / "imgs.npz").read_bytes()
    _refused_untouched(_run("fid", "ref", tmp_path / "imgs.npz", "--out", tmp_path / "imgs.npz"))
    _refused_untouched(_run("fid", "ref", tmp_path / "imgs.npz", "--out", tmp_path / "imgs"))
    assert (tmp_path / "imgs.npz").read_bytes() == before
    _refused_untouched(_run("fid", "ref", s, "--out", tmp_path / "r.npz", "--json", tiny_inception))
    assert tiny_inception.read_bytes() == b"tiny stand-in"
    from uvit_cli.fid import make_ref_stats

    with pytest.raises(ConfigError, match="--out is the same file as IMAGES"):  # the library call too
        make_ref_stats(tmp_path / "imgs.npz", tmp_path / "imgs.npz")


def test_fid_from_a_checkpoint_refuses_json_that_is_an_input(tmp_path, tiny_inception):
    """Refused before the checkpoint is read (here it is not even a checkpoint)."""
    np.savez(tmp_path / "R.npz", mu=np.full(D, 0.5), sigma=np.eye(D))
    before = (tmp_path / "R.npz").read_bytes()
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"not read")
    for js, name in [(tmp_path / "R.npz", "REF"), (ckpt, "--ckpt")]:
        res = _run("fid", "--ckpt", ckpt, "--n", 4, tmp_path / "R.npz", "--json", js)
        _refused_untouched(res)
        assert f"--json is the same file as {name}" in res.output
    assert (tmp_path / "R.npz").read_bytes() == before and ckpt.read_bytes() == b"not read"


def test_check_outputs_passes_distinct_paths(tmp_path):
    (tmp_path / "a").write_text("a")
    fileio.check_outputs({"--json": tmp_path / "b", "--out": None}, {"REF": tmp_path / "a", "X": None})
    with pytest.raises(ConfigError, match="--out is the same file as --json"):
        fileio.check_outputs({"--json": tmp_path / "b", "--out": tmp_path / "." / "b"}, {})


# --------------------------------------------------------------------------------------------------
# Lock and temporary files never follow symlinks


def test_a_lock_that_is_a_symlink_is_refused_and_its_target_kept(tmp_path):
    """Before: `open(lock, "a+")` followed the link and truncated the file it points to."""
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "lock").symlink_to(victim)
    with pytest.raises(LockNotAFile, match=r"lock is a symbolic link \(to .*precious.txt\).*rm "):
        RunDirLock(run).acquire()
    assert victim.read_text() == "keep me\n" and (run / "lock").is_symlink()
    (run / "lock").unlink()
    (run / "lock").symlink_to(tmp_path / "missing")  # dangling: O_CREAT would have made the target
    with pytest.raises(LockNotAFile):
        RunDirLock(run).acquire()
    assert not (tmp_path / "missing").exists()
    (run / "lock").unlink()
    os.mkfifo(run / "lock")
    with pytest.raises(LockNotAFile, match="not a regular file"):
        RunDirLock(run).acquire()
    (run / "lock").unlink()
    with RunDirLock(run):  # the fix the message gives: delete it
        assert json.loads((run / "lock").read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("writer", ["write_json_atomic", "atomic_path"])
def test_a_temporary_planted_as_a_symlink_is_never_written_through(writer, tmp_path):
    """A leftover `.NAME.tmp-PID` that is a symlink (pid reuse, or planted): before, the write went into
    the link's target and the rename then put the link under the final name."""
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    target = tmp_path / "out.json"
    fileio.temp_path(target).symlink_to(victim)
    if writer == "write_json_atomic":
        fileio.write_json_atomic(target, {"a": 1})
    else:
        with fileio.atomic_path(target) as tmp:
            with open(tmp, "w") as f:  # as PIL, torch and safetensors open the temporary themselves
                f.write('{"a": 1}\n')
    assert victim.read_text() == "keep me\n"
    assert not target.is_symlink() and json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "precious.txt"]


def test_an_atomic_write_to_a_symlink_replaces_the_link_not_its_target(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    (tmp_path / "out.json").symlink_to(victim)
    fileio.write_text_atomic(tmp_path / "out.json", "new\n")
    assert victim.read_text() == "keep me\n" and (tmp_path / "out.json").read_text() == "new\n"
    assert not (tmp_path / "out.json").is_symlink()
