"""The one atomic writer: write to a temporary name beside the target, then rename; and the claim
on an output that keeps two runs from writing it at once.

Nothing half-written is ever visible under its final name: a run killed midway leaves at most
a ``.<name>.tmp-*`` file or folder, which is never taken as complete and which the next run
that claims the same output removes.  A write that fails (no space left, no permission, a name
too long, a name that cannot be encoded) removes its temporary copy and becomes one
:class:`~uapx.errors.UapxError` naming the path.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import UapxError

_FIX = {
    errno.ENOSPC: "free space on that file system, or pass an --out on another one",
    errno.EDQUOT: "free space in your quota, or pass an --out on another file system",
    errno.EACCES: "pass an --out in a folder you can write to",
    errno.EPERM: "pass an --out in a folder you can write to",
    errno.EROFS: "pass an --out on a writable file system",
    errno.ENAMETOOLONG: "pass a shorter --out",
    errno.ENOTDIR: "pass an --out in a folder (a file is in the way)",
    errno.EEXIST: "pass another --out",
}


def write_error(exc: BaseException, path: str | os.PathLike) -> UapxError:
    """The one-line error for a failed write of ``path`` (an ``OSError`` or an encoding error)."""
    if isinstance(exc, UnicodeError) or (isinstance(exc, ValueError) and "null" in str(exc)):
        return UapxError(f"cannot write {os.fsdecode(path)!a}: the name cannot be encoded for this file system",
                         "pass an --out made of ordinary characters")
    where = getattr(exc, "filename", None) or path
    why = getattr(exc, "strerror", None) or str(exc)
    return UapxError(f"cannot write {_shown(where)}: {why}",
                     _FIX.get(getattr(exc, "errno", None), "check the file system, or pass another --out"))


def _shown(path: str | os.PathLike) -> str:
    return repr(os.fsdecode(path))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    With ``directory=True`` the temporary path is a fresh folder.  An existing folder at ``path``
    is replaced (moved aside, then removed) only after the new one is complete, and only with
    ``replace``; without it the rename takes an absent or empty folder only (a folder that
    appeared meanwhile with something in it is refused, atomically, by the rename itself).
    An ``OSError`` or encoding error raised in the block or by the rename removes the temporary
    path and becomes a :class:`UapxError` naming ``path``.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            os.chmod(tmp, 0o777 & ~_umask())
        else:
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
            os.close(fd)
            tmp = Path(name)
            os.chmod(tmp, 0o666 & ~_umask())
    except (OSError, UnicodeError, ValueError) as exc:
        raise write_error(exc, target) from None
    try:
        yield tmp
        if directory and replace and target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        elif directory:
            try:
                os.rename(tmp, target)  # onto nothing or an empty folder; never onto a folder with files
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise UapxError(f"output folder {str(target)!r} appeared while this run was writing it",
                                    "pass --overwrite to replace it, or another --out") from None
                raise
        else:
            os.replace(tmp, target)
    except BaseException as exc:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, UnicodeEncodeError)):
            raise write_error(exc, target) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically; serialised in memory first, so that a failing write is an ``OSError``
    (torch's own file writer reports a full disk as a ``RuntimeError``)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for tensors, NumPy values and paths."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):  # numpy
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# -- claims ------------------------------------------------------------------------------------

_ACTIVE: dict[Path, "Claim"] = {}  # the claims this process holds, by absolute path


class Claim:
    """An exclusive claim on the output ``path``: a lock file ``.<name>.lock`` beside it, held with
    ``flock`` (released by the kernel when the process dies, so a claim never outlives its run).

    Taking the claim removes the ``.<name>.tmp-*`` / ``.<name>.old-*`` leftovers of dead runs (no
    live run can own them while the claim is held).  :meth:`release` frees it; a claim this
    process already holds on ``path`` (a run of it that failed) is released and taken afresh.
    """

    def __init__(self, path: str | os.PathLike, *, inside: bool = False) -> None:
        self.path = Path(path)
        key = self.path.absolute()
        if key in _ACTIVE:
            _ACTIVE.pop(key).release()
        self.lock = self.path.with_name(f".{self.path.name}.lock")
        self._fd: int | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise UapxError(f"output {str(self.path)!r} is being written by another uapx run (pid {holder})",
                                    "wait for that run to finish, or pass another --out") from None
                try:  # the lock file may have been removed by its last holder between open and flock
                    same = os.fstat(fd).st_ino == os.stat(self.lock).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except (OSError, UnicodeError, ValueError) as exc:
            raise write_error(exc, self.path) from None
        self._fd = fd
        _ACTIVE[key] = self
        self.stale = remove_stale(self.path)
        if inside and self.path.is_dir():  # a folder written file by file (a perturbation set)
            self.stale += [p.name for p in self.path.glob(".*.tmp-*")]
            for p in self.path.glob(".*.tmp-*"):
                p.unlink(missing_ok=True)

    def release(self) -> None:
        if self._fd is None:
            return
        if _ACTIVE.get(self.path.absolute()) is self:
            del _ACTIVE[self.path.absolute()]
        with contextlib.suppress(OSError):
            os.unlink(self.lock)
        os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # at interpreter shutdown the module's globals may be gone; the kernel frees the lock
            pass

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(path: str | os.PathLike, *, inside: bool = False) -> Claim:
    """Claim the output ``path`` for this run (see :class:`Claim`); ``inside``: also remove the
    temporary files dead runs left inside the folder ``path``."""
    return Claim(path, inside=inside)


def release(path: str | os.PathLike) -> None:
    """Release this process's claim on ``path``, if it holds one."""
    c = _ACTIVE.get(Path(path).absolute())
    if c is not None:
        c.release()


def release_all() -> None:
    """Release every claim this process holds (the CLI calls it when a command ends)."""
    for c in list(_ACTIVE.values()):
        c.release()


def remove_stale(path: str | os.PathLike) -> list[str]:
    """Remove the temporary copies of ``path`` that dead runs left (call it holding the claim)."""
    target = Path(path)
    removed = []
    if not target.parent.is_dir():
        return removed
    for p in target.parent.iterdir():
        if p.name.startswith((f".{target.name}.tmp-", f".{target.name}.old-", f".{target.name}.probe-")):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed
