"""Strong-attack evaluation of robust models: PGD with random restarts, and the "suspect" flag.

A model whose gradients are masked passes a 20-step PGD check from the clean point but not many
steps from several random starts. :func:`with_restarts` turns any attack into its restarted
version (an image counts as robust only if every restart fails); :func:`strong_attack` is the
issue-13 evaluation (100-step PGD, 5 random restarts, the training norm and eps);
:func:`card_entry` writes it into a model card beside the 20-step figure.

Re-measure a shipped card (updates the JSON beside the weights)::

    python -m uapx.strength zoo:cifar10-l2 --data-root DATA --n 500
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from . import atomic, data
from .attacks import pgd
from .defaults import default_step_size
from .errors import UapxError

AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]

STRONG_STEPS = 100
STRONG_RESTARTS = 5
SUSPECT_GAP = 0.05  # strong-attack accuracy this far below the 20-step figure marks the model suspect


def with_restarts(attack: AttackFn, restarts: int) -> AttackFn:
    """``attack`` run ``restarts`` times; per image, the first perturbation that fools the model.

    ``attack(model, x, y, generator) -> x_adv`` must draw its random start from ``generator``;
    later restarts attack only the images that earlier ones did not fool (same result, less work).
    Returns an attack of the same signature: ``x_adv`` ``(N, C, H, W)``.
    """
    if restarts < 1:
        raise UapxError(f"restarts must be >= 1, got {restarts}", "pass 1 or more restarts")

    def restarted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        best = x.detach().clone()
        alive = torch.ones(len(x), dtype=torch.bool, device=x.device)  # not yet fooled
        for _ in range(restarts):
            idx = alive.nonzero().flatten()
            if idx.numel() == 0:
                break
            xa = attack(model, x[idx], y[idx], generator)
            with torch.no_grad():
                fooled = model(xa).argmax(1) != y[idx]
            best[idx] = xa  # the last attempt for images still standing, the fooling one otherwise
            alive[idx[fooled]] = False
        return best

    return restarted


def pgd_attack(norm: str, eps: float, steps: int, *, random_start: bool = True) -> AttackFn:
    """PGD with the default step size (:func:`uapx.defaults.default_step_size`) as an :data:`AttackFn`."""
    def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return pgd(model, x, y, norm=norm, eps=eps, steps=steps, step_size=default_step_size(eps, steps),
                   random_start=random_start, generator=generator)
    return attack


def accuracy_under(model: nn.Module, images: data.ImageSet, attack: AttackFn | None, *, seed: int = 0,
                   batch_size: int = 250, device: str = "cpu", desc: str = "attack") -> float:
    """Accuracy of ``model`` on ``images`` under ``attack`` (clean when None); batch ``i`` draws its
    random starts from a generator seeded ``seed * 100003 + i`` (the same figure for any device)."""
    model.eval()
    correct = 0
    for i, s in enumerate(tqdm(range(0, len(images), batch_size), desc=desc, leave=False, unit="batch")):
        x = images.images(slice(s, s + batch_size)).to(device)
        y = images.y[s:s + batch_size].to(device)
        if attack is not None:
            x = attack(model, x, y, torch.Generator().manual_seed(seed * 100003 + i))
        with torch.no_grad():
            correct += int((model(x).argmax(1) == y).sum())
    return correct / len(images)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``k / n``."""
    try:
        from .stats import wilson_interval  # the project's one definition, where it exists
        lo, hi = wilson_interval(k, n)
        return float(lo), float(hi)
    except (ImportError, TypeError, ValueError):
        p, d = k / n, 1 + z * z / n
        c = (p + z * z / (2 * n)) / d
        h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
        return max(0.0, c - h), min(1.0, c + h)


def strong_attack(model: nn.Module, images: data.ImageSet, *, norm: str, eps: float, steps: int = STRONG_STEPS,
                  restarts: int = STRONG_RESTARTS, seed: int = 0, batch_size: int = 250,
                  device: str = "cpu") -> float:
    """Accuracy under ``steps``-step PGD (``norm``, ``eps``) with ``restarts`` random restarts."""
    attack = with_restarts(pgd_attack(norm, eps, steps), restarts)
    return accuracy_under(model, images, attack, seed=seed, batch_size=batch_size, device=device,
                          desc=f"{steps}-step PGD-{norm.upper()} x {restarts} restarts")


def card_entry(model: nn.Module, test_set: data.ImageSet, card: dict, *, n: int | None = None, seed: int = 0,
               device: str = "cpu", steps: int = STRONG_STEPS, restarts: int = STRONG_RESTARTS) -> dict:
    """The card's ``strong_attack`` entry: accuracy under the strong attack at the training norm and eps
    on all test images (``n=None``) or a seeded random sample of ``n``, with the 20-step (card's) figure
    re-measured on the same images, and ``suspect`` when the strong figure is > 5 points below it."""
    cfg = card["config"]
    norm, eps = cfg["adversarial"], cfg["eps"]
    if norm is None:
        raise UapxError(f"{card.get('name')!r} is not adversarially trained", "strong attacks are for robust models")
    images = test_set.subset(n, seed=seed) if n else test_set
    atk = card["robust_attack"]
    weak = accuracy_under(model, images, pgd_attack(atk["norm"], atk["eps"], atk["steps"], random_start=False),
                          device=device, desc=f"{atk['steps']}-step PGD-{atk['norm'].upper()}")
    strong = strong_attack(model, images, norm=norm, eps=eps, steps=steps, restarts=restarts, seed=seed,
                           device=device)
    k = round(strong * len(images))
    return {"norm": norm, "eps": eps, "steps": steps, "restarts": restarts, "step_size": default_step_size(eps, steps),
            "random_start": True, "images": len(images),
            "sample": ("all test images" if n is None
                       else f"seeded random sample (uapx.data.ImageSet.subset, seed {seed})"),
            "accuracy": strong, "accuracy_95ci": wilson(k, len(images)),
            "weak_attack_accuracy_same_images": weak,
            "weak_attack": {k2: atk[k2] for k2 in ("norm", "eps", "steps", "step_size", "random_start")},
            "suspect": bool(weak - strong > SUSPECT_GAP), "suspect_rule": f"{atk['steps']}-step accuracy minus strong accuracy > {SUSPECT_GAP}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m uapx.strength", description=__doc__.split("\n")[0])
    ap.add_argument("model", help="zoo:<name> or a model file with a card JSON beside it")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--n", type=int, default=None, help="seeded random sample of test images (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    from pathlib import Path

    from .models import load_with_card, zoo
    try:
        model, card = load_with_card(args.model)
        card_path = zoo.path(args.model[4:]).with_suffix(".json") if args.model.startswith("zoo:") \
            else Path(args.model).with_suffix(".json")
        test_set = data.load(card["dataset"], "test", args.data_root)
        entry = card_entry(model.to(args.device), test_set, card, n=args.n, seed=args.seed, device=args.device)
    except UapxError as e:
        print(f"uapx: error: {e}", file=sys.stderr)
        return 2
    command = "python -m uapx.strength " + " ".join(sys.argv[1:] if argv is None else argv)
    on_disk = json.loads(card_path.read_text())
    on_disk["strong_attack"] = {**entry, "command": command}
    atomic.write_json(card_path, on_disk)
    print(f"{card_path}: {entry['accuracy']:.4f} under {entry['steps']}-step PGD-{entry['norm'].upper()} x "
          f"{entry['restarts']} restarts at eps {entry['eps']} ({entry['images']} images; "
          f"{entry['weak_attack']['steps']}-step "
          f"{entry['weak_attack_accuracy_same_images']:.4f}){' SUSPECT' if entry['suspect'] else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
