"""PerturbationSet: the N x d matrix of per-image perturbations and what produced them.

Rows are flattened perturbations ``delta_i = x_adv_i - x_i``; alongside them: labels, clean and
adversarial predictions, the budget, the model's id and the attack's settings.  Consumers read
the rows through :meth:`PerturbationSet.chunks`, so a set kept on disk is streamed and never
has to fit in memory whole.

On disk a set is a folder (format ``uapx-perturbations``, version 1)::

    manifest.json        metadata, the list of complete chunks, "complete": true at the end
    chunk-00000.pt ...   {"deltas": (n_i, d) float32, "labels", "clean_pred", "adv_pred", "indices"}

A set written by several torchrun ranks holds one such folder per rank, ``rank-00000/`` ...,
and a top ``manifest.json`` listing them as ``"parts"`` in row order.

Chunks and the manifest are written atomically (temporary name, then rename), and the manifest
lists a chunk only once it is on disk, so a run killed midway resumes where it stopped and
nothing half-written is ever read as complete.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from . import atomic
from .errors import UapxError

FORMAT, VERSION = "uapx-perturbations", 1
_COLUMNS = ("labels", "clean_pred", "adv_pred", "indices")


@dataclass
class PerturbationSet:
    """Per-image perturbations, in memory or streamed from a folder.

    Attributes:
        labels, clean_pred, adv_pred, indices: ``(N,)`` int64 (indices: rows' positions in the
            data set split).
        shape: the image shape ``(C, H, W)``; ``d = C*H*W``.
        eps, norm: the attack budget.
        model_id: which model was attacked; attack: the attack's settings.
    """

    deltas: torch.Tensor | None  # (N, d) when in memory, None when on disk
    labels: torch.Tensor
    clean_pred: torch.Tensor
    adv_pred: torch.Tensor
    shape: tuple[int, ...]
    eps: float
    norm: str = "l2"
    model_id: str = ""
    attack: dict = field(default_factory=dict)
    indices: torch.Tensor | None = None
    files: list[Path] | None = field(default=None, repr=False)  # chunk files when on disk
    mask: torch.Tensor | None = field(default=None, repr=False)  # rows kept of the files' rows

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        for name in ("clean_pred", "adv_pred"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have shape ({n},)")
        if (self.deltas is None) == (self.files is None):
            raise ValueError("give exactly one of deltas (in memory) or files (on disk)")
        if self.deltas is not None and self.deltas.shape[0] != n:
            raise ValueError(f"deltas must have {n} rows")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        where = "in memory" if self.deltas is not None else f"on disk, {len(self.files or [])} chunk file(s)"
        model = f", model={self.model_id!r}" if self.model_id else ""
        return (f"PerturbationSet(n={len(self)}, shape={tuple(self.shape)}, norm={self.norm!r}, "
                f"eps={self.eps:g}{model}, {where})")

    @property
    def d(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def classes(self) -> list[int]:
        """The labels present (under torch.distributed: on any rank, the same list on every rank)."""
        from . import distributed

        if not distributed.active():
            return sorted(int(c) for c in self.labels.unique())
        top = int(distributed.all_reduce_scalar(float(self.labels.max()) if len(self) else -1.0, "max"))
        present = torch.zeros(top + 1, dtype=torch.float64)
        present[self.labels.unique()] = 1.0
        return [int(c) for c in distributed.all_reduce_(present).nonzero().flatten()]

    def chunks(self, size: int = 4096) -> Iterator[torch.Tensor]:
        """Yield ``(n_i, d)`` float32 row blocks in order (at most ``size`` rows each)."""
        if self.deltas is not None:
            for s in range(0, len(self), size):
                yield self.deltas[s:s + size]
            return
        offset = 0
        for f in self.files:
            block = _read_chunk(f)["deltas"]
            n = block.shape[0]
            if self.mask is not None:
                block = block[self.mask[offset:offset + n]]
            offset += n
            if block.shape[0]:  # a file the mask leaves empty yields nothing
                yield from block.split(size)

    def matrix(self) -> torch.Tensor:
        """The whole ``(N, d)`` matrix in memory (for sets that fit)."""
        if self.deltas is not None:
            return self.deltas
        return torch.cat(list(self.chunks())) if len(self) else torch.empty(0, self.d)

    def where(self, mask: torch.Tensor) -> "PerturbationSet":
        """The rows selected by a boolean mask ``(N,)`` (a view for sets on disk)."""
        cols = {k: None if getattr(self, k) is None else getattr(self, k)[mask] for k in _COLUMNS}
        meta = dict(shape=self.shape, eps=self.eps, norm=self.norm, model_id=self.model_id, attack=self.attack)
        if self.deltas is not None:
            return PerturbationSet(self.deltas[mask], **cols, **meta)
        full = mask if self.mask is None else _compose(self.mask, mask)
        return PerturbationSet(None, **cols, **meta, files=self.files, mask=full)

    # -- storage --------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike, *, chunk_size: int = 4096) -> Path:
        """Write the set as a complete folder (replacing nothing: ``folder`` must not exist)."""
        w = PerturbationWriter(folder, self.metadata())
        for s, block in zip(range(0, len(self), chunk_size), self.chunks(chunk_size)):
            sl = slice(s, s + block.shape[0])
            w.write_chunk(block, self.labels[sl], self.clean_pred[sl], self.adv_pred[sl],
                          None if self.indices is None else self.indices[sl])
        w.finish()
        return Path(folder)

    def metadata(self) -> dict:
        return {"shape": list(self.shape), "eps": self.eps, "norm": self.norm, "model_id": self.model_id,
                "attack": self.attack}

    @classmethod
    def load(cls, folder: str | os.PathLike, *, in_memory: bool = False) -> "PerturbationSet":
        """Open a complete set folder; rows stay on disk unless ``in_memory``."""
        folder = Path(folder)
        man = read_manifest(folder)
        if man is None:
            raise UapxError(f"{str(folder)!r} is not a uapx perturbation set (no manifest.json)",
                            "pass a folder written by 'uapx attack'")
        if not man.get("complete"):
            raise UapxError(f"perturbation set {str(folder)!r} is incomplete ({len(man['chunks'])} chunks written)",
                            "run the same 'uapx attack' command again to finish it")
        files = [folder / part / c["file"] for part in man.get("parts", ["."])
                 for c in (man["chunks"] if part == "." else read_manifest(folder / part)["chunks"])]
        cols: dict[str, list[torch.Tensor]] = {k: [] for k in _COLUMNS}
        deltas = []
        for f in files:
            chunk = _read_chunk(f)
            for k in _COLUMNS:
                cols[k].append(chunk[k])
            if in_memory:
                deltas.append(chunk["deltas"])
        cat = {k: torch.cat(v) if v else torch.empty(0, dtype=torch.long) for k, v in cols.items()}
        meta = {k: man[k] for k in ("eps", "norm", "model_id", "attack")}
        if in_memory:
            return cls(torch.cat(deltas) if deltas else torch.empty(0, man["d"]), **cat, shape=tuple(man["shape"]),
                       **meta)
        return cls(None, **cat, shape=tuple(man["shape"]), **meta, files=files)


def _compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """A mask over the files' rows selecting ``inner`` (a mask over the rows ``outer`` kept)."""
    full = torch.zeros_like(outer)
    full[outer.nonzero().squeeze(1)[inner]] = True
    return full


def _read_chunk(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UapxError(f"perturbation chunk {str(path)!r} is unreadable ({type(exc).__name__})",
                        "delete the set folder and run 'uapx attack' again") from None


def read_manifest(folder: Path) -> dict | None:
    p = Path(folder) / "manifest.json"
    if not p.is_file():
        return None
    try:
        man = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UapxError(f"{str(p)!r} is damaged ({exc})", "delete the set folder and run 'uapx attack' again") from None
    if man.get("format") != FORMAT:
        raise UapxError(f"{str(p)!r} is not a uapx perturbation set manifest", "pass a folder written by uapx")
    if man.get("version") != VERSION:
        raise UapxError(f"{str(p)!r} has format version {man.get('version')}; this uapx reads {VERSION}",
                        "re-create it with this version of uapx")
    return man


class PerturbationWriter:
    """Writes a set folder chunk by chunk; resumes a folder whose metadata matches.

    Args:
        folder: the set folder.
        metadata: what must match to resume (shape, eps, norm, model id, attack, data...).
    """

    def __init__(self, folder: str | os.PathLike, metadata: dict) -> None:
        self.folder = Path(folder)
        self.metadata = json.loads(json.dumps(metadata, default=atomic.json_default))
        existing = read_manifest(self.folder)
        if existing is not None:
            old = {k: existing.get(k) for k in self.metadata}
            if old != self.metadata:
                raise UapxError(f"{str(self.folder)!r} holds a perturbation set made with other settings",
                                "pass another --out, or delete the folder to start over")
            self.manifest = existing
        else:
            if self.folder.exists() and any(self.folder.iterdir()):
                raise UapxError(f"{str(self.folder)!r} exists and is not a perturbation set",
                                "pass another --out")
            self.folder.mkdir(parents=True, exist_ok=True)
            self.manifest = {"format": FORMAT, "version": VERSION, **self.metadata, "d": 0, "n": 0,
                             "chunks": [], "complete": False}

    @property
    def rows_done(self) -> int:
        return sum(c["rows"] for c in self.manifest["chunks"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def write_chunk(self, deltas: torch.Tensor, labels: torch.Tensor, clean_pred: torch.Tensor,
                    adv_pred: torch.Tensor, indices: torch.Tensor | None) -> None:
        """Append ``deltas`` ``(n, d)`` and its ``(n,)`` columns as the next chunk."""
        n = deltas.shape[0]
        name = f"chunk-{len(self.manifest['chunks']):05d}.pt"
        idx = indices if indices is not None else torch.arange(self.rows_done, self.rows_done + n)
        atomic.torch_save({"deltas": deltas.reshape(n, -1).float().contiguous().clone(),
                           "labels": labels.clone(), "clean_pred": clean_pred.clone(),
                           "adv_pred": adv_pred.clone(), "indices": idx.clone()}, self.folder / name)
        self.manifest["chunks"].append({"file": name, "start": self.rows_done, "rows": n})
        self.manifest["n"] = self.rows_done
        self.manifest["d"] = int(deltas[0].numel()) if n else self.manifest["d"]
        atomic.write_json(self.folder / "manifest.json", self.manifest)

    def finish(self) -> None:
        self.manifest["complete"] = True
        atomic.write_json(self.folder / "manifest.json", self.manifest)


def write_parts_manifest(folder: str | os.PathLike, parts: list[str], metadata: dict) -> None:
    """The top manifest of a set written in parts (one complete set folder per torchrun rank)."""
    folder = Path(folder)
    mans = [read_manifest(folder / part) for part in parts]
    if any(m is None or not m.get("complete") for m in mans):
        raise UapxError(f"not every part of {str(folder)!r} is complete", "run the same command again")
    meta = json.loads(json.dumps(metadata, default=atomic.json_default))
    atomic.write_json(folder / "manifest.json", {
        "format": FORMAT, "version": VERSION, **meta, "d": mans[0]["d"], "n": sum(m["n"] for m in mans),
        "chunks": [c for m in mans for c in m["chunks"]], "parts": parts, "complete": True})
