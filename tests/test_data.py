"""Shard format and reader: round trips, caption choice, fp16 error, atomic shards, sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from uvit_cli import data
from uvit_cli.errors import DataError


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 4, 4), dtype=np.uint8)


def _text_set(tmp_path, n=9, per_shard=4):
    rng = np.random.default_rng(1)
    counts = [5, 6, 7, 5, 5, 1, 5, 6, 5][:n]
    contexts = [rng.standard_normal((c, 77, 16)).astype(np.float32) for c in counts]
    moments = rng.standard_normal((n, 8, 2, 2)).astype(np.float32)
    empty = rng.standard_normal((77, 16)).astype(np.float32)
    data.write_arrays(
        tmp_path,
        moments,
        space="latent",
        contexts=contexts,
        empty_context=empty,
        items_per_shard=per_shard,
        dtype="float32",
    )
    return moments, contexts, empty


def test_pixel_class_round_trip_across_shards(tmp_path):
    x = _pixels(7)
    y = np.array([0, 2, 1, 2, 0, 1, 1])
    data.write_arrays(tmp_path, x, y=y, items_per_shard=3)
    ds = data.FeatureDataset(tmp_path)
    assert len(ds) == 7 and ds.space == "pixel" and ds.conditioning == "class"
    assert ds.num_classes == 3 and ds.null_class == 3 and ds.shape == (3, 4, 4) == ds.z_shape
    assert data.list_shards(tmp_path / "train") == [0, 1, 2]
    for i in range(7):
        item = ds[i]
        assert item["x"].dtype == torch.float32 and item["y"].dtype == torch.int64
        torch.testing.assert_close(
            item["x"], torch.from_numpy(x[i].astype(np.float32)) / 127.5 - 1, rtol=0, atol=0
        )
        assert int(item["y"]) == y[i]
    assert float(ds[0]["x"].min()) >= -1 and float(ds[0]["x"].max()) <= 1
    with pytest.raises(IndexError):
        ds[7]


def test_latent_views_count_twice(tmp_path):
    m = np.random.default_rng(0).standard_normal((5, 2, 8, 2, 2)).astype(np.float32)
    data.write_arrays(tmp_path, m, space="latent", y=np.arange(5), num_classes=1000, items_per_shard=2)
    ds = data.FeatureDataset(tmp_path)
    assert len(ds) == 10 and ds.views == 2 and ds.num_classes == 1000 and ds.null_class == 1000
    assert ds.shape == (8, 2, 2) and ds.z_shape == (4, 2, 2)
    for i in range(10):
        np.testing.assert_allclose(ds[i]["x"].numpy(), m[i // 2, i % 2], rtol=2**-11)
        assert int(ds[i]["y"]) == i // 2


def test_text_contexts_offsets_and_empty_context(tmp_path):
    moments, contexts, empty = _text_set(tmp_path)
    ds = data.FeatureDataset(tmp_path, seed=3)
    assert ds.conditioning == "text" and ds.num_classes == 0 and "y" not in ds[0]
    torch.testing.assert_close(ds.empty_context, torch.from_numpy(empty))
    for i in range(len(ds)):
        k = ds.caption_index(i)
        assert ds.num_captions(i) == len(contexts[i])
        torch.testing.assert_close(ds[i]["context"], torch.from_numpy(contexts[i][k]), rtol=0, atol=0)
        torch.testing.assert_close(ds[i]["x"], torch.from_numpy(moments[i]), rtol=0, atol=0)


def test_caption_choice_deterministic_and_epoch_dependent(tmp_path):
    _, contexts, _ = _text_set(tmp_path)
    a = data.FeatureDataset(tmp_path, seed=7)
    b = data.FeatureDataset(tmp_path, seed=7)
    picks = {}
    for epoch in range(20):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        picks[epoch] = [a.caption_index(i) for i in range(len(a))]
        assert picks[epoch] == [b.caption_index(i) for i in range(len(b))]
        # (index, epoch) keys give the same answer whatever the current epoch
        b.set_epoch(999)
        for i in range(len(a)):
            torch.testing.assert_close(a[i]["context"], b[(i, epoch)]["context"], rtol=0, atol=0)
    # the pick changes across epochs and covers every caption of an item
    assert len({tuple(p) for p in picks.values()}) > 10
    assert {picks[e][2] for e in picks} == set(range(7))
    assert all(picks[e][5] == 0 for e in picks)  # single caption
    # a different seed gives a different sequence
    c = data.FeatureDataset(tmp_path, seed=8)
    assert [c.caption_index(i, 0) for i in range(len(c))] != picks[0] or [
        c.caption_index(i, 1) for i in range(len(c))
    ] != picks[1]


def test_caption_choice_is_uniform():
    counts = np.bincount([data.choose(0, e, i, 5) for e in range(200) for i in range(100)], minlength=5)
    assert counts.min() > 0.18 * 20000 and counts.max() < 0.22 * 20000


def test_dataloader_workers_match_in_process(tmp_path):
    _text_set(tmp_path)
    ds = data.FeatureDataset(tmp_path, seed=1)
    ds.set_epoch(4)
    ref = data.collate([ds[i] for i in range(len(ds))])
    dl = torch.utils.data.DataLoader(ds, batch_size=len(ds), num_workers=2, collate_fn=data.collate)
    got = next(iter(dl))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)


def test_fp16_storage_error_bound():
    # realistic magnitudes: SD-VAE moments (mean std ~5.5 up to ~40, logvar in [-22, -4]) and CLIP
    # hidden states (mostly |v| < 3, a few outlier channels near 30)
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((64, 4, 32, 32)).astype(np.float32) * 5.5
    logvar = rng.uniform(-22, -4, (64, 4, 32, 32)).astype(np.float32)
    ctx = rng.standard_normal((64, 77, 768)).astype(np.float32)
    ctx[:, :, 7] *= 10
    for a in (np.concatenate([mean, logvar], 1), ctx):
        back = data.to_storage(a, "float16").astype(np.float32)
        err = np.abs(back - a)
        normal = np.abs(a) >= 2**-14
        assert (err[normal] / np.abs(a[normal])).max() <= 2**-11  # round to nearest: half an ulp
        assert err.max() <= np.abs(a).max() * 2**-11
        assert err[~normal].max(initial=0) <= 2**-25
    assert data.to_storage(mean, "float32").dtype == np.float32


def test_fp16_refuses_out_of_range():
    with pytest.raises(DataError, match="float32"):
        data.to_storage(np.array([7e4], np.float32), "float16")
    with pytest.raises(DataError, match="NaN"):
        data.to_storage(np.array([np.nan], np.float32), "float16")


def test_shard_written_atomically(tmp_path, monkeypatch):
    split = tmp_path / "train"
    split.mkdir()
    sd = data.ShardData(
        x=_pixels(2)[:, None], keys=["a", "b"], sources=3, skipped=[{"key": "c", "reason": "x"}]
    )
    # a crash while writing leaves only a temporary, which the reader never lists
    from uvit_cli.data import format as shard_format

    real_write = shard_format.write_npy

    def boom(f, arr):
        real_write(f, arr)
        raise KeyboardInterrupt

    monkeypatch.setattr(shard_format, "write_npy", boom)
    with pytest.raises(KeyboardInterrupt):
        data.write_shard(split, 0, sd, "fp")
    monkeypatch.setattr(shard_format, "write_npy", real_write)
    assert data.list_shards(split) == [] and data.read_shard_meta(split, 0) is None
    assert list(split.iterdir()) == []
    # a hard kill leaves a temporary: never listed as a shard, removed at the next start
    (split / ".tmp-shard-00000-123").mkdir()
    (split / ".tmp-shard-00000-123" / "x.npy").write_bytes(b"partial")
    assert data.list_shards(split) == []
    assert data.remove_temporaries(split) == 1 and list(split.iterdir()) == []
    meta = data.write_shard(split, 0, sd, "fp")
    assert data.list_shards(split) == [0] and meta == data.read_shard_meta(split, 0)
    assert meta["count"] == 2 and meta["sources"] == 3 and meta["skipped"][0]["key"] == "c"
    assert set(meta["sha256"]) == {"x.npy", "items.json"}
    assert np.load(split / "shard-00000" / "x.npy", mmap_mode="r").shape == (2, 1, 3, 4, 4)


def test_verify_detects_modification(tmp_path):
    data.write_arrays(tmp_path, _pixels(5), items_per_shard=2)
    assert data.verify(tmp_path) == {"train": 6}
    arr = np.load(tmp_path / "train" / "shard-00001" / "x.npy")
    arr[0, 0, 0, 0, 0] ^= 1
    np.save(tmp_path / "train" / "shard-00001" / "x.npy", arr)
    with pytest.raises(DataError, match="shard-00001"):
        data.verify(tmp_path)


def test_reader_errors(tmp_path):
    with pytest.raises(DataError, match="prepare"):
        data.FeatureDataset(tmp_path)
    data.write_arrays(tmp_path, _pixels(3))
    with pytest.raises(DataError, match="no 'val' split"):
        data.FeatureDataset(tmp_path, split="val")
    with pytest.raises(DataError, match="not a text"):
        _ = data.FeatureDataset(tmp_path).empty_context
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["splits"]["train"]["complete"] = False
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="incomplete"):
        data.FeatureDataset(tmp_path)


def test_open_shards_are_bounded(tmp_path):
    data.write_arrays(tmp_path, _pixels(10), items_per_shard=1)
    ds = data.FeatureDataset(tmp_path, max_open_shards=3)
    for i in range(10):
        ds[i]
    assert len(ds._open) == 3


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sampler_global_batches_independent_of_world_size(world):
    ref = list(data.ResumableSampler(37, 8, seed=5))
    assert len(ref) == 32 and len(set(ref)) == 32
    shards = [list(data.ResumableSampler(37, 8, seed=5, rank=r, world_size=world)) for r in range(world)]
    per = 8 // world
    for b in range(4):
        glob = [i for s in shards for i in s[b * per : (b + 1) * per]]
        assert glob == ref[b * 8 : (b + 1) * 8]


def test_sampler_resume_and_epochs():
    s = data.ResumableSampler(40, 8, seed=1, with_epoch=True)
    s.set_epoch(3)
    full = list(s)
    assert all(e == 3 for _, e in full)
    s.set_epoch(3, start_batch=2)
    assert list(s) == full[16:] and len(s) == 24
    s.set_epoch(4)
    assert [i for i, _ in s] != [i for i, _ in full]
    with pytest.raises(DataError):
        data.ResumableSampler(40, 6, world_size=4)
