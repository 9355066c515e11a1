"""Data sets: MNIST and CIFAR-10 from a data root, and the embedded default.

Images come out as ``uint8`` tensors ``(N, C, H, W)``; :meth:`ImageSet.images` converts to float
in [0, 1].  Normalisation belongs to the model, never to the data.

Data roots, in order: the ``root`` argument (``--data-root``), ``$UAPX_DATA_ROOT``, then
``~/.cache/uapx/data``.  Layouts read under a root:

- MNIST: ``MNIST/raw/*-ubyte`` (torchvision's layout; ``.gz`` files are read too).
- CIFAR-10: ``cifar-10-batches-py/`` (the official Python pickles) or an ImageFolder tree
  ``cifar10-jpeg/{train,test}/<class>/*.jpg``.
- ``imagefolder``: any ImageFolder tree ``DIR/{train,val,test}/<class>/*`` or ``DIR/<class>/*``
  (``--data-root DIR``; ImageNet's ``val/<wnid>/*.JPEG`` as is), read on demand at its own size or
  resized and centre-cropped to ``image_size`` (:func:`uapx.image_sources.image_folder`).  Any
  ``torch.utils.data.Dataset`` of ``(image, label)`` becomes an ImageSet through
  :func:`uapx.image_sources.from_dataset`.

The MNIST test split (10,000 images) is embedded in the package, so ``uapx analyze`` works
offline with no arguments.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .errors import SplitNotFound, UapxError

DATASETS = ("mnist", "cifar10", "imagefolder")
SPLITS = ("train", "test")
MNIST_CLASSES = [str(i) for i in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
EMBEDDED_MNIST = Path(__file__).with_name("_data") / "mnist"
_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
HOW_TO_GET = ("put the official files there (torchvision's MNIST/raw or cifar-10-batches-py layout), e.g. "
              "with torchvision.datasets.MNIST(ROOT, download=True) or torchvision.datasets.CIFAR10(ROOT, "
              "download=True) on a machine with network access, and pass --data-root ROOT or set UAPX_DATA_ROOT")


@dataclass
class ImageSet:
    """A labelled image set held in memory as ``uint8``.

    Attributes:
        x: ``(N, C, H, W)`` uint8 images, or a :class:`~uapx.image_sources.LazyImages` view of
            files or a Dataset read on demand (``images()`` reads either as float).
        y: ``(N,)`` int64 labels.
        classes: class names, indexed by label.
        name, split, source: what it is and where it was read from.
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    name: str
    split: str
    source: str
    indices: torch.Tensor | None = field(default=None, repr=False)
    skipped: list[str] = field(default_factory=list, repr=False)  # unreadable files left out (skip_unreadable)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        return (f"ImageSet({self.name!r}, split={self.split!r}, n={len(self)}, shape={self.shape}, "
                f"{len(self.classes)} classes, source={self.source!r})")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def skipped_record(self, listed: int = 20) -> dict:
        """What ``skip_unreadable`` left out, as written to reports: ``{"count", "files"}`` (the first
        ``listed`` paths)."""
        return {"count": len(self.skipped), "files": self.skipped[:listed]}

    def images(self, idx: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Float images in [0, 1], ``(n, C, H, W)``."""
        x = self.x if idx is None else self.x[idx]
        if not isinstance(x, torch.Tensor):  # a LazyImages view (uapx.image_sources): read now
            return x.decode()
        return x.float().div_(255.0)

    def take(self, rows: slice) -> "ImageSet":
        """The images at positions ``rows`` (e.g. this rank's shard), keeping their indices."""
        idx = self.indices[rows] if self.indices is not None else torch.arange(len(self))[rows]
        return replace(self, x=self.x[rows], y=self.y[rows], indices=idx)

    def subset(self, n: int | None, *, seed: int = 0) -> "ImageSet":
        """A seeded random draw of ``n`` images (all of them when ``n`` is None), stratified by class
        (:func:`uapx.stats.stratified_draw`) and class-interleaved, so that every prefix (the
        trajectory images) and every contiguous shard (a torchrun rank's) is a class-mixed draw too
        -- never the class-sorted order of an ImageFolder."""
        from .stats import stratified_draw

        if n is not None and (n < 1 or n > len(self)):
            raise UapxError(f"--n-samples {n} is out of range: the {self.name} {self.split} split has "
                            f"{len(self)} images", f"pass --n-samples between 1 and {len(self)}")
        idx = stratified_draw(self.y, n, seed=seed)
        base = self.indices[idx] if self.indices is not None else idx
        return replace(self, x=self.x[idx], y=self.y[idx], indices=base)


def default_root() -> Path:
    return Path(os.path.expanduser("~")) / ".cache" / "uapx" / "data"


def resolve_root(root: str | os.PathLike | None) -> tuple[Path, bool]:
    """``(root, explicit)``: the data root to read and whether the user named it."""
    if root:
        return Path(root).expanduser(), True
    env = os.environ.get("UAPX_DATA_ROOT")
    if env:
        return Path(env).expanduser(), True
    return default_root(), False


def load(name: str, split: str = "test", root: str | os.PathLike | None = None, *,
         skip_unreadable: bool = False, image_size: int | None = None) -> ImageSet:
    """Load data set ``name`` (``mnist`` or ``cifar10``), split ``train`` or ``test``.

    Without an explicit root, the MNIST test split falls back to the copy embedded in uapx.  An
    image file that cannot be decoded is a one-line error naming it, or, with ``skip_unreadable``,
    left out and listed in ``ImageSet.skipped``.
    """
    if name not in DATASETS:
        raise UapxError(f"unknown data set {name!r}", f"choose from: {', '.join(DATASETS)}")
    if name == "imagefolder":  # any ImageFolder tree, read on demand (uapx.image_sources)
        from .image_sources import image_folder

        if not root:
            raise UapxError("--dataset imagefolder needs --data-root DIR",
                            "pass --data-root DIR holding DIR/{train,val,test}/<class>/* or DIR/<class>/*")
        return image_folder(root, split, image_size=image_size, skip_unreadable=skip_unreadable)
    if image_size is not None:
        raise UapxError(f"--image-size applies to --dataset imagefolder, not {name}",
                        f"pass --dataset imagefolder --data-root DIR (e.g. the {name} JPEG tree), or leave it out")
    if split not in SPLITS:
        raise UapxError(f"unknown split {split!r}", f"choose from: {', '.join(SPLITS)}")
    base, explicit = resolve_root(root)
    if explicit and not base.is_dir():
        raise UapxError(f"data root {str(base)!r} does not exist", HOW_TO_GET)
    looked: list[Path] = []
    if name == "mnist":
        found = _load_mnist(base, split, looked)
        if found is None and not explicit and split == "test":
            found = _read_mnist_dir(EMBEDDED_MNIST, split, "embedded MNIST test split")
    else:
        found = _load_cifar10(base, split, looked, skip_unreadable)
    if found is None:
        where = ", ".join(str(p) for p in looked)
        raise SplitNotFound(f"no {name} {split} data found (looked in {where})", HOW_TO_GET)
    return found


# -- MNIST -------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise UapxError(f"cannot read {str(path)!r} ({exc})", "replace the damaged file") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UapxError(f"{str(path)!r} is not an IDX file of unsigned bytes", "replace the damaged file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UapxError(f"{str(path)!r} is truncated ({body.size} of {int(np.prod(dims))} bytes)",
                        "replace the damaged file")
    return body.reshape(dims)


def _read_mnist_dir(folder: Path, split: str, source: str) -> ImageSet | None:
    files = []
    for stem in _MNIST_FILES[split]:
        for cand in (folder / stem, folder / f"{stem}.gz"):
            if cand.is_file():
                files.append(cand)
                break
        else:
            return None
    images, labels = (_read_idx(f) for f in files)
    if images.shape[0] != labels.shape[0]:
        raise UapxError(f"MNIST {split} images and labels in {str(folder)!r} differ in count",
                        "replace the damaged files")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageSet(x, y, MNIST_CLASSES, "mnist", split, source)


def _load_mnist(base: Path, split: str, looked: list[Path]) -> ImageSet | None:
    for folder in (base / "MNIST" / "raw", base / "mnist" / "raw", base):
        looked.append(folder)
        if folder.is_dir():
            found = _read_mnist_dir(folder, split, str(folder))
            if found is not None:
                return found
    return None


# -- CIFAR-10 ----------------------------------------------------------------------------------


def _load_cifar10(base: Path, split: str, looked: list[Path], skip_unreadable: bool = False) -> ImageSet | None:
    official = base / "cifar-10-batches-py"
    looked.append(official)
    if official.is_dir():
        return _read_cifar_pickles(official, split)
    for folder in (base / "cifar10-jpeg" / split, base / "cifar10" / split):
        looked.append(folder)
        if folder.is_dir():
            return _read_image_folder(folder, split, skip_unreadable)
    return None


def _read_cifar_pickles(folder: Path, split: str) -> ImageSet:
    import pickle

    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for n in names:
        p = folder / n
        if not p.is_file():
            raise UapxError(f"CIFAR-10 layout in {str(folder)!r} is partial: {n} is missing",
                            "restore the official cifar-10-batches-py folder")
        try:
            with open(p, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d["labels"], dtype=np.int64))
        except Exception as exc:
            raise UapxError(f"cannot read {str(p)!r} ({type(exc).__name__})",
                            "restore the official cifar-10-batches-py folder") from None
    return ImageSet(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)),
                    CIFAR10_CLASSES, "cifar10", split, str(folder))


def _read_image_folder(folder: Path, split: str, skip_unreadable: bool = False) -> ImageSet:
    from PIL import Image

    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if classes != CIFAR10_CLASSES:
        raise UapxError(f"{str(folder)!r} does not hold the 10 CIFAR-10 class folders (found {len(classes)})",
                        "lay it out as <root>/cifar10-jpeg/{train,test}/<class>/*.jpg")
    files = [(p, label) for label, c in enumerate(classes)
             for p in sorted((folder / c).iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    cache = _decode_cache(folder, files)
    cached = None
    if cache.is_file():
        try:
            cached = torch.load(cache, weights_only=True)
        except Exception:
            pass  # a damaged cache is rebuilt
    if cached is not None:
        x, y, *rest = cached
        skipped = list(rest[0]) if rest else []
    else:
        x = torch.empty(len(files), 3, 32, 32, dtype=torch.uint8)
        keep, skipped = [], []
        for i, (p, _) in enumerate(files):
            try:
                with Image.open(p) as im:
                    img = np.asarray(im.convert("RGB"))
            except Exception as exc:  # zero bytes, not an image, truncated
                skipped.append(str(p))
                if not skip_unreadable:
                    raise _unreadable(str(p), exc) from None
                continue
            if img.shape != (32, 32, 3):
                raise UapxError(f"{str(p)!r} is not a 32x32 image", "use the CIFAR-10 images unchanged")
            x[i] = torch.from_numpy(img).permute(2, 0, 1)
            keep.append(i)
        y = torch.tensor([label for _, label in files], dtype=torch.int64)
        if skipped:
            x, y = x[keep], y[keep]
        try:
            from . import atomic

            atomic.torch_save((x, y, skipped), cache)
        except (OSError, UapxError):
            pass  # caching is an optimisation only
    if skipped and not skip_unreadable:
        raise _unreadable(skipped[0], None)
    return ImageSet(x, y, CIFAR10_CLASSES, "cifar10", split, str(folder), skipped=skipped)


def _unreadable(path: str, exc: BaseException | None) -> UapxError:
    why = f" ({type(exc).__name__}: {' '.join(str(exc).split())[:100]})" if exc is not None else ""
    return UapxError(f"cannot read image {path!r}{why}",
                     "remove or replace the file, or pass --skip-unreadable to leave such files out "
                     "(they are counted in the report)")


def _decode_cache(folder: Path, files: list) -> Path:
    h = hashlib.sha1(str(folder.resolve()).encode())
    h.update(str(len(files)).encode())
    for p, _ in files[:: max(1, len(files) // 64)]:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return Path(os.path.expanduser("~")) / ".cache" / "uapx" / "decoded" / f"{h.hexdigest()[:16]}.pt"
