"""Labels in the model's output space: ImageNet wnids and explicit ``{class name: index}`` maps.

An ImageFolder names its classes by its sub-folders and numbers them 0..C-1 in sorted order
(torchvision's ``ImageFolder``).  That is the model's numbering only when the folder holds every
class the model was trained on.  A folder with a subset of ImageNet's classes (``val/<wnid>/*``
with, say, 10 wnids) read by a 1000-class ImageNet model needs each wnid's ImageNet index
instead; :func:`model_labels` does that by itself, and takes an explicit map (``--class-index
FILE``, JSON ``{class_name: index}``) for any other label space.

The ImageNet index of a wnid is its position in the sorted list of the 1000 ILSVRC-2012 synsets
(the order of ``LOC_synset_mapping.txt`` and of torchvision's and timm's ImageNet weights).  The
list ships with uapx (``uapx/_data/imagenet_wnids.txt``, copied from timm 1.0.31's
``timm/data/_info/imagenet_synsets.txt``, Apache-2.0); nothing is downloaded.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import UapxError

IMAGENET_WNIDS_FILE = Path(__file__).with_name("_data") / "imagenet_wnids.txt"
IMAGENET_CLASSES = 1000
WNID = re.compile(r"n\d{8}")


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 wnids in ImageNet index order (sorted): ``imagenet_wnids()[i]`` is class i."""
    return tuple(IMAGENET_WNIDS_FILE.read_text().split())


def read_class_index(path: str | Path) -> dict[str, int]:
    """A ``--class-index`` file: a JSON object ``{class_name: index}`` with whole indices >= 0."""
    fix = 'write a JSON object of class names to whole-number indices, e.g. {"n01440764": 0, "n01443537": 1}'
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UapxError(f"cannot read --class-index {str(path)!r}: {exc.strerror or exc}",
                        "pass a readable JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UapxError(f"--class-index {str(path)!r} is not JSON ({exc})", fix) from None
    if not isinstance(raw, dict) or not raw:
        raise UapxError(f"--class-index {str(path)!r} holds a {type(raw).__name__}, not a non-empty JSON object",
                        fix)
    bad = [(k, v) for k, v in raw.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise UapxError(f"--class-index {str(path)!r} maps {bad[0][0]!r} to {bad[0][1]!r}, not a whole number >= 0",
                        fix)
    return dict(raw)


def model_labels(images: Any, outputs: int, *, class_index: Mapping[str, int] | str | Path | None = None,
                 what: str) -> Any:
    """``images`` (an :class:`~uapx.data.ImageSet`) with labels in the model's output space and
    ``classes`` of length ``outputs`` (names of the classes the data lacks: the wnid, or the index).

    - ``class_index`` (a map or a ``--class-index`` file): label of class ``name`` is ``class_index[name]``.
    - else, when the model has 1000 outputs and the class names are ImageNet wnids: the wnid's
      ImageNet index (:func:`imagenet_wnids`).
    - else the data's own labels 0..C-1, which need ``outputs >= C``.

    Raises:
        UapxError: a class the map lacks, an index the model cannot output, a wnid-like name that is
            not an ImageNet class, or fewer outputs than classes.
    """
    classes = list(images.classes)
    names: list[str] = [str(i) for i in range(outputs)]
    if class_index is not None:
        where = "--class-index"
        if not isinstance(class_index, Mapping):
            where = f"--class-index {str(class_index)!r}"
            class_index = read_class_index(class_index)
        missing = [c for c in classes if c not in class_index]
        if missing:
            raise UapxError(f"class {missing[0]!r} of {images.name} is not in {where} "
                            f"({len(missing)} of {len(classes)} classes missing)",
                            f"add every class folder name to {where}")
        index = [int(class_index[c]) for c in classes]
        for c, i in zip(classes, index):
            if i >= outputs:
                raise UapxError(f"{where} maps {c!r} to {i}, but model {what} has {outputs} outputs (0..{outputs - 1})",
                                f"give indices below {outputs}, or pass the model this label space belongs to")
    elif outputs == IMAGENET_CLASSES and any(WNID.fullmatch(c) for c in classes):
        wnids = imagenet_wnids()
        position = {w: i for i, w in enumerate(wnids)}
        unknown = [c for c in classes if c not in position]
        if unknown:
            raise UapxError(f"class folder {unknown[0]!r} of {images.name} is not one of the 1000 ImageNet "
                            f"(ILSVRC-2012) wnids ({len(unknown)} of {len(classes)} are not)",
                            "keep only ImageNet class folders, or pass --class-index FILE mapping each folder "
                            "name to the model's output index")
        index = [position[c] for c in classes]
        names = list(wnids)
    else:
        if outputs < len(classes):
            raise UapxError(f"model {what} has {outputs} outputs but {images.name} has {len(classes)} classes",
                            f"pass a model with {len(classes)} outputs, or --class-index FILE mapping the "
                            f"class names to its outputs")
        index = list(range(len(classes)))
    for c, i in zip(classes, index):
        names[i] = c
    lut = torch.tensor(index, dtype=torch.int64)
    return replace(images, y=lut[images.y], classes=names)
