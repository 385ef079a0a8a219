import os

import pytest

# Keep tests deterministic and light on the 2-core CI machine (set before torch is imported).
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny ops: one thread is fastest on 2 cores


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread for every test module, whatever OMP_NUM_THREADS says: tiny models gain nothing
    from more, and on a busy 2-core machine OpenMP threads waiting for each other make a step ~30x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A tiny class-conditional pixel set (train_fixtures.write_pixel_set), one per test module."""
    from train_fixtures import write_pixel_set

    return write_pixel_set(tmp_path_factory.mktemp("data") / "px")
