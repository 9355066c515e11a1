"""Labels in the model's output space: an ImageFolder holding some of ImageNet's classes read by a
1000-class model, and an explicit --class-index map; checked against torchvision's own ImageNet
metadata and a model that is right only when every label is."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import uapx.cli
import uapx.data
from uapx.class_index import imagenet_wnids, model_labels
from uapx.errors import UapxError

# three real ILSVRC-2012 wnids and the class names torchvision's Imagenette gives them
WNIDS = {"n01440764": "tench", "n02102040": "English springer", "n03888257": "parachute"}
LEVELS = (0.2, 0.5, 0.8)  # every image of the i-th class folder is this grey level


def _folder(root, classes, per_class=2, size=8):
    for c, level in zip(classes, LEVELS):
        d = root / "val" / c
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((size, size, 3), round(level * 255), dtype=np.uint8)).save(d / f"{i}.JPEG",
                                                                                               quality=100)
    return root


class Oracle(nn.Module):
    """Predicts output ``index[i]`` for images of grey level ``LEVELS[i]`` (and nothing else): right
    on every image exactly when the labels are the model's own indices."""

    def __init__(self, index: list[int], outputs: int) -> None:
        super().__init__()
        centres = torch.full((outputs,), 10.0)
        centres[torch.tensor(index)] = torch.tensor(LEVELS[:len(index)])
        self.register_buffer("centres", centres)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -100.0 * (x.mean((1, 2, 3))[:, None] - self.centres) ** 2


def _scripted(path, index, outputs):
    torch.jit.script(Oracle(index, outputs)).save(str(path))
    return str(path)


def test_the_shipped_wnid_list_is_imagenet_order_by_torchvision():
    """1000 unique sorted wnids; each Imagenette wnid sits at the index whose name torchvision's
    ImageNet weights give the same class (an independent source of both)."""
    from torchvision.datasets.imagenette import Imagenette
    from torchvision.models import ResNet18_Weights

    wnids = imagenet_wnids()
    assert len(wnids) == len(set(wnids)) == 1000 and list(wnids) == sorted(wnids)
    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    for wnid, names in Imagenette._WNID_TO_CLASS.items():
        assert categories[wnids.index(wnid)] == names[0], wnid


def test_wnid_subset_gets_imagenet_indices_end_to_end(tmp_path):
    """3 wnid folders (sorted-order labels 0, 1, 2) with a 1000-output model: analyze and apply use
    the ImageNet indices 0, 217, 701, so the oracle model is right on every image."""
    from torchvision.models import ResNet18_Weights

    root = _folder(tmp_path / "inet", list(WNIDS))
    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    truth = [categories.index(name) for name in WNIDS.values()]  # torchvision's indices of the three names
    assert truth == [0, 217, 701]
    images = uapx.data.load("imagefolder", "val", root)
    assert images.y.tolist() == [0, 0, 1, 1, 2, 2]  # torchvision ImageFolder's labels: wrong for the model
    mapped = model_labels(images, 1000, what="m")
    assert mapped.y.tolist() == [0, 0, 217, 217, 701, 701] and len(mapped.classes) == 1000
    assert [mapped.classes[i] for i in truth] == list(WNIDS)
    model = _scripted(tmp_path / "oracle.pt", truth, 1000)
    out = tmp_path / "rep"
    assert uapx.cli.main(["analyze", "--dataset", "imagefolder", "--data-root", str(root), "--model", model,
                          "--n-samples", "all", "--steps", "1", "--eps", "0.01", "--plugins", "average",
                          "--random-draws", "1", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    held = rep["data"].get("held_out", {}).get("n_images", 0)  # a held-out part of the sample, where drawn
    assert rep["attack"]["clean_accuracy"] == 1.0 and rep["data"]["n_images"] + held == 6
    res_file = tmp_path / "apply.json"
    assert uapx.cli.main(["apply", str(out / "uaps.pt"), "--dataset", "imagefolder", "--data-root", str(root),
                          "--model", model, "--random-draws", "1", "--out", str(res_file)]) == 0
    res = json.loads(res_file.read_text())
    assert res["clean_accuracy"] == 1.0 and res["n_images"] == 6


def test_explicit_class_index_and_its_errors(tmp_path):
    root = _folder(tmp_path / "own", ["cat", "dog", "fish"])
    index = {"cat": 7, "dog": 2, "fish": 4}
    (tmp_path / "index.json").write_text(json.dumps(index))
    model = _scripted(tmp_path / "oracle.pt", [7, 2, 4], 10)
    out = tmp_path / "rep"
    common = ["analyze", "--dataset", "imagefolder", "--data-root", str(root), "--model", model, "--n-samples",
              "all", "--steps", "1", "--eps", "0.01", "--plugins", "average", "--random-draws", "1"]
    assert uapx.cli.main([*common, "--class-index", str(tmp_path / "index.json"), "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["attack"]["clean_accuracy"] == 1.0
    assert uapx.cli.main([*common, "--out", str(tmp_path / "plain")]) == 0  # labels 0, 1, 2: the model disagrees
    assert json.loads((tmp_path / "plain" / "report.json").read_text())["attack"]["clean_accuracy"] == 0.0
    for extra, accuracy in ((["--class-index", str(tmp_path / "index.json")], 1.0), ([], 0.0)):  # apply too
        res_file = tmp_path / f"apply{len(extra)}.json"
        assert uapx.cli.main(["apply", str(out / "uaps.pt"), "--dataset", "imagefolder", "--data-root", str(root),
                              "--model", model, "--random-draws", "1", *extra, "--out", str(res_file)]) == 0
        assert json.loads(res_file.read_text())["clean_accuracy"] == accuracy

    images = uapx.data.load("imagefolder", "val", root)
    for bad, needle in [({"cat": 7, "dog": 2}, "class 'fish' of imagefolder is not in --class-index"),
                        ({**index, "fish": 10}, "maps 'fish' to 10, but model m has 10 outputs")]:
        with pytest.raises(UapxError, match=needle) as e:
            model_labels(images, 10, class_index=bad, what="m")
        assert "\n" not in str(e.value) and "; fix: " in str(e.value)
    for text, needle in [("[1, 2]", "not a non-empty JSON object"), ('{"cat": 1.5}', "not a whole number"),
                         ("{", "is not JSON")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(UapxError, match=needle):
            model_labels(images, 10, class_index=str(tmp_path / "bad.json"), what="m")


def test_wnid_like_folder_that_is_not_an_imagenet_class_is_one_line(tmp_path):
    images = uapx.data.load("imagefolder", "val", _folder(tmp_path, ["n01440764", "n99999999"]))
    with pytest.raises(UapxError, match="'n99999999' of imagefolder is not one of the 1000 ImageNet") as e:
        model_labels(images, 1000, what="m")
    assert "--class-index" in str(e.value).split("; fix: ")[1]
    same = model_labels(images, 10, what="m")  # not a 1000-class model: the folder's own order
    assert same.y.tolist() == images.y.tolist() and same.classes[:2] == images.classes
