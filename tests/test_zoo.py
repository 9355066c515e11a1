"""Every shipped zoo model meets its issue's targets, and its card's numbers are re-measured here."""
from __future__ import annotations

import math

import pytest
import torch

import uapx.data
import uapx.models
from uapx.attacks import pgd

# name -> (min clean accuracy, min robust accuracy, eps of the robust accuracy)
TARGETS = {
    "mnist-natural": (0.99, None, None),
    "mnist-l2": (0.98, 0.60, 2.0),
    "cifar10-natural": (0.85, None, None),
    "cifar10-l2": (0.70, 0.45, 0.5),
}
NAMES = uapx.models.zoo.names()


def test_the_zoo_ships_the_embedded_default():
    assert "mnist-natural" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_card_states_targets_that_hold(name):
    card = uapx.models.zoo.card(name)
    clean_min, robust_min, eps = TARGETS[name]
    assert card["clean_accuracy"] >= clean_min
    assert card["clean_eval_images"] == 10_000
    if robust_min is not None:
        assert card["robust_accuracy"] >= robust_min
        assert card["robust_attack"]["eps"] == eps and card["robust_attack"]["norm"] == "l2"
        assert card["robust_attack"]["steps"] > card["config"]["attack_steps"]  # stronger than training
    for key in ("dataset", "arch", "command", "epochs", "training", "data"):
        assert card[key]
    assert uapx.models.zoo.path(name).stat().st_size <= 10 * 2 ** 20


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
