"""Data loading on real MNIST and CIFAR-10, in every supported layout, and its errors."""
from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch

from uapx import data
from uapx.errors import UapxError


def test_embedded_mnist_is_the_real_test_split(data_root):
    emb = data.load("mnist", "test")
    assert emb.source == "embedded MNIST test split"
    real = data.load("mnist", "test", data_root)
    assert real.source.endswith("MNIST/raw")
    assert torch.equal(emb.x, real.x) and torch.equal(emb.y, real.y)
    assert emb.x.shape == (10000, 1, 28, 28) and emb.x.dtype == torch.uint8
    assert torch.bincount(emb.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_train_split_and_env_root(data_root, monkeypatch):
    monkeypatch.setenv("UAPX_DATA_ROOT", str(data_root))
    train = data.load("mnist", "train")
    assert len(train) == 60000 and train.images(slice(0, 5)).max() <= 1.0


def test_cifar10_image_folder(data_root):
    test = data.load("cifar10", "test", data_root)
    assert test.x.shape == (10000, 3, 32, 32)
    assert torch.bincount(test.y).tolist() == [1000] * 10
    assert test.classes[0] == "airplane" and test.classes[9] == "truck"
    # a natural image set: mean intensity near CIFAR-10's (0.47), not blank or noise
    assert 0.4 < float(test.images().mean()) < 0.55


def test_cifar10_official_pickles(data_root, tmp_path):
    """The official cifar-10-batches-py layout, written here from the real images."""
    jpeg = data.load("cifar10", "test", data_root)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": jpeg.x.reshape(10000, -1).numpy(), "labels": jpeg.y.tolist()}, f)
    off = data.load("cifar10", "test", tmp_path)
    assert torch.equal(off.x, jpeg.x) and torch.equal(off.y, jpeg.y)
    with pytest.raises(UapxError, match="data_batch_1 is missing"):
        data.load("cifar10", "train", tmp_path)


def test_missing_data_names_the_folders_looked_in(tmp_path):
    with pytest.raises(UapxError) as exc:
        data.load("cifar10", "test", tmp_path)
    msg = str(exc.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and str(tmp_path / "cifar10-jpeg" / "test") in msg
    # the fix names how to get the files with what a user has (torchvision), nothing outside the package
    assert "torchvision.datasets.CIFAR10(ROOT, download=True)" in msg and "shared/" not in msg and "\n" not in msg
    with pytest.raises(UapxError, match="MNIST/raw"):
        data.load("mnist", "train", tmp_path)


def test_partial_and_damaged_layouts(data_root, tmp_path):
    (tmp_path / "cifar10-jpeg" / "test" / "airplane").mkdir(parents=True)
    with pytest.raises(UapxError, match="class folders"):
        data.load("cifar10", "test", tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    src = data_root / "MNIST" / "raw"
    shutil.copy(src / "t10k-labels-idx1-ubyte", raw)
    (raw / "t10k-images-idx3-ubyte").write_bytes((src / "t10k-images-idx3-ubyte").read_bytes()[:5000])
    with pytest.raises(UapxError, match="truncated"):
        data.load("mnist", "test", tmp_path)


def test_subset_is_seeded_and_bounded():
    ds = data.load("mnist", "test")
    a, b, c = ds.subset(100, seed=1), ds.subset(100, seed=1), ds.subset(100, seed=2)
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    assert torch.equal(a.x, ds.x[a.indices]) and len(set(a.indices.tolist())) == 100
    assert not np.all(np.diff(a.indices.numpy()) > 0)  # random order, never sorted by position or class
    with pytest.raises(UapxError, match="between 1 and 10000"):
        ds.subset(10001)
