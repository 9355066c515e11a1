"""Plugins that must see every image read them block by block on a streamed run (images behind an
ImageRows, read from their source only where indexed): never the whole tensor, and the numbers of
the in-memory run."""
from __future__ import annotations

import importlib

import pytest
import torch

from uapx.image_sources import ImageRows, blocks, from_dataset


@pytest.fixture
def streamed(monkeypatch):
    """``rows(x, y)``: an ImageRows over the images whose whole-tensor fallback is an error."""
    def refuse(self):
        raise AssertionError("a plugin read every image at once")

    monkeypatch.setattr(ImageRows, "materialized", refuse)
    return lambda x, y: ImageRows(from_dataset(torch.utils.data.TensorDataset(x, y)))


def test_blocks_cover_the_rows_in_order_in_bounded_pieces():
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(10, 7)
    parts = list(blocks(x, 3))
    assert [p.shape[0] for p in parts] == [3, 3, 3, 1] and torch.equal(torch.cat(parts), x)
    big = torch.zeros(5, 3, 224, 224)  # 602,112 bytes a row: about 27 rows per 16 MB block
    assert next(blocks(big)).shape[0] == 5 and max(1, (16 << 20) // (4 * 3 * 224 * 224)) == 27


def test_interpretability_reads_streamed_images_in_blocks_with_the_in_memory_numbers(streamed, monkeypatch):
    mod = importlib.import_module("uapx_plugins.interpretability")
    import uapx.image_sources

    monkeypatch.setattr(uapx.image_sources, "BLOCK_BYTES", 4 * 36 * 7)  # 7 images a block: many blocks
    g = torch.Generator().manual_seed(3)
    x = torch.rand(50, 1, 6, 6, generator=g) * torch.linspace(0.1, 1, 36).reshape(1, 1, 6, 6)
    y = torch.arange(50) % 4
    rows = streamed(x, y)
    flat = x.reshape(50, -1).double()
    diffs = mod.class_mean_differences(rows, y)
    for c in range(4):  # against a plain NumPy-style recount
        torch.testing.assert_close(diffs[c], flat[y == c].mean(0) - flat.mean(0))
    exact = torch.linalg.svd(flat - flat.mean(0), full_matrices=False)[2][:5]
    for kw, tol in (({}, 1e-9), ({"max_gram_dim": 0}, 1e-3)):  # covariance; randomized (large images)
        basis = mod.principal_subspace(rows, 5, **kw)
        assert float(torch.linalg.svdvals(basis @ exact.T).min()) > 1 - tol  # the same 5-dim subspace
        torch.testing.assert_close(basis @ basis.T, torch.eye(5, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("name,settings", [("deepfool-uap", {"batch": 4, "passes": 2, "max_images": 30}),
                                           ("deepfool-uap", {"passes": 1, "max_images": 12}),
                                           ("sgd-uap", {"epochs": 2, "batch_size": 8}),
                                           ("sgd-uap", {"epochs": 1, "batch_size": 8, "per_class": True})])
def test_model_based_methods_give_the_in_memory_uaps_on_streamed_images(streamed, name, settings):
    """deepfool-uap and sgd-uap on an ImageRows (never read whole; per class through a lazy view)
    give the UAPs of the same images held as a tensor."""
    import uapx
    from uapx.analysis import MethodData

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3)).eval()
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(36, 1, 6, 6, generator=g), torch.arange(36) % 3
    pset = uapx.PerturbationSet(torch.zeros(36, 36), y, y, y, (1, 6, 6), 1.0)
    method = uapx.plugin(name)
    a = method(**settings)(pset, 1.0, data=MethodData(net, x, y, batch_size=10))
    b = method(**settings)(pset, 1.0, data=MethodData(net, streamed(x, y), y, batch_size=10))
    assert [u.name for u in a] == [u.name for u in b] and len(a) >= 1
    for ua, ub in zip(a, b):
        torch.testing.assert_close(ua.vector, ub.vector, rtol=1e-5, atol=1e-6)
        assert float(ua.vector.norm()) > 0


def test_subspace_basis_streams_an_on_disk_set(tmp_path, monkeypatch):
    """subspace's top-k basis from a perturbation set on disk, never loaded whole: the span of
    NumPy's top-k right singular vectors, by the exact route and by the randomized one."""
    import numpy as np

    import uapx
    import uapx.linalg

    s = importlib.import_module("uapx_plugins.subspace")
    g = torch.Generator().manual_seed(2)
    a = torch.randn(80, 6, generator=g) @ torch.randn(6, 50, generator=g) + 0.01 * torch.randn(80, 50, generator=g)
    y = torch.arange(80) % 2
    uapx.PerturbationSet(a, y, y, y, (2, 5, 5), 1.0).save(tmp_path / "set", chunk_size=16)
    pset = uapx.PerturbationSet.load(tmp_path / "set")

    def refuse(self):
        raise AssertionError("the whole matrix was loaded")

    monkeypatch.setattr(uapx.PerturbationSet, "matrix", refuse)
    ref = np.linalg.svd(a.double().numpy())[2][:4]
    for exact in (True, False):
        monkeypatch.setattr(s, "exact_svd_fits", lambda n, d, exact=exact: exact)
        basis = s.top_right_singular_vectors(pset, 4).double().numpy()
        assert np.linalg.svd(basis @ ref.T, compute_uv=False).min() > 1 - 1e-4
