"""``analyze``: data -> model -> batched PGD -> PerturbationSet -> UAP methods -> evaluation
-> diagnostics -> report.

The core owns the flow and the shared artefacts (perturbations, trajectories): several plugins
reuse one attack run.  Plugins are found through the registry only.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from . import atomic, data, defaults, distributed, info, models, plots
from . import settings as plugin_settings
from .attacks import Trajectory, check_budget
from .errors import EXIT_PLUGIN, UapxError
from .evaluate import UAPEvaluation, evaluate_many, random_baseline
from .methods import UAP, MethodData, uaps_to_bytes
from .perturbations import PerturbationSet, PerturbationWriter, write_parts_manifest
from .registry import Registry, get_registry
from .report import Report, check_output_folder



@dataclass
class AnalyzeConfig:
    """Everything that determines an analysis (recorded in ``report.json``)."""

    dataset: str = "mnist"
    data_root: str | None = None
    split: str = "test"
    model: str | None = None  # default zoo:<dataset>-natural
    arch: str | None = None
    plugins: list[str] = field(default_factory=lambda: ["average", "svd"])
    plugin_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    attack: str = "pgd-l2"
    eps: float | None = None  # default per norm and data set: uapx.defaults
    steps: int = 20
    step_size: float | None = None  # default uapx.defaults.default_step_size
    n_samples: int | None = 1000
    batch_size: int = 250
    k: int = 5
    random_draws: int = 5
    trajectory_samples: int = 100
    transfer: list[str] = field(default_factory=list)  # other models to apply the global UAPs to
    device: str = "cpu"
    eval_precision: str = "auto"  # UAP evaluation: auto (bfloat16 where it agrees with float32), float32, bfloat16
    compile: bool = False  # evaluate through torch.compile (eager with one warning where it fails)
    seed: int = 0
    out: str = "uapx-report"
    overwrite: bool = False

    def resolved(self) -> "AnalyzeConfig":
        c = AnalyzeConfig(**asdict(self))
        c.model = c.model or f"zoo:{c.dataset}-natural"
        norm = attack_norm(c.attack)
        c.eps = c.eps if c.eps is not None else defaults.default_eps(norm, c.dataset)
        c.step_size = c.step_size if c.step_size is not None else defaults.default_step_size(c.eps, c.steps)
        check_budget(c.eps, c.steps, c.step_size)
        defaults.check_eps(norm, c.eps)
        if c.trajectory_samples < 1:
            raise UapxError(f"--trajectory-samples must be >= 1, got {c.trajectory_samples}",
                            "pass --trajectory-samples 1 or more")
        if c.batch_size < 1:
            raise UapxError(f"--batch-size must be >= 1, got {c.batch_size}", "pass --batch-size 1 or more")
        if c.device.startswith("cuda") and not torch.cuda.is_available():
            raise UapxError(f"device {c.device!r} requested but CUDA is not available", "pass --device cpu")
        return c


def attack_norm(attack: str) -> str:
    """The norm ("l2", "linf") of the attack plugin named ``attack`` ("l2" for an unknown name, which
    fails later with its own error)."""
    comp = get_registry().components.get(attack)
    return getattr(comp.cls, "norm", "l2") if comp is not None and comp.kind == "attack" else "l2"


def defaults_applied(given: AnalyzeConfig, resolved: AnalyzeConfig) -> dict:
    """Which settings were not given and took their defaults (norm- and data-set-specific)."""
    out = {k: getattr(resolved, k) for k in ("model", "eps", "step_size") if getattr(given, k) is None}
    if out:
        out["norm"], out["dataset"] = attack_norm(resolved.attack), resolved.dataset
    return out


@dataclass
class Analysis:
    """What diagnostics receive: the model, the images and every shared artefact of the run.

    Attributes:
        config: the resolved :class:`AnalyzeConfig`.
        model: the classifier (eval mode); card: its model card.
        images: the attacked :class:`~uapx.data.ImageSet`; x ``(N, C, H, W)`` float, y ``(N,)``.
        clean_pred: ``(N,)`` predictions on clean images.
        pset: the :class:`~uapx.perturbations.PerturbationSet` of the attack.
        uaps: every UAP the methods produced; evaluations: their :class:`UAPEvaluation` by name.
        attack: the attack object (its settings are ``attack.settings()``).
    """

    config: AnalyzeConfig
    model: nn.Module
    card: dict
    images: data.ImageSet
    x: torch.Tensor
    y: torch.Tensor
    clean_pred: torch.Tensor
    pset: PerturbationSet
    attack: Any
    uaps: list[UAP] = field(default_factory=list)
    evaluations: dict[str, UAPEvaluation] = field(default_factory=dict)
    n_images: int = 0  # over every rank under torchrun (x holds this rank's shard); default: len(x)
    _trajectory: tuple[torch.Tensor, Trajectory] | None = None

    def __post_init__(self) -> None:
        self.n_images = self.n_images or int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.images.classes)

    def trajectories(self) -> Trajectory:
        """PGD trajectories of the first ``config.trajectory_samples`` images, recorded once and
        shared by every diagnostic that asks (same attack settings as the main run).

        Under torchrun each rank records its part of the *global* first ``trajectory_samples``
        images (:func:`uapx.distributed.local_prefix`; possibly none), and ``index`` holds their
        global positions (in one process, positions ``0 .. m-1`` of ``x``)."""
        if self._trajectory is None:
            n = self.n_images
            part = distributed.local_prefix(self.config.trajectory_samples, n)
            if part.stop > 0:
                dev = self.config.device
                _, traj = self.attack(self.model, self.x[part].to(dev), self.y[part].to(dev), record=True)
            else:  # this rank holds none of them
                steps, d = int(self.attack.steps), int(torch.Size(self.x.shape[1:]).numel())
                traj = Trajectory(torch.arange(0), torch.empty(steps, 0, d), torch.empty(steps, 0, d),
                                  torch.empty(steps, 0))
            traj.index = traj.index + distributed.shard(n).start  # global positions
            self._trajectory = (traj.index, traj)
        return self._trajectory[1]


@dataclass
class AnalyzeResult:
    """What :func:`analyze` returns: the report folder, ``report.json`` as a dict, the analysis."""

    out: Path
    report: dict
    analysis: Analysis

    def __repr__(self) -> str:
        return (f"AnalyzeResult(out={str(self.out)!r}, {len(self.analysis.uaps)} UAPs, "
                f"diagnostics={sorted(self.report.get('diagnostics', {}))})")


def _instantiate(cls: type, settings: dict, offered: dict | None = None) -> Any:
    """Build a plugin object from the user's ``settings`` (checked and converted by
    :func:`uapx.settings.convert`) over the run's ``offered`` ones (e.g. ``k``), passed where accepted."""
    params = plugin_settings.parameters(cls)
    kwargs = {k: v for k, v in (offered or {}).items() if k in params or plugin_settings.takes_any(cls)}
    kwargs.update(plugin_settings.convert(cls.name, cls, settings))
    try:
        return cls(**kwargs)
    except UapxError:
        raise
    except TypeError as exc:
        raise UapxError(f"bad settings for plugin {cls.name!r}: {exc}", "check --set NAME.KEY=VALUE") from None


def _check_images(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise UapxError("the input images contain NaN or Inf", "clean the data set")
    if x.min() < 0 or x.max() > 1:
        raise UapxError(f"the input images lie outside [0, 1] (range {float(x.min()):.3g}..{float(x.max()):.3g})",
                        "give images scaled to [0, 1]; normalisation belongs in the model")


def perturb(model: nn.Module, images: data.ImageSet, attack: Any, *, batch_size: int, device: str = "cpu",
            meta: dict, writer: PerturbationWriter | None = None, chunk_size: int = 4096) -> PerturbationSet:
    """Attack every image of ``images`` in batches, with a progress bar.

    Without ``writer`` the perturbations are kept in memory; with one they are written chunk by
    chunk (``chunk_size`` images each) and the chunks the writer already holds are skipped, so a
    killed run resumes.  ``meta`` gives the set's shape, eps, norm, model_id and attack.
    """
    n = len(images)
    cols: dict[str, list[torch.Tensor]] = {"deltas": [], "labels": [], "clean": [], "adv": []}
    start = writer.rows_done if writer is not None else 0
    step = max(chunk_size if writer is not None else n, 1)
    with tqdm(total=n, initial=start, desc="attack", unit="img") as bar:
        for s in range(start, n, step):
            x = images.images(slice(s, s + step))
            y = images.y[s:s + step]
            _check_images(x)
            deltas, clean, adv = [], [], []
            for b in range(0, x.shape[0], batch_size):
                xb, yb = x[b:b + batch_size].to(device), y[b:b + batch_size].to(device)
                xa, _ = attack(model, xb, yb)
                with torch.no_grad():
                    clean.append(model(xb).argmax(1).cpu())
                    adv.append(model(xa).argmax(1).cpu())
                deltas.append((xa - xb).reshape(xb.shape[0], -1).cpu())
                bar.update(xb.shape[0])
            d, c_, a_ = torch.cat(deltas), torch.cat(clean), torch.cat(adv)
            if writer is not None:
                idx = images.indices[s:s + step] if images.indices is not None else torch.arange(s, s + len(y))
                writer.write_chunk(d, y, c_, a_, idx)
            else:
                for key, t in zip(cols, (d, y, c_, a_)):
                    cols[key].append(t)
    if writer is not None:
        writer.finish()
        return PerturbationSet.load(writer.folder)
    return PerturbationSet(torch.cat(cols["deltas"]), torch.cat(cols["labels"]), torch.cat(cols["clean"]),
                           torch.cat(cols["adv"]), meta["shape"], meta["eps"], meta["norm"], meta["model_id"],
                           meta["attack"], images.indices)


@dataclass
class Setup:
    """What analyze and attack share: the resolved config's images, model and attack."""

    images: data.ImageSet
    model: nn.Module
    card: dict
    attack: Any
    meta: dict


def setup(c: AnalyzeConfig, reg: Registry) -> Setup:
    """Load data, model and the attack plugin for a resolved config."""
    attack_comp = reg.get(c.attack, "attack")
    torch.manual_seed(c.seed)
    images = data.load(c.dataset, c.split, c.data_root).subset(c.n_samples, seed=c.seed)
    model, card = models.load_with_card(c.model, device=c.device, arch=c.arch)
    attack = _instantiate(attack_comp.cls, c.plugin_settings.get(c.attack, {}),
                          {"eps": c.eps, "steps": c.steps, "step_size": c.step_size})
    meta = {"shape": tuple(images.shape), "eps": c.eps, "norm": attack.norm, "model_id": c.model,
            "attack": {"name": c.attack, **attack.settings()}}
    return Setup(images, model, card, attack, meta)


def attack_dataset(config: AnalyzeConfig, *, chunk_size: int = 4096, registry: Registry | None = None) -> PerturbationSet:
    """``uapx attack``: perturb a data set and write the set folder ``config.out`` (resumable)."""
    reg = registry or get_registry()
    c = config.resolved()
    ranks = world = 1
    if distributed.init_from_env(c.device):
        ranks, world = distributed.rank(), distributed.world_size()
    s = setup(c, reg)
    data_meta = {"dataset": c.dataset, "split": c.split, "n_samples": len(s.images), "seed": c.seed,
                 "chunk_size": chunk_size}
    meta = {**s.meta, "shape": list(s.meta["shape"]), "data": data_meta}
    if world == 1:
        with atomic.claim(c.out, inside=True):  # a second run on the same --out is refused
            writer = PerturbationWriter(c.out, meta)
            if writer.complete:
                return PerturbationSet.load(c.out)
            return perturb(s.model, s.images, s.attack, batch_size=c.batch_size, device=c.device, meta=s.meta,
                           writer=writer, chunk_size=chunk_size)
    # torchrun: each rank writes its shard as a complete set of its own; rank 0 lists the parts
    parts = [f"rank-{r:05d}" for r in range(world)]
    writer = PerturbationWriter(Path(c.out) / parts[ranks], {**meta, "part": [ranks, world]})
    if not writer.complete:
        perturb(s.model, s.images.take(distributed.shard(len(s.images))), s.attack, batch_size=c.batch_size,
                device=c.device, meta=s.meta, writer=writer, chunk_size=chunk_size)
    distributed.barrier()
    if distributed.is_main():
        write_parts_manifest(c.out, parts, meta)
    distributed.barrier()
    return PerturbationSet.load(c.out)


def analyze(config: AnalyzeConfig, *, registry: Registry | None = None) -> AnalyzeResult:
    """Run an analysis end to end and write its report folder; see :class:`AnalyzeConfig`."""
    reg = registry or get_registry()
    c = config.resolved()
    components = reg.check_names(c.plugins)  # before any work
    attack_comp = reg.get(c.attack, "attack")  # unknown names fail before any work
    plugin_settings.check_run(c.plugin_settings, [attack_comp, *components])
    if distributed.init_from_env(c.device):  # every built-in reduces across ranks; others must say they do
        unsupported = [comp.name for comp in components if not getattr(comp.cls, "supports_distributed", False)]
        if unsupported:
            raise UapxError(f"plugin(s) {', '.join(unsupported)} do not declare supports_distributed and cannot "
                            "run on sharded data under torchrun",
                            "run them in one process, or use only: " + ", ".join(
                                sorted(k.name for k in reg.components.values()
                                       if getattr(k.cls, "supports_distributed", False))))
    out = check_output_folder(c.out, overwrite=c.overwrite, claim=distributed.is_main())
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    s = setup(c, reg)
    model, card, attack = s.model, s.card, s.attack
    images = s.images.take(distributed.shard(len(s.images)))  # all of them in one process
    timing["load"] = time.perf_counter() - t0
    t = time.perf_counter()
    pset = perturb(model, images, attack, batch_size=c.batch_size, device=c.device, meta=s.meta)
    timing["attack"] = time.perf_counter() - t
    x, y = images.images(), images.y
    # predictions and labels of every rank's shard (N integers each), for the evaluation
    y_all, clean_pred, adv_pred = (distributed.all_gather_rows(t) for t in (y, pset.clean_pred, pset.adv_pred))
    analysis = Analysis(c, model, card, images, x, y, pset.clean_pred, pset, attack, n_images=len(y_all))

    t = time.perf_counter()
    methods = [comp for comp in components if comp.kind == "method"]
    method_data = MethodData(model, x, y, c.device, c.batch_size, c.seed)
    for comp in methods:
        method = _instantiate(comp.cls, c.plugin_settings.get(comp.name, {}), {"k": c.k})
        analysis.uaps += _run_plugin(comp.name, lambda: method(pset, c.eps, data=method_data))
    evals, extra = evaluate_many(model, x, y_all, analysis.uaps, num_classes=analysis.num_classes,
                                 draws=c.random_draws, seed=c.seed, batch_size=c.batch_size, device=c.device,
                                 clean_pred=clean_pred, precision=c.eval_precision, compile=c.compile)
    analysis.evaluations.update(evals)
    baseline = extra["random_baseline"].get(f"{c.eps:g}") or random_baseline(
        model, x, y_all, c.eps, clean_pred=clean_pred, num_classes=analysis.num_classes, draws=c.random_draws,
        seed=c.seed, batch_size=c.batch_size, device=c.device)
    transfer = {}
    global_uaps = [u for u in analysis.uaps if u.source_class is None]
    for spec in c.transfer:
        other = models.load(spec, device=c.device)
        t_evals, t_extra = evaluate_many(other, x, y_all, global_uaps, num_classes=analysis.num_classes,
                                         draws=c.random_draws, seed=c.seed, batch_size=c.batch_size,
                                         device=c.device, precision=c.eval_precision, compile=c.compile)
        transfer[spec] = {**t_extra, "evaluations": {k: v.to_dict() for k, v in t_evals.items()}}
    timing["uap_methods"] = time.perf_counter() - t

    report = Report(f"uapx analysis: {c.model} on {c.dataset} ({c.split}), eps {c.eps:g}")
    diag_results = {}
    for comp in components:
        if comp.kind != "diagnostic":
            continue
        t = time.perf_counter()
        diag = _instantiate(comp.cls, c.plugin_settings.get(comp.name, {}))
        res = _run_plugin(comp.name, lambda: diag.run(analysis))
        diag_results[comp.name] = {"plugin": repr(diag), **res.figures}
        for name, fig, caption in res.plots:
            report.add_plot(comp.name, name, fig, caption)
        if res.summary:
            report.summaries[comp.name] = res.summary
        timing[f"diagnostic:{comp.name}"] = time.perf_counter() - t
    timing["total"] = time.perf_counter() - t0

    norms = torch.cat([b.norm(dim=1) for b in pset.chunks()])
    attack_fig = {
        "n_images": len(y_all), "clean_accuracy": float((clean_pred == y_all).double().mean()),
        "adversarial_accuracy": float((adv_pred == y_all).double().mean()),
        "attack_success_rate": float((adv_pred != clean_pred).double().mean()),
        "perturbation_norm": {"mean": distributed.all_reduce_scalar(float(norms.sum())) / len(y_all),
                              "min": distributed.all_reduce_scalar(float(norms.min()), "min"),
                              "max": distributed.all_reduce_scalar(float(norms.max()), "max")},
    }
    report.data.update({
        "config": asdict(c),
        "defaults_applied": defaults_applied(config, c),
        "environment": info.collect(reg),
        "model": card,
        "data": {"dataset": images.name, "split": images.split, "source": images.source,
                 "n_images": len(y_all), "shape": list(images.shape),
                 **({"ranks": distributed.world_size()} if distributed.active() else {})},
        "attack": {"plugin": repr(attack), **attack_fig},
        "uaps": {
            "random_baseline": baseline,
            "evaluation": extra["evaluation"],
            "evaluations": {name: ev.to_dict() for name, ev in analysis.evaluations.items()},
            **({"transfer": transfer} if transfer else {}),
        },
        "diagnostics": diag_results,
        "timing_seconds": {k: round(v, 3) for k, v in timing.items()},
    })
    report.summaries["uaps"] = plots.uap_summary(analysis, baseline)
    plots.add_uap_plots(report, analysis, baseline)
    report.tables["uaps"] = plots.comparison_table(analysis, baseline)
    if distributed.is_main():
        report.extra_files["uaps.pt"] = uaps_to_bytes(analysis.uaps)
        report.write(out, replace=c.overwrite)
    distributed.barrier()
    return AnalyzeResult(out, report.data, analysis)


def _run_plugin(name: str, fn):
    """Run plugin code; an exception from it becomes a one-line error naming the plugin."""
    try:
        return fn()
    except UapxError:
        raise
    except Exception as exc:
        raise UapxError(f"plugin {name!r} failed: {type(exc).__name__}: {exc}",
                        "run without it (--plugins) or report the bug to its authors",
                        exit_code=EXIT_PLUGIN) from exc


def apply_uaps(path: str, *, model: str, dataset: str = "mnist", data_root: str | None = None, split: str = "test",
               n_samples: int | None = None, arch: str | None = None, batch_size: int = 500, draws: int = 5,
               seed: int = 0, device: str = "cpu", only: list[str] | None = None, out: str | None = None,
               precision: str = "auto") -> dict:
    """``uapx apply``: evaluate saved UAPs on any model and data set (JSON-ready results)."""
    from . import atomic
    from .methods import load_uaps

    uaps = load_uaps(path)
    if only:
        known = {u.name for u in uaps}
        missing = [n for n in only if n not in known]
        if missing:
            raise UapxError(f"no UAP named {missing[0]!r} in {path!r}",
                            f"choose from: {', '.join(sorted(known)[:20])}")
        uaps = [u for u in uaps if u.name in only]
    images = data.load(dataset, split, data_root).subset(n_samples, seed=seed)
    if uaps and tuple(uaps[0].vector.shape) != tuple(images.shape):
        raise UapxError(f"the UAPs have shape {tuple(uaps[0].vector.shape)} but {dataset} images are "
                        f"{tuple(images.shape)}", "apply them to a data set of the same image shape")
    net = models.load(model, device=device, arch=arch)
    distributed.init_from_env(device)
    shard = images.take(distributed.shard(len(images)))  # all of them in one process
    y_all = distributed.all_gather_rows(shard.y)  # predict() gathers every rank's predictions
    evals, extra = evaluate_many(net, shard.images(), y_all, uaps, num_classes=len(images.classes), draws=draws,
                                 seed=seed, batch_size=batch_size, device=device, precision=precision)
    res = {"uaps": str(path), "model": model, "dataset": dataset, "split": split, "n_images": len(images),
           **extra, "evaluations": {k: v.to_dict() for k, v in evals.items()}}
    if out and distributed.is_main():
        atomic.write_json(out, res)
    return res
