"""The ``uapx`` command line: a thin layer over the Python API.

``main(argv) -> int`` runs in-process (tests call it directly); this is the one place that turns
errors into exit codes: a :class:`~uapx.errors.UapxError` prints one line and returns its code;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import inspect
import os
import sys
from typing import Sequence

from . import argtypes
from .errors import EXIT_INTERRUPTED, EXIT_USAGE, UapxError


class _Parser(argparse.ArgumentParser):
    """argparse with uapx's error format: a :class:`UapxError` instead of usage and exit."""

    def error(self, message: str):  # type: ignore[override]
        what, _, fix = message.partition("; fix: ")
        raise UapxError(what, fix or f"see '{self.prog} --help'")


def _default(owner, name: str):
    """The default of field ``name`` of dataclass ``owner``, or of parameter ``name`` of function ``owner``."""
    if dataclasses.is_dataclass(owner):
        f = {f.name: f for f in dataclasses.fields(owner)}[name]
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    default = inspect.signature(owner).parameters[name].default
    return None if default is inspect.Parameter.empty else default


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return "all" if value is None else str(value)


def _opt(p: argparse.ArgumentParser, owner, name: str, help: str, *, flag: str | None = None,
         shown: str | None = None, **kw) -> None:
    """Add ``--name`` (``dest=name``) taking its default from ``owner`` (see :func:`_default`); the
    help ends with the default (``shown`` says it in words where it is None or computed)."""
    default = _default(owner, name)
    if kw.get("action") == "store_true":
        shown = shown or "off"
    p.add_argument(flag or "--" + name.replace("_", "-"), dest=name, default=default,
                   help=f"{help} (default: {shown or _shown(default)})", **kw)


def _plugin_opt(p: argparse.ArgumentParser, dest: str) -> None:
    p.add_argument("-p", dest=dest, action="append", default=[], metavar="no:NAME", type=argtypes.disable,
                   help="disable the plugin (entry point) NAME, e.g. -p no:average; repeatable (before or "
                        "after the subcommand)")


def _installed_names() -> tuple[list[str], list[str]]:
    """(zoo model names, attack plugin names) for the help texts."""
    from .models import zoo
    from .registry import Registry

    reg = Registry().load_entrypoints()
    return zoo.names(), sorted(c.name for c in reg.components.values() if c.kind == "attack")


def _add_common_model_args(p: argparse.ArgumentParser, owner) -> None:
    from .data import DATASETS

    _opt(p, owner, "dataset", "data set", choices=list(DATASETS))
    _opt(p, owner, "data_root", "folder holding the data", type=argtypes.input_path, metavar="DIR",
         shown="$UAPX_DATA_ROOT, then ~/.cache/uapx/data; the MNIST test split is embedded")
    _opt(p, owner, "device", "torch device: cpu, cuda or cuda:N", type=argtypes.device)
    _opt(p, owner, "seed", "random seed of every draw", type=argtypes.seed)
    _opt(p, owner, "skip_unreadable", "leave out image files that cannot be decoded, counted in what the command "
         "writes (report, results, model card); without it such a file is an error naming it", action="store_true")


def _add_model_args(p: argparse.ArgumentParser, owner, zoo_names: list[str]) -> None:
    from .models import ARCHITECTURES

    models = ", ".join(f"zoo:{n}" for n in zoo_names) or "none installed"
    _opt(p, owner, "model", f"the model: zoo:NAME ({models}), a checkpoint path, or a factory MODULE:CALLABLE "
         "(e.g. torchvision.models:resnet18)", type=argtypes.input_path, shown="zoo:<dataset>-natural")
    _opt(p, owner, "arch", "architecture of a plain state_dict checkpoint", choices=list(ARCHITECTURES),
         shown="read from the checkpoint")
    from .pipeline import apply_uaps

    if owner in (AnalyzeConfig_(), apply_uaps):  # the user's own model and images (uapx.models.factory, uapx.image_sources)
        from .models.factory import NORMALIZATIONS, checked_normalize, parse_model_args

        _opt(p, owner, "model_args", "keyword arguments of a factory --model, KEY=VALUE,... (values read as "
             "Python literals, e.g. num_classes=10)", type=parse_model_args, metavar="KEY=VALUE,...",
             shown="none")
        _opt(p, owner, "weights", "state_dict file (or checkpoint dict holding one) loaded into a factory --model",
             type=argtypes.input_path, metavar="FILE", shown="the factory's own")
        _opt(p, owner, "normalize", f"normalisation layer in front of the model (inputs are images in [0, 1]): "
             f"{', '.join(NORMALIZATIONS)} or MEAN;STD per channel, e.g. '0.5,0.5,0.5;0.25,0.25,0.25'",
             type=checked_normalize, metavar="NAME|MEAN;STD", shown="none")
        _opt(p, owner, "image_size", "imagefolder: resize the shorter side to S and centre-crop S x S",
             type=argtypes.whole(1), metavar="S", shown="the images' own size")
        _opt(p, owner, "class_index", "JSON file {class_name: index} giving each class folder its output of the "
             "model; without it the class folders of a 1000-output model that are ImageNet wnids (n01440764, ...) "
             "get their ImageNet indices, other folders 0..C-1 in sorted order", type=argtypes.input_path,
             metavar="FILE", shown="wnids or sorted order")
    _opt(p, owner, "split", "data split (val: imagefolder only; test falls back to val there)" + (
         "; analyze fits the UAPs on it" if owner is AnalyzeConfig_() else ""), choices=["train", "val", "test"],
         **({"shown": "analyze: train where the data set has one, else --eval-split; attack: test"}
            if owner is AnalyzeConfig_() else {}))


def AnalyzeConfig_():  # noqa: N802 - the class, imported late (cli loads fast)
    from .pipeline import AnalyzeConfig

    return AnalyzeConfig


def _add_attack_args(p: argparse.ArgumentParser, attacks: list[str]) -> None:
    from . import defaults
    from .pipeline import AnalyzeConfig as A

    _opt(p, A, "attack", f"attack plugin ({', '.join(attacks) or 'see uapx plugins'})")
    _opt(p, A, "eps", "perturbation budget (norm of the attack); analyze: a comma-separated list (e.g. 1,2,4) "
         "runs one attack per eps and reports every figure against eps", type=argtypes.eps_values,
         shown="per norm and data set: " + defaults.described())
    _opt(p, A, "steps", "PGD steps", type=argtypes.whole(1))
    _opt(p, A, "step_size", "PGD step size", type=argtypes.positive, shown="2.5*eps/steps")
    _opt(p, A, "n_samples", "images drawn from --split (a seeded class-stratified subset) and attacked, or 'all'; "
         "analyze: where the held-out images come from the same split, a part of them is held out instead (see "
         "--eval-split)", type=argtypes.count_or_all)
    _opt(p, A, "batch_size", "attack batch size", type=argtypes.whole(1))
    _opt(p, A, "target_class", "targeted: push every image to class C (the attack descends C's loss; the UAPs and "
         "their targeted success rate aim at C)", type=argtypes.whole(0), metavar="C", shown="none (untargeted)")


def build_parser(*, installed: bool = True) -> argparse.ArgumentParser:
    """The parser; ``installed=False`` leaves the zoo and plugin names out of the help (no plugin loading)."""
    from . import __version__
    from .pipeline import AnalyzeConfig, apply_uaps, attack_dataset
    from .reproduce import ReproduceConfig
    from .train import TrainConfig

    zoo_names, attacks = _installed_names() if installed else ([], [])
    parser = _Parser(prog="uapx", description="Universal adversarial perturbations for "
                     "studying adversarial training.")
    parser.add_argument("--version", action="version", version=f"uapx {__version__}")
    _plugin_opt(parser, "plugin_opts")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    A = AnalyzeConfig
    a = sub.add_parser("analyze", help="attack, build UAPs, run diagnostics, write a report")
    _add_common_model_args(a, A)
    _add_model_args(a, A, zoo_names)
    _add_attack_args(a, attacks)
    _opt(a, A, "norm", "the UAPs' ball: l2 (directions scaled to norm eps) or linf (eps * sign of each direction; "
         "sgd-uap and deepfool-uap step and project in Linf)", choices=["l2", "linf"], shown="the attack's norm")
    _opt(a, A, "plugins", "comma-separated UAP methods and diagnostics (see 'uapx plugins')", type=argtypes.names)
    _opt(a, A, "k", "directions per SVD-type method", type=argtypes.whole(1))
    _opt(a, A, "random_draws", "random directions of the same norm drawn for the baseline", type=argtypes.whole(1))
    _opt(a, A, "trajectory_samples", "images whose PGD trajectories are recorded for trajectory diagnostics",
         type=argtypes.whole(1))
    from .inference import PRECISIONS
    from .pipeline import HELD_OUT

    _opt(a, A, "eval_split", "the split of the held-out images the UAPs are judged on (the report's figure; "
         "in-sample rates beside it). " + HELD_OUT.replace("eval_n_samples", "--eval-n-samples").replace(
             "n_samples", "--n-samples").replace("%", "%%"), choices=["train", "val", "test"])
    _opt(a, A, "eval_n_samples", "held-out images (see --eval-split)", type=argtypes.whole(1),
         shown="as many as --n-samples from another split; half of the sample from the fit split")
    _opt(a, A, "eval_precision", "arithmetic of the UAP evaluation: auto = int8 (CPUs with VNNI) and bfloat16 where the "
         "CPU/GPU has them, near-ties remade a rung up and at last in float32 so that the predictions are "
         "float32's (else float32); bfloat16 = "
         "plain bfloat16 where it agrees with float32 on >= 99.9%% of the checked images",
         choices=list(PRECISIONS))
    _opt(a, A, "compile", "evaluate through torch.compile (cached; eager with one warning where it fails)",
         action="store_true")
    a.add_argument("--set", dest="settings", action="append", default=[], metavar="PLUGIN.KEY=VALUE",
                   help="a setting of a selected plugin, checked against its constructor, e.g. --set "
                        "svd.center=true (repeatable; 'uapx plugins --settings' lists the keys)")
    _opt(a, A, "transfer", "also apply the global UAPs to these models (zoo:NAME or checkpoint paths)",
         type=argtypes.names, metavar="MODEL[,MODEL...]")
    _opt(a, A, "out", "report folder", type=argtypes.output_path, metavar="DIR")
    _opt(a, A, "overwrite", "replace a report folder that already holds a run", action="store_true")

    k = sub.add_parser("attack", help="perturb a data set with PGD and save the perturbation set (resumable)")
    _add_common_model_args(k, A)
    _add_model_args(k, A, zoo_names)
    _add_attack_args(k, attacks)
    k.set_defaults(n_samples=None)  # a saved set holds the whole split unless asked otherwise
    k.add_argument("--chunk-size", type=argtypes.whole(1), default=_default(attack_dataset, "chunk_size"),
                   help="images per chunk file (default: %(default)s)")
    k.add_argument("--out", required=True, type=argtypes.output_path, metavar="DIR",
                   help="perturbation set folder; the same command resumes it")

    ap = sub.add_parser("apply", help="apply saved UAPs (a report's uaps.pt) to a model and data set")
    _add_common_model_args(ap, apply_uaps)
    _add_model_args(ap, apply_uaps, zoo_names)
    ap.add_argument("uaps", type=argtypes.input_path, help="UAP file, e.g. uapx-report/uaps.pt")
    _opt(ap, apply_uaps, "n_samples", "images, a seeded random subset, or 'all'", type=argtypes.count_or_all)
    _opt(ap, apply_uaps, "batch_size", "evaluation batch size", type=argtypes.whole(1))
    _opt(ap, apply_uaps, "draws", "random directions of the same norm drawn for the baseline",
         flag="--random-draws", type=argtypes.whole(1))
    _opt(ap, apply_uaps, "only", "comma-separated UAP names to apply", type=argtypes.names, shown="all")
    _opt(ap, apply_uaps, "out", "write the results as JSON to this file", type=argtypes.output_path,
         metavar="FILE", shown="print only")
    _opt(ap, apply_uaps, "overwrite", "replace an existing --out file", action="store_true")

    T = TrainConfig
    t = sub.add_parser("train", help="train a natural or adversarially robust model")
    _add_common_model_args(t, T)
    from .models import ARCHITECTURES

    _opt(t, T, "arch", "architecture", choices=list(ARCHITECTURES), shown="mnist-cnn for MNIST, resnet-small "
         "for CIFAR-10")
    _opt(t, T, "adversarial", "adversarial training norm", choices=["l2", "linf"], shown="natural training")
    _opt(t, T, "eps", "training budget", type=argtypes.positive)
    _opt(t, T, "attack_steps", "PGD steps while training", type=argtypes.whole(1))
    _opt(t, T, "attack_step_size", "PGD step size while training", type=argtypes.positive, shown="2.5*eps/steps")
    _opt(t, T, "eps_ramp_epochs", "grow the training eps linearly to --eps over this many epochs (0: no warm-up)",
         type=argtypes.non_negative)
    _opt(t, T, "early_stop", "stop when the epoch-end PGD accuracy on 512 training images falls by > 20 points, "
         "keeping the previous epoch's weights (Wong et al. 2020, for single-step training)", action="store_true")
    _opt(t, T, "epochs", "training epochs", type=argtypes.whole(1))
    _opt(t, T, "batch_size", "training batch size", type=argtypes.whole(1))
    _opt(t, T, "lr", "peak learning rate of the one-cycle schedule", type=argtypes.positive,
         shown="0.1 with sgd, 1e-3 with adam")
    _opt(t, T, "optimizer", "optimizer", choices=["adam", "sgd"], shown="adam for MNIST, sgd for CIFAR-10")
    _opt(t, T, "checkpoint_every", "batches between checkpoints", type=argtypes.whole(1))
    _opt(t, T, "eval_steps", "PGD steps for the robust accuracy", type=argtypes.whole(1))
    _opt(t, T, "eval_eps", "budget for the robust accuracy", type=argtypes.positive, shown="--eps")
    _opt(t, T, "eval_n", "test images for the robust accuracy, or 'all'", type=argtypes.count_or_all)
    _opt(t, T, "strong_n", "seeded sample of test images for the 100-step, 5-restart PGD of the card, or 'all'",
         type=argtypes.count_or_all)
    t.add_argument("--out", required=True, type=argtypes.output_path, metavar="FILE",
                   help="output model file (the checkpoint is <out>.ckpt)")

    R = ReproduceConfig
    r = sub.add_parser("reproduce", help="the whole study: zoo models, real data, one report with the findings")
    _opt(r, R, "data_root", "folder holding MNIST and CIFAR-10 (see 'analyze')", type=argtypes.input_path,
         metavar="DIR", shown="$UAPX_DATA_ROOT, then ~/.cache/uapx/data")
    _opt(r, R, "n_samples", "test images per model", type=argtypes.whole(1))
    _opt(r, R, "steps", "PGD steps", type=argtypes.whole(1))
    _opt(r, R, "trajectory_samples", "trajectories recorded per model", type=argtypes.whole(1))
    _opt(r, R, "batch_size", "attack batch size", type=argtypes.whole(1))
    _opt(r, R, "datasets", "comma-separated data sets of the study", type=argtypes.names)
    from . import defaults

    _opt(r, R, "sweep", "also run every model at each eps of the sweep (" + "; ".join(
         f"{d}: {', '.join(f'{e:g}' for e in v)}" for d, v in defaults.STUDY_EPS_SWEEP.items())
         + ") and plot the figures against eps; --no-sweep: the study's eps only", action=argparse.BooleanOptionalAction,
         shown="on")
    _opt(r, R, "device", "torch device: cpu, cuda or cuda:N", type=argtypes.device)
    _opt(r, R, "seed", "random seed of every draw", type=argtypes.seed)
    _opt(r, R, "out", "report folder", type=argtypes.output_path, metavar="DIR")
    _opt(r, R, "overwrite", "replace a report folder that already holds a study", action="store_true")

    pl = sub.add_parser("plugins", help="list the installed plugins and where they come from")
    pl.add_argument("--settings", action="store_true",
                    help="list each plugin's --set keys with their defaults (default: off)")
    sub.add_parser("zoo", help="list the zoo models with their model cards' accuracies")
    sub.add_parser("info", help="versions, device, kernel backend, loaded plugins")
    for s in sub.choices.values():
        _plugin_opt(s, "sub_plugin_opts")
    return parser


def _registry(args: argparse.Namespace):
    from .registry import Registry

    disabled = []
    for opt in [*args.plugin_opts, *getattr(args, "sub_plugin_opts", [])]:
        if not opt.startswith("no:") or not opt[3:]:
            raise UapxError(f"-p takes no:NAME, got {opt!r}", "write -p no:NAME to disable plugin NAME")
        disabled.append(opt[3:])
    return Registry(disabled=disabled).load_entrypoints()


def _from_args(cls, args: argparse.Namespace, **extra):
    """An instance of config dataclass ``cls`` from the options named like its fields."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **extra})


def cmd_plugins(args: argparse.Namespace) -> int:
    from . import settings

    reg = _registry(args)
    comps = sorted(reg.components.values(), key=lambda c: (c.kind, c.name))
    if args.settings:
        for c in comps:
            rows = settings.describe(c.cls)
            print(f"{c.name} ({c.kind}): {len(rows)} setting{'s' * (len(rows) != 1)}")
            for key, typ, default in rows:
                if c.kind == "attack" and default == "(required)":  # given by the attack options
                    default = f"--{key.replace('_', '-')}"
                print(f"  --set {c.name}.{key}=...  {typ}; default {default}")
        return 0
    rows = [(c.name, c.kind, c.plugin.distribution, c.plugin.version, c.plugin.name, c.description) for c in comps]
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


def cmd_zoo(args: argparse.Namespace) -> int:
    from .models import zoo

    header = ("model", "data set", "architecture", "training", "clean acc.", "robust acc.", "under", "images")
    rows = []
    norm_word = {"l2": "L2", "linf": "Linf"}
    for name in zoo.names():
        c = zoo.card(name)
        ra = c.get("robust_attack", {})
        under = f"{ra.get('steps', '?')}-step PGD-{norm_word.get(ra.get('norm'), '?')} eps {ra.get('eps', '?')}"
        pct = (lambda v: f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "?")
        rows.append((f"zoo:{name}", c.get("dataset", "?"), c.get("arch", "?"), c.get("training", "?"),
                     pct(c.get("clean_accuracy")), pct(c.get("robust_accuracy")), under,
                     str(ra.get("images", c.get("clean_eval_images", "?")))))
        strong = c.get("strong_attack")
        if isinstance(strong, dict) and "accuracy" in strong:
            rows.append(("", "", "", "", "", pct(strong["accuracy"]), f"{strong.get('steps', '?')}-step PGD-"
                         f"{norm_word.get(strong.get('norm'), '?')} eps {strong.get('eps', '?')} x "
                         f"{strong.get('restarts', '?')} restarts", str(strong.get("images", "?"))))
    if not rows:
        print("no zoo models installed")
        return 0
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from . import info

    for k, v in info.collect(_registry(args)).items():
        print(f"{k}: {v}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    card = train(_from_args(TrainConfig, args))
    print(f"wrote {args.out}: clean accuracy {card['clean_accuracy']:.4f}, robust accuracy "
          f"{card['robust_accuracy']:.4f} ({card['robust_attack']['steps']}-step PGD-"
          f"{card['robust_attack']['norm'].upper()} at eps {card['robust_attack']['eps']})")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from .pipeline import AnalyzeConfig, attack_dataset

    pset = attack_dataset(_from_args(AnalyzeConfig, args), chunk_size=args.chunk_size, registry=_registry(args))
    print(f"wrote {len(pset)} perturbations (d = {pset.d}) to {args.out}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from . import defaults
    from .pipeline import apply_uaps

    names = set(inspect.signature(apply_uaps).parameters) - {"path"}
    kwargs = {n: getattr(args, n) for n in names if hasattr(args, n)}
    kwargs["model"] = args.model or defaults.default_model(args.dataset)
    res = apply_uaps(args.uaps, **kwargs)
    print(f"{'uap':<28} {'eps':>6} {'fooling':>8} {'accuracy':>8} sign")
    for name, ev in res["evaluations"].items():
        print(f"{name:<28} {ev['eps']:>6g} {ev['fooling_rate']:>8.4f} {ev['accuracy']:>8.4f} {ev['sign']:+d}")
    for key, b in res["random_baseline"].items():  # key: eps, with the norm and target where not L2/untargeted
        label = f"random ({key}, mean of {b['draws']})" if ":" in key else f"random (mean of {b['draws']})"
        print(f"{label:<28} {b['eps']:>6g} {b['fooling_rate']['mean']:>8.4f} {b['accuracy']['mean']:>8.4f}")
    for name, ev in res["evaluations"].items():
        if ev.get("targeted_success") is not None:
            print(f"{name}: targeted success -> class {ev['target_class']} {ev['targeted_success']:.4f}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import STUDY, ReproduceConfig, reproduce

    unknown = [d for d in args.datasets if d not in STUDY]
    if unknown or not args.datasets:
        raise UapxError(f"unknown data set {unknown[0]!r} in --datasets" if unknown else "--datasets is empty",
                        f"choose from: {', '.join(STUDY)}")
    out = reproduce(_from_args(ReproduceConfig, args), registry=_registry(args))
    print(f"study report written to {out}/index.html")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .pipeline import AnalyzeConfig, analyze

    if not args.plugins:
        raise UapxError("--plugins names no plugin", "name at least one, e.g. --plugins average,svd "
                        "(see 'uapx plugins')")
    cfg = _from_args(AnalyzeConfig, args, plugin_settings=parse_settings(args.settings))
    result = analyze(cfg, registry=_registry(args))
    from . import distributed

    if distributed.is_main():
        print(f"report written to {result.out}/index.html")
    return 0


def parse_settings(items: list[str]) -> dict[str, dict]:
    """``["svd.k=10", "average.normalize=true"]`` -> ``{"svd": {"k": "10"}, "average": {...}}``; the
    values stay text: :func:`uapx.settings.convert` converts them to the types the plugin declares."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        plugin, dot, name = key.partition(".")
        if not sep or not dot or not plugin or not name:
            raise UapxError(f"--set {item!r} is not PLUGIN.KEY=VALUE", "write e.g. --set svd.center=true")
        out.setdefault(plugin, {})[name] = value
    return out


_PATH_ERRNOS = {errno.ENAMETOOLONG: "pass a shorter path", errno.EACCES: "pass a path you may read and write",
                errno.EPERM: "pass a path you may read and write", errno.ENOSPC: "free space on that file system",
                errno.EROFS: "pass a path on a writable file system", errno.ENOTDIR: "a file is in the way: pass "
                "another path", errno.ELOOP: "pass a path without a symbolic-link loop"}

COMMANDS = {"reproduce": cmd_reproduce, "analyze": cmd_analyze, "attack": cmd_attack, "apply": cmd_apply,
            "train": cmd_train, "plugins": cmd_plugins, "zoo": cmd_zoo, "info": cmd_info}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI in-process; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # the zoo and plugin names are loaded for the help text only
        parser = build_parser(installed=any(a in ("-h", "--help") for a in argv))
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version
            return int(exc.code or 0)
        if args.command is None:
            parser.print_help()
            return 0
        return COMMANDS[args.command](args)
    except UapxError as exc:
        print(f"uapx: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("uapx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # the file system refused a path (set outside the options, e.g. $UAPX_DATA_ROOT)
        if exc.errno not in _PATH_ERRNOS or not exc.filename:
            raise
        print(f"uapx: error: {UapxError(f'cannot use {os.fsdecode(exc.filename)!r}: {exc.strerror}', _PATH_ERRNOS[exc.errno])}",
              file=sys.stderr)
        return EXIT_USAGE
    finally:
        if "uapx.atomic" in sys.modules:  # outputs this command claimed are free again
            sys.modules["uapx.atomic"].release_all()


def console_main() -> int:
    """The ``uapx`` console script."""
    import os

    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # the output was piped into e.g. head, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    sys.exit(code)
