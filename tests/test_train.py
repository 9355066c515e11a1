"""Training: interrupted and resumed runs end with the same weights; adversarial runs; model cards.

Runs use 512 real MNIST training images (``uapx.data.load`` is patched to select them), so
that a run takes seconds.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import uapx.data
import uapx.models
import uapx.train
from uapx.attacks import pgd
from uapx.errors import UapxError
from uapx.train import TrainConfig, train

PREPARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "prepare.py"
BATCHES_PER_EPOCH = 8  # 512 images / 64
ADAM_STEP = torch.optim.Adam.step


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """Real MNIST laid out by shared/data/prepare.py in a temporary folder."""
    if not PREPARE.is_file():
        pytest.skip(f"real MNIST not available: {PREPARE} is missing")
    root = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, str(PREPARE), str(root), "--only", "mnist"], check=True, capture_output=True)
    return root


@pytest.fixture(scope="module")
def small_sets(mnist_root) -> dict[str, uapx.data.ImageSet]:
    real_load = uapx.data.load
    return {"train": real_load("mnist", "train", mnist_root).subset(512, seed=0),
            "test": real_load("mnist", "test", mnist_root).subset(256, seed=1)}


@pytest.fixture
def tiny_mnist(monkeypatch, small_sets) -> dict[str, uapx.data.ImageSet]:
    """``uapx.data.load`` returns the small sets (data selection only)."""
    def load(name: str, split: str = "test", root=None) -> uapx.data.ImageSet:
        assert name == "mnist"
        return small_sets[split]

    monkeypatch.setattr(uapx.data, "load", load)
    return small_sets


class Interrupted(Exception):
    """Stands in for Ctrl-C (a plain Exception, so that it cannot stop the test session)."""


def count_steps(monkeypatch, *, stop_after: int | None = None) -> dict[str, int]:
    """Count optimizer steps; with ``stop_after``, interrupt the run at the next one."""
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        if stop_after is not None and calls["n"] >= stop_after:
            raise Interrupted
        calls["n"] += 1
        return ADAM_STEP(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    return calls


def config(out: Path, **kw) -> TrainConfig:
    base = dict(dataset="mnist", epochs=2, batch_size=64, checkpoint_every=2, eval_steps=2, eval_n=32,
                half=False, out=str(out), command="uapx train (test)")
    return TrainConfig(**{**base, **kw})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize("adversarial", [None, "l2"], ids=["natural", "adversarial-l2"])
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, tiny_mnist, monkeypatch, capsys,
                                                                   adversarial):
    kw = dict(adversarial=adversarial, eps=1.0, attack_steps=1) if adversarial else {}
    full = count_steps(monkeypatch)
    card_a = train(config(tmp_path / "a.pt", **kw))
    assert full["n"] == 2 * BATCHES_PER_EPOCH

    # stop in epoch 2 after 5 of its batches: the last checkpoint is at batch 4, so batch 5 is lost
    count_steps(monkeypatch, stop_after=BATCHES_PER_EPOCH + 5)
    with pytest.raises(Interrupted):
        train(config(tmp_path / "b.pt", **kw))
    assert (tmp_path / "b.pt.ckpt").is_file() and not (tmp_path / "b.pt").exists()

    resumed = count_steps(monkeypatch)
    capsys.readouterr()
    card_b = train(config(tmp_path / "b.pt", **kw))
    assert "at epoch 2, batch 4" in capsys.readouterr().err
    assert resumed["n"] == BATCHES_PER_EPOCH - 4  # it resumed; it did not start over

    wa, wb = weights(tmp_path / "a.pt"), weights(tmp_path / "b.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    for key in ("clean_accuracy", "robust_accuracy"):
        assert card_a[key] == card_b[key]


def test_checkpoint_of_another_run_is_refused(tmp_path, tiny_mnist, monkeypatch):
    count_steps(monkeypatch, stop_after=3)
    with pytest.raises(Interrupted):
        train(config(tmp_path / "m.pt"))
    with pytest.raises(UapxError, match="belongs to a different training run"):
        train(config(tmp_path / "m.pt", lr=5e-4))


def test_adversarial_run_records_robust_accuracy(tmp_path, tiny_mnist, monkeypatch):
    attacks = []
    real_pgd = uapx.train.pgd

    def spy(model, x, y, **kw):
        attacks.append(kw)
        return real_pgd(model, x, y, **kw)

    monkeypatch.setattr(uapx.train, "pgd", spy)
    out = tmp_path / "adv.pt"
    card = train(config(out, adversarial="l2", eps=1.0, attack_steps=2, epochs=1, batch_size=128,
                        eval_steps=3, eval_n=32, half=True))
    n_batches = 512 // 128
    train_attacks = attacks[:n_batches]
    assert all(a["norm"] == "l2" and a["eps"] == 1.0 and a["steps"] == 2 and a["random_start"]
               for a in train_attacks)  # training examples were adversarial

    assert card["training"] == "PGD-L2 adversarial" and card["config"]["adversarial"] == "l2"
    assert card["robust_attack"] == {"norm": "l2", "eps": 1.0, "steps": 3, "step_size": 2.5 * 1.0 / 3,
                                     "random_start": False, "images": 32}
    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(card))

    # re-measure both accuracies from the shipped file
    model, saved_card = uapx.models.load_with_card(str(out))
    assert saved_card["robust_accuracy"] == card["robust_accuracy"]
    test = tiny_mnist["test"]
    with torch.no_grad():
        clean = (model(test.images()).argmax(1) == test.y).float().mean().item()
    assert clean == pytest.approx(card["clean_accuracy"], abs=1e-9)
    sub = test.subset(32, seed=0)
    x_adv = pgd(model, sub.images(), sub.y, norm="l2", eps=1.0, steps=3, step_size=2.5 / 3)
    with torch.no_grad():
        robust = (model(x_adv).argmax(1) == sub.y).float().mean().item()
    assert robust == pytest.approx(card["robust_accuracy"], abs=1e-9)
