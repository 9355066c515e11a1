"""Natural and adversarial (PGD-L2 / PGD-Linf) training with checkpoints, resume and evaluation.

A training run writes ``<out>.ckpt`` (uapx format plus ``train_state``) every
``checkpoint_every`` batches and at the end of every epoch, atomically; started again with the
same command it resumes from there and ends with the same weights as an uninterrupted run.
The final model is written to ``<out>`` with a model card (JSON beside it).
"""
from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import atomic, data, strength
from .attacks import check_budget, pgd
from .defaults import default_step_size
from .errors import UapxError
from .models import build, save_model
from .models.architectures import DEFAULT_ARCH
from .models.checkpoints import load_state, read_checkpoint


EARLY_STOP_IMAGES = 512  # training images of the early-stopping check
EARLY_STOP_STEPS = 10  # PGD steps of the check
EARLY_STOP_DROP = 0.2  # a fall of the check's accuracy by more than this stops training (Wong et al. 2020)


@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded in the model card)."""

    dataset: str = "mnist"
    arch: str | None = None
    adversarial: str | None = None  # None, "l2" or "linf"
    eps: float = 2.0
    attack_steps: int = 10
    attack_step_size: float | None = None  # default uapx.defaults.default_step_size (2.5 * eps / steps)
    eps_ramp_epochs: float = 0.0  # training eps grows linearly from eps/ramp-batches to eps over this many epochs
    early_stop: bool = False  # Wong et al. 2020: stop when the epoch-end PGD accuracy drops > 20 points
    epochs: int = 3
    batch_size: int = 128
    lr: float | None = None
    weight_decay: float | None = None
    optimizer: str | None = None  # "adam" (MNIST default) or "sgd" (CIFAR-10 default)
    augment: bool | None = None  # random crop + flip (CIFAR-10 default)
    seed: int = 0
    data_root: str | None = None
    device: str = "cpu"
    out: str = "model.pt"
    checkpoint_every: int = 200
    eval_steps: int = 40
    eval_eps: float | None = None  # default: eps
    eval_n: int | None = None  # test images for the robust accuracy; None = all
    strong_n: int | None = 1000  # seeded sample of test images for the strong attack (uapx.strength); None = all
    half: bool = True
    skip_unreadable: bool = False  # leave out image files that cannot be decoded (counted in the model card)
    command: str = field(default_factory=lambda: " ".join(
        ["uapx"] + [shlex.quote(a) for a in sys.argv[1:]]))

    def resolved(self) -> "TrainConfig":
        c = TrainConfig(**asdict(self))
        cifar = c.dataset == "cifar10"
        c.arch = c.arch or DEFAULT_ARCH[c.dataset]
        c.optimizer = c.optimizer or ("sgd" if cifar else "adam")
        c.lr = c.lr if c.lr is not None else (0.1 if c.optimizer == "sgd" else 1e-3)
        c.weight_decay = c.weight_decay if c.weight_decay is not None else (5e-4 if c.optimizer == "sgd" else 0.0)
        c.augment = c.augment if c.augment is not None else cifar
        if c.attack_step_size is None:
            c.attack_step_size = default_step_size(c.eps, c.attack_steps)
        c.eval_eps = c.eval_eps or c.eps
        if c.adversarial not in (None, "l2", "linf"):
            raise UapxError(f"unknown --adversarial {c.adversarial!r}", "choose l2 or linf, or leave it out")
        if c.adversarial:
            check_budget(c.eps, c.attack_steps, c.attack_step_size)
        if not (c.eps_ramp_epochs >= 0) or c.eps_ramp_epochs > c.epochs:
            raise UapxError(f"--eps-ramp-epochs must lie in [0, --epochs], got {c.eps_ramp_epochs}",
                            "pass e.g. --eps-ramp-epochs 2 (0 = no warm-up)")
        if c.early_stop and not c.adversarial:
            raise UapxError("--early-stop checks adversarial training against catastrophic overfitting",
                            "pass --adversarial linf (or l2) with it, or leave --early-stop out")
        if c.epochs < 1 or c.batch_size < 1:
            raise UapxError("--epochs and --batch-size must be >= 1", "pass positive values")
        return c


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop (pad 4) and horizontal flip, ``(N, C, H, W)`` float."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    ox = torch.randint(0, 9, (n,), generator=g)
    oy = torch.randint(0, 9, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        img = padded[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w]
        out[i] = img.flip(-1) if flip[i] else img
    return out


def _optimizer(c: TrainConfig, model: nn.Module, steps_total: int):
    if c.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    elif c.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=0.9, weight_decay=c.weight_decay, nesterov=True)
    else:
        raise UapxError(f"unknown optimizer {c.optimizer!r}", "choose adam or sgd")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=steps_total, pct_start=0.15)
    return opt, sched


def evaluate(model: nn.Module, images: data.ImageSet, *, norm: str | None = None, eps: float = 0.0,
             steps: int = 0, step_size: float | None = None, batch_size: int = 500, device: str = "cpu",
             desc: str = "eval") -> float:
    """Accuracy of ``model`` on ``images``, clean (``norm=None``) or under PGD."""
    model.eval()
    correct = 0
    for s in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, unit="batch"):
        x = images.images(slice(s, s + batch_size)).to(device)
        y = images.y[s:s + batch_size].to(device)
        if norm is not None:
            step = step_size if step_size is not None else default_step_size(eps, steps)
            x = pgd(model, x, y, norm=norm, eps=eps, steps=steps, step_size=step)
        with torch.no_grad():
            correct += int((model(x).argmax(1) == y).sum())
    return correct / len(images)


def train(config: TrainConfig) -> dict:
    """Train (or resume) the model described by ``config``; returns its model card.

    ``config.out`` is claimed for the run (:func:`uapx.atomic.claim`): a second run on it is refused."""
    out = Path(config.resolved().out)
    with atomic.claim(out):
        atomic.remove_stale(out.with_name(out.name + ".ckpt"))  # what killed runs left
        return _train(config)


def _train(config: TrainConfig) -> dict:
    c = config.resolved()
    out = Path(c.out)
    ckpt_path = out.with_name(out.name + ".ckpt")
    train_set = data.load(c.dataset, "train", c.data_root, skip_unreadable=c.skip_unreadable)
    test_set = data.load(c.dataset, "test", c.data_root, skip_unreadable=c.skip_unreadable)
    torch.manual_seed(c.seed)
    model = build(c.arch).to(c.device)
    # channels-last convolutions are ~20% faster on CPUs for 3-channel images; same numbers otherwise
    fmt = torch.channels_last if train_set.shape[0] == 3 else torch.contiguous_format
    model = model.to(memory_format=fmt)
    steps_per_epoch = math.ceil(len(train_set) / c.batch_size)
    opt, sched = _optimizer(c, model, c.epochs * steps_per_epoch)
    epoch, step, elapsed = 0, 0, 0.0
    check_history: list[float] = []  # epoch-end PGD accuracies of the early-stopping check
    prev_state: dict | None = None  # weights at the end of the last epoch that passed the check
    stopped_at: int | None = None
    check_set = train_set.subset(min(EARLY_STOP_IMAGES, len(train_set)), seed=c.seed + 1) if c.early_stop else None
    if ckpt_path.exists():
        saved = read_checkpoint(ckpt_path)
        st = saved.get("train_state", {}) if isinstance(saved, dict) else {}
        if not _same_run(st.get("config_key"), c):
            raise UapxError(f"{str(ckpt_path)!r} belongs to a different training run",
                            "use another --out, or delete the checkpoint to start over")
        load_state(model, saved["state_dict"], source=str(ckpt_path))
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        epoch, step, elapsed = st["epoch"], st["step"], st.get("elapsed", 0.0)
        check_history, prev_state = st.get("check_history", []), st.get("prev_state")
        stopped_at = st.get("stopped_at")
        print(f"resuming {ckpt_path} at epoch {epoch + 1}, batch {step}", file=sys.stderr)

    def checkpoint(epoch: int, step: int) -> None:
        save_model(ckpt_path, model, c.arch, card={}, train_state={
            "config_key": _config_key(c), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "epoch": epoch, "step": step, "elapsed": elapsed + time.time() - t0,
            "check_history": check_history, "prev_state": prev_state, "stopped_at": stopped_at})

    ramp_batches = c.eps_ramp_epochs * steps_per_epoch
    t0 = time.time()
    while epoch < c.epochs and stopped_at is None:
        perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(c.seed * 1000 + epoch))
        model.train()
        bar = tqdm(range(step, steps_per_epoch), desc=f"epoch {epoch + 1}/{c.epochs}", unit="batch")
        seen, loss_sum, hits = 0, 0.0, 0
        for b in bar:
            idx = perm[b * c.batch_size:(b + 1) * c.batch_size]
            g = torch.Generator().manual_seed(hash((c.seed, epoch, b)) & 0x7FFFFFFF)
            x = train_set.images(idx)
            if c.augment:
                x = _augment(x, g)
            x, y = x.to(c.device), train_set.y[idx].to(c.device)
            if c.adversarial:
                # linear eps warm-up, the step size scaled with it
                scale = min(1.0, (epoch * steps_per_epoch + b + 1) / ramp_batches) if ramp_batches else 1.0
                model.eval()
                x = pgd(model, x, y, norm=c.adversarial, eps=c.eps * scale, steps=c.attack_steps,
                        step_size=c.attack_step_size * scale, random_start=True, generator=g)
                model.train()
            logits = model(x.contiguous(memory_format=fmt))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            seen, loss_sum = seen + len(y), loss_sum + loss.item() * len(y)
            hits += int((logits.argmax(1) == y).sum())
            if (b + 1) % c.checkpoint_every == 0 and b + 1 < steps_per_epoch:
                checkpoint(epoch, b + 1)
        epoch, step = epoch + 1, 0
        print(f"epoch {epoch}: mean training loss {loss_sum / max(seen, 1):.4f}, accuracy on the training "
              f"{'adversarial ' if c.adversarial else ''}batches {hits / max(seen, 1):.4f} ({seen} images)",
              file=sys.stderr)
        if c.early_stop:
            acc = _early_stop_check(model, check_set, c, epoch)
            check_history.append(acc)
            print(f"epoch {epoch}: early-stopping check, PGD accuracy {acc:.4f} on {len(check_set)} training images",
                  file=sys.stderr)
            if len(check_history) > 1 and acc < check_history[-2] - EARLY_STOP_DROP:
                stopped_at = epoch  # catastrophic overfitting: keep the weights of the previous epoch
                load_state(model, prev_state, source="the previous epoch")
                print(f"epoch {epoch}: PGD accuracy fell from {check_history[-2]:.4f}; stopping with the weights "
                      f"of epoch {epoch - 1}", file=sys.stderr)
            else:
                prev_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        checkpoint(epoch, 0)
    train_seconds = elapsed + time.time() - t0

    model.eval()
    if c.half:  # evaluate exactly the weights that are shipped
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.half().float())
    clean = evaluate(model, test_set, device=c.device, desc="clean accuracy")
    robust_set = test_set.subset(c.eval_n, seed=c.seed) if c.eval_n else test_set
    norm = c.adversarial or "l2"
    robust_step = default_step_size(c.eval_eps, c.eval_steps)
    robust = evaluate(model, robust_set, norm=norm, eps=c.eval_eps, steps=c.eval_steps, step_size=robust_step,
                      device=c.device, desc="robust accuracy")
    card = {
        "name": out.stem, "dataset": c.dataset,
        "data": ("CIFAR-10 JPEG copy (quality 75)" if "jpeg" in train_set.source
                 else f"{c.dataset} from {train_set.source}"),
        "arch": c.arch, "training": "natural" if not c.adversarial else f"PGD-{c.adversarial.upper()} adversarial",
        "command": c.command, "config": asdict(c), "epochs": c.epochs,
        "train_seconds": round(train_seconds, 1),
        "clean_accuracy": clean, "clean_eval_images": len(test_set),
        "robust_accuracy": robust,
        "unreadable_skipped": {"train": train_set.skipped_record(), "test": test_set.skipped_record()},
        "robust_attack": {"norm": norm, "eps": c.eval_eps, "steps": c.eval_steps, "step_size": robust_step,
                          "random_start": False, "images": len(robust_set)},
        "torch": str(torch.__version__),
        "machine": machine(),
    }
    if c.adversarial:
        card["strong_attack"] = strength.card_entry(model, test_set, card, n=c.strong_n, seed=c.seed, device=c.device)
    if c.early_stop:
        card["early_stop_check"] = {"pgd_accuracy_per_epoch": check_history, "images": len(check_set),
                                    "steps": EARLY_STOP_STEPS, "stopped_at_epoch": stopped_at}
    save_model(out, model, c.arch, card=card, half=c.half)
    atomic.write_json(out.with_suffix(".json"), card)
    return card


def machine() -> dict:
    """The CPU model (from /proc/cpuinfo where there is one) and the torch threads used."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _early_stop_check(model: nn.Module, images: data.ImageSet, c: TrainConfig, epoch: int) -> float:
    """Wong et al. 2020's check against catastrophic overfitting: PGD accuracy (10 steps, random start,
    the training norm and eps) on a fixed seeded sample of training images."""
    model.eval()
    x, y = images.images().to(c.device), images.y
    g = torch.Generator().manual_seed(c.seed * 1000 + epoch)
    steps = EARLY_STOP_STEPS
    x_adv = pgd(model, x, y.to(c.device), norm=c.adversarial, eps=c.eps, steps=steps,
                step_size=default_step_size(c.eps, steps),
                random_start=True, generator=g)
    with torch.no_grad():
        return float((model(x_adv).argmax(1).cpu() == y).double().mean())


def _same_run(saved_key: str | None, c: TrainConfig) -> bool:
    """Whether a checkpoint's config key describes run ``c``. Settings added to TrainConfig after the
    checkpoint was written match when ``c`` leaves them at their defaults (which reproduce the old runs)."""
    if saved_key is None:
        return False
    saved, now = json.loads(saved_key), json.loads(_config_key(c))
    defaults = asdict(TrainConfig())
    return all(saved[k] == v if k in saved else v == defaults[k] for k, v in now.items()) and saved.keys() <= now.keys()


def _config_key(c: TrainConfig) -> str:
    """What must match for a checkpoint to be resumed (not the output path or device)."""
    d = asdict(c)
    for k in ("device", "out", "command", "data_root", "checkpoint_every", "eval_steps", "eval_n", "eval_eps",
              "strong_n"):
        d.pop(k)
    return json.dumps(d, sort_keys=True)
