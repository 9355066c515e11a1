"""Images read on demand: any ImageFolder tree (at any size, or resized to S x S), any
``torch.utils.data.Dataset`` of ``(image, label)``, and a float view that streams either.

A :class:`LazyImages` stands where an :class:`~uapx.data.ImageSet` holds its ``uint8`` tensor:
indexing it (``x[rows]``) gives another view without reading anything, and
:meth:`LazyImages.decode` reads the rows of a view as float images in [0, 1].  So an ImageSet of a
million files costs its file list, and :class:`ImageRows` (what the analysis holds as ``x``) reads
only the rows asked for: ``x[s:e]`` is a float tensor ``(e - s, C, H, W)``.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import SplitNotFound, UapxError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGEFOLDER_SPLITS = ("train", "val", "test")
DECODE_THREADS = min(8, os.cpu_count() or 1)


class LazyImages:
    """Rows of an image store, read on demand.  Subclasses implement :meth:`_read`.

    Attributes:
        rows: ``(n,)`` int64 positions in the store of the rows this view holds.
        shape: ``torch.Size((n, C, H, W))``.
    """

    def __init__(self, rows: torch.Tensor, sample_shape: Sequence[int]) -> None:
        self.rows = rows.long()
        self.sample_shape = torch.Size(sample_shape)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((int(self.rows.numel()), *self.sample_shape))

    def __len__(self) -> int:
        return int(self.rows.numel())

    def __getitem__(self, idx: slice | torch.Tensor | int) -> "LazyImages":
        """Another view holding the rows ``idx`` (a slice, index tensor or boolean mask); reads nothing."""
        rows = self.rows[idx]
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.rows = rows.reshape(-1)
        return view

    def decode(self) -> torch.Tensor:
        """The rows of this view as float images ``(n, C, H, W)`` in [0, 1]."""
        if not len(self):
            return torch.empty(self.shape)
        return torch.stack(self._read(self.rows.tolist()))

    def _read(self, rows: list[int]) -> list[torch.Tensor]:
        raise NotImplementedError


class FileImages(LazyImages):
    """Image files decoded with PIL as RGB (or greyscale where every file is), optionally resized
    (shorter side to ``size``, torchvision's ``Resize``) and centre-cropped to ``size x size``."""

    def __init__(self, files: Sequence[Path], sample_shape: Sequence[int], *, size: int | None, mode: str) -> None:
        super().__init__(torch.arange(len(files)), sample_shape)
        self.files = list(files)
        self.size, self.mode = size, mode

    def _one(self, row: int) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms import functional as TF

        path = self.files[row]
        try:
            with Image.open(path) as im:
                im = im.convert(self.mode)
                if self.size is not None:
                    im = TF.center_crop(TF.resize(im, self.size, antialias=True), [self.size, self.size])
                x = TF.pil_to_tensor(im)
        except Exception as exc:  # truncated or damaged after the listing
            from .data import _unreadable

            raise _unreadable(str(path), exc) from None
        if tuple(x.shape) != tuple(self.sample_shape):
            raise UapxError(f"image {str(path)!r} is {x.shape[2]}x{x.shape[1]}, the others "
                            f"{self.sample_shape[2]}x{self.sample_shape[1]}",
                            "pass --image-size S to resize and centre-crop every image to S x S")
        return x.float().div_(255.0)

    def _read(self, rows: list[int]) -> list[torch.Tensor]:
        if len(rows) < 4 or DECODE_THREADS == 1:
            return [self._one(r) for r in rows]
        with ThreadPoolExecutor(DECODE_THREADS) as pool:  # PIL decodes without the GIL
            return list(pool.map(self._one, rows))


class DatasetImages(LazyImages):
    """The images of a ``torch.utils.data.Dataset`` of ``(image, label)``: tensors in [0, 1]
    (``(C, H, W)``, float or uint8) or PIL images."""

    def __init__(self, dataset: Any, sample_shape: Sequence[int]) -> None:
        super().__init__(torch.arange(len(dataset)), sample_shape)
        self.dataset = dataset

    def _read(self, rows: list[int]) -> list[torch.Tensor]:
        out = []
        for r in rows:
            x = as_image_tensor(self.dataset[r][0], where=f"item {r}")
            if tuple(x.shape) != tuple(self.sample_shape):
                raise UapxError(f"data set item {r} has shape {tuple(x.shape)}, item 0 {tuple(self.sample_shape)}",
                                "give images of one shape (resize them in the data set's transform)")
            out.append(x)
        return out


def as_image_tensor(img: Any, *, where: str) -> torch.Tensor:
    """A data set's image as a float tensor ``(C, H, W)`` in [0, 1] (uint8 is divided by 255)."""
    if not isinstance(img, torch.Tensor):
        try:
            from torchvision.transforms import functional as TF

            img = TF.pil_to_tensor(img)
        except Exception:
            raise UapxError(f"data set {where}: the image is a {type(img).__name__}, not a tensor or PIL image",
                            "return (image tensor (C, H, W) in [0, 1], label) pairs") from None
    if img.ndim == 2:
        img = img.unsqueeze(0)
    if img.ndim != 3:
        raise UapxError(f"data set {where}: the image has shape {tuple(img.shape)}, not (C, H, W)",
                        "return (image tensor (C, H, W) in [0, 1], label) pairs")
    return img.float().div_(255.0) if img.dtype == torch.uint8 else img.float()


class ImageRows:
    """Float images of an :class:`~uapx.data.ImageSet`, read only where indexed.

    ``rows[idx]`` (slice, index tensor, boolean mask or int) is a float tensor in [0, 1];
    ``shape`` and ``len`` are those of the ``(N, C, H, W)`` tensor it stands for; iterating
    :meth:`chunks` streams them.  ``to(device)`` reads every row (for code that needs them all).
    """

    def __init__(self, images: Any) -> None:
        self.images = images

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.images), *self.images.shape))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: slice | torch.Tensor | int) -> torch.Tensor:
        if isinstance(idx, int):
            return self.images.images(slice(idx, idx + 1 if idx != -1 else None))[0]
        return self.images.images(idx)

    def rows(self, idx: slice | torch.Tensor) -> "ImageRows":
        """The rows ``idx`` (slice, index tensor or boolean mask) as another ImageRows: a view that
        reads nothing until indexed (a class's images for a per-class UAP method)."""
        from dataclasses import replace

        sel = self.images
        base = sel.indices[idx] if sel.indices is not None else torch.arange(len(sel))[idx]
        return ImageRows(replace(sel, x=sel.x[idx], y=sel.y[idx], indices=base))

    def chunks(self, size: int) -> Any:
        """Yield float blocks of at most ``size`` images, in order."""
        for s in range(0, len(self), size):
            yield self[s:s + size]

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.materialized().to(*args, **kwargs)

    def materialized(self) -> torch.Tensor:
        """Every image as one float tensor ``(N, C, H, W)``, read once and kept (memory grows with N:
        the fallback for code that needs the whole tensor; one warning)."""
        if getattr(self, "_all", None) is None:
            import warnings

            warnings.warn(f"uapx: a plugin reads all {len(self)} images at once ({len(self) * self.shape[1:].numel() * 4 / 2**20:.0f} "
                          "MiB); memory now grows with the number of images", stacklevel=3)
            self._all = self.images.images()
        return self._all

    def __getattr__(self, name: str) -> Any:  # tensor methods (reshape, mean, ...) on the whole tensor
        if name.startswith("_") or name == "images":
            raise AttributeError(name)
        return getattr(self.materialized(), name)

    def __repr__(self) -> str:
        return f"ImageRows(shape={tuple(self.shape)}, read on demand)"


BLOCK_BYTES = 16 << 20
"""Float32 bytes per block that :func:`blocks` reads (about 16 MB, the streamed run's chunk size)."""


def blocks(x: Any, rows: int | None = None) -> Any:
    """Yield float blocks ``x[s:s + rows]`` of ``x`` ``(N, ...)`` -- a tensor or an :class:`ImageRows`
    (a streamed run's images, read from their files only here) -- in order; ``rows`` defaults to
    about :data:`BLOCK_BYTES` of float32 per block.  What code that must see every image iterates,
    so that its memory does not grow with N."""
    n = int(x.shape[0])
    rows = rows or max(1, BLOCK_BYTES // (4 * max(1, int(torch.Size(x.shape[1:]).numel()))))
    for s in range(0, n, rows):
        yield x[s:s + rows]


# -- ImageFolder trees --------------------------------------------------------------------------


def find_split_folder(root: Path, split: str) -> Path | None:
    """The folder of ``split`` under ``root``: ``root/split``; for ``test``, ``root/val`` next (the
    ImageNet layout); else ``root`` itself when it holds class folders of images (a single split)."""
    for name in (split, "val") if split == "test" else (split,):
        if (root / name).is_dir():
            return root / name
    subdirs = [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
    if subdirs and not any(d.name in IMAGEFOLDER_SPLITS for d in subdirs):
        return root
    return None


def image_folder(root: str | os.PathLike, split: str = "test", *, image_size: int | None = None,
                 skip_unreadable: bool = False):
    """An :class:`~uapx.data.ImageSet` of an ImageFolder tree, read on demand.

    Layouts: ``root/{train,val,test}/<class>/*`` (``test`` falls back to ``val``, so ImageNet's
    ``val/<wnid>/*.JPEG`` works as is) or ``root/<class>/*`` (one split).  Classes are the
    sub-folder names in sorted order (label i = i-th name, as torchvision's ImageFolder).  Every
    file's header is read now: one that PIL cannot open is a one-line error naming it (or, with
    ``skip_unreadable``, left out and listed in ``skipped``); without ``image_size`` all images
    must share one size.
    """
    from PIL import Image

    from .data import ImageSet, _unreadable

    base = Path(root).expanduser()
    if not base.is_dir():
        raise UapxError(f"image folder {str(base)!r} does not exist",
                        "pass --data-root DIR holding DIR/{train,val,test}/<class>/* or DIR/<class>/*")
    folder = find_split_folder(base, split)
    if folder is None:
        raise SplitNotFound(f"no {split} split in {str(base)!r} (looked for {split}/"
                        f"{', val/' if split == 'test' else ''} and for class folders)",
                        "lay it out as DIR/{train,val,test}/<class>/* or DIR/<class>/*, or pass --split")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    listed = [(p, label) for label, c in enumerate(classes) for p in sorted((folder / c).iterdir())
              if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not listed:
        raise UapxError(f"{str(folder)!r} holds no image files in class folders",
                        f"put images ({', '.join(IMAGE_SUFFIXES[:3])}, ...) in {folder}/<class>/")

    def header(item: tuple[Path, int]) -> tuple[tuple[int, int], str] | BaseException:
        try:
            with Image.open(item[0]) as im:
                info = (im.size, im.mode)
                im.verify()
            return info
        except Exception as exc:  # noqa: BLE001 - any failure means unreadable
            return exc

    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        headers = list(pool.map(header, listed))
    files, labels, skipped, sizes, grey = [], [], [], set(), True
    for (path, label), h in zip(listed, headers):
        if isinstance(h, BaseException):
            if not skip_unreadable:
                raise _unreadable(str(path), h)
            skipped.append(str(path))
            continue
        files.append(path)
        labels.append(label)
        sizes.add(h[0])
        grey = grey and h[1] in ("L", "1", "I", "I;16", "F")
    if not files:
        raise UapxError(f"no readable image in {str(folder)!r}", "check the files")
    mode, channels = ("L", 1) if grey else ("RGB", 3)
    if image_size is None and len(sizes) > 1:
        w, h = sorted(sizes)[:2]
        raise UapxError(f"the images in {str(folder)!r} differ in size ({w[0]}x{w[1]}, {h[0]}x{h[1]}, ...)",
                        "pass --image-size S to resize the shorter side to S and centre-crop S x S")
    if image_size is not None:
        shape = (channels, image_size, image_size)
    else:
        (w, h), = sizes
        shape = (channels, h, w)
    x = FileImages(files, shape, size=image_size, mode=mode)
    return ImageSet(x, torch.tensor(labels, dtype=torch.int64), classes, "imagefolder",
                    folder.name if folder != base else "all", str(folder), skipped=skipped)


def from_dataset(dataset: Any, *, name: str = "dataset", classes: Sequence[str] | None = None):
    """An :class:`~uapx.data.ImageSet` over a ``torch.utils.data.Dataset`` of ``(image, label)``
    (an ImageSet is returned as it is).  Images are read on demand; the labels are read once,
    from ``dataset.targets`` where it has them, else item by item."""
    from .data import ImageSet

    if isinstance(dataset, ImageSet):
        return dataset
    try:
        n = len(dataset)
    except TypeError:
        raise UapxError(f"the data set ({type(dataset).__name__}) has no length",
                        "pass a map-style torch.utils.data.Dataset or an ImageSet") from None
    if n == 0:
        raise UapxError("the data set is empty", "pass a data set with images")
    first = as_image_tensor(dataset[0][0], where="item 0")
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == n:
        y = torch.as_tensor(list(targets) if not isinstance(targets, torch.Tensor) else targets).long()
    else:
        y = torch.tensor([int(dataset[i][1]) for i in range(n)], dtype=torch.int64)
    names = list(classes or getattr(dataset, "classes", None) or [str(c) for c in range(int(y.max()) + 1)])
    return ImageSet(DatasetImages(dataset, tuple(first.shape)), y, names, name, "given",
                    type(dataset).__name__)
