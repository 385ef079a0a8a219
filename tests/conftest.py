import os

import pytest

# Keep tests deterministic and light on the 2-core CI machine (set before torch is imported).
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny ops: one thread is fastest on 2 cores


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
