"""The ``uapx`` command line: a thin layer over the Python API.

``main(argv) -> int`` runs in-process (tests call it directly); this is the one place that turns
errors into exit codes: a :class:`~uapx.errors.UapxError` prints one line and returns its code;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .errors import EXIT_INTERRUPTED, UapxError


def _add_common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist", choices=["mnist", "cifar10"], help="data set (default: mnist)")
    p.add_argument("--data-root", default=None,
                   help="folder holding the data (default: $UAPX_DATA_ROOT, then ~/.cache/uapx/data; "
                        "the MNIST test split is embedded)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def _count_or_all(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'all', got {text!r}") from None


def _add_attack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="zoo:<name> or a checkpoint path (default: zoo:<dataset>-natural)")
    p.add_argument("--arch", default=None, help="architecture of a plain state_dict checkpoint")
    p.add_argument("--split", default="test", choices=["train", "test"], help="data split (default: test)")
    p.add_argument("--attack", default="pgd-l2", help="attack plugin (default: pgd-l2)")
    p.add_argument("--eps", type=float, default=None, help="L2 budget (default: 2.0 MNIST, 0.5 CIFAR-10)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps (default: 20)")
    p.add_argument("--step-size", type=float, default=None, help="PGD step size (default: 2.5*eps/steps)")
    p.add_argument("--n-samples", type=_count_or_all, default=1000,
                   help="images to attack, a seeded random subset, or 'all' (default: 1000; attack: all)")
    p.add_argument("--batch-size", type=int, default=250, help="attack batch size (default: 250)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="uapx", description="Universal adversarial perturbations for "
                                     "studying adversarial training.")
    parser.add_argument("--version", action="version", version=f"uapx {__version__}")
    parser.add_argument("-p", dest="plugin_opts", action="append", default=[], metavar="no:NAME",
                        help="disable the plugin (entry point) NAME, e.g. -p no:average")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    a = sub.add_parser("analyze", help="attack, build UAPs, run diagnostics, write a report")
    _add_common_model_args(a)
    _add_attack_args(a)
    a.add_argument("--plugins", default="average,svd",
                   help="comma-separated UAP methods and diagnostics (default: average,svd; see 'uapx plugins')")
    a.add_argument("--k", type=int, default=5, help="directions per SVD-type method (default: 5)")
    a.add_argument("--random-draws", type=int, default=5,
                   help="random directions drawn for the baseline (default: 5)")
    a.add_argument("--trajectory-samples", type=int, default=100,
                   help="images whose PGD trajectories are recorded for trajectory diagnostics (default: 100)")
    a.add_argument("--set", dest="settings", action="append", default=[], metavar="PLUGIN.KEY=VALUE",
                   help="a plugin setting, e.g. --set svd.center=true --set average.normalize=true")
    a.add_argument("--transfer", default="", metavar="MODEL[,MODEL...]",
                   help="also apply the global UAPs to these models (zoo:NAME or checkpoint paths)")
    a.add_argument("--out", default="uapx-report", help="report folder (default: ./uapx-report)")
    a.add_argument("--overwrite", action="store_true", help="replace a report folder that already holds a run")

    k = sub.add_parser("attack", help="perturb a data set with PGD and save the perturbation set (resumable)")
    _add_common_model_args(k)
    _add_attack_args(k)
    k.set_defaults(n_samples=None)
    k.add_argument("--chunk-size", type=int, default=4096, help="images per chunk file (default: 4096)")
    k.add_argument("--out", required=True, help="perturbation set folder; the same command resumes it")

    ap = sub.add_parser("apply", help="apply saved UAPs (a report's uaps.pt) to a model and data set")
    _add_common_model_args(ap)
    ap.add_argument("uaps", help="UAP file, e.g. uapx-report/uaps.pt")
    ap.add_argument("--model", default=None, help="zoo:<name> or a checkpoint path (default: zoo:<dataset>-natural)")
    ap.add_argument("--arch", default=None, help="architecture of a plain state_dict checkpoint")
    ap.add_argument("--split", default="test", choices=["train", "test"])
    ap.add_argument("--n-samples", type=_count_or_all, default="all", help="images (default: all)")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--random-draws", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated UAP names to apply (default: all)")
    ap.add_argument("--out", default=None, help="write the results as JSON to this file")

    t = sub.add_parser("train", help="train a natural or adversarially robust model")
    _add_common_model_args(t)
    t.add_argument("--arch", default=None, help="architecture (default: mnist-cnn / resnet-small)")
    t.add_argument("--adversarial", default=None, choices=["l2", "linf"], help="adversarial training norm")
    t.add_argument("--eps", type=float, default=2.0, help="training budget (default: 2.0)")
    t.add_argument("--attack-steps", type=int, default=10, help="PGD steps while training (default: 10)")
    t.add_argument("--attack-step-size", type=float, default=None, help="default 2.5*eps/steps")
    t.add_argument("--eps-ramp-epochs", type=float, default=0.0,
                   help="grow the training eps linearly to --eps over this many epochs (default: 0, no warm-up)")
    t.add_argument("--early-stop", action="store_true",
                   help="stop when the epoch-end PGD accuracy on 512 training images falls by > 20 points, "
                        "keeping the previous epoch's weights (Wong et al. 2020, for single-step training)")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--optimizer", default=None, choices=["adam", "sgd"])
    t.add_argument("--checkpoint-every", type=int, default=200, help="batches between checkpoints")
    t.add_argument("--eval-steps", type=int, default=40, help="PGD steps for the robust accuracy")
    t.add_argument("--eval-eps", type=float, default=None, help="budget for the robust accuracy (default: eps)")
    t.add_argument("--eval-n", type=int, default=None, help="test images for the robust accuracy (default: all)")
    t.add_argument("--strong-n", type=_count_or_all, default=1000,
                   help="seeded sample of test images for the 100-step, 5-restart PGD of the card "
                        "(default: 1000; 'all' for all)")
    t.add_argument("--out", required=True, help="output model file (the checkpoint is <out>.ckpt)")

    r = sub.add_parser("reproduce", help="the whole study: zoo models, real data, one report with the findings")
    r.add_argument("--data-root", default=None, help="folder holding MNIST and CIFAR-10 (see 'analyze')")
    r.add_argument("--n-samples", type=int, default=1000, help="test images per model (default: 1000)")
    r.add_argument("--steps", type=int, default=20, help="PGD steps (default: 20)")
    r.add_argument("--trajectory-samples", type=int, default=100, help="trajectories recorded per model")
    r.add_argument("--batch-size", type=int, default=250)
    r.add_argument("--datasets", default="mnist,cifar10", help="comma-separated (default: mnist,cifar10)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default="uapx-study", help="report folder (default: ./uapx-study)")
    r.add_argument("--overwrite", action="store_true")

    sub.add_parser("plugins", help="list the installed plugins and where they come from")
    sub.add_parser("info", help="versions, device, kernel backend, loaded plugins")
    return parser


def _registry(args: argparse.Namespace):
    from .registry import Registry

    disabled = []
    for opt in args.plugin_opts:
        if not opt.startswith("no:"):
            raise UapxError(f"-p takes no:NAME, got {opt!r}", "write -p no:NAME to disable plugin NAME")
        disabled.append(opt[3:])
    return Registry(disabled=disabled).load_entrypoints()


def cmd_plugins(args: argparse.Namespace) -> int:
    reg = _registry(args)
    rows = [(c.name, c.kind, c.plugin.distribution, c.plugin.version, c.plugin.name, c.description)
            for c in sorted(reg.components.values(), key=lambda c: (c.kind, c.name))]
    header = ("name", "kind", "distribution", "version", "plugin", "description")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    for r in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r[:5], widths)) + "  " + r[5])
    for rec in reg.records:
        if rec.error:
            print(f"FAILED  plugin {rec.name!r} from {rec.distribution} {rec.version}: {rec.error}")
        elif rec.disabled:
            print(f"disabled  plugin {rec.name!r} from {rec.distribution} {rec.version}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from . import info

    for k, v in info.collect(_registry(args)).items():
        print(f"{k}: {v}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    card = train(TrainConfig(dataset=args.dataset, arch=args.arch, adversarial=args.adversarial, eps=args.eps,
                             attack_steps=args.attack_steps, attack_step_size=args.attack_step_size,
                             eps_ramp_epochs=args.eps_ramp_epochs, early_stop=args.early_stop,
                             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                             seed=args.seed, data_root=args.data_root, device=args.device, out=args.out,
                             checkpoint_every=args.checkpoint_every, eval_steps=args.eval_steps,
                             eval_eps=args.eval_eps, eval_n=args.eval_n, strong_n=args.strong_n))
    print(f"wrote {args.out}: clean accuracy {card['clean_accuracy']:.4f}, robust accuracy "
          f"{card['robust_accuracy']:.4f} ({card['robust_attack']['steps']}-step PGD-"
          f"{card['robust_attack']['norm'].upper()} at eps {card['robust_attack']['eps']})")
    return 0


def _config(args: argparse.Namespace, **extra):
    from .pipeline import AnalyzeConfig

    return AnalyzeConfig(dataset=args.dataset, data_root=args.data_root, split=args.split, model=args.model,
                         arch=args.arch, attack=args.attack, eps=args.eps, steps=args.steps,
                         step_size=args.step_size, n_samples=args.n_samples, batch_size=args.batch_size,
                         device=args.device, seed=args.seed, out=args.out, **extra)


def cmd_attack(args: argparse.Namespace) -> int:
    from .pipeline import attack_dataset

    if args.chunk_size < 1:
        raise UapxError(f"--chunk-size must be >= 1, got {args.chunk_size}", "pass --chunk-size 1 or more")
    pset = attack_dataset(_config(args), chunk_size=args.chunk_size, registry=_registry(args))
    print(f"wrote {len(pset)} perturbations (d = {pset.d}) to {args.out}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from .pipeline import apply_uaps

    only = [n.strip() for n in args.only.split(",") if n.strip()]
    res = apply_uaps(args.uaps, model=args.model or f"zoo:{args.dataset}-natural", dataset=args.dataset,
                     data_root=args.data_root, split=args.split, n_samples=args.n_samples, arch=args.arch,
                     batch_size=args.batch_size, draws=args.random_draws, seed=args.seed, device=args.device,
                     only=only, out=args.out)
    print(f"{'uap':<28} {'eps':>6} {'fooling':>8} {'accuracy':>8} sign")
    for name, ev in res["evaluations"].items():
        print(f"{name:<28} {ev['eps']:>6g} {ev['fooling_rate']:>8.4f} {ev['accuracy']:>8.4f} {ev['sign']:+d}")
    for eps, b in res["random_baseline"].items():
        print(f"{'random (mean of ' + str(b['draws']) + ')':<28} {float(eps):>6g} "
              f"{b['fooling_rate']['mean']:>8.4f} {b['accuracy']['mean']:>8.4f}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import STUDY, ReproduceConfig, reproduce

    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in datasets if d not in STUDY]
    if unknown:
        raise UapxError(f"unknown data set {unknown[0]!r} in --datasets", f"choose from: {', '.join(STUDY)}")
    out = reproduce(ReproduceConfig(data_root=args.data_root, n_samples=args.n_samples, steps=args.steps,
                                    trajectory_samples=args.trajectory_samples, batch_size=args.batch_size,
                                    device=args.device, seed=args.seed, out=args.out, overwrite=args.overwrite,
                                    datasets=datasets), registry=_registry(args))
    print(f"study report written to {out}/index.html")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .pipeline import analyze

    plugins = [p.strip() for p in args.plugins.split(",") if p.strip()]
    cfg = _config(args, plugins=plugins, plugin_settings=parse_settings(args.settings), k=args.k,
                  random_draws=args.random_draws, overwrite=args.overwrite,
                  trajectory_samples=args.trajectory_samples, transfer=[m.strip() for m in args.transfer.split(",") if m.strip()])
    result = analyze(cfg, registry=_registry(args))
    from . import distributed

    if distributed.is_main():
        print(f"report written to {result.out}/index.html")
    return 0


def parse_settings(items: list[str]) -> dict[str, dict]:
    """``["svd.k=10", "average.normalize=true"]`` -> ``{"svd": {"k": 10}, "average": {...}}``."""
    import json

    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        plugin, dot, name = key.partition(".")
        if not sep or not dot or not plugin or not name:
            raise UapxError(f"--set {item!r} is not PLUGIN.KEY=VALUE", "write e.g. --set svd.center=true")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(plugin, {})[name] = parsed
    return out


COMMANDS = {"reproduce": cmd_reproduce, "analyze": cmd_analyze, "attack": cmd_attack, "apply": cmd_apply, "train": cmd_train, "plugins": cmd_plugins, "info": cmd_info}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI in-process; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except UapxError as exc:
        print(f"uapx: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("uapx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def console_main() -> int:
    """The ``uapx`` console script."""
    sys.exit(main())
