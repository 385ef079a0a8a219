"""No reader in the package runs code from a file: each gets a pickle whose `__reduce__` would create a marker
file, and must refuse it with one line (naming neither `weights_only=False` nor any other way to turn the
protection off) while the marker stays absent."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from uvit_cli.errors import UvitError


class _Payload:
    """Unpickling this runs `exec`, which creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _refused(call, marker: Path) -> str:
    with pytest.raises(UvitError) as info:
        call()
    msg = str(info.value)
    assert not marker.exists(), "the file's code ran"
    assert "\n" not in msg.strip() and "weights_only" not in msg, msg
    return msg


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "code-ran"
    yield m
    assert not m.exists()


def _evil_object_npy(path: Path, marker: Path) -> None:
    np.save(path, np.array([_Payload(marker)], dtype=object), allow_pickle=True)


def test_the_payload_works_when_unpickled_plainly(tmp_path, marker):
    """The control: an unrestricted load does run it (so the refusals below are meaningful)."""
    other = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(other)))
    assert other.exists()


@pytest.mark.parametrize("name", ["data_batch_1", "batches.meta"])
def test_cifar10_batches(tmp_path, marker, name):
    from uvit_cli.prepare.pixel_sets import cifar10_classes, read_cifar10_batch

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    with open(d / name, "wb") as f:
        pickle.dump({b"data": _Payload(marker), b"labels": [0]}, f, protocol=2)
    if name == "batches.meta":
        (d / "data_batch_1").write_bytes(b"")
        msg = _refused(lambda: cifar10_classes(tmp_path), marker)
    else:
        msg = _refused(lambda: read_cifar10_batch(d / name), marker)
    assert "refusing to load __builtin__.exec" in msg and name in msg


def test_cifar10_batches_of_every_pickle_protocol_still_load(tmp_path):
    """The restriction keeps real batches readable: numpy arrays under protocols 2 (the published files), 4, 5."""
    from uvit_cli.prepare.pixel_sets import read_cifar10_batch

    rows = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    for protocol in (2, 4, 5):
        p = tmp_path / f"batch{protocol}"
        p.write_bytes(pickle.dumps({b"data": rows, b"labels": [3, 7]}, protocol=protocol))
        x, y = read_cifar10_batch(p)
        assert np.array_equal(x, rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)) and y.tolist() == [3, 7]


def test_official_feature_files(tmp_path, marker):
    from uvit_cli.prepare.official import load_official_npy

    _evil_object_npy(tmp_path / "0.npy", marker)
    _refused(lambda: load_official_npy(tmp_path / "0.npy"), marker)


def test_official_checkpoint_and_training_state(tmp_path, marker):
    from uvit_cli.checkpoint import load_state, load_weights

    torch.save({"pos_embed": torch.zeros(1), "x": _Payload(marker)}, tmp_path / "nnet_ema.pth")
    msg = _refused(lambda: load_weights(tmp_path / "nnet_ema.pth"), marker)
    assert "(exec)" in msg and "could run code" in msg
    torch.save({"step": 1, "rng": _Payload(marker)}, tmp_path / "state.pt")
    _refused(lambda: load_state(tmp_path / "state.pt"), marker)


def test_encoder_weights(tmp_path, marker):
    from uvit_cli.encoders import load_state_dict_file

    for name in ("autoencoder_kl.pth", "legacy.bin"):
        p = tmp_path / name
        torch.save({"w": _Payload(marker)}, p, _use_new_zipfile_serialization=name.endswith(".pth"))
        assert "(exec)" in _refused(lambda: load_state_dict_file(p), marker)


def test_inception_weights(tmp_path, marker):
    from uvit_cli.inception import load_inception

    torch.save({"Mixed_5b.x": _Payload(marker)}, tmp_path / "pt_inception.pth")
    _refused(lambda: load_inception(tmp_path / "pt_inception.pth"), marker)


def test_fid_reference_statistics(tmp_path, marker):
    from uvit_cli.fid.stats import load_ref_stats

    p = tmp_path / "ref.npz"
    np.savez(p, mu=np.array([_Payload(marker)], dtype=object), sigma=np.eye(1))
    _refused(lambda: load_ref_stats(p, dim=None), marker)


def test_prepared_shards(tmp_path, marker):
    from uvit_cli.data import FeatureDataset, write_arrays

    root = write_arrays(tmp_path / "set", np.zeros((4, 3, 8, 8), np.uint8), items_per_shard=2)
    x = next((root / "train").glob("*/x.npy"))
    _evil_object_npy(x, marker)
    _refused(lambda: FeatureDataset(root)[0], marker)
