"""Every shipped zoo model meets its issue's targets, and its card's numbers are re-measured here."""
from __future__ import annotations

import math

import pytest
import torch

import uapx.data
import uapx.models
from uapx.attacks import pgd

# name -> (min clean accuracy, min robust accuracy, norm and eps of the robust accuracy); issue 13's for the
# Linf, multi-step L2 and eps-1 models. A card whose model misses one says so in "targets_missed".
TARGETS = {
    "mnist-natural": (0.99, None, None, None),
    "mnist-l2": (0.98, 0.60, "l2", 2.0),
    "cifar10-natural": (0.85, None, None, None),
    "cifar10-l2": (0.70, 0.45, "l2", 0.5),
    "mnist-linf": (0.98, 0.85, "linf", 0.3),
    "cifar10-linf": (0.70, 0.35, "linf", 8 / 255),
    "cifar10-l2-pgd": (0.75, 0.55, "l2", 0.5),
    "cifar10-l2-eps1": (0.65, 0.35, "l2", 1.0),
}
NAMES = uapx.models.zoo.names()


def test_the_zoo_ships_the_embedded_default():
    assert "mnist-natural" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_card_states_targets_that_hold(name):
    card = uapx.models.zoo.card(name)
    clean_min, robust_min, norm, eps = TARGETS[name]
    missed = [k for k, ok in (("clean", card["clean_accuracy"] >= clean_min),
                              ("robust", robust_min is None or card["robust_accuracy"] >= robust_min)) if not ok]
    assert missed == card.get("targets_missed", [])  # met, or the miss is labelled in the card
    assert card["clean_eval_images"] == 10_000
    if robust_min is not None:
        assert card["robust_attack"]["eps"] == pytest.approx(eps) and card["robust_attack"]["norm"] == norm
        assert card["robust_attack"]["images"] == 10_000
        assert card["robust_attack"]["steps"] > card["config"]["attack_steps"]  # stronger than training
        assert card["config"]["adversarial"] == norm
    for key in ("dataset", "arch", "command", "epochs", "training", "data"):
        assert card[key]
    assert uapx.models.zoo.path(name).stat().st_size <= 10 * 2 ** 20


# robust models whose strong-attack measurement has not finished yet (it must be absent, not guessed)
STRONG_PENDING: set[str] = set()  # cifar10-l2 measured 2026-12-02


@pytest.mark.parametrize("name", [n for n in NAMES if TARGETS[n][1] is not None])
def test_robust_card_records_the_strong_attack_and_its_verdict(name):
    card = uapx.models.zoo.card(name)
    if name in STRONG_PENDING:
        assert "strong_attack" not in card  # measured now: drop it from STRONG_PENDING
        return
    strong = card["strong_attack"]  # 100-step PGD, 5 random restarts, the training norm and eps
    assert (strong["steps"], strong["restarts"], strong["random_start"]) == (100, 5, True)
    assert strong["norm"] == card["config"]["adversarial"] and strong["eps"] == card["config"]["eps"]
    assert strong["images"] >= 300 and ("seed" in strong["sample"] or strong["images"] == 10_000)
    assert strong["suspect"] == (strong["weak_attack_accuracy_same_images"] - strong["accuracy"] > 0.05)
    lo, hi = strong["accuracy_95ci"]
    assert lo <= strong["accuracy"] <= hi


def _remeasure(name: str, test: uapx.data.ImageSet, robust_n: int) -> None:
    """Clean accuracy on the whole test set as the card states, and robust accuracy on a sample
    within 4 standard errors of the card's full-set figure."""
    model, card = uapx.models.load_with_card(f"zoo:{name}")
    with torch.no_grad():
        pred = torch.cat([model(test.images(slice(s, s + 1000))).argmax(1) for s in range(0, len(test), 1000)])
    assert len(test) == card["clean_eval_images"]
    assert float((pred == test.y).double().mean()) == pytest.approx(card["clean_accuracy"], abs=0.001)
    atk = card["robust_attack"]
    sub = test.subset(robust_n, seed=1)
    x_adv = pgd(model, sub.images(), sub.y, norm=atk["norm"], eps=atk["eps"], steps=atk["steps"],
                step_size=atk["step_size"])
    with torch.no_grad():
        robust = float((model(x_adv).argmax(1) == sub.y).double().mean())
    p = card["robust_accuracy"]
    se = math.sqrt(max(p * (1 - p), 0.01) / robust_n)
    assert abs(robust - p) <= 4 * se, (robust, p)


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("mnist")])
def test_mnist_card_numbers_are_reproduced(name):
    _remeasure(name, uapx.data.load("mnist", "test"), 300)


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("cifar10")])
def test_cifar10_card_numbers_are_reproduced(name, data_root):
    card = uapx.models.zoo.card(name)
    assert "JPEG copy" in card["data"]  # trained and measured on shared/data's CIFAR-10 copy
    _remeasure(name, uapx.data.load("cifar10", "test", str(data_root)), 200)


def test_robust_models_are_discoverable_per_data_set():
    for dataset in ("mnist", "cifar10"):
        found = uapx.models.zoo.robust_names(dataset)
        assert found == [n for n in NAMES if n.startswith(dataset + "-") and TARGETS[n][1] is not None]
