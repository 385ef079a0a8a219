"""`uvit prepare` through the CLI on tiny fake COCO / ImageNet / folder sets laid out like the real ones,
with tiny seeded encoders saved in the real file formats; shard contents checked against a direct
computation written here independently (preprocess by hand, encode one image at a time)."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from encoder_fixtures import save_autoencoder, save_text_encoder, tiny_autoencoder, tiny_text_encoder
from PIL import Image
from train_fixtures import TORCHRUN_2
from typer.testing import CliRunner

from uvit_cli import data
from uvit_cli.cli import app
from uvit_cli.encoders import load_autoencoder, load_text_encoder
from uvit_cli.errors import DataError
from uvit_cli.fileio import sha256_file

runner = CliRunner()


# --------------------------------------------------------------------------------------------------
# Fixtures: encoders in real formats, fake data sets


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    vae_pth = save_autoencoder(tiny_autoencoder(seed=1), d / "autoencoder_kl.pth", "uvit")  # U-ViT's own file
    small = tiny_autoencoder(seed=2, ch=8, norm_groups=4)  # cheaper; diffusers folder keeps norm_num_groups
    vae_diffusers = save_autoencoder(small, d / "sd-vae", "diffusers")
    clip_dir = save_text_encoder(tiny_text_encoder(seed=3), d / "clip-vit-large-patch14", layout="clipmodel")
    return {"vae": str(vae_pth), "vae_small": str(vae_diffusers), "clip": str(clip_dir)}


def _rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


COCO_CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs   playing with a frisbee &amp; a ball",
    "A café with “curly quotes” and ACCENTS éè.",
    "",
    "a very " + "long " * 90 + "caption",
    "A kitchen with a stove.",
    "Una calle con coches.",
]


def make_coco(root: Path, seed: int = 0, n_train: int = 3, n_val: int = 2) -> Path:
    """COCO 2014 layout: train2014/, val2014/, annotations/captions_{train,val}2014.json."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True)
    sizes = [(37, 53), (64, 41), (50, 50), (33, 70), (71, 29)]
    for split, n, ids in (("train", n_train, [391895, 9, 522418, 184613, 318219]), ("val", n_val, [42, 7])):
        (root / f"{split}2014").mkdir()
        images, anns = [], []
        for j, img_id in enumerate(ids[:n]):
            name = f"COCO_{split}2014_{img_id:012d}.jpg"
            h, w = sizes[(j + len(split)) % len(sizes)]
            img = Image.fromarray(_rgb(rng, h, w))
            if j == 1:
                img = img.convert("L")  # a grayscale JPEG, as COCO has
            img.save(root / f"{split}2014" / name, quality=95)
            images.append({"id": img_id, "file_name": name, "height": h, "width": w})
            for k in range(5 + j % 3):  # 5, 6, 7 captions
                anns.append(
                    {"image_id": img_id, "id": 1000 * img_id + k, "caption": COCO_CAPTIONS[(j + k) % 7]}
                )
        rng.shuffle(anns)  # interleaved images, as in the real file
        (root / "annotations" / f"captions_{split}2014.json").write_text(
            json.dumps({"info": {}, "images": images[::-1], "annotations": anns})
        )
    return root


def make_imagenet(root: Path, seed: int = 0) -> Path:
    """ImageNet layout: train/<synset>/<synset>_<n>.JPEG, sizes that exercise the BOX halving."""
    rng = np.random.default_rng(seed)
    files = {"n01440764": [(600, 530), (300, 280)], "n01443537": [(260, 700)]}
    for syn, sizes in files.items():
        (root / "train" / syn).mkdir(parents=True)
        for k, (h, w) in enumerate(sizes):
            img = Image.fromarray(_rgb(rng, h, w))
            if k == 1:
                img = img.convert("CMYK")  # CMYK JPEGs exist in ImageNet
            img.save(root / "train" / syn / f"{syn}_{k + 10}.JPEG", quality=90)
    return root


def coco_crop(arr: np.ndarray, res: int) -> np.ndarray:
    h, w = arr.shape[:2]
    c = min(h, w)
    arr = arr[(h - c) // 2 : (h + c) // 2, (w - c) // 2 : (w + c) // 2]
    return np.array(Image.fromarray(arr).resize((res, res), Image.LANCZOS))


def adm_crop(img: Image.Image, res: int) -> np.ndarray:
    while min(*img.size) >= 2 * res:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    s = res / min(*img.size)
    img = img.resize(tuple(round(x * s) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    y0, x0 = (arr.shape[0] - res) // 2, (arr.shape[1] - res) // 2
    return arr[y0 : y0 + res, x0 : x0 + res]


def to_input(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((arr.astype(np.float32) / 127.5 - 1).transpose(2, 0, 1)[None].copy())


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result


def read_split(out: Path, split: str):
    m = data.read_manifest(out)
    entry = m["splits"][split]
    xs, ys, ctx, keys, caps = [], [], [], [], []
    for shard in entry["shards"]:
        d = out / split / shard["name"]
        items = json.loads((d / "items.json").read_text())
        keys += items["keys"]
        caps += items.get("captions", [])
        if shard["count"] == 0:
            continue
        xs.append(np.load(d / "x.npy"))
        if (d / "y.npy").exists():
            ys.append(np.load(d / "y.npy"))
        if (d / "context.npy").exists():
            c = np.load(d / "context.npy")
            o = np.load(d / "context_offsets.npy")
            ctx += [c[o[j] : o[j + 1]] for j in range(len(o) - 1)]
    return {
        "x": np.concatenate(xs),
        "y": np.concatenate(ys) if ys else None,
        "ctx": ctx,
        "keys": keys,
        "captions": caps,
        "manifest": m,
    }


def shard_hashes(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): sha256_file(p)
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


# --------------------------------------------------------------------------------------------------
# COCO


def _prepare_coco(coco, out, encoders, *options):
    """`uvit prepare coco` of a fake COCO into `out` with the tiny encoders, decoding in this process."""
    return invoke("prepare", "coco", "--coco-root", str(coco), "--out", str(out), "--vae", encoders["vae"],
                  "--clip", encoders["clip"], "--workers", "0", *options)  # fmt: skip


def test_prepare_coco_matches_direct_computation(tmp_path, encoders):
    coco = make_coco(tmp_path / "coco", n_train=3, n_val=1)
    out = tmp_path / "coco256"
    r = _prepare_coco(
        coco, out, encoders, "--items-per-shard", "2", "--batch-size", "2", "--dtype", "float32"
    )
    assert r.exit_code == 0, r.output
    assert "train: 3 items in 2 shards, 18 captions" in r.output and "val: 1 items in 1 shard" in r.output

    vae = load_autoencoder(encoders["vae"])
    clip = load_text_encoder(encoders["clip"])
    for split, n in (("train", 3), ("val", 1)):
        got = read_split(out, split)
        ann = json.loads((coco / "annotations" / f"captions_{split}2014.json").read_text())
        ids = sorted(im["id"] for im in ann["images"])
        assert got["keys"] == [str(i) for i in ids] and got["x"].shape == (n, 1, 8, 32, 32)
        for j, img_id in enumerate(ids):
            path = coco / f"{split}2014" / f"COCO_{split}2014_{img_id:012d}.jpg"
            arr = coco_crop(np.array(Image.open(path).convert("RGB")), 256)
            with torch.no_grad():
                want = vae.encode_moments(to_input(arr))[0].numpy()  # one image per call, fp32, as U-ViT
            np.testing.assert_allclose(got["x"][j, 0], want, rtol=1e-5, atol=1e-5)
            caps = [a["caption"] for a in ann["annotations"] if a["image_id"] == img_id]
            assert got["captions"][j] == caps and 5 <= len(caps) <= 7
            np.testing.assert_allclose(got["ctx"][j], clip.encode(caps).numpy(), rtol=1e-5, atol=1e-5)

    m = got["manifest"]
    assert m["kind"] == "coco" and m["conditioning"] == "text" and m["shape"] == [8, 32, 32]
    assert m["encoders"]["autoencoder"]["sha256"] == sha256_file(encoders["vae"])
    assert m["context_shape"] == [77, 32] and m["splits"]["val"]["items"] == 1
    assert "LANCZOS" in m["preprocessing"]
    np.testing.assert_allclose(np.load(out / "empty_context.npy"), clip.encode([""])[0].numpy(), atol=1e-6)
    assert data.verify(out, "train")["train"] > 0

    ds = data.FeatureDataset(out, "train")
    assert len(ds) == 3 and ds.space == "latent" and ds.conditioning == "text" and ds.shape == (8, 32, 32)
    assert ds.empty_context.shape == (77, 32)


def test_prepare_coco_fp16_default_and_single_split(tmp_path, encoders):
    coco = make_coco(tmp_path / "coco", n_train=1, n_val=2)
    out = tmp_path / "coco32"
    r = _prepare_coco(coco, out, encoders, "--split", "val", "--resolution", "32")
    assert r.exit_code == 0, r.output
    m = data.read_manifest(out)
    assert list(m["splits"]) == ["val"] and m["dtype"] == "float16" and m["shape"] == [8, 4, 4]
    got = read_split(out, "val")
    assert got["x"].dtype == np.float16 and got["ctx"][0].dtype == np.float16
    vae = load_autoencoder(encoders["vae"])
    img = Image.open(coco / "val2014" / "COCO_val2014_000000000007.jpg").convert("RGB")
    with torch.no_grad():
        want = vae.encode_moments(to_input(coco_crop(np.array(img), 32)))[0].numpy()
    x = got["x"][0, 0].astype(np.float32)
    assert np.abs(x - want).max() <= np.abs(want).max() * 2**-11 + 1e-5
    # now add the train split into the same --out: same settings, so it is accepted
    r = _prepare_coco(coco, out, encoders, "--split", "train", "--resolution", "32")
    assert r.exit_code == 0, r.output
    assert set(data.read_manifest(out)["splits"]) == {"train", "val"}


def test_coco_listing_follows_pycocotools(tmp_path):
    """MSCOCODatabase: images by sorted id; captions = loadAnns(getAnnIds(id)), i.e. the image's annotations in
    file order, each looked up by annotation id (an id used twice gives its last caption). Expected lists from
    running the official class (with pycocotools' COCO index) on this file."""
    from uvit_cli.prepare.sources import coco_sources

    (tmp_path / "train2014").mkdir()
    (tmp_path / "annotations").mkdir()
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in (5, 3, 9)]
    anns = [
        {"image_id": 5, "id": 1, "caption": "a"},
        {"image_id": 3, "id": 2, "caption": "b"},
        {"image_id": 5, "id": 3, "caption": "c"},
        {"image_id": 9, "id": 1, "caption": "d"},  # reuses id 1
        {"image_id": 3, "id": 4, "caption": "e"},
        {"image_id": 3, "id": 2, "caption": "f"},  # reuses id 2
    ]
    (tmp_path / "annotations" / "captions_train2014.json").write_text(
        json.dumps({"images": images, "annotations": anns})
    )
    got = [(s.key, s.captions) for s in coco_sources(tmp_path, "train")]
    assert got == [("3", ["f", "e", "f"]), ("5", ["d", "c"]), ("9", ["d"])]


def test_missing_coco_files_one_line(tmp_path, encoders):
    coco = make_coco(tmp_path / "coco")
    (coco / "annotations" / "captions_val2014.json").unlink()
    args = [
        "prepare",
        "coco",
        "--coco-root",
        str(coco),
        "--out",
        str(tmp_path / "o"),
        "--vae",
        encoders["vae"],
    ]
    r = invoke(*args, "--clip", encoders["clip"])
    assert r.exit_code == 2 and "captions_val2014.json" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    shutil.rmtree(coco / "train2014")
    r = invoke(*args, "--clip", encoders["clip"], "--split", "train")
    assert r.exit_code == 2 and "train2014" in r.output
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------
# ImageNet


def test_prepare_imagenet_matches_direct_computation(tmp_path, encoders):
    root = make_imagenet(tmp_path / "imagenet")
    out = tmp_path / "imagenet256"
    r = invoke(
        "prepare", "imagenet", "--root", str(root), "--resolution", "256", "--out", str(out),
        "--vae", encoders["vae_small"], "--workers", "2", "--items-per-shard", "2", "--dtype", "float32",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    got = read_split(out, "train")
    assert got["keys"] == [
        "n01440764/n01440764_10.JPEG",
        "n01440764/n01440764_11.JPEG",
        "n01443537/n01443537_10.JPEG",
    ]
    assert got["y"].tolist() == [0, 0, 1] and got["x"].shape == (3, 2, 8, 32, 32)
    vae = load_autoencoder(encoders["vae_small"])
    for j, key in enumerate(got["keys"]):
        x = to_input(adm_crop(Image.open(root / "train" / key).convert("RGB"), 256))
        with torch.no_grad():
            want = vae.encode_moments(torch.cat([x, torch.flip(x, dims=[3])])).numpy()
        np.testing.assert_allclose(got["x"][j], want, rtol=1e-5, atol=1e-5)
    m = got["manifest"]
    assert m["num_classes"] == 2 and m["classes"] == ["n01440764", "n01443537"] and m["views"] == 2
    ds = data.FeatureDataset(out)
    assert len(ds) == 6 and ds.conditioning == "class" and ds.null_class == 2
    torch.testing.assert_close(ds[5]["x"], torch.from_numpy(got["x"][2, 1]))
    assert int(ds[5]["y"]) == 1


@pytest.mark.parametrize("res", [256, 64])
def test_crops_on_odd_sizes_match_the_official_recipes(res):
    """The crops against `coco_crop` / `adm_crop` above (U-ViT's center_crop and ADM's center_crop_arr) on
    the sizes where off-by-one offsets, rounding and repeated BOX halving show (odd, extreme, tiny)."""
    from uvit_cli.prepare.sources import center_crop_adm, center_crop_lanczos

    rng = np.random.default_rng(3)
    for h, w in [(257, 513), (1000, 300), (511, 511), (64, 4096), (4096, 64), (20, 30), (1, 1), (3, 700),
                 (767, 1535), (255, 257)]:  # fmt: skip
        img = Image.fromarray(_rgb(rng, h, w))
        np.testing.assert_array_equal(center_crop_lanczos(img, res), coco_crop(np.asarray(img), res))
        np.testing.assert_array_equal(center_crop_adm(img, res), adm_crop(img, res))


def test_imagenet_listing_is_the_official_depth_first_order(tmp_path):
    """U-ViT's `_list_image_files_recursively`: each directory's entries sorted by name, depth first; the
    label is the index of the file name's prefix before "_" among the sorted prefixes (not the folder)."""
    from uvit_cli.prepare.sources import imagenet_sources

    train = tmp_path / "train"
    names = [
        "n01440764/n01440764_9.JPEG",
        "n01440764/extra/n01440764_5.jpeg",  # a nested folder sorts among the files by its name
        "n01440764/n01440764_10.png",
        "n01440764-b/n01440764_7.gif",  # "n01440764" < "n01440764-b", though "-" < "/" in a path sort
        "n01443537/n01443537_2.JPEG",
        "n01443537/n00000001_1.jpg",  # labelled by its own prefix
        "n01443537/._n01443537_3.JPEG",  # macOS metadata: hidden, skipped
        "n01443537/notes.txt",  # not an image (the official function would crash on it)
    ]
    for name in names:
        (train / name).parent.mkdir(parents=True, exist_ok=True)
        (train / name).write_bytes(b"")
    sources, classes = imagenet_sources(tmp_path)
    assert [s.key for s in sources] == [
        "n01440764/extra/n01440764_5.jpeg",
        "n01440764/n01440764_10.png",
        "n01440764/n01440764_9.JPEG",
        "n01440764-b/n01440764_7.gif",
        "n01443537/n00000001_1.jpg",
        "n01443537/n01443537_2.JPEG",
    ]
    assert classes == ["n00000001", "n01440764", "n01443537"]
    assert [s.label for s in sources] == [1, 1, 1, 1, 0, 2]


def test_imagenet_rejects_other_resolutions(tmp_path, encoders):
    root = make_imagenet(tmp_path / "imagenet")
    r = invoke(
        "prepare", "imagenet", "--root", str(root), "--resolution", "128", "--out", str(tmp_path / "o")
    )
    assert r.exit_code == 2 and "256 or 512" in r.output


# --------------------------------------------------------------------------------------------------
# Robustness: corrupt input, resume, refusal of mixed settings


def _folder_with_bad_images(root: Path) -> Path:
    rng = np.random.default_rng(5)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
    Image.fromarray(_rgb(rng, 40, 30)).save(root / "cats" / "a.jpg")
    Image.fromarray(_rgb(rng, 20, 20)).convert("RGBA").save(root / "cats" / "b.png")
    Image.fromarray(_rgb(rng, 33, 47)).save(root / "cats" / "c.jpg")
    good = root / "dogs" / "d.jpg"
    Image.fromarray(_rgb(rng, 64, 64)).save(good, quality=95)
    raw = good.read_bytes()
    (root / "dogs" / "e_truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (root / "dogs" / "f_garbage.jpg").write_bytes(b"not an image at all")
    Image.fromarray(_rgb(rng, 16, 24)).convert("P").save(root / "dogs" / "g.gif")
    return root


def test_corrupt_images_skipped_and_listed(tmp_path, encoders):
    root = _folder_with_bad_images(tmp_path / "imgs")
    out = tmp_path / "px"
    r = invoke("prepare", "folder", str(root), "--out", str(out), "--name", out.name, "--space", "pixel", "--resolution", "16",
               "--items-per-shard", "3", "--workers", "2", "--batch-size", "2")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "5 items" in r.output and "2 unreadable images skipped" in r.output
    m = data.read_manifest(out)
    skipped = m["splits"]["train"]["skipped"]
    assert [s["key"] for s in skipped] == ["dogs/e_truncated.jpg", "dogs/f_garbage.jpg"]
    assert all(s["reason"] for s in skipped)
    assert m["classes"] == ["cats", "dogs"] and m["conditioning"] == "class" and m["dtype"] == "uint8"
    got = read_split(out, "train")
    assert got["keys"] == ["cats/a.jpg", "cats/b.png", "cats/c.jpg", "dogs/d.jpg", "dogs/g.gif"]
    assert got["y"].tolist() == [0, 0, 0, 1, 1] and got["x"].dtype == np.uint8
    want = adm_crop(Image.open(root / "cats" / "b.png").convert("RGB"), 16).transpose(2, 0, 1)
    np.testing.assert_array_equal(got["x"][1, 0], want)
    ds = data.FeatureDataset(out)
    torch.testing.assert_close(ds[1]["x"], torch.from_numpy(want.astype(np.float32)) / 127.5 - 1)


def test_resume_after_interruption_is_identical(tmp_path, encoders, monkeypatch):
    coco = make_coco(tmp_path / "coco", n_train=5, n_val=1)
    # shards of 2, 2, 1 images; batches of up to 3 that must not cross shards
    args = ["--coco-root", str(coco), "--vae", encoders["vae"], "--clip", encoders["clip"], "--split", "train",
            "--items-per-shard", "2", "--batch-size", "3", "--workers", "0", "--resolution", "32"]  # fmt: skip
    ref = tmp_path / "ref" / "coco32"
    assert invoke("prepare", "coco", "--out", str(ref), *args).exit_code == 0

    # interrupt after the first shard is written (as Ctrl-C would)
    run_mod = importlib.import_module("uvit_cli.prepare.run")  # the package re-exports a function named run

    real = run_mod._finish_shard
    calls = []

    def finish_then_die(*a, **k):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(run_mod, "_finish_shard", finish_then_die)
    out = tmp_path / "coco32"
    r = invoke("prepare", "coco", "--out", str(out), *args)
    assert r.exit_code == 130
    assert data.list_shards(out / "train") == [0]
    assert not data.read_manifest(out)["splits"]["train"]["complete"]
    with pytest.raises(DataError, match="incomplete"):
        data.FeatureDataset(out)
    # a hard kill mid-write leaves a temporary directory: it must be ignored and cleaned up
    (out / "train" / ".tmp-shard-00001-999").mkdir()
    (out / "train" / ".tmp-shard-00001-999" / "x.npy").write_bytes(b"partial")
    mtime = (out / "train" / "shard-00000" / "x.npy").stat().st_mtime_ns

    monkeypatch.setattr(run_mod, "_finish_shard", real)
    written = []
    monkeypatch.setattr(run_mod, "_finish_shard", lambda buf, *a: written.append(buf.index) or real(buf, *a))
    r = invoke("prepare", "coco", "--out", str(out), *args)
    assert r.exit_code == 0, r.output
    assert written == [1, 2]  # finished shards are not recomputed
    assert (out / "train" / "shard-00000" / "x.npy").stat().st_mtime_ns == mtime
    assert shard_hashes(out) == shard_hashes(ref)
    assert data.read_manifest(out)["splits"] == data.read_manifest(ref)["splits"]
    # a rerun of a finished set writes nothing
    written.clear()
    assert invoke("prepare", "coco", "--out", str(out), *args).exit_code == 0 and written == []


def test_refuses_out_made_with_other_settings(tmp_path, encoders):
    coco = make_coco(tmp_path / "coco", n_train=2, n_val=1)
    out = tmp_path / "coco256"
    base = ["prepare", "coco", "--coco-root", str(coco), "--out", str(out), "--clip", encoders["clip"],
            "--split", "train", "--workers", "0", "--resolution", "32"]  # fmt: skip
    assert invoke(*base, "--vae", encoders["vae"]).exit_code == 0
    before = shard_hashes(out)
    r = invoke(*base, "--vae", encoders["vae_small"])  # other autoencoder weights
    assert r.exit_code == 2 and "other settings" in r.output and "vae_sha256" in r.output
    r = invoke(*base, "--vae", encoders["vae"], "--dtype", "float32")
    assert r.exit_code == 2 and "dtype" in r.output
    r = invoke(*base, "--vae", encoders["vae"], "--items-per-shard", "7")
    assert r.exit_code == 2 and "items_per_shard" in r.output
    assert shard_hashes(out) == before
    # the sources changed (a new caption): refuse rather than mix
    p = coco / "annotations" / "captions_train2014.json"
    ann = json.loads(p.read_text())
    ann["annotations"].append({"image_id": ann["images"][0]["id"], "id": 1, "caption": "new"})
    p.write_text(json.dumps(ann))
    r = invoke(*base, "--vae", encoders["vae"])
    assert r.exit_code == 2 and "changed" in r.output
    # a non-empty directory that is not a shard set
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    r = invoke(
        "prepare", "folder", str(tmp_path / "coco" / "val2014"), "--out", str(other), "--name", "home",
        "--space", "pixel",
    )  # fmt: skip
    assert r.exit_code == 2 and "not empty" in r.output


def test_folder_captions_text_set(tmp_path, encoders):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("x.jpg", "y.jpg", "z.jpg"):
        Image.fromarray(_rgb(rng, 24, 24)).save(root / name)
    (root / "captions.jsonl").write_text(
        '{"file": "x.jpg", "caption": "a red square"}\n{"file": "y.jpg", "captions": ["one", "two"]}\n'
        '{"file": "x.jpg", "caption": "another"}\n'
    )
    out = tmp_path / "o"
    r = invoke("prepare", "folder", str(root), "--out", str(out), "--name", out.name, "--space", "pixel", "--resolution", "16",
               "--clip", encoders["clip"], "--workers", "0")  # fmt: skip
    assert r.exit_code == 0, r.output
    m = data.read_manifest(out)
    assert m["conditioning"] == "text" and [s["key"] for s in m["splits"]["train"]["skipped"]] == ["z.jpg"]
    ds = data.FeatureDataset(out)
    assert len(ds) == 2 and ds.captions(0) == ["a red square", "another"] and ds.num_captions(1) == 2
    clip = load_text_encoder(encoders["clip"])
    k = ds.caption_index(0)
    torch.testing.assert_close(ds[0]["context"], clip.encode([ds.captions(0)[k]])[0], atol=2e-3, rtol=2**-10)


@pytest.mark.slow
def test_torchrun_two_ranks_identical(tmp_path, encoders):
    """Two gloo ranks write byte-identical shards and the same manifest as one process."""
    import os
    import subprocess
    import sys

    coco = make_coco(tmp_path / "coco", n_train=4, n_val=2)
    args = ["prepare", "coco", "--coco-root", str(coco), "--vae", encoders["vae_small"], "--clip", encoders["clip"],
            "--resolution", "32", "--items-per-shard", "2", "--workers", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "uvit_cli", *args, "--out", str(one)], env=env, check=True)
    subprocess.run([*TORCHRUN_2, "-m", "uvit_cli", *args, "--out", str(two)], env=env, check=True)
    one, two = one / "coco32", two / "coco32"  # --out is the data root: the set is its coco<resolution>
    assert shard_hashes(one) and shard_hashes(one) == shard_hashes(two)
    assert data.read_manifest(one)["splits"] == data.read_manifest(two)["splits"]


# --------------------------------------------------------------------------------------------------
# Importing features extracted by the official scripts


def make_official_coco(root: Path, seed: int = 0, ctx_dim: int = 16) -> dict:
    """coco256_features/ exactly as extract_mscoco_feature.py / extract_empty_feature.py write it: np.save of
    float32 moments `<idx>.npy` and per caption `<idx>_<k>.npy`, plus empty_context.npy and run_vis/."""
    rng = np.random.default_rng(seed)
    want: dict = {"empty": rng.normal(size=(77, ctx_dim)).astype(np.float32)}
    root.mkdir(parents=True)
    np.save(root / "empty_context.npy", want["empty"])
    (root / "run_vis").mkdir()
    run_vis = np.empty(2, dtype=object)
    run_vis[0], run_vis[1] = "A green train is coming down the tracks.", want["empty"]
    np.save(root / "run_vis" / "0.npy", run_vis)  # (prompt, context): ignored by the import
    for split, n_captions in (("train", [5, 7, 6, 5, 5]), ("val", [5, 6])):
        (root / split).mkdir()
        want[split] = []
        for idx, n in enumerate(n_captions):
            moments = rng.normal(size=(8, 4, 4)).astype(np.float32)
            ctx = rng.normal(size=(n, 77, ctx_dim)).astype(np.float32)
            np.save(root / split / f"{idx}.npy", moments)
            for k in range(n):
                np.save(root / split / f"{idx}_{k}.npy", ctx[k])
            want[split].append((moments, ctx))
    return want


def official_imagenet_file(path: Path, moments: np.ndarray, label: int, numpy1: bool = False) -> None:
    """np.save(path, (moment, lb)) as extract_imagenet_feature.py ran it (numpy < 1.24 made a (2,) object
    array of the ragged tuple; numpy 2 refuses ragged input, so the same array is built explicitly).
    numpy1: the bytes numpy 1.x wrote, pickle protocol 3 naming `numpy.core.multiarray` (numpy 2: protocol
    4, `numpy._core`)."""
    pair = np.empty(2, dtype=object)
    pair[0], pair[1] = moments, np.int64(label)
    if not numpy1:
        np.save(path, pair)
        return
    body = pickle.dumps(pair, protocol=3).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in body  # GLOBAL opcode, newline-terminated names
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": (2,)})
        f.write(body)


def test_import_official_coco_features(tmp_path):
    want = make_official_coco(tmp_path / "coco256_features")
    out = tmp_path / "coco32"
    r = invoke("prepare", "official-features", str(tmp_path / "coco256_features"), "--out", str(out),
               "--items-per-shard", "2", "--dtype", "float32")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "train: 5 items in 3 shards, 28 captions" in r.output and "val: 2 items in 1 shard" in r.output
    ds = data.FeatureDataset(out, "train", seed=0)
    assert ds.conditioning == "text" and ds.space == "latent" and ds.z_shape == (4, 4, 4) and len(ds) == 5
    assert ds.manifest["context_shape"] == [77, 16] and ds.manifest["kind"] == "coco"
    np.testing.assert_array_equal(ds.empty_context.numpy(), want["empty"])
    for i, (moments, ctx) in enumerate(want["train"]):
        np.testing.assert_array_equal(ds[i]["x"].numpy(), moments)
        assert ds.num_captions(i) == len(ctx)
        seen = {ds.caption_index(i, e) for e in range(60)}
        assert seen == set(range(len(ctx)))  # every caption reachable, as random.randint(0, n - 1)
        for e in range(3):
            np.testing.assert_array_equal(ds[(i, e)]["context"].numpy(), ctx[ds.caption_index(i, e)])
    val = data.FeatureDataset(out, "val")
    np.testing.assert_array_equal(val[1]["x"].numpy(), want["val"][1][0])
    # rerun: everything reused; a different source into the same --out is refused
    r = invoke("prepare", "official-features", str(tmp_path / "coco256_features"), "--out", str(out),
               "--items-per-shard", "2", "--dtype", "float32")  # fmt: skip
    assert r.exit_code == 0 and data.FeatureDataset(out, "train")[4]["x"].shape == (8, 4, 4)
    (tmp_path / "coco256_features" / "train" / "4_5.npy").write_bytes(
        (tmp_path / "coco256_features" / "train" / "4_0.npy").read_bytes()
    )
    r = invoke("prepare", "official-features", str(tmp_path / "coco256_features"), "--out", str(out),
               "--items-per-shard", "2", "--dtype", "float32")  # fmt: skip
    assert r.exit_code == 2 and "sources" in r.output and "changed" in r.output


def test_import_official_imagenet_features_and_train(tmp_path):
    from test_prepare_pixel import tiny

    from uvit_cli.train import train

    src = tmp_path / "imagenet256_features"
    src.mkdir()
    rng = np.random.default_rng(1)
    images = [(rng.normal(size=(8, 4, 4)).astype(np.float32), int(lab)) for lab in (3, 999, 0)]
    # extract_imagenet_feature.py's layout for one batch of 3: the 3 images, then their 3 mirror images
    files = [(m, y) for m, y in images] + [(m[:, :, ::-1].copy(), y) for m, y in images]
    for idx, (m, y) in enumerate(files):
        official_imagenet_file(src / f"{idx}.npy", m, y, numpy1=idx % 2 == 0)
    out = tmp_path / "in"
    r = invoke(
        "prepare", "official-features", str(src), "--out", str(out), "--name", "in", "--dtype", "float32"
    )
    assert r.exit_code == 0, r.output
    ds = data.FeatureDataset(out)
    assert len(ds) == 6 and ds.views == 1 and ds.num_classes == 1000 and ds.null_class == 1000
    for i, (m, y) in enumerate(files):
        np.testing.assert_array_equal(ds[i]["x"].numpy(), m)
        assert int(ds[i]["y"]) == y
    preset = tiny("imagenet256_uvit_l2", out, img_size=4, patch_size=2)
    assert train(preset, tmp_path / "run").step == 1  # num_classes 1001 = 1000 + the CFG null label

    # A pickle that would run code under np.load(allow_pickle=True) is refused, not executed.
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = np.empty(2, dtype=object)
    bad[0], bad[1] = Evil(), np.int64(0)
    np.save(src / "2.npy", bad)
    r = invoke("prepare", "official-features", str(src), "--out", str(tmp_path / "in2"))
    assert r.exit_code == 2 and "refusing to load" in r.output and not (tmp_path / "pwned").exists()
    (src / "2.npy").unlink()
    r = invoke("prepare", "official-features", str(src), "--out", str(tmp_path / "in3"))
    assert r.exit_code == 2 and "2.npy is missing" in r.output


def test_data_roots_come_from_the_flag_then_the_environment_then_data_dir(tmp_path, monkeypatch):
    from uvit_cli.errors import DataError
    from uvit_cli.prepare import data_root

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("UVIT_COCO", raising=False)
    with pytest.raises(DataError, match=r"pass --coco-root DIR, set \$UVIT_COCO, or put it in ./data/coco/"):
        data_root("coco")
    (tmp_path / "data" / "coco").mkdir(parents=True)
    assert data_root("coco") == Path("data/coco")
    monkeypatch.setenv("UVIT_COCO", str(tmp_path / "elsewhere"))
    assert data_root("coco") == tmp_path / "elsewhere"
    assert data_root("coco", tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv("UVIT_IMAGENET", raising=False)
    with pytest.raises(DataError, match=r"pass --root DIR, set \$UVIT_IMAGENET"):
        data_root("imagenet")
    from typer.testing import CliRunner

    from uvit_cli.cli import app

    monkeypatch.delenv("UVIT_CIFAR10", raising=False)
    res = CliRunner().invoke(app, ["prepare", "cifar10", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "$UVIT_CIFAR10" in res.output and "Traceback" not in res.output


def test_prepare_result_summary_progress_note_and_the_cpu_bf16_warning():
    """What `uvit prepare` prints is the core's: a line per split and encoder, the shards kept, the skipped
    images named (first three), the bar's note; bf16 without a GPU is warned about, fp32 is not."""
    import torch

    from uvit_cli.prepare import PrepareResult, Progress
    from uvit_cli.prepare.check import precision_warning

    skipped = [{"key": f"k{i}", "reason": "named pipe"} for i in range(5)]
    manifest = {
        "splits": {
            "train": {"items": 7, "shards": ["a", "b"], "captions": 30, "skipped": skipped},
            "val": {"items": 2, "shards": ["c"]},
        },
        "encoders": {"vae": {"path": "/w/vae.pth", "sha256": "0123456789abcdef" * 4}},
    }
    result = PrepareResult(Path("feats/coco256"), manifest, reused={"train": 2, "val": 0})
    assert result.summary(1.25) == [
        "train: 7 items in 2 shards, 30 captions, 5 unreadable images skipped (listed in manifest.json)",
        "val: 2 items in 1 shard",
        "vae: /w/vae.pth sha256 0123456789abcdef",
        "wrote feats/coco256 in 1.2 s (2 finished shards verified and kept)",
    ]
    assert result.skipped_warnings() == [
        "train: skipped k0 (named pipe); k1 (named pipe); k2 (named pipe), and 2 more"
    ]
    assert Progress("train", 1, 2, skipped=3, shards_reused=4).note() == "3 skipped, 4 shards reused"
    assert Progress("train", 1, 2).note() == ""
    assert precision_warning("fp32") is None
    bf16 = precision_warning("bf16")
    assert (bf16 is None) == torch.cuda.is_available()
