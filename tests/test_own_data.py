"""The user's own images: ImageFolder trees at any size, torch Datasets, streamed analyses, and an
ImageNet-size run end to end; each against torchvision / plain PyTorch references."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms

import uapx
import uapx.cli
import uapx.data
import uapx.linalg
import uapx.pipeline
from uapx.errors import UapxError
from uapx.image_sources import ImageRows, from_dataset


def _tree(root, classes=("n01440764", "n01443537"), per_class=3, split="val", size=None, seed=0, suffix=".JPEG"):
    """An ImageFolder tree of random RGB images (random sizes unless ``size``)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        d = root / split / c if split else root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = size or (int(rng.integers(40, 70)), int(rng.integers(40, 80)))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"img{i}{suffix}")
    return root


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and "; fix: " in msg
    return msg


def test_imagefolder_matches_torchvision_imagefolder_with_resize_and_crop(tmp_path):
    root = _tree(tmp_path, classes=("a", "b", "c"), per_class=2, split="val")
    images = uapx.data.load("imagefolder", "test", tmp_path, image_size=32)  # test falls back to val/
    ref = torchvision.datasets.ImageFolder(str(root / "val"), transform=transforms.Compose(
        [transforms.Resize(32), transforms.CenterCrop(32), transforms.PILToTensor()]))
    assert images.classes == ref.classes and images.split == "val" and len(images) == len(ref) == 6
    assert images.shape == (3, 32, 32)
    x = images.images()
    for i, (img, label) in enumerate(ref):
        assert int(images.y[i]) == label
        torch.testing.assert_close(x[i], img.float() / 255)
    sub = images.subset(4, seed=1)  # a view of 4 files: nothing decoded until asked
    torch.testing.assert_close(sub.images(), x[sub.indices])


def test_single_split_tree_at_native_size_and_size_mismatch(tmp_path):
    _tree(tmp_path, classes=("x", "y"), per_class=2, split=None, size=(20, 24), suffix=".png")
    images = uapx.data.load("imagefolder", "train", tmp_path)
    assert images.shape == (3, 20, 24) and images.y.tolist() == [0, 0, 1, 1]
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(tmp_path / "x" / "odd.png")
    with pytest.raises(UapxError) as e:
        uapx.data.load("imagefolder", "train", tmp_path)
    assert "--image-size" in _one_line(e)


def test_undecodable_image_is_named_in_one_line(tmp_path):
    _tree(tmp_path, per_class=2)
    bad = tmp_path / "val" / "n01440764" / "broken.JPEG"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(UapxError) as e:
        uapx.data.load("imagefolder", "val", tmp_path, image_size=16)
    assert str(bad) in _one_line(e)
    kept = uapx.data.load("imagefolder", "val", tmp_path, image_size=16, skip_unreadable=True)
    assert len(kept) == 4 and kept.skipped == [str(bad)]
    code = uapx.cli.main(["analyze", "--dataset", "imagefolder", "--data-root", str(tmp_path), "--image-size", "16"])
    assert code == 2


def test_image_size_needs_imagefolder():
    with pytest.raises(UapxError) as e:
        uapx.data.load("mnist", "test", image_size=32)
    assert "imagefolder" in _one_line(e)


_Tensors = torch.utils.data.TensorDataset  # (image, label) pairs of two tensors


def test_dataset_adapter_and_image_rows():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(10, 1, 6, 6, generator=g), torch.arange(10) % 3
    images = from_dataset(_Tensors(x, y))
    assert images.classes == ["0", "1", "2"] and torch.equal(images.y, y)
    rows = ImageRows(images)
    assert rows.shape == (10, 1, 6, 6) and len(rows) == 10
    torch.testing.assert_close(rows[2:5], x[2:5])
    torch.testing.assert_close(rows[torch.tensor([7, 1])], x[[7, 1]])
    torch.testing.assert_close(rows[y == 1], x[y == 1])
    torch.testing.assert_close(torch.cat(list(rows.chunks(4))), x)


def test_python_api_takes_a_module_and_a_dataset(tmp_path):
    """analyze(config, model=..., data=...): the number of classes comes from the model (5 outputs
    for 3 labelled classes here), and the fooling rates are those of a plain-PyTorch recount."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(40, 1, 8, 8, generator=g), torch.arange(40) % 3
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    cfg = uapx.AnalyzeConfig(plugins=["average"], steps=3, eps=1.0, random_draws=2, out=str(tmp_path / "r"),
                             eval_precision="float32")
    res = uapx.analyze(cfg, model=net, data=_Tensors(x, y))
    # one data set: the sample is halved, the UAPs fitted on 20 images and judged on the other 20
    assert res.analysis.num_classes == 5 and res.report["data"]["n_images"] == 20
    held = res.analysis.heldout
    assert held.n_images == 20 and held.protocol == "sample"
    fit_rows = {tuple(r.flatten().tolist()) for r in res.analysis.x}
    assert not fit_rows & {tuple(r.flatten().tolist()) for r in held.x}  # disjoint
    uap = next(u for u in res.analysis.uaps if u.name == "average")
    for xs, figures in ((res.analysis.x, res.report["uaps"]["evaluations"]),
                        (held.x, res.report["uaps"]["held_out"]["evaluations"])):
        with torch.no_grad():
            clean = net(xs).argmax(1)
            fooled = (net((xs + uap.vector).clamp(0, 1)).argmax(1) != clean).double().mean()
        assert figures["average"]["plus"]["fooling_rate"] == pytest.approx(float(fooled))
    with pytest.raises(UapxError) as e:  # more labelled classes than outputs: refused before any work
        uapx.analyze(replace(cfg, out=str(tmp_path / "r2")), model=nn.Sequential(nn.Flatten(), nn.Linear(64, 2)),
                     data=_Tensors(x, y))
    assert "has 2 outputs" in _one_line(e)


def test_streamed_run_gives_the_in_memory_numbers(tmp_path, monkeypatch):
    """With a small IN_MEMORY_BYTES the run streams (images read in chunks of 15, perturbations on disk):
    the UAPs, their evaluations and the spectrum are those of the in-memory run."""
    common = dict(plugins=["average", "rsvd", "spectrum"], n_samples=120, steps=2, random_draws=2, k=2,
                  eval_precision="float32")
    mem = uapx.analyze(**common, out=str(tmp_path / "mem"))
    assert mem.analysis.pset.deltas is not None
    # the fit half of the sample, 60 x 784 float32 rows, is 188,160 bytes (and so are the 60 held-out images)
    monkeypatch.setattr(uapx.pipeline, "IN_MEMORY_BYTES", 100_000)
    disk = uapx.analyze(**common, out=str(tmp_path / "disk"))
    assert disk.analysis.pset.deltas is None and isinstance(disk.analysis.x, ImageRows)
    assert isinstance(disk.analysis.heldout.x, ImageRows)
    assert not list(tmp_path.glob(".disk.tmp-scratch-*"))  # the scratch set is removed afterwards
    for a, b in zip(mem.analysis.uaps, disk.analysis.uaps):
        assert a.name == b.name
        torch.testing.assert_close(a.vector, b.vector, rtol=1e-4, atol=1e-6)
    ea, eb = mem.report["uaps"]["evaluations"], disk.report["uaps"]["evaluations"]
    assert {k: v["fooling_rate"] for k, v in ea.items()} == {k: v["fooling_rate"] for k, v in eb.items()}
    ha, hb = mem.report["uaps"]["held_out"]["evaluations"], disk.report["uaps"]["held_out"]["evaluations"]
    assert {k: v["fooling_rate"] for k, v in ha.items()} == {k: v["fooling_rate"] for k, v in hb.items()}
    sa = mem.report["diagnostics"]["spectrum"]["global"]["singular_values"]
    sb = disk.report["diagnostics"]["spectrum"]["global"]["singular_values"]
    np.testing.assert_allclose(sa, sb, rtol=1e-4)


def test_svd_refuses_and_spectrum_goes_randomized_beyond_the_exact_limit(monkeypatch):
    """Where the exact SVD does not fit, svd is a one-line error suggesting rsvd and spectrum
    reports the top singular values by randomized SVD, which match NumPy's on a low-rank matrix."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(60, 4, generator=g) @ torch.randn(4, 300, generator=g) * torch.tensor([5.0, 3, 2, 1]).repeat(75)
    pset = uapx.PerturbationSet(a, torch.arange(60) % 2, torch.zeros(60, dtype=torch.long),
                                             torch.zeros(60, dtype=torch.long), (3, 10, 10), 1.0)
    monkeypatch.setattr(uapx.linalg, "GRAM_MAX_DIM", 100)
    monkeypatch.setattr(uapx.linalg, "EXACT_MAX_BYTES", 0)
    with pytest.raises(UapxError) as e:
        uapx.plugin("svd")(k=2)(pset, 1.0)
    assert "rsvd" in _one_line(e)
    spectrum = uapx.plugin("spectrum")(top=4)
    figs = spectrum._one(pset)
    assert figs["solver"] == "randomized" and figs["effective_rank"] is None
    np.testing.assert_allclose(figs["singular_values"], np.linalg.svd(a.double().numpy(), compute_uv=False)[:4],
                               rtol=1e-6)


@pytest.mark.slow
def test_imagenet_size_end_to_end(tmp_path):
    """224 x 224 images from a generated ImageFolder (ImageNet's val/<wnid>/*.JPEG layout, random
    sizes resized and centre-cropped), a torchvision ResNet-18 built by its factory with random
    weights from a file, ImageNet normalisation, 2 PGD steps."""
    _tree(tmp_path / "imagenet", per_class=3)
    for p in (tmp_path / "imagenet" / "val").rglob("*.JPEG"):  # larger than 224 on both sides
        Image.open(p).resize((260, 300)).save(p)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=2)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "rep"
    code = uapx.cli.main(["analyze", "--dataset", "imagefolder", "--data-root", str(tmp_path / "imagenet"),
                          "--image-size", "224", "--model", "torchvision.models:resnet18", "--model-args",
                          "num_classes=2", "--weights", str(tmp_path / "w.pt"), "--normalize", "imagenet",
                          "--steps", "2", "--plugins", "average,rsvd,spectrum", "--k", "2", "--random-draws", "1",
                          "--n-samples", "all", "--eval-precision", "float32", "--out", str(out)])
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"]["shape"] == [3, 224, 224] and rep["data"]["n_images"] == 3  # and 3 held out
    assert rep["uaps"]["held_out"]["n_images"] == 3 and rep["uaps"]["held_out"]["protocol"] == "sample"
    assert rep["model"]["format"] == "factory" and rep["model"]["normalize"]["std"] == [0.229, 0.224, 0.225]
    uaps = torch.load(out / "uaps.pt", weights_only=False)["uaps"]
    assert all(tuple(u["vector"].shape) == (3, 224, 224) for u in uaps)
    rsvd = [u for u in uaps if u["name"] == "rsvd:v1"][0]
    assert rsvd["meta"]["singular_value"] > 0
    assert len(rep["diagnostics"]["spectrum"]["global"]["singular_values"]) >= 2
    fooling = rep["uaps"]["evaluations"]["rsvd:v1"]["fooling_rate"]
    assert 0.0 <= fooling <= 1.0
