"""SD KL-f8 autoencoder: CompVis layout, parity with diffusers on tiny seeded weights, every file format."""

from __future__ import annotations

import json
import re

import pytest
import torch
from encoder_fixtures import TINY_VAE, ldm_to_diffusers, randomize_, save_autoencoder, tiny_autoencoder
from safetensors.torch import load_file, save_file

from uvit_cli.encoders import AutoencoderKL, load_autoencoder
from uvit_cli.encoders.autoencoder import AttnBlock, diffusers_to_ldm
from uvit_cli.errors import CheckpointError

TOL = 1e-4  # VAE parity tolerance against diffusers; measured ~2e-6 (moments) and ~1e-5 (decode)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("UVIT_OFFLINE", "1")
    monkeypatch.delenv("UVIT_VAE", raising=False)


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_real_config_is_the_compvis_layout():
    with torch.device("meta"):  # no memory allocated
        sd = AutoencoderKL().state_dict()
    assert len(sd) == 248
    assert sum(v.numel() for v in sd.values()) == 83_653_863
    assert (
        sum(k.startswith("encoder.") for k in sd) == 106 and sum(k.startswith("decoder.") for k in sd) == 138
    )
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (
        128,
        256,
        1,
        1,
    )  # up.0 = highest resolution
    assert sd["decoder.up.3.block.2.conv2.weight"].shape == (512, 512, 3, 3)
    assert sd["encoder.conv_out.weight"].shape == (8, 512, 3, 3) and sd["quant_conv.weight"].shape == (
        8,
        8,
        1,
        1,
    )
    assert {k.split(".")[2] for k in sd if k.startswith("decoder.up.") and "upsample" in k} == {"1", "2", "3"}
    assert not any("encoder.down.3.downsample" in k for k in sd)
    assert not any("attn" in k and ".mid." not in k for k in sd)  # attention only in the middle blocks


def test_attention_is_the_ldm_formula_bit_for_bit():
    blk = randomize_(AttnBlock(32, 32), 5)
    x = torch.randn(2, 32, 6, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = blk.norm(x)
        q, k, v = (c(h).reshape(2, 32, 30) for c in (blk.q, blk.k, blk.v))
        w = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * 32**-0.5, dim=2)  # ldm AttnBlock, verbatim math
        ref = x + blk.proj_out(torch.bmm(v, w.permute(0, 2, 1)).reshape(2, 32, 6, 5))
        # Equal, not close: SDPA differs from this math by ~5e-6 in the moments, F.silu by ~2e-6.
        assert torch.equal(blk(x), ref)


# Numbers produced by the OFFICIAL U-ViT `libs/autoencoder.py` FrozenAutoencoderKL (as stored in the fork
# Gbone3176/uvit-base; ddconfig ch 32, ch_mult [1,1,2,2], num_res_blocks 1, attn_resolutions []) loading
# `tiny_autoencoder(seed=5)` saved with save_autoencoder(..., "uvit"), scale_factor 0.23010, torch 2.14 CPU
# fp32: encode_moments(_images()), then torch.manual_seed(3) + sample(), then decode. Our module gave
# bit-identical tensors in that run. The tolerances allow for other CPUs' kernels: `.ci/cpu-variation`
# measured at most 3.9e-6 on elements, 1.5e-5 / 4.5e-4 on the sums, 2.8e-7 relative on the |sums|
# (AVX-512, AVX2 and plain kernels); each tolerance is at least 10x that.
OFFICIAL_M_0_12 = [-1.120188, 1.39122, 0.396711, -0.924012, 1.112767, 0.277781, -0.090262, -0.944196]
OFFICIAL_M_SUM, OFFICIAL_M_ABS_SUM = 11.867988960817456, 126.82054861821234
OFFICIAL_Z_1_30 = [-0.445525, 0.534338, -0.179969, -0.196978]
OFFICIAL_D_1_17_5 = [-0.224461, -0.78291, -0.59209]
OFFICIAL_D_SUM, OFFICIAL_D_ABS_SUM = -57.819921370431985, 2803.921899410012


def test_matches_numbers_from_the_official_autoencoder(tmp_path):
    path = save_autoencoder(tiny_autoencoder(seed=5), tmp_path / "autoencoder_kl.pth", "uvit")
    vae = load_autoencoder(str(path), scale_factor=0.23010)
    with torch.no_grad():
        m = vae.encode_moments(_images())
        z = vae.sample(m, generator=torch.Generator().manual_seed(3))  # = manual_seed(3) + randn_like
        d = vae.decode(z)
    assert m.shape == (2, 8, 4, 4) and d.shape == (2, 3, 32, 32)
    assert m[0, :, 1, 2].tolist() == pytest.approx(OFFICIAL_M_0_12, abs=5e-5)
    assert m.double().sum().item() == pytest.approx(OFFICIAL_M_SUM, abs=3e-4)
    assert m.double().abs().sum().item() == pytest.approx(OFFICIAL_M_ABS_SUM, rel=5e-6)
    assert z[1, :, 3, 0].tolist() == pytest.approx(OFFICIAL_Z_1_30, abs=5e-5)
    assert d[1, :, 17, 5].tolist() == pytest.approx(OFFICIAL_D_1_17_5, abs=5e-5)
    assert d.double().sum().item() == pytest.approx(OFFICIAL_D_SUM, abs=1e-2)
    assert d.double().abs().sum().item() == pytest.approx(OFFICIAL_D_ABS_SUM, rel=5e-6)


# --- parity with diffusers on files diffusers itself wrote -------------------------------------------------
@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    n = len(TINY_VAE["ch_mult"])
    ref = diffusers.AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[TINY_VAE["ch"] * m for m in TINY_VAE["ch_mult"]],
        layers_per_block=TINY_VAE["num_res_blocks"],
        latent_channels=4,
        norm_num_groups=32,
    )
    randomize_(ref, 7).eval()
    out = tmp_path_factory.mktemp("diffusers_vae")
    ref.save_pretrained(out)
    return ref, out


def _check_parity(ours: AutoencoderKL, ref) -> tuple[float, float]:
    x = _images()
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        m = ours.encode_moments(x)
        m_ref = ref.quant_conv(ref.encoder(x))
        assert m.shape == (2, 8, 4, 4)
        d_enc = (m - m_ref).abs().max().item()
        assert (m[:, :4] - ref.encode(x).latent_dist.mean).abs().max() < TOL
        d_dec = (ours.decode(z * ours.scale_factor) - ref.decode(z).sample).abs().max().item()
    assert d_enc < TOL and d_dec < TOL, (d_enc, d_dec)
    return d_enc, d_dec


def test_diffusers_file_parity(diffusers_vae):
    ref, folder = diffusers_vae
    ours = load_autoencoder(str(folder))
    assert ours.weights_path.endswith("diffusion_pytorch_model.safetensors")
    _check_parity(ours, ref)


def test_diffusers_legacy_attention_names(diffusers_vae, tmp_path):
    ref, folder = diffusers_vae
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in sd.items():
        for new, old in legacy.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[k] = v
    assert any(".query." in k for k in renamed) and not any(".to_q." in k for k in renamed)
    save_file(renamed, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    _check_parity(load_autoencoder(str(tmp_path)), ref)


def test_our_key_map_is_the_inverse_of_diffusers_converter(diffusers_vae):
    ref, folder = diffusers_vae
    dsd = ref.state_dict()
    ldm = diffusers_to_ldm(dsd)
    with torch.device("meta"):
        expected = AutoencoderKL(**TINY_VAE).state_dict()
    assert {k: tuple(v.shape) for k, v in ldm.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    config = json.loads((folder / "config.json").read_text())
    back = ldm_to_diffusers(ldm, config)  # diffusers' ldm -> diffusers converter
    assert back.keys() == dsd.keys() and all(torch.equal(back[k], dsd[k]) for k in dsd)
    assert set(ldm_to_diffusers(ldm, config, legacy=True)) != set(dsd)  # legacy names differ


# --- CompVis / U-ViT and SD checkpoint files ----------------------------------------------------------------
def test_uvit_pth_strict_round_trip(tmp_path):
    vae = tiny_autoencoder(seed=3)
    path = save_autoencoder(vae, tmp_path / "autoencoder_kl.pth", "uvit")
    assert set(torch.load(path, weights_only=True)) == set(vae.state_dict())  # a plain dict, no wrapper
    loaded = load_autoencoder(str(path), scale_factor=0.23010)
    assert loaded.scale_factor == 0.23010 and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    sd, sd2 = vae.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_sd_checkpoint_wrapper_and_diffusers_writer_agree(tmp_path):
    vae = tiny_autoencoder(seed=4)
    x = _images(1, 32)
    with torch.no_grad():
        want = vae.encode_moments(x)
        for fmt in ("sd_ckpt", "diffusers", "diffusers_legacy"):
            path = save_autoencoder(vae, tmp_path / f"vae_{fmt}", fmt)
            got = load_autoencoder(str(path)).encode_moments(x)
            assert torch.equal(got, want), fmt


def test_mismatched_keys_raise_one_line(tmp_path):
    sd = tiny_autoencoder().state_dict()
    del sd["decoder.norm_out.bias"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_autoencoder(str(tmp_path / "bad.pth"))
    msg = str(e.value)
    assert "\n" not in msg and "decoder.norm_out.bias" in msg and "encoder.extra.weight" in msg


def test_pickled_objects_are_refused(tmp_path):
    sd = tiny_autoencoder().state_dict()
    torch.save(
        {"state_dict": sd, "callback": re.compile("x")}, tmp_path / "lightning.ckpt"
    )  # not weights-only
    with pytest.raises(CheckpointError, match="safetensors"):
        load_autoencoder(str(tmp_path / "lightning.ckpt"))


def test_sample_and_decode_follow_uvit():
    vae = tiny_autoencoder(scale_factor=0.5)
    mean = torch.randn(2, 4, 3, 3)
    logvar = torch.full((2, 4, 3, 3), 100.0)  # clamped to 20
    z = vae.sample(torch.cat([mean, logvar], 1), generator=torch.Generator().manual_seed(9))
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(z, 0.5 * (mean + torch.exp(torch.tensor(10.0)) * eps))
    z2 = vae.sample(torch.cat([mean, torch.full_like(mean, -100.0)], 1))  # clamp -30: ~ the mean
    assert torch.allclose(z2, 0.5 * mean, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(vae.decode(z), vae.decoder(vae.post_quant_conv(z / 0.5)))
        assert vae.decode(z).shape == (2, 3, 24, 24)
        coco = tiny_autoencoder(scale_factor=0.23010)
        # U-ViT computes (1 / s) * z; z / s rounds differently for s = 0.23010 (1 ulp on some elements).
        assert torch.equal(coco.decode(z), coco.decoder(coco.post_quant_conv((1.0 / 0.23010) * z)))
