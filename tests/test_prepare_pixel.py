"""`uvit prepare cifar10|celeba|imagenet --space pixel` on tiny fake sets laid out like the real distributions
(CIFAR-10 python pickles, img_align_celeba JPEGs, ImageNet train/); shards checked against a direct computation
written here (numpy reshape of the pickle rows; PIL crop + torchvision's own Resize), then read by the trainer."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from test_prepare import adm_crop, invoke, make_imagenet, read_split, shard_hashes

from uvit_cli import data
from uvit_cli.config import load_preset
from uvit_cli.train import train
from uvit_cli.train.rundir import check_data_fits

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --------------------------------------------------------------------------------------------------
# Fake data sets in the real formats


def make_cifar10(root: Path, counts=(3, 2, 1, 2, 2), n_test: int = 3, seed: int = 0) -> dict[str, list]:
    """cifar-10-batches-py/ with real-format pickles (bytes keys, (n, 3072) uint8 rows); returns the rows."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rows: dict[str, list] = {"train": [], "test": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, n in zip(names, [*counts, n_test], strict=True):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        batch = {
            b"batch_label": name.encode(),
            b"labels": y,
            b"data": x,
            b"filenames": [f"img_{name}_{j}.png".encode() for j in range(n)],
        }
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
        rows["test" if name == "test_batch" else "train"].append((name, x, y))
    meta = {b"num_cases_per_batch": 10000, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return rows


def make_celeba(root: Path, n: int = 5, seed: int = 0) -> Path:
    """img_align_celeba/000001.jpg ...: 178x218 smooth colour images (JPEG-friendly, like photos)."""
    rng = np.random.default_rng(seed)
    (root / "img_align_celeba").mkdir(parents=True)
    yy, xx = np.mgrid[0:218, 0:178]
    for i in range(n, 0, -1):  # written out of order: the listing must sort
        a, b, c = rng.uniform(0.02, 0.2, 3)
        img = np.stack([np.sin(a * xx + i), np.cos(b * yy), np.sin(c * (xx + yy))], -1)
        noise = rng.normal(0, 0.1, img.shape)
        arr = ((img + noise) * 100 + 128).clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "img_align_celeba" / f"{i:06d}.jpg", quality=95)
    return root


def celeba_direct(path: Path, res: int = 64) -> np.ndarray:
    """The official transform: Crop(x1=57, x2=185, y1=25, y2=153) = F.crop(top 57, left 25, 128, 128), Resize."""
    img = Image.open(path).convert("RGB")
    img = T.Resize(res)(TF.crop(img, 57, 25, 128, 128))
    return np.array(img).transpose(2, 0, 1)  # CHW, as ToTensor


def tiny(preset: str, out: Path, **model) -> object:
    """The packaged preset with its data settings, on `out`, with a model small enough for the CPU."""
    sets = [f"data.path='{out}'", "model.embed_dim=32", "model.depth=2", "model.num_heads=2"]
    sets += [f"model.{k}={v}" for k, v in model.items()]
    sets += ["train.steps=1", "train.batch_size=4", "train.num_workers=0", "train.compile=false"]
    sets += ["train.mixed_precision='no'", "train.sample_interval=1000000", "train.save_interval=1"]
    sets += ["train.warmup_steps=0", "model.use_checkpoint=false"]
    return load_preset(preset, sets)


# --------------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar10_matches_pickles_and_trains(tmp_path):
    rows = make_cifar10(tmp_path / "cifar")
    out = tmp_path / "cifar10"
    r = invoke("prepare", "cifar10", "--root", str(tmp_path / "cifar"), "--out", str(out),
               "--items-per-shard", "4", "--workers", "0")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "train: 10 items in 3 shards" in r.output and "test: 3 items in 1 shard" in r.output
    for split in ("train", "test"):
        got = read_split(out, split)
        want_x = np.concatenate([x for _, x, _ in rows[split]]).reshape(-1, 3, 32, 32)  # R, G, B planes
        want_y = [v for _, _, y in rows[split] for v in y]
        assert got["x"].dtype == np.uint8 and got["x"].shape == (len(want_x), 1, 3, 32, 32)
        np.testing.assert_array_equal(got["x"][:, 0], want_x)
        assert got["y"].tolist() == want_y
        assert got["keys"] == [f"{name}/{j}" for name, x, _ in rows[split] for j in range(len(x))]
    m = got["manifest"]
    assert m["kind"] == "cifar10" and m["space"] == "pixel" and m["shape"] == [3, 32, 32]
    assert m["views"] == 1 and m["conditioning"] == "class" and m["classes"] == CLASSES
    assert m["num_classes"] == 10 and m["dtype"] == "uint8"

    ds = data.FeatureDataset(out)
    assert len(ds) == 10 and ds.z_shape == (3, 32, 32)
    item = ds[4]
    assert item["x"].shape == (3, 32, 32) and -1 <= item["x"].min() and item["x"].max() <= 1
    want = np.concatenate([x for _, x, _ in rows["train"]]).reshape(-1, 3, 32, 32)[4]
    torch.testing.assert_close(item["x"], torch.from_numpy(want / 127.5 - 1).float())

    # The paper's model is unconditional: it trains on the labelled set and ignores y.
    preset = tiny("cifar10_uvit_s2", out)
    assert preset.model.conditioning == "none" and preset.data.random_flip
    assert train(preset, tmp_path / "run").step == 1
    # ... and a class-conditional variant uses the labels (10 classes + the CFG null class).
    check_data_fits(tiny("cifar10_uvit_s2", out, num_classes=11), ds)

    # A finished set: a rerun reuses every shard and changes nothing; other settings are refused.
    before = shard_hashes(out)
    r = invoke("prepare", "cifar10", "--root", str(tmp_path / "cifar"), "--out", str(out),
               "--items-per-shard", "4", "--workers", "0")  # fmt: skip
    assert r.exit_code == 0 and shard_hashes(out) == before
    r = invoke("prepare", "cifar10", "--root", str(tmp_path / "cifar"), "--out", str(out), "--workers", "0")
    assert r.exit_code == 2 and "items_per_shard" in r.output and shard_hashes(out) == before


def test_cifar10_missing_or_wrong_files_one_line(tmp_path):
    make_cifar10(tmp_path / "cifar")
    batches = tmp_path / "cifar" / "cifar-10-batches-py"
    out = tmp_path / "o"

    def run_it(root: Path):
        r = invoke("prepare", "cifar10", "--root", str(root), "--out", str(out), "--workers", "0")
        assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
        return r.output

    (batches / "data_batch_3").unlink()
    assert "data_batch_3" in run_it(tmp_path / "cifar")
    (batches / "data_batch_3").write_bytes(b"\x80\x02}q\x00")  # a truncated download
    assert "not a CIFAR-10 python batch" in run_it(tmp_path / "cifar")
    (batches / "data_batch_3").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    )
    assert "(n, 3072)" in run_it(batches)  # --root may also be cifar-10-batches-py itself
    assert "cifar-10-batches-py" in run_it(tmp_path)  # nothing there
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# CelebA


def test_celeba_matches_torchvision_and_trains(tmp_path):
    root = make_celeba(tmp_path / "celeba", n=5)
    Image.new("RGB", (100, 100)).save(root / "img_align_celeba" / "000006.jpg")  # not an aligned image
    out = tmp_path / "celeba64"
    r = invoke("prepare", "celeba", "--root", str(root), "--out", str(out), "--items-per-shard", "4",
               "--workers", "2")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "train: 5 items in 2 shards, 1 unreadable images skipped" in r.output
    got = read_split(out, "train")
    assert got["keys"] == [f"{i:06d}.jpg" for i in range(1, 6)] and got["y"] is None
    assert got["x"].shape == (5, 1, 3, 64, 64) and got["x"].dtype == np.uint8
    for j, key in enumerate(got["keys"]):
        np.testing.assert_array_equal(got["x"][j, 0], celeba_direct(root / "img_align_celeba" / key))
    m = got["manifest"]
    assert m["kind"] == "celeba" and m["conditioning"] == "none" and m["shape"] == [3, 64, 64]
    assert "178x218" in m["splits"]["train"]["skipped"][0]["reason"]

    # The exact check can fail: NEAREST, or bilinear without PIL's antialiasing, give other pixels.
    img = Image.open(root / "img_align_celeba" / "000001.jpg").convert("RGB").crop((25, 57, 153, 185))
    no_antialias = TF.resize(TF.pil_to_tensor(img), [64, 64], antialias=False).numpy()
    for other in (np.array(img.resize((64, 64), Image.NEAREST)).transpose(2, 0, 1), no_antialias):
        assert not np.array_equal(other, got["x"][0, 0])

    preset = tiny("celeba64_uvit_s4", out)
    assert preset.model.conditioning == "none"
    assert train(preset, tmp_path / "run").step == 1


def test_celeba_partition_and_errors(tmp_path):
    root = make_celeba(tmp_path / "celeba", n=6)
    (root / "list_eval_partition.txt").write_text(
        "000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n000004.jpg 2\n000005.jpg 0\n000006.jpg 2\n"
    )
    out = tmp_path / "celeba32"
    # --root one level up, as U-ViT's CelebA(root=...) (torchvision appends "celeba/")
    r = invoke("prepare", "celeba", "--root", str(tmp_path), "--out", str(out), "--workers", "0",
               "--resolution", "32")  # fmt: skip
    assert r.exit_code == 0, r.output
    splits = data.read_manifest(out)["splits"]
    assert {k: v["items"] for k, v in splits.items()} == {"train": 3, "val": 1, "test": 2}
    assert read_split(out, "test")["keys"] == ["000004.jpg", "000006.jpg"]
    np.testing.assert_array_equal(
        read_split(out, "val")["x"][0, 0], celeba_direct(root / "img_align_celeba" / "000003.jpg", 32)
    )
    # The partition names an image that is not there: refuse in one line, before writing anything.
    (root / "img_align_celeba" / "000006.jpg").unlink()
    r = invoke("prepare", "celeba", "--root", str(root), "--out", str(tmp_path / "p"), "--workers", "0")
    assert r.exit_code == 2 and "000006.jpg" in r.output and len(r.output.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    r = invoke("prepare", "celeba", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "p"))
    assert r.exit_code == 2 and "img_align_celeba" in r.output and not (tmp_path / "p").exists()


# --------------------------------------------------------------------------------------------------
# ImageNet 64 (pixels)


def test_imagenet64_pixels_match_adm_crop(tmp_path):
    root = make_imagenet(tmp_path / "imagenet")
    out = tmp_path / "imagenet64"
    r = invoke("prepare", "imagenet", "--root", str(root), "--space", "pixel", "--out", str(out),
               "--workers", "0", "--items-per-shard", "2")  # fmt: skip
    assert r.exit_code == 0, r.output
    got = read_split(out, "train")
    assert got["x"].shape == (3, 1, 3, 64, 64) and got["x"].dtype == np.uint8  # no stored flip
    assert got["y"].tolist() == [0, 0, 1]
    for j, key in enumerate(got["keys"]):
        want = adm_crop(Image.open(root / "train" / key).convert("RGB"), 64).transpose(2, 0, 1)
        np.testing.assert_array_equal(got["x"][j, 0], want)
    m = got["manifest"]
    assert m["kind"] == "imagenet64" and m["space"] == "pixel" and m["views"] == 1 and m["num_classes"] == 2
    assert m["encoders"] == {}
    ds = data.FeatureDataset(out)
    assert len(ds) == 3 and ds.z_shape == (3, 64, 64) and int(ds[2]["y"]) == 1
    check_data_fits(tiny("imagenet64_uvit_m4", out, num_classes=2), ds)
    r = invoke("prepare", "imagenet", "--root", str(root), "--space", "pixel", "--resolution", "256",
               "--out", str(tmp_path / "p"))  # fmt: skip
    assert r.exit_code == 2 and "pixels are 64" in r.output
