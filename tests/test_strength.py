"""Strong-attack evaluation: restarts as a wrapper, and the suspect flag catching masked gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import uapx.data
import uapx.models
from uapx import strength
from uapx.errors import UapxError


class MarkerModel(nn.Module):
    """Predicts the class written in pixel (0, 0, 1) as ``class / 10``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot((x[:, 0, 0, 1] * 10).round().long() % 10, 10).float()


def test_restarts_fool_an_image_if_any_attempt_does_and_only_attack_survivors():
    n, restarts = 12, 3
    g = torch.Generator().manual_seed(0)
    fools = torch.rand(n, restarts, generator=g) < 0.3  # does attempt r fool image i?
    y = torch.arange(n) % 10
    x = torch.zeros(n, 1, 2, 2)
    x[:, 0, 0, 0] = torch.arange(n) / 100  # image id
    x[:, 0, 0, 1] = y / 10
    calls = []

    def attack(model, xb, yb, generator):
        r = len(calls)
        ids = (xb[:, 0, 0, 0] * 100).round().long()
        calls.append(ids.tolist())
        out = xb.clone()
        out[fools[ids, r], 0, 0, 1] = ((yb[fools[ids, r]] + 1) % 10) / 10
        return out

    x_adv = strength.with_restarts(attack, restarts)(MarkerModel(), x, y, torch.Generator())
    fooled = MarkerModel()(x_adv).argmax(1) != y
    assert fooled.tolist() == fools.any(1).tolist()
    for r, ids in enumerate(calls):  # attempt r only saw the images no earlier attempt fooled
        assert ids == [i for i in range(n) if not fools[i, :r].any()]
    with pytest.raises(UapxError, match="restarts"):
        strength.with_restarts(attack, 0)


class FlatOnTheDataGrid(nn.Module):
    """``model`` behind a continuous staircase that is flat within a quarter step of every multiple
    of 1/255 (where all MNIST pixels lie) and steeper between: zero gradient at every clean image
    (masked gradients), true gradients at almost every random start."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x * 255
        k = torch.round(r)
        f = r - k  # in [-0.5, 0.5]
        ramp = torch.sign(f) * (f.abs() - 0.25).clamp_min(0) * 2  # 0 for |f| < 0.25, +-0.5 at the edges
        return self.model((k + ramp) / 255)


def _card(eps: float) -> dict:
    return {"name": "t", "config": {"adversarial": "linf", "eps": eps},
            "robust_attack": {"norm": "linf", "eps": eps, "steps": 20, "step_size": 2.5 * eps / 20,
                              "random_start": False}}


def test_masked_gradients_are_flagged_suspect_and_a_plain_model_is_not():
    model = uapx.models.load("zoo:mnist-natural")
    test = uapx.data.load("mnist", "test")
    entry = strength.card_entry(FlatOnTheDataGrid(model).eval(), test, _card(0.3), n=100, seed=0, steps=5, restarts=2)
    # 20-step PGD from the clean point cannot move (sign of a zero gradient); random starts fool it
    assert entry["weak_attack_accuracy_same_images"] > 0.9
    assert entry["accuracy"] < entry["weak_attack_accuracy_same_images"] - 0.05 and entry["suspect"]
    lo, hi = entry["accuracy_95ci"]
    assert lo <= entry["accuracy"] <= hi and entry["images"] == 100 and "seed 0" in entry["sample"]

    control = strength.card_entry(model, test, _card(0.3), n=100, seed=0, steps=5, restarts=2)
    assert not control["suspect"]  # a natural model falls to both attacks alike


def test_strong_attack_is_at_least_as_strong_as_one_start_and_reproducible():
    model = uapx.models.load("zoo:mnist-l2")
    imgs = uapx.data.load("mnist", "test").subset(64, seed=2)
    one = strength.accuracy_under(model, imgs, strength.pgd_attack("l2", 2.0, 10), seed=5)
    five = strength.strong_attack(model, imgs, norm="l2", eps=2.0, steps=10, restarts=5, seed=5)
    assert five <= one  # the first restart is the one-start attack (same seed), later ones only add
    assert strength.strong_attack(model, imgs, norm="l2", eps=2.0, steps=10, restarts=5, seed=5) == five


def test_wilson_interval_matches_the_formula():
    lo, hi = strength.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
