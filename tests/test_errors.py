"""Every bad input through the CLI: one line naming the fix, a non-zero exit, no traceback, nothing lost."""
from __future__ import annotations

import errno
import os
import pathlib
import subprocess
import sys

import torch
from torch import nn

import pytest

from uapx.cli import main
from uapx.models import save_model
from uapx.models.architectures import build

from plugin_dists import write_distribution

FAST = ["--n-samples", "20", "--steps", "2", "--batch-size", "10", "--random-draws", "1", "--k", "1"]


class NaNNet(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10] * float("nan")


def make_case(name: str, tmp_path, monkeypatch):
    """Build the bad input; returns (argv, expected words in the error)."""
    if name == "missing data root":
        return ["analyze", "--data-root", str(tmp_path / "nope")], "does not exist"
    if name == "wrong data layout":
        (tmp_path / "root" / "cifar10-jpeg" / "test" / "cats").mkdir(parents=True)
        return ["analyze", "--dataset", "cifar10", "--data-root", str(tmp_path / "root")], "class folders"
    if name == "data root without the data set":
        (tmp_path / "empty").mkdir()
        return ["analyze", "--data-root", str(tmp_path / "empty")], "no mnist test data found"
    if name == "truncated checkpoint":
        p = tmp_path / "m.pt"
        save_model(p, build("mnist-cnn"), "mnist-cnn")
        p.write_bytes(p.read_bytes()[:5000])
        return ["analyze", "--model", str(p)], "is corrupt, truncated"
    if name == "checkpoint of another architecture":
        p = tmp_path / "r.pt"
        torch.save(build("resnet-small").state_dict(), p)
        return ["analyze", "--model", str(p), "--arch", "mnist-cnn"], "does not fit"
    if name == "eps <= 0":
        return ["analyze", "--eps", "-0.5"], "--eps: must be a positive"
    if name == "steps < 1":
        return ["analyze", "--steps", "0"], "--steps: must be >= 1"
    if name == "step size <= 0":
        return ["analyze", "--step-size", "-1"], "--step-size: must be a positive"
    if name == "NaN arising in gradients":
        p = tmp_path / "nan.pt"
        torch.jit.script(NaNNet()).save(str(p))
        return ["analyze", "--model", str(p)], "NaN or Inf"
    if name == "unknown plugin":
        return ["analyze", "--plugins", "svd,spectrun"], "choose from"
    if name == "plugin that raises":
        write_distribution(tmp_path / "site", "raiser", "0.1", {"raiser": RAISER}, {"raiser": "raiser"})
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        return ["analyze", "--plugins", "raiser"], "plugin 'raiser' failed: RuntimeError: boom"
    if name == "unwritable output folder":
        (tmp_path / "file").write_text("x")
        return ["analyze", "--out", str(tmp_path / "file" / "rep")], "cannot write"
    if name == "report folder holding another run":
        return ["analyze", "--out", str(tmp_path / "existing")], "--overwrite"
    if name == "more samples than exist":
        return ["analyze", "--n-samples", "10001"], "between 1 and 10000"
    if name == "unknown attack":
        return ["analyze", "--attack", "fgsm"], "unknown attack"
    if name == "malformed --set":
        return ["analyze", "--set", "svd=3"], "PLUGIN.KEY=VALUE"
    if name == "disabling a plugin that does not exist":
        return ["analyze", "-p", "no:averag"], "-p no:averag: no plugin (entry point) is named 'averag'"
    # -- issue 15: every option checked before any work, in one format --------------------------
    if name == "argparse error":
        return ["analyze", "--k", "abc"], "argument --k: expected a whole number, got 'abc'"
    if name == "unknown option":
        return ["analyze", "--kk", "3"], "unrecognized arguments: --kk"
    if name == "device torch does not know":
        return ["analyze", "--device", "tpu:0"], "unknown device 'tpu:0'"
    if name == "cuda without a GPU for apply":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        return ["apply", str(uap_file(tmp_path)), "--device", "cuda"], "CUDA is not available"
    if name == "cuda without a GPU for train":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        return ["train", "--device", "cuda", "--out", str(tmp_path / "m.pt")], "CUDA is not available"
    if name == "random draws 0":
        return ["analyze", "--random-draws", "0"], "--random-draws: must be >= 1"
    if name == "apply batch size 0":
        return ["apply", str(uap_file(tmp_path)), "--batch-size", "0"], "--batch-size: must be >= 1"
    if name == "train checkpoint-every 0":
        return ["train", "--checkpoint-every", "0", "--out", str(tmp_path / "m.pt")], "--checkpoint-every: must be >= 1"
    if name == "eps whose default step overflows":
        return ["analyze", "--eps", "1e308"], "--eps 1e+308 is too large"
    if name == "data root too long":
        return ["analyze", "--data-root", str(tmp_path / ("d" * 300))], "is too long"
    if name == "output name too long":
        return ["analyze", "--out", str(tmp_path / ("r" * 250))], "is too long"
    if name == "output path that cannot be encoded":
        return ["analyze", "--out", str(tmp_path / "r\ud800")], "cannot be encoded"
    if name == "attack output under a file":
        (tmp_path / "file").write_text("x")
        return ["attack", "--out", str(tmp_path / "file" / "set")], "is a file, not a folder"
    if name == "apply output under a file":
        (tmp_path / "file").write_text("x")
        return ["apply", str(uap_file(tmp_path)), "--out", str(tmp_path / "file" / "r.json")], "is a file, not a folder"
    if name == "apply output that exists":
        (tmp_path / "r.json").write_text('{"earlier": true}')
        return ["apply", str(uap_file(tmp_path)), "--out", str(tmp_path / "r.json")], "already exists"
    if name == "train output under a file":
        (tmp_path / "file").write_text("x")
        return ["train", "--out", str(tmp_path / "file" / "m.pt")], "is a file, not a folder"
    # -- model/data compatibility: one forward pass before any attack -----------------------------
    if name == "model for another input shape":  # an MNIST model on CIFAR-10 images
        root = image_folder(tmp_path / "imgs")
        return ["analyze", "--dataset", "cifar10", "--data-root", str(root), "--model", "zoo:mnist-natural"], \
            "does not accept cifar10 images of shape (3, 32, 32)"
    if name == "transfer model with another number of classes":
        p = tmp_path / "five.pt"
        torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(784, 5))).save(str(p))
        return ["analyze", "--transfer", str(p)], "has 5 outputs but mnist has 10 classes"
    if name == "apply target for another number of classes":
        p = tmp_path / "five.pt"
        torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(784, 5))).save(str(p))
        return ["apply", str(uap_file(tmp_path)), "--model", str(p)], "has 5 outputs but mnist has 10 classes"
    if name == "uapx checkpoint missing its weights":
        p = tmp_path / "empty.pt"
        torch.save({"format": "uapx-model", "arch": "mnist-cnn"}, p)
        return ["analyze", "--model", str(p)], "lacks its state_dict"
    # -- --set against the constructor, plugin lists, directions -----------------------------------
    if name == "--set unknown key":
        return ["analyze", "--plugins", "svd", "--set", "svd.nonesuch=1"], "plugin 'svd' has no setting 'nonesuch'"
    if name == "--set for a plugin not selected":
        return ["analyze", "--plugins", "svd", "--set", "average.normalize=true"], "is not part of this run"
    if name == "--set of the wrong type":
        return ["analyze", "--plugins", "svd", "--set", "svd.center=maybe"], "expected true/false"
    if name == "empty plugin list":
        return ["analyze", "--plugins", ""], "--plugins names no plugin"
    if name == "zero directions":
        return ["analyze", "--plugins", "svd", "--set", "svd.k=0"], "k must be >= 1"
    # -- unreadable images, outputs, disks -------------------------------------------------------
    if name == "zero-byte image":
        root = image_folder(tmp_path / "imgs")
        (root / "cifar10-jpeg" / "test" / "cat" / "broken.jpg").write_bytes(b"")
        return ["analyze", "--dataset", "cifar10", "--data-root", str(root)], "cannot read image"
    if name == "concurrent run on the same output":
        out = tmp_path / "busy"
        holder = hold_lock(tmp_path / ".busy.lock")
        monkeypatch.setattr("uapx.cli._test_holder", holder, raising=False)
        return ["analyze", "--out", str(out)], "is being written by another uapx run"
    if name == "full disk while writing the report":
        real = pathlib.Path.write_bytes

        def full(self, data):
            if ".tmp-" in str(self):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
            return real(self, data)

        monkeypatch.setattr(pathlib.Path, "write_bytes", full)
        return ["analyze", "--plugins", "average"], "No space left on device"
    if name == "full disk while writing a perturbation chunk":
        import uapx.atomic

        def full_open(path, mode="r", *a, **k):
            if "w" in mode:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return open(path, mode, *a, **k)

        monkeypatch.setattr(uapx.atomic, "open", full_open, raising=False)
        return ["attack", "--out", str(tmp_path / "set")], "No space left on device"
    # -- plugins that break the contract (exit 3) ------------------------------------------------
    if name == "diagnostic returning a dict":
        write_distribution(tmp_path / "site", "dictdiag", "0.1", {"dictdiag": DICT_DIAG}, {"dictdiag": "dictdiag"})
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        return ["analyze", "--plugins", "dictdiag"], "plugin 'dictdiag' failed: run() returned a dict"
    if name == "method returning a wrong shape":
        write_distribution(tmp_path / "site", "badshape", "0.1", {"badshape": BAD_SHAPE}, {"badshape": "badshape"})
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        return ["analyze", "--plugins", "badshape"], "not 784 elements"
    if name == "method returning no directions":
        write_distribution(tmp_path / "site", "nodirs", "0.1", {"nodirs": NO_DIRS}, {"nodirs": "nodirs"})
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        return ["analyze", "--plugins", "nodirs"], "plugin 'nodirs' failed: the method returned no directions"
    raise KeyError(name)


def uap_file(tmp_path) -> pathlib.Path:
    """A uaps.pt holding one (1, 28, 28) UAP of norm 2."""
    from uapx.methods import UAP, uaps_to_bytes

    p = tmp_path / "uaps.pt"
    v = torch.ones(1, 28, 28)
    p.write_bytes(uaps_to_bytes([UAP("ones", v * (2.0 / float(v.norm())), "test", 2.0)]))
    return p


def image_folder(root: pathlib.Path, per_class: int = 2) -> pathlib.Path:
    """A tiny CIFAR-10 ImageFolder tree of random 32x32 PNGs."""
    import numpy as np
    from PIL import Image

    from uapx.data import CIFAR10_CLASSES

    rng = np.random.default_rng(0)
    for c in CIFAR10_CLASSES:
        d = root / "cifar10-jpeg" / "test" / c
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def hold_lock(lock: pathlib.Path):
    """Another process holding the claim on an output (as a running uapx would)."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


DICT_DIAG = '''
import uapx
from uapx.diagnostics import Diagnostic

class DictDiag(Diagnostic):
    name = "dictdiag"
    def run(self, analysis):
        return {"figures": 1}

@uapx.hookimpl
def uapx_add_diagnostics():
    return [DictDiag]
'''

BAD_SHAPE = '''
import torch
import uapx
from uapx.methods import Direction, UAPMethod

class BadShape(UAPMethod):
    name = "badshape"
    def directions(self, pset):
        return [Direction(torch.ones(10))]

@uapx.hookimpl
def uapx_add_uap_methods():
    return [BadShape]
'''

NO_DIRS = '''
import uapx
from uapx.methods import UAPMethod

class NoDirs(UAPMethod):
    name = "nodirs"
    def directions(self, pset):
        return []

@uapx.hookimpl
def uapx_add_uap_methods():
    return [NoDirs]
'''


RAISER = '''
import uapx
from uapx.methods import UAPMethod

class Raiser(UAPMethod):
    name = "raiser"
    description = "always fails"
    def directions(self, pset):
        raise RuntimeError("boom")

@uapx.hookimpl
def uapx_add_uap_methods():
    return [Raiser]
'''

CASES = ["missing data root", "wrong data layout", "data root without the data set", "truncated checkpoint",
         "checkpoint of another architecture", "eps <= 0", "steps < 1", "step size <= 0",
         "NaN arising in gradients", "unknown plugin", "plugin that raises", "unwritable output folder",
         "report folder holding another run", "more samples than exist", "unknown attack", "malformed --set",
         "disabling a plugin that does not exist",
         "argparse error", "unknown option", "device torch does not know", "cuda without a GPU for apply",
         "cuda without a GPU for train", "random draws 0", "apply batch size 0", "train checkpoint-every 0",
         "eps whose default step overflows", "data root too long", "output name too long",
         "output path that cannot be encoded", "attack output under a file", "apply output under a file", "apply output that exists",
         "train output under a file", "model for another input shape",
         "transfer model with another number of classes", "apply target for another number of classes",
         "uapx checkpoint missing its weights", "--set unknown key", "--set for a plugin not selected",
         "--set of the wrong type", "empty plugin list", "zero directions", "zero-byte image",
         "concurrent run on the same output", "full disk while writing the report",
         "full disk while writing a perturbation chunk", "diagnostic returning a dict",
         "method returning a wrong shape", "method returning no directions"]
EXIT_3 = {"plugin that raises", "diagnostic returning a dict", "method returning a wrong shape",
          "method returning no directions"}
NEEDS_NO_FAST = {"apply", "train"}  # FAST holds analyze/attack options


def snapshot(root: pathlib.Path) -> dict:
    """Every path under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0,
                                       p.stat().st_mtime_ns if p.is_file() else 0)
            for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, tmp_path, monkeypatch, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "report.json").write_text('{"precious": true}')
    argv, needle = make_case(case, tmp_path, monkeypatch)
    out_given = "--out" in argv
    if not out_given and argv[0] != "apply":
        argv += ["--out", str(tmp_path / "rep")]
    before = snapshot(tmp_path)
    fast = [] if argv[0] in NEEDS_NO_FAST else FAST if argv[0] == "analyze" else FAST[:6]
    try:
        code = main([argv[0], *fast, *argv[1:]])  # the case's own options come last and win
    finally:
        holder = getattr(__import__("uapx.cli").cli, "_test_holder", None)
        if holder is not None:
            holder.kill()
            holder.wait()
    err = capsys.readouterr().err
    assert code == (3 if case in EXIT_3 else 2), err
    lines = [line for line in err.splitlines() if line.strip()]
    bars = [line for line in lines if "%|" in line or line.startswith(("attack:", "evaluate:"))]
    errors = [line for line in lines if line not in bars]
    assert len(errors) == 1 and errors[0].startswith("uapx: error: "), err  # progress bars aside
    assert lines[-1] == errors[0] and errors[0].count("; fix: ") == 1
    assert needle in errors[0] and "Traceback" not in err, errors[0]
    assert (existing / "report.json").read_text() == '{"precious": true}'  # nothing lost
    after = snapshot(tmp_path)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))  # nothing on disk changed


def test_images_outside_the_box_and_nan_inputs_via_the_api():
    from uapx.errors import UapxError
    from uapx.pipeline import _check_images

    with pytest.raises(UapxError, match="outside \\[0, 1\\]"):
        _check_images(torch.full((2, 1, 4, 4), 1.5))
    with pytest.raises(UapxError, match="NaN or Inf"):
        _check_images(torch.tensor([[[[float("nan")]]]]))


def test_unreadable_images_are_skipped_and_counted_with_the_option(tmp_path):
    import json

    root = image_folder(tmp_path / "imgs")
    bad = root / "cifar10-jpeg" / "test" / "dog" / "broken.jpg"
    bad.write_bytes(b"not an image")
    out = tmp_path / "rep"
    assert main(["analyze", "--dataset", "cifar10", "--data-root", str(root), "--skip-unreadable",
                 "--n-samples", "all", "--steps", "1", "--plugins", "average", "--random-draws", "1",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"]["unreadable_skipped"] == {"count": 1, "files": [str(bad)]}
    assert rep["data"]["n_images"] + rep["uaps"]["held_out"]["n_images"] == 20  # the 20 readable ones, halved


def test_train_skips_unreadable_images_with_the_option_and_counts_them(tmp_path):
    """train shares analyze's --skip-unreadable: without it the broken file is named in one line (exit
    2, no model written); with it training runs on the readable images and the card counts the one left out."""
    import json

    root = image_folder(tmp_path / "imgs", per_class=1)
    (root / "cifar10-jpeg" / "test").rename(root / "cifar10-jpeg" / "train")
    image_folder(tmp_path / "imgs", per_class=1)  # the test split
    bad = root / "cifar10-jpeg" / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"not an image")
    argv = ["train", "--dataset", "cifar10", "--data-root", str(root), "--epochs", "1", "--batch-size", "5",
            "--eval-steps", "1", "--eval-n", "2", "--out", str(tmp_path / "m.pt")]
    assert main(argv) == 2 and not (tmp_path / "m.pt").exists()
    assert main([*argv, "--skip-unreadable"]) == 0
    card = json.loads((tmp_path / "m.json").read_text())
    assert card["unreadable_skipped"] == {"train": {"count": 1, "files": [str(bad)]}, "test": {"count": 0, "files": []}}


def test_final_rename_never_replaces_a_folder_that_appeared_meanwhile(tmp_path):
    from uapx import atomic
    from uapx.errors import UapxError

    target = tmp_path / "rep"
    with pytest.raises(UapxError, match="appeared while this run was writing it"):
        with atomic.atomic_path(target, directory=True, replace=False) as tmp:
            (tmp / "report.json").write_text("new")
            target.mkdir()
            (target / "report.json").write_text("theirs")
    assert (target / "report.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]  # the temporary copy is gone
    with atomic.atomic_path(target, directory=True, replace=True) as tmp:  # --overwrite replaces it
        (tmp / "report.json").write_text("new")
    assert (target / "report.json").read_text() == "new"
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic.atomic_path(empty, directory=True, replace=False) as tmp:  # an empty folder holds nothing
        (tmp / "a").write_text("a")
    assert (empty / "a").read_text() == "a"


def test_a_claim_is_exclusive_across_processes_and_removes_leftovers_of_dead_runs(tmp_path):
    from uapx import atomic
    from uapx.errors import UapxError

    out = tmp_path / "rep"
    (tmp_path / ".rep.tmp-dead1").mkdir()
    (tmp_path / ".rep.tmp-dead1" / "report.json").write_text("{}")
    (tmp_path / ".rep.old-dead2").mkdir()
    (tmp_path / ".other.tmp-keep").mkdir()  # another output's: not ours to remove
    with atomic.claim(out) as c:
        assert sorted(c.stale) == [".rep.old-dead2", ".rep.tmp-dead1"]
        assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-keep", ".rep.lock"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-keep"]  # released: no lock file left
    holder = hold_lock(tmp_path / ".rep.lock")
    try:
        with pytest.raises(UapxError, match=r"being written by another uapx run \(pid 4242\)"):
            atomic.claim(out)
    finally:
        holder.kill()
        holder.wait()
    atomic.claim(out).release()  # the holder died: its lock is free


def test_the_writability_probe_of_a_rank_survives_the_main_ranks_sweep(tmp_path, monkeypatch):
    """Under torchrun every rank checks --out, but only the main rank claims it; its claim sweeps
    the ``.<out>.probe-*`` files, so another rank's probe may vanish between write and unlink."""
    from uapx import atomic
    from uapx.report import check_output_folder

    out = tmp_path / "rep"
    real = pathlib.Path.write_bytes

    def swept(self, data):  # the main rank's claim runs right after this rank wrote its probe
        n = real(self, data)
        atomic.claim(out).release()
        return n

    monkeypatch.setattr(pathlib.Path, "write_bytes", swept)
    assert check_output_folder(out, overwrite=False) == out
    assert not any(p.name.startswith(".rep.probe-") for p in tmp_path.iterdir())


def test_write_errors_name_the_path_and_remove_the_partial_output(tmp_path, monkeypatch):
    from uapx import atomic
    from uapx.errors import UapxError

    for code, fix in ((errno.ENOSPC, "free space"), (errno.EACCES, "can write to"),
                      (errno.ENAMETOOLONG, "shorter --out")):
        def fail(self, data, code=code):
            raise OSError(code, os.strerror(code), str(self))

        monkeypatch.setattr(pathlib.Path, "write_bytes", fail)
        with pytest.raises(UapxError) as info:
            with atomic.atomic_path(tmp_path / "rep", directory=True) as tmp:
                (tmp / "report.json").write_bytes(b"{}")
        assert os.strerror(code) in str(info.value) and fix in str(info.value) and "rep" in str(info.value)
        assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(UapxError, match="cannot be encoded"):
        atomic.write_text(tmp_path / "r\ud800", "x")
    assert list(tmp_path.iterdir()) == []
