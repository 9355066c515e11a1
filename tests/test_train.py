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
    def load(name: str, split: str = "test", root=None, **options) -> uapx.data.ImageSet:
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


RUNS = {"natural": {}, "adversarial-l2": dict(adversarial="l2", eps=1.0, attack_steps=1),
        # eps warm-up over 1.5 epochs and the early-stopping check (its state lives in the checkpoint)
        "linf-ramp-early-stop": dict(adversarial="linf", eps=0.3, attack_steps=1, attack_step_size=0.375,
                                     eps_ramp_epochs=1.5, early_stop=True)}


@pytest.mark.parametrize("run", RUNS)
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, tiny_mnist, monkeypatch, capsys, run):
    kw = {**RUNS[run], "strong_n": 16}
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
    for key in ("clean_accuracy", "robust_accuracy", "strong_attack", "early_stop_check"):
        assert card_a.get(key) == card_b.get(key)


def test_eps_ramp_grows_the_training_budget_linearly(tmp_path, tiny_mnist, monkeypatch):
    attacks = []
    real_pgd = uapx.train.pgd
    monkeypatch.setattr(uapx.train, "pgd", lambda model, x, y, **kw: attacks.append(kw) or real_pgd(model, x, y, **kw))
    train(config(tmp_path / "r.pt", adversarial="linf", eps=0.3, attack_steps=2, attack_step_size=0.2,
                 eps_ramp_epochs=0.5, epochs=1, eval_n=8, strong_n=8, eval_steps=1))
    ramp = [a for a in attacks if a.get("random_start") and a["steps"] == 2][:BATCHES_PER_EPOCH]
    assert len(ramp) == BATCHES_PER_EPOCH
    for k, a in enumerate(ramp):  # 4 batches of warm-up: eps * (k + 1) / 4, step size scaled alike
        scale = min(1.0, (k + 1) / 4)
        assert a["eps"] == pytest.approx(0.3 * scale) and a["step_size"] == pytest.approx(0.2 * scale)


def test_early_stop_keeps_the_weights_of_the_epoch_before_the_fall(tmp_path, tiny_mnist, monkeypatch, capsys):
    seen = []  # (epoch, weights) at each check
    accuracies = iter([0.50, 0.45, 0.20, 0.60])  # falls by 25 points at epoch 3

    def check(model, images, c, epoch):
        assert len(images) == 512 and c.adversarial == "linf"
        seen.append((epoch, {k: v.clone() for k, v in model.state_dict().items()}))
        return next(accuracies)

    monkeypatch.setattr(uapx.train, "_early_stop_check", check)
    out = tmp_path / "s.pt"
    card = train(config(out, adversarial="linf", eps=0.3, attack_steps=1, attack_step_size=0.375, epochs=4,
                        early_stop=True, strong_n=8))
    assert [e for e, _ in seen] == [1, 2, 3]  # epoch 4 never ran
    assert card["early_stop_check"]["pgd_accuracy_per_epoch"] == [0.50, 0.45, 0.20]
    assert card["early_stop_check"]["stopped_at_epoch"] == 3
    assert "stopping with the weights of epoch 2" in capsys.readouterr().err
    final = weights(out)
    for k, v in seen[1][1].items():
        assert torch.equal(final[k], v), k
    assert any(not torch.equal(final[k], v) for k, v in seen[2][1].items())  # not the weights of epoch 3
    # started again, the stopped run goes straight to the card
    card2 = train(config(out, adversarial="linf", eps=0.3, attack_steps=1, attack_step_size=0.375, epochs=4,
                         early_stop=True, strong_n=8))
    assert len(seen) == 3 and card2["clean_accuracy"] == card["clean_accuracy"]


def test_early_stop_check_is_pgd_accuracy_on_the_training_sample(tiny_mnist):
    torch.manual_seed(0)
    model = uapx.models.build("mnist-cnn").eval()
    c = TrainConfig(adversarial="linf", eps=0.3, seed=0).resolved()
    imgs = tiny_mnist["train"].subset(64, seed=3)
    acc = uapx.train._early_stop_check(model, imgs, c, epoch=2)
    x_adv = pgd(model, imgs.images(), imgs.y, norm="linf", eps=0.3, steps=10, step_size=0.075, random_start=True,
                generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert acc == float((model(x_adv).argmax(1) == imgs.y).double().mean())


def test_checkpoints_written_before_a_setting_existed_still_resume():
    c = TrainConfig(adversarial="l2", eps=1.0).resolved()
    old = json.loads(uapx.train._config_key(c))
    for new_setting in ("eps_ramp_epochs", "early_stop"):
        old.pop(new_setting)
    assert uapx.train._same_run(json.dumps(old), c)
    assert not uapx.train._same_run(json.dumps(old), TrainConfig(adversarial="l2", eps=1.0, early_stop=True).resolved())
    assert not uapx.train._same_run(json.dumps({**old, "eps": 2.0}), c)
    assert not uapx.train._same_run(None, c)


@pytest.mark.parametrize("kw, match", [(dict(eps_ramp_epochs=5), "eps-ramp-epochs"),
                                       (dict(eps_ramp_epochs=-1), "eps-ramp-epochs"),
                                       (dict(early_stop=True, adversarial=None), "early-stop")])
def test_bad_training_settings_are_refused(kw, match):
    with pytest.raises(UapxError, match=match):
        TrainConfig(**{"adversarial": "linf", "eps": 0.3, "epochs": 3, **kw}).resolved()


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
                        eval_steps=3, eval_n=32, half=True, strong_n=16))
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
