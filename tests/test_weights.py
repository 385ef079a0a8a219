"""Weight resolution: argument > environment variable > Hugging Face cache > (guarded) download; hashes."""

from __future__ import annotations

import hashlib
import socket
import sys

import pytest
from encoder_fixtures import save_autoencoder, save_text_encoder, tiny_autoencoder, tiny_text_encoder

from uvit_cli.encoders import load_autoencoder, load_text_encoder, resolve_weights
from uvit_cli.errors import WeightsNotFoundError
from uvit_cli.fileio import sha256_file


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for var in ("UVIT_VAE", "UVIT_CLIP", "HF_HUB_CACHE", "XDG_CACHE_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache unless a test fills it
    monkeypatch.setenv("UVIT_OFFLINE", "1")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_autoencoder(tiny_autoencoder(), tmp_path_factory.mktemp("w") / "sd-vae", "diffusers")


def _fake_cache(tmp_path, repo_id: str, source, subfolder: str = "") -> None:
    """The hub cache layout: models--ORG--NAME/{refs/main, snapshots/<commit>/...}."""
    repo = tmp_path / "hf_home" / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / "0123abcd" / subfolder
    snap.mkdir(parents=True)
    for f in source.iterdir():
        (snap / f.name).symlink_to(f)  # the real cache links snapshot files to blobs
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")


def test_explicit_file_and_directory(vae_dir, tmp_path):
    weights = vae_dir / "diffusion_pytorch_model.safetensors"
    assert resolve_weights(str(weights), "vae").path == weights
    r = resolve_weights(vae_dir, "vae")
    assert r.path == weights and r.source == "argument"
    pipeline = tmp_path / "pipeline"
    (pipeline / "vae").mkdir(parents=True)
    (pipeline / "vae" / weights.name).symlink_to(weights)
    assert resolve_weights(str(pipeline), "vae").path == pipeline / "vae" / weights.name  # SD pipeline folder


def test_uvit_file_preferred_over_ema(tmp_path):
    vae = tiny_autoencoder()
    save_autoencoder(vae, tmp_path / "autoencoder_kl_ema.pth", "uvit")
    save_autoencoder(vae, tmp_path / "autoencoder_kl.pth", "uvit")
    assert resolve_weights(str(tmp_path), "vae").path.name == "autoencoder_kl.pth"


def test_env_var_then_argument_wins(vae_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("UVIT_VAE", str(vae_dir))
    r = resolve_weights(None, "vae")
    assert r.source == "env" and r.path.parent == vae_dir
    other = save_autoencoder(tiny_autoencoder(seed=1), tmp_path / "x.pth", "uvit")
    assert resolve_weights(str(other), "vae").path == other


def test_hf_cache_default_and_hub_id(vae_dir, tmp_path):
    _fake_cache(tmp_path, "stabilityai/sd-vae-ft-ema", vae_dir)
    r = resolve_weights(None, "vae")
    assert r.source == "cache" and "models--stabilityai--sd-vae-ft-ema/snapshots/0123abcd" in str(r.path)
    assert resolve_weights("stabilityai/sd-vae-ft-ema", "vae").path == r.path
    vae = load_autoencoder(None)
    assert vae.weights_path == str(r.path)
    assert vae.weights_sha256 == hashlib.sha256(r.path.read_bytes()).hexdigest()


def test_hf_cache_pipeline_subfolder_for_clip(tmp_path):
    src = save_text_encoder(tiny_text_encoder(), tmp_path / "src")
    _fake_cache(tmp_path, "org/sd-pipeline", src, subfolder="text_encoder")
    clip = load_text_encoder("org/sd-pipeline")
    assert clip.weights_path.endswith("text_encoder/model.safetensors")
    assert clip.encode(["a cat"]).shape == (1, 77, 32)


def test_missing_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("UVIT_CLIP", str(tmp_path / "nope"))
    with pytest.raises(WeightsNotFoundError) as e:
        resolve_weights(None, "clip")
    msg = str(e.value)
    assert "$UVIT_CLIP" in msg and str(tmp_path / "nope") in msg and "--clip" in msg and "\n" not in msg
    monkeypatch.delenv("UVIT_CLIP")
    with pytest.raises(WeightsNotFoundError) as e:
        load_autoencoder(None)
    msg = str(e.value)
    assert str(tmp_path / "hf_home" / "hub") in msg and "stabilityai/sd-vae-ft-ema" in msg
    assert "UVIT_OFFLINE" in msg and "--vae" in msg and "UVIT_VAE" in msg


def test_missing_explicit_path_does_not_fall_back(vae_dir, tmp_path):
    _fake_cache(tmp_path, "stabilityai/sd-vae-ft-ema", vae_dir)
    with pytest.raises(WeightsNotFoundError, match="no such file"):
        resolve_weights(str(tmp_path / "typo.pth"), "vae")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsNotFoundError, match="autoencoder_kl.pth"):
        resolve_weights(str(empty), "vae")


def test_download_is_guarded(tmp_path, monkeypatch):
    monkeypatch.delenv("UVIT_OFFLINE")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(WeightsNotFoundError, match="huggingface_hub not installed"):
        resolve_weights("org/missing", "vae")
    monkeypatch.delitem(sys.modules, "huggingface_hub")
    pytest.importorskip("huggingface_hub")

    def no_network(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(WeightsNotFoundError, match="unreachable"):
        resolve_weights("org/missing", "vae")
    with pytest.raises(WeightsNotFoundError, match="downloads disabled"):
        resolve_weights("org/missing", "vae", allow_download=False)


def test_sha256_file_is_chunked(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk_bytes=1000) == hashlib.sha256(data).hexdigest()


def test_refs_main_snapshot_wins(vae_dir, tmp_path):
    _fake_cache(tmp_path, "stabilityai/sd-vae-ft-ema", vae_dir)
    repo = tmp_path / "hf_home" / "hub" / "models--stabilityai--sd-vae-ft-ema"
    newer = repo / "snapshots" / "ffff0000"
    newer.mkdir()
    (newer / "diffusion_pytorch_model.safetensors").symlink_to(
        vae_dir / "diffusion_pytorch_model.safetensors"
    )
    assert "/0123abcd/" in str(resolve_weights(None, "vae").path)  # refs/main, not the newest folder
    (repo / "refs" / "main").unlink()
    assert "/ffff0000/" in str(resolve_weights(None, "vae").path)


def test_one_rule_flag_then_env_then_preset_then_cache(vae_dir, tmp_path, monkeypatch):
    _fake_cache(tmp_path, "stabilityai/sd-vae-ft-ema", vae_dir)
    preset_file = save_autoencoder(
        tiny_autoencoder(seed=5), tmp_path / "preset" / "autoencoder_kl.pth", "uvit"
    )
    env_file = save_autoencoder(tiny_autoencoder(seed=6), tmp_path / "env" / "autoencoder_kl.pth", "uvit")
    flag_file = save_autoencoder(tiny_autoencoder(seed=7), tmp_path / "flag" / "autoencoder_kl.pth", "uvit")

    assert resolve_weights(None, "vae").source == "cache"
    r = resolve_weights(None, "vae", preset=str(preset_file))
    assert (r.path, r.source) == (preset_file, "preset")
    assert resolve_weights(None, "vae", preset=str(preset_file.parent)).path == preset_file  # a directory
    monkeypatch.setenv("UVIT_VAE", str(env_file))
    assert resolve_weights(None, "vae", preset=str(preset_file)).path == env_file
    assert resolve_weights(str(flag_file), "vae", preset=str(preset_file)).path == flag_file


def test_a_bare_file_name_in_the_preset_picks_the_file_of_the_directory_used(tmp_path, monkeypatch):
    d = tmp_path / "assets"
    save_autoencoder(tiny_autoencoder(), d / "autoencoder_kl.pth", "uvit")
    save_autoencoder(tiny_autoencoder(seed=1), d / "autoencoder_kl_ema.pth", "uvit")
    monkeypatch.setenv("UVIT_VAE", str(d))
    assert resolve_weights(None, "vae").path.name == "autoencoder_kl.pth"
    assert resolve_weights(None, "vae", preset="autoencoder_kl_ema.pth").path.name == "autoencoder_kl_ema.pth"
    assert (
        resolve_weights(str(d), "vae", preset="autoencoder_kl_ema.pth").path.name == "autoencoder_kl_ema.pth"
    )
    monkeypatch.delenv("UVIT_VAE")
    _fake_cache(tmp_path, "stabilityai/sd-vae-ft-ema", d)  # the cache too
    r = resolve_weights(None, "vae", preset="autoencoder_kl_ema.pth")
    assert r.source == "cache" and r.path.name == "autoencoder_kl_ema.pth"
    monkeypatch.chdir(d)  # a bare name that exists in the working directory is that file
    r = resolve_weights(None, "vae", preset="autoencoder_kl.pth")
    assert r.source == "preset" and r.path.name == "autoencoder_kl.pth"


def test_a_preset_path_that_is_missing_does_not_fall_back(vae_dir, tmp_path):
    _fake_cache(tmp_path, "stabilityai/sd-vae-ft-ema", vae_dir)
    with pytest.raises(WeightsNotFoundError, match="the preset's pretrained"):
        resolve_weights(None, "vae", preset=str(tmp_path / "typo.pth"))
    with pytest.raises(WeightsNotFoundError, match="org/missing"):
        resolve_weights(None, "clip", preset="org/missing")
