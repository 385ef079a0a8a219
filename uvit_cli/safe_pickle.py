"""Reading pickles from data files without running their code.

`pickle.load` calls whatever a file names (`os.system`, `builtins.eval`, ...). The pickles this project
reads (CIFAR-10 batches, the official ImageNet feature files) hold only dicts, lists, strings, numbers and
numpy arrays, so this unpickler resolves exactly the numpy globals an array or scalar needs and refuses
every other global with `pickle.UnpicklingError`. Stdlib and numpy only.
"""

from __future__ import annotations

import pickle
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
