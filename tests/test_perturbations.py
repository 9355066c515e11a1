"""PerturbationSet storage (chunked folders), `uapx attack`, and resume after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from uapx.cli import main
from uapx.errors import UapxError
from uapx.perturbations import PerturbationSet, PerturbationWriter


def random_set(n=50, d=12, seed=0) -> PerturbationSet:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    return PerturbationSet(torch.randn(n, d, generator=g), labels, labels.clone(), (labels + 1) % 3, (3, 2, 2), 1.5,
                           "l2", "zoo:x", {"steps": 3}, torch.arange(n) * 2)


def test_folder_round_trip_streams_the_same_rows(tmp_path):
    s = random_set()
    s.save(tmp_path / "set", chunk_size=16)
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == [
        "chunk-00000.pt", "chunk-00001.pt", "chunk-00002.pt", "chunk-00003.pt", "manifest.json"]
    disk = PerturbationSet.load(tmp_path / "set")
    assert disk.deltas is None and len(disk) == 50 and disk.d == 12
    assert torch.equal(torch.cat(list(disk.chunks(7))), s.deltas)
    assert max(b.shape[0] for b in disk.chunks(7)) == 7
    for name in ("labels", "clean_pred", "adv_pred", "indices"):
        assert torch.equal(getattr(disk, name), getattr(s, name))
    # selections of selections, on disk, equal those in memory
    m1 = disk.labels != 0
    sub_disk, sub_mem = disk.where(m1), s.where(m1)
    m2 = torch.arange(len(sub_mem)) % 2 == 0
    assert torch.equal(sub_disk.where(m2).matrix(), sub_mem.where(m2).matrix())
    assert torch.equal(sub_disk.where(m2).labels, sub_mem.where(m2).labels)
    assert torch.equal(PerturbationSet.load(tmp_path / "set", in_memory=True).deltas, s.deltas)


def test_incomplete_and_foreign_folders_are_refused(tmp_path):
    w = PerturbationWriter(tmp_path / "p", random_set().metadata())
    s = random_set()
    w.write_chunk(s.deltas[:10], s.labels[:10], s.clean_pred[:10], s.adv_pred[:10], None)
    with pytest.raises(UapxError, match="incomplete"):
        PerturbationSet.load(tmp_path / "p")
    with pytest.raises(UapxError, match="other settings"):
        PerturbationWriter(tmp_path / "p", {**s.metadata(), "eps": 9.0})
    assert PerturbationWriter(tmp_path / "p", s.metadata()).rows_done == 10  # resumable
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("hi")
    with pytest.raises(UapxError, match="not a perturbation set"):
        PerturbationWriter(tmp_path / "other", s.metadata())


ATTACK = ["attack", "--n-samples", "96", "--steps", "3", "--batch-size", "16", "--chunk-size", "32"]


def test_attack_command_matches_analyze_perturbations(tmp_path, capsys):
    assert main([*ATTACK, "--out", str(tmp_path / "set")]) == 0
    s = PerturbationSet.load(tmp_path / "set")
    assert len(s) == 96 and s.d == 784 and s.attack["steps"] == 3 and s.model_id == "zoo:mnist-natural"
    norms = s.matrix().norm(dim=1)
    assert float(norms.max()) <= 2.0 + 1e-5
    man = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert man["complete"] and [c["rows"] for c in man["chunks"]] == [32, 32, 32]
    from uapx.attacks import pgd
    from uapx import data, models

    images = data.load("mnist", "test").subset(96, seed=0)
    assert torch.equal(s.indices, images.indices)
    model = models.load("zoo:mnist-natural")
    x = images.images(slice(0, 16))
    ref = pgd(model, x, images.y[:16], eps=2.0, steps=3, step_size=2.5 * 2.0 / 3)
    torch.testing.assert_close(s.matrix()[:16], (ref - x).reshape(16, -1), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_killed_attack_resumes_to_identical_output(tmp_path):
    args = [sys.executable, "-m", "uapx", *ATTACK, "--n-samples", "256"]
    full = tmp_path / "full"
    subprocess.run([*args, "--out", str(full)], check=True, capture_output=True)
    part = tmp_path / "part"
    proc = subprocess.Popen([*args, "--out", str(part)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it once at least one chunk is complete, before the end
        man = part / "manifest.json"
        if man.exists() and len(json.loads(man.read_text())["chunks"]) >= 1:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads((part / "manifest.json").read_text())
    assert not done["complete"], "the run finished before it could be killed"
    subprocess.run([*args, "--out", str(part)], check=True, capture_output=True)
    a, b = PerturbationSet.load(full, in_memory=True), PerturbationSet.load(part, in_memory=True)
    assert torch.equal(a.deltas, b.deltas) and torch.equal(a.adv_pred, b.adv_pred)
    assert not [p for p in part.iterdir() if ".tmp-" in p.name]
