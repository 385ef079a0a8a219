"""Reading pickles from data and weight files without running their code.

`pickle.load` calls whatever a file names (`os.system`, `builtins.eval`, ...). The pickles this project
reads as data (CIFAR-10 batches, the official ImageNet feature files) hold only dicts, lists, strings,
numbers and numpy arrays, so `load_numpy_pickle` resolves exactly the numpy globals an array or scalar
needs and refuses every other global with `pickle.UnpicklingError`. Torch files (.pth/.pt/.bin/.ckpt) go
through `torch_load_tensors`: torch's weights-only unpickler, with a refusal that names the offending
global and does not suggest turning the protection off.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import IO, Any

import numpy as np

# What a pickled numpy array (or numpy scalar) needs, under numpy 1 and numpy 2 module names.
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol 2 (Python 3) stores bytes, e.g. an array's buffer
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds plain containers and numpy arrays and refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core." + module[len("numpy.core.") :]  # numpy 1 names in files, numpy 2 here
        return super().find_class(module, name)


def load_numpy_pickle(f: IO[bytes], *, encoding: str = "ASCII") -> Any:
    """`pickle.load(f)` restricted to containers, scalars and numpy arrays (see the module docstring)."""
    return NumpyOnlyUnpickler(f, encoding=encoding).load()


def torch_load_tensors(path: str | os.PathLike[str], *, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU. A file that names any other global (code to run on
    load) raises `pickle.UnpicklingError` with a one-line reason; torch's own message advises
    `weights_only=False`, which would run that code."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise pickle.UnpicklingError(
            f"holds Python objects other than tensors{what}; refused, because loading them could run code "
            "from the file"
        ) from None
