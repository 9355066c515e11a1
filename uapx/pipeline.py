"""``analyze``: data -> model -> batched PGD -> PerturbationSet -> UAP methods -> evaluation
-> diagnostics -> report.

The core owns the flow and the shared artefacts (perturbations, trajectories): several plugins
reuse one attack run.  Plugins are found through the registry only.
"""
from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from tqdm import tqdm

from . import atomic, data, defaults, distributed, info, models, norms, plots
from . import settings as plugin_settings
from .analysis import Analysis, HeldOut, MethodData  # noqa: F401  (re-exported: uapx.pipeline.Analysis)
from .attacks import check_budget
from . import contract
from .class_index import model_labels, read_class_index
from .compat import check_model_fits
from .errors import EXIT_PLUGIN, UapxError
from .evaluate import baseline_key, evaluate_many, predict, random_baseline
from .methods import check_threat_model, uaps_to_bytes
from .perturbations import PerturbationSet, PerturbationWriter, write_parts_manifest
from .registry import Component, Registry, get_registry
from .report import Report, check_output_folder


HELD_OUT = (  # the held-out rule, stated once (the help text and the report quote it)
    "UAPs are fitted on one set of images and judged on a disjoint one. From another split than the fit "
    "split, the held-out images are a seeded class-stratified draw of eval_n_samples images (default: as many "
    "as n_samples); from the fit split itself (a data set with one split, e.g. the embedded MNIST test split, "
    "or --split equal to --eval-split), they are a seeded class-stratified part of the sample of n_samples "
    "images (default: half of it) and the UAPs are fitted on the rest.")


@dataclass
class AnalyzeConfig:
    """Everything that determines an analysis (recorded in ``report.json``)."""

    dataset: str = "mnist"
    data_root: str | None = None
    split: str | None = None  # the UAPs' fit images; default train where the data set has one, else eval_split
    model: str | None = None  # default zoo:<dataset>-natural; or a factory MODULE:CALLABLE
    arch: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a factory --model
    weights: str | None = None  # state_dict file loaded into a factory --model
    normalize: str | None = None  # normalisation layer in front of the model: imagenet, cifar10 or MEAN;STD
    image_size: int | None = None  # imagefolder: resize the shorter side and centre-crop to S x S
    class_index: str | dict[str, int] | None = None  # {class name: model output} (a JSON file); uapx.class_index
    plugins: list[str] = field(default_factory=lambda: ["average", "svd"])
    plugin_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    attack: str = "pgd-l2"
    eps: float | list[float] | None = None  # default per norm and data set (uapx.defaults); a list: an eps sweep
    norm: str | None = None  # the UAPs' ball, l2 or linf (uapx.norms); default: the attack's norm
    target_class: int | None = None  # targeted UAPs (and attack): the class every image is pushed to
    steps: int = 20
    step_size: float | None = None  # default uapx.defaults.default_step_size
    n_samples: int | None = 1000  # images drawn from the fit split (the sample)
    eval_split: str = "test"  # the held-out images the UAPs are judged on (never one they were fitted on)
    eval_n_samples: int | None = None  # held-out images: see HELD_OUT
    batch_size: int = 250
    k: int = 5
    random_draws: int = 5
    trajectory_samples: int = 100
    transfer: list[str] = field(default_factory=list)  # other models to apply the global UAPs to
    device: str = "cpu"
    eval_precision: str = "auto"  # UAP evaluation: auto (refined int8/bfloat16: float32 predictions), float32, bfloat16
    compile: bool = False  # evaluate through torch.compile (eager with one warning where it fails)
    seed: int = 0
    out: str = "uapx-report"
    overwrite: bool = False
    skip_unreadable: bool = False  # leave out image files that cannot be decoded (counted in the report)

    def resolved(self, attack: Component | None = None) -> "AnalyzeConfig":
        """The config with its defaults filled in and checked (before any work).  ``attack``: the
        attack component, looked up once by the caller (:func:`plan`); without it, it is looked up
        here in the default registry."""
        c = AnalyzeConfig(**asdict(self))
        c.model = c.model or defaults.default_model(c.dataset)
        norm = attack_norm(attack if attack is not None else get_registry().components.get(c.attack))
        c.norm, c.target_class = norms.check_norm(c.norm or norm), norms.check_target_class(c.target_class)
        c.eps = c.eps if c.eps is not None else defaults.default_eps(c.norm, c.dataset)
        c.step_size = c.step_size if c.step_size is not None else defaults.default_step_size(c.eps, c.steps)
        if self.step_size is None and c.eps == c.eps and not abs(c.step_size) < float("inf"):
            raise UapxError(f"--eps {c.eps:g} is too large: the default step size (2.5*eps/steps) overflows",
                            "pass a smaller --eps (any two images in [0, 1] differ by at most sqrt(d) in L2)")
        check_budget(c.eps, c.steps, c.step_size)
        for ball in dict.fromkeys((norm, c.norm)):  # the attack's and the UAPs'
            defaults.check_eps(ball, c.eps)
        if isinstance(c.class_index, (str, Path)):  # read (and checked) before any work
            c.class_index = read_class_index(c.class_index)
        if c.trajectory_samples < 1:
            raise UapxError(f"--trajectory-samples must be >= 1, got {c.trajectory_samples}",
                            "pass --trajectory-samples 1 or more")
        if c.batch_size < 1:
            raise UapxError(f"--batch-size must be >= 1, got {c.batch_size}", "pass --batch-size 1 or more")
        if c.device.startswith("cuda") and not torch.cuda.is_available():
            raise UapxError(f"device {c.device!r} requested but CUDA is not available", "pass --device cpu")
        return c

    def offered(self) -> dict[str, Any]:
        """The run's settings offered to every UAP method whose constructor takes them."""
        return {"k": self.k, "norm": self.norm, "target_class": self.target_class}


def eps_values(eps: float | list[float] | tuple | None) -> list[float]:
    """The budgets a config asks for: ``[]`` (the default), ``[eps]`` or the distinct values of a
    sweep, in the order given."""
    if eps is None:
        return []
    values = [float(e) for e in eps] if isinstance(eps, (list, tuple)) else [float(eps)]
    if not values:
        raise UapxError("the eps list is empty", "pass --eps 2, or a list such as --eps 1,2,4")
    if len(set(values)) < len(values):
        raise UapxError(f"an eps appears twice in {values}", "list each eps once, e.g. --eps 1,2,4")
    return values


def attack_norm(comp: Component | None) -> str:
    """The norm ("l2", "linf") of the attack component ``comp`` ("l2" for none or a non-attack, which
    fails later with its own error)."""
    return getattr(comp.cls, "norm", "l2") if comp is not None and comp.kind == "attack" else "l2"


def defaults_applied(given: AnalyzeConfig, resolved: AnalyzeConfig, norm: str) -> dict:
    """Which settings were not given and took their defaults (``norm``- and data-set-specific)."""
    out = {k: getattr(resolved, k) for k in ("model", "eps", "step_size") if getattr(given, k) is None}
    if out:
        out["norm"], out["dataset"] = norm, resolved.dataset
    return out


@dataclass
class AnalyzeResult:
    """What :func:`analyze` returns: the report folder, ``report.json`` as a dict, the analysis."""

    out: Path
    report: dict
    analysis: Analysis | None  # None only for an eps sweep whose every eps was resumed from disk

    def __repr__(self) -> str:
        if self.analysis is None:  # an eps sweep resumed from finished parts
            return f"AnalyzeResult(out={str(self.out)!r})"
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
    transfer: dict[str, nn.Module] = field(default_factory=dict)  # --transfer models, checked like the model
    heldout: data.ImageSet | None = None  # the held-out images (disjoint from images); draw_images
    protocol: str = "split"  # how they were drawn: "split" or "sample" (see HELD_OUT)


def _rows(images: data.ImageSet, idx: torch.Tensor) -> data.ImageSet:
    """The images at positions ``idx`` ``(m,)`` (in that order), keeping their indices."""
    base = images.indices[idx] if images.indices is not None else idx
    return replace(images, x=images.x[idx], y=images.y[idx], indices=base)


def draw_images(c: AnalyzeConfig, dataset: Any = None) -> tuple[data.ImageSet, data.ImageSet, str]:
    """Stage 1a: ``(fit images, held-out images, protocol)``, disjoint seeded class-stratified draws
    by the rule :data:`HELD_OUT` (``protocol`` ``"split"``: from another split; ``"sample"``: a part of
    the one sample).  ``dataset`` (an ImageSet or a torch Dataset) is one split: all of it is the
    sample when it holds no more than ``n_samples`` images."""
    from .errors import SplitNotFound
    from .image_sources import from_dataset
    from .stats import stratified_draw

    if dataset is not None:
        pool = held_pool = from_dataset(dataset)
        n = c.n_samples if c.n_samples is not None and c.n_samples < len(pool) else None
    else:
        def load(split: str) -> data.ImageSet:
            return data.load(c.dataset, split, c.data_root, skip_unreadable=c.skip_unreadable,
                             image_size=c.image_size)

        held_pool = load(c.eval_split)
        pool = held_pool
        if (c.split or "train") != c.eval_split:
            try:
                pool = load(c.split or "train")
            except SplitNotFound:
                if c.split is not None:  # asked for by name: the one-line error
                    raise
        if pool.source == held_pool.source and torch.equal(pool.y, held_pool.y):  # the same images under two
            pool = held_pool  # names, e.g. an ImageFolder of class folders only: one split
        n = c.n_samples
    if pool is not held_pool:
        if list(pool.classes) != list(held_pool.classes):
            raise UapxError(f"the {pool.split} and {held_pool.split} splits of {pool.name} have different classes "
                            f"({len(pool.classes)} and {len(held_pool.classes)})",
                            "give both splits the same class folders, or pass --split equal to --eval-split")
        fit = pool.subset(n, seed=c.seed)
        m = c.eval_n_samples or c.n_samples
        return fit, held_pool.subset(m if m is not None and m < len(held_pool) else None, seed=c.seed + 1), "split"
    sample = pool.subset(n, seed=c.seed)
    m = c.eval_n_samples or len(sample) // 2
    if m >= len(sample) or m < 1:
        raise UapxError(f"the sample of {len(sample)} {sample.name} {sample.split} images cannot hold {m} held-out "
                        "images and the images the UAPs are fitted on",
                        f"pass --eval-n-samples below {len(sample)} (default: half of the sample), a larger "
                        "--n-samples, or held-out images of another split (--eval-split)")
    held = stratified_draw(sample.y, m, seed=c.seed + 1)
    keep = torch.ones(len(sample), dtype=torch.bool)
    keep[held] = False
    rest = keep.nonzero().flatten()
    rest = rest[stratified_draw(sample.y[rest], None, seed=c.seed + 2)]  # class-interleaved: every prefix stratified
    return _rows(sample, rest), _rows(sample, held), "sample"


def load_inputs(c: AnalyzeConfig, attack_comp: Component, *, model: nn.Module | None = None,
                dataset: Any = None, held_out: bool = True) -> Setup:
    """Stage 1: load the data, the model (and ``--transfer`` models) and build the attack plugin
    ``attack_comp`` for a resolved config.  ``model`` (an ``nn.Module``) and ``dataset`` (an
    :class:`~uapx.data.ImageSet` or a ``torch.utils.data.Dataset`` of ``(image, label)``) replace
    the ones the config names.  The number of classes is the model's number of outputs, checked
    against the data's classes with one forward pass before any attack.  Without ``held_out`` (``uapx
    attack``) the images are a draw of ``n_samples`` of split ``c.split`` (default test) only."""
    torch.manual_seed(c.seed)
    if held_out:
        images, heldout, protocol = draw_images(c, dataset)
    else:
        images, heldout, protocol = data.load(c.dataset, c.split or "test", c.data_root, image_size=c.image_size,
                                              skip_unreadable=c.skip_unreadable).subset(c.n_samples, seed=c.seed), None, ""
    model, card = models.load_with_card(model if model is not None else c.model, device=c.device, arch=c.arch,
                                        model_args=c.model_args, weights=c.weights, normalize=c.normalize)
    x1 = images.images(slice(0, 1)).to(c.device)  # one forward pass each before any attack
    outputs = check_model_fits(model, x1, None, what=c.model, data=images.name)
    # labels in the model's output space (ImageNet wnids on a 1000-class model, --class-index)
    images = model_labels(images, outputs, class_index=c.class_index, what=c.model)
    norms.check_target_class(c.target_class, len(images.classes))
    if heldout is not None:
        heldout = model_labels(heldout, outputs, class_index=c.class_index, what=c.model)
    transfer = {spec: models.load(spec, device=c.device) for spec in c.transfer}
    for spec, other in transfer.items():
        check_model_fits(other, x1, len(images.classes), what=f"--transfer {spec}", data=images.name)
    attack = _instantiate(attack_comp.cls, c.plugin_settings.get(c.attack, {}),
                          {"eps": c.eps, "steps": c.steps, "step_size": c.step_size, "target_class": c.target_class})
    meta = {"shape": tuple(images.shape), "eps": c.eps, "norm": attack.norm, "model_id": c.model,
            "attack": {"name": c.attack, "norm": attack.norm, **attack.settings()}}
    return Setup(images, model, card, attack, meta, transfer, heldout, protocol)


def attack_dataset(config: AnalyzeConfig, *, chunk_size: int = 4096, registry: Registry | None = None) -> PerturbationSet:
    """``uapx attack``: perturb a data set and write the set folder ``config.out`` (resumable)."""
    reg = registry or get_registry()
    if len(eps_values(config.eps)) > 1:
        raise UapxError("uapx attack takes one --eps", "run it once per eps (analyze sweeps eps: --eps 1,2,4)")
    config = replace(config, eps=(eps_values(config.eps) or [None])[0])
    attack_comp = reg.get(config.attack, "attack")
    c = replace(config.resolved(attack_comp), split=config.split or "test")  # a saved set is one split's
    ranks = world = 1
    if distributed.init_from_env(c.device):
        ranks, world = distributed.rank(), distributed.world_size()
    s = load_inputs(c, attack_comp, held_out=False)
    data_meta = {"dataset": c.dataset, "split": c.split, "n_samples": len(s.images), "seed": c.seed,
                 "chunk_size": chunk_size}
    meta = {**s.meta, "shape": list(s.meta["shape"]), "data": data_meta}
    if world == 1:
        fresh = not Path(c.out).exists()
        with atomic.claim(c.out, inside=True):  # a second run on the same --out is refused
            writer = PerturbationWriter(c.out, meta)
            if writer.complete:
                return PerturbationSet.load(c.out)
            try:
                return perturb(s.model, s.images, s.attack, batch_size=c.batch_size, device=c.device,
                               meta=s.meta, writer=writer, chunk_size=chunk_size)
            except BaseException:
                if fresh and writer.rows_done == 0:  # nothing to resume: leave no empty set folder
                    shutil.rmtree(c.out, ignore_errors=True)
                raise
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


@dataclass
class Plan:
    """The components of a run, looked up once: the attack, then the selected methods and
    diagnostics (in ``--plugins`` order)."""

    attack: Component
    methods: list[Component]
    diagnostics: list[Component]


def plan(c: AnalyzeConfig, reg: Registry) -> Plan:
    """Look up the attack and the selected plugins and check their settings and torchrun support:
    unknown names and bad settings fail here, before any work."""
    components = reg.check_names(c.plugins)
    attack_comp = reg.get(c.attack, "attack")
    plugin_settings.check_run(c.plugin_settings, [attack_comp, *components], offered=c.offered())
    if distributed.init_from_env(c.device):  # every built-in reduces across ranks; others must say they do
        unsupported = [comp.name for comp in components if not getattr(comp.cls, "supports_distributed", False)]
        if unsupported:
            raise UapxError(f"plugin(s) {', '.join(unsupported)} do not declare supports_distributed and cannot "
                            "run on sharded data under torchrun",
                            "run them in one process, or use only: " + ", ".join(
                                sorted(k.name for k in reg.components.values()
                                       if getattr(k.cls, "supports_distributed", False))))
    methods: list[Component] = []
    diagnostics: list[Component] = []
    for comp in components:
        (methods if comp.kind == "method" else diagnostics).append(comp)
    return Plan(attack_comp, methods, diagnostics)


class Timer:
    """Seconds per stage of a run (``report.json``'s ``timing_seconds``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = time.perf_counter() - t

    def total(self) -> dict[str, float]:
        return {**{k: round(v, 3) for k, v in self.seconds.items()},
                "total": round(time.perf_counter() - self.start, 3)}


@dataclass
class Predictions:
    """Labels and predictions ``(N,)`` of every image over every torchrun rank (the evaluation and
    the attack figures count all of them)."""

    y: torch.Tensor
    clean: torch.Tensor
    adv: torch.Tensor


IN_MEMORY_BYTES = 64 << 20  # float images / perturbations above this stream (from the files / an on-disk set)


def streams(n: int, d: int) -> bool:
    """Whether ``n`` float32 rows of ``d`` values are too many to hold (:data:`IN_MEMORY_BYTES`)."""
    return n * d * 4 > IN_MEMORY_BYTES


def chunk_rows(d: int) -> int:
    """Rows per chunk of a streamed perturbation set (and per read of images): about 16 MB each."""
    return max(1, min(4096, (IN_MEMORY_BYTES // 4) // (4 * d)))


@contextmanager
def scratch_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside the report (removed afterwards; a dead run's is removed by the
    next run claiming the same ``--out``) for the perturbations of a streamed run."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-scratch-", dir=out.parent if out.parent.is_dir() else None))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def attack_images(c: AnalyzeConfig, s: Setup, scratch: Path | None = None) -> tuple[Analysis, Predictions]:
    """Stage 2: attack this rank's shard of the images; the analysis context and every rank's
    labels and predictions.

    Memory stays flat in N: where the ``(N, d)`` float rows would exceed :data:`IN_MEMORY_BYTES`
    (and a ``scratch`` folder is given), images are read chunk by chunk, the perturbations are
    written to an on-disk :class:`PerturbationSet` in ``scratch`` as they are made, and the
    analysis holds an :class:`~uapx.image_sources.ImageRows` view that reads images where indexed."""
    from .image_sources import ImageRows

    images = s.images.take(distributed.shard(len(s.images)))  # all of them in one process
    d = int(torch.Size(images.shape).numel())
    stream = scratch is not None and streams(len(images), d)
    writer = PerturbationWriter(scratch / "perturbations", s.meta) if stream else None
    pset = perturb(s.model, images, s.attack, batch_size=c.batch_size, device=c.device, meta=s.meta,
                   writer=writer, chunk_size=chunk_rows(d))
    preds = Predictions(*(distributed.all_gather_rows(t) for t in (images.y, pset.clean_pred, pset.adv_pred)))
    x = ImageRows(images) if stream else images.images()
    analysis = Analysis(s.model, x, images.y, c.device, c.batch_size, c.seed, pset=pset,
                        eps=c.eps, attack=s.attack, classes=list(images.classes), n_images=len(preds.y),
                        model_id=c.model, trajectory_samples=c.trajectory_samples)
    return analysis, preds


def build_uaps(analysis: Analysis, methods: list[Component], c: AnalyzeConfig) -> None:
    """Stage 3: run every selected UAP method at the run's eps; the UAPs go to ``analysis.uaps``
    (model-based methods optimise on the analysis, a :class:`MethodData`)."""
    for comp in tqdm(methods, desc="UAP methods", unit="method", leave=False,
                     disable=not (methods and distributed.is_main())):
        method = _instantiate(comp.cls, c.plugin_settings.get(comp.name, {}), c.offered())
        analysis.uaps += _run_plugin(comp.name, lambda: contract.method_uaps(
            comp.name, method(analysis.pset, analysis.eps, data=analysis)))


def evaluate_uaps(analysis: Analysis, preds: Predictions, c: AnalyzeConfig) -> dict:
    """Stage 4: evaluate every UAP on the images it was fitted on (in-sample) against random
    directions of the same norm; ``report.json``'s ``uaps`` section (evaluations go to
    ``analysis.evaluations``)."""
    x, k, eps = analysis.x, analysis.num_classes, analysis.eps
    opts = dict(draws=c.random_draws, seed=c.seed, batch_size=c.batch_size, device=c.device)
    evals, extra = evaluate_many(analysis.model, x, preds.y, analysis.uaps, num_classes=k, clean_pred=preds.clean,
                                 precision=c.eval_precision, compile=c.compile, **opts)
    analysis.evaluations.update(evals)
    baseline = extra["random_baseline"].get(baseline_key(eps, c.norm, c.target_class)) or random_baseline(
        analysis.model, x, preds.y, eps, clean_pred=preds.clean, num_classes=k, norm=c.norm, target=c.target_class,
        **opts)
    return {
        "random_baseline": baseline,
        "evaluation": extra["evaluation"],
        "evaluations": {name: ev.to_dict() for name, ev in analysis.evaluations.items()},
    }


def evaluate_held_out(analysis: Analysis, s: Setup, c: AnalyzeConfig, checked: dict | None = None) -> dict:
    """Stage 4b: every UAP on the held-out images ``s.heldout`` (disjoint from the fit images; rule
    :data:`HELD_OUT`), each with the sign chosen on the fit images, beside random directions of the
    same norm, and the global UAPs on the ``--transfer`` models; sets ``analysis.heldout`` and
    returns ``report.json``'s ``uaps.held_out``.  Run after :func:`evaluate_uaps`; ``checked``, its
    ``"evaluation"`` entry, lends the analysed model's refined-evaluation rungs and margins (one check per run)."""
    from .image_sources import ImageRows
    from .stats import class_counts

    images = s.heldout
    shard = images.take(distributed.shard(len(images)))
    d = int(torch.Size(images.shape).numel())
    x = ImageRows(shard) if streams(len(shard), d) else shard.images()
    y_all = distributed.all_gather_rows(shard.y)
    clean = predict(analysis.model, x, batch_size=c.batch_size, device=c.device)  # every rank's
    signs = {name: ev.sign for name, ev in analysis.evaluations.items()}
    opts = dict(draws=c.random_draws, seed=c.seed, batch_size=c.batch_size, device=c.device,
                precision=c.eval_precision, compile=c.compile, signs=signs)
    evals, extra = evaluate_many(analysis.model, x, y_all, analysis.uaps, num_classes=analysis.num_classes,
                                 clean_pred=clean, checked=checked, **opts)
    baseline = extra["random_baseline"].get(baseline_key(analysis.eps, c.norm, c.target_class)) or random_baseline(
        analysis.model, x, y_all, analysis.eps, clean_pred=clean, num_classes=analysis.num_classes, norm=c.norm,
        target=c.target_class, **{k: opts[k] for k in ("draws", "seed", "batch_size", "device")})
    analysis.heldout = HeldOut(x, shard.y, clean[distributed.shard(len(images))], split=images.split,
                               protocol=s.protocol, n_images=len(images), evaluations=evals,
                               random_baseline=baseline, indices=shard.indices)
    transfer = {}
    global_uaps = [u for u in analysis.uaps if u.source_class is None]
    for spec, other in s.transfer.items():
        t_evals, t_extra = evaluate_many(other, x, y_all, global_uaps, num_classes=analysis.num_classes, **opts)
        transfer[spec] = {**t_extra, "evaluations": {name: v.to_dict() for name, v in t_evals.items()}}
    return {"split": images.split, "protocol": s.protocol, "rule": HELD_OUT, "n_images": len(images),
            "class_counts": class_counts(images.y), "clean_accuracy": extra["clean_accuracy"],
            "random_baseline": baseline, "evaluations": {name: ev.to_dict() for name, ev in evals.items()},
            **({"transfer": transfer} if transfer else {})}


def run_diagnostics(analysis: Analysis, diagnostics: list[Component], c: AnalyzeConfig, report: Report,
                    timer: Timer) -> dict:
    """Stage 5: run every selected diagnostic on the analysis; their figures by name (plots and
    summaries go to ``report``).  Trajectories are recorded once, in a stage of their own, when a
    diagnostic declares ``needs_trajectories``."""
    if any(getattr(comp.cls, "needs_trajectories", False) for comp in diagnostics):
        with timer("trajectories"):
            analysis.trajectories()
    results = {}
    for comp in diagnostics:
        with timer(f"diagnostic:{comp.name}"):
            diag = _instantiate(comp.cls, c.plugin_settings.get(comp.name, {}))
            res = _run_plugin(comp.name, lambda: contract.diagnostic_result(comp.name, diag.run(analysis)))
            results[comp.name] = {"plugin": repr(diag), **res.figures}
            for name, fig, caption in res.plots:
                report.add_plot(comp.name, name, fig, caption)
            if res.summary:
                report.summaries[comp.name] = res.summary
    return results


def attack_figures(pset: PerturbationSet, preds: Predictions) -> dict:
    """Accuracy and success of the per-image attack and its perturbation norms, over every rank."""
    n = len(preds.y)

    def summary(norms: torch.Tensor) -> dict:
        return {"mean": distributed.all_reduce_scalar(float(norms.sum())) / n,
                "min": distributed.all_reduce_scalar(float(norms.min()), "min"),
                "max": distributed.all_reduce_scalar(float(norms.max()), "max")}

    l2, linf = zip(*((b.norm(dim=1), b.abs().amax(dim=1)) for b in pset.chunks()))  # one pass, chunk by chunk
    return {
        "n_images": n, "clean_accuracy": float((preds.clean == preds.y).double().mean()),
        "adversarial_accuracy": float((preds.adv == preds.y).double().mean()),
        "attack_success_rate": float((preds.adv != preds.clean).double().mean()),
        "perturbation_norm": summary(torch.cat(l2)), "perturbation_norm_linf": summary(torch.cat(linf)),
    }


def write_report(report: Report, out: Path, config: AnalyzeConfig, c: AnalyzeConfig, reg: Registry, s: Setup,
                 analysis: Analysis, preds: Predictions, uaps: dict, diagnostics: dict, timer: Timer) -> None:
    """Stage 6: fill ``report.json`` (what ran, the attack, the UAPs, the diagnostics, timings), add
    the UAP plots and table, and write the report folder (on rank 0)."""
    images = s.images
    report.data.update({
        "config": asdict(c),
        "defaults_applied": defaults_applied(config, c, c.norm),
        "environment": info.collect(reg),
        "model": s.card,
        "data": {"dataset": images.name, "split": images.split, "source": images.source,
                 "n_images": len(preds.y), "shape": list(images.shape),
                 "held_out": {"split": s.heldout.split, "source": s.heldout.source, "protocol": s.protocol,
                              "n_images": len(s.heldout)},
                 "unreadable_skipped": {"count": len(images.skipped), "files": images.skipped[:20]},
                 **({"ranks": distributed.world_size()} if distributed.active() else {})},
        "attack": {"plugin": repr(s.attack), **attack_figures(analysis.pset, preds)},
        "uaps": uaps,
        "diagnostics": diagnostics,
        "timing_seconds": timer.total(),
    })
    baseline = uaps["random_baseline"]
    report.summaries["uaps"] = plots.uap_summary(analysis, baseline)
    plots.add_uap_plots(report, analysis, baseline)
    report.tables["uaps"] = plots.comparison_table(analysis, baseline)
    if distributed.is_main():
        report.extra_files["uaps.pt"] = uaps_to_bytes(analysis.uaps)
        report.extra_files.update(plots.uap_files(analysis.uaps))  # uaps/<name>.npy and .png
        report.write(out, replace=c.overwrite)
    distributed.barrier()


def analyze(config: AnalyzeConfig, *, registry: Registry | None = None, model: nn.Module | None = None,
            data: Any = None) -> AnalyzeResult:
    """Run an analysis end to end and write its report folder; see :class:`AnalyzeConfig`.

    ``model`` (any ``nn.Module`` taking images in [0, 1], or behind ``config.normalize``) and
    ``data`` (an :class:`~uapx.data.ImageSet` or any ``torch.utils.data.Dataset`` of
    ``(image, label)``) replace the model and data set the config names.

    The UAPs are fitted on one set of images and judged on a disjoint one (:data:`HELD_OUT`).
    The stages: :func:`load_inputs` (:func:`draw_images`), :func:`attack_images`, :func:`build_uaps`,
    :func:`evaluate_uaps` (in-sample), :func:`evaluate_held_out`, :func:`run_diagnostics`,
    :func:`write_report`."""
    reg = registry or get_registry()
    if model is not None:
        config = replace(config, model=config.model or f"<{type(model).__name__}>")
    if data is not None:
        config = replace(config, dataset=getattr(data, "name", None) or type(data).__name__, data_root=None)
    eps_list = eps_values(config.eps)
    if len(eps_list) > 1:  # one analysis per eps and a combined report (uapx.sweep)
        from .sweep import analyze_sweep

        return analyze_sweep(config, eps_list, registry=reg, model=model, data=data)
    config = replace(config, eps=eps_list[0] if eps_list else None)
    p = plan(config, reg)  # names and settings checked before any work; the attack looked up once
    c = config.resolved(p.attack)
    check_threat_model(p.attack.cls, [m.cls for m in p.methods], norm=c.norm, target_class=c.target_class)
    out = check_output_folder(c.out, overwrite=c.overwrite, claim=distributed.is_main())
    distributed.barrier()  # rank 0 has claimed --out (removing dead runs' leftovers) before any rank writes beside it
    timer = Timer()
    with timer("load"):
        s = load_inputs(c, p.attack, model=model, dataset=data)
    with scratch_folder(out) as scratch:  # a streamed run's perturbation set lives here until the report is out
        with timer("attack"):
            analysis, preds = attack_images(c, s, scratch)
        with timer("uap_methods"):
            build_uaps(analysis, p.methods, c)
            uaps = evaluate_uaps(analysis, preds, c)
        with timer("held_out"):
            uaps["held_out"] = evaluate_held_out(analysis, s, c, checked=uaps["evaluation"])
            if "transfer" in uaps["held_out"]:  # report.json's uaps.transfer (on the held-out images)
                uaps["transfer"] = uaps["held_out"].pop("transfer")
        report = Report(f"uapx analysis: {c.model} on {c.dataset} (fit: {s.images.split}, {len(preds.y)} images; "
                        f"held out: {s.heldout.split}, {len(s.heldout)} images), eps {c.eps:g}")
        diagnostics = run_diagnostics(analysis, p.diagnostics, c, report, timer)
        write_report(report, out, config, c, reg, s, analysis, preds, uaps, diagnostics, timer)
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
               precision: str = "auto", overwrite: bool = False, skip_unreadable: bool = False,
               model_args: dict | None = None, weights: str | None = None, normalize: str | None = None,
               image_size: int | None = None, class_index: str | dict[str, int] | None = None) -> dict:
    """``uapx apply``: evaluate saved UAPs on any model and data set (JSON-ready results); the
    model and images as :func:`analyze` takes them (factory, weights, normalisation, image size).

    ``out`` (a JSON file) is claimed for the run and an existing one is replaced only with
    ``overwrite``; ``skip_unreadable`` leaves out image files that cannot be decoded (counted);
    ``class_index`` as in :class:`AnalyzeConfig` (:func:`uapx.class_index.model_labels`)."""
    from .methods import load_uaps

    if out and distributed.is_main():
        if Path(out).exists() and not overwrite:
            raise UapxError(f"output {str(out)!r} already exists", "pass --overwrite to replace it, or another --out")
        atomic.claim(out)  # released by the CLI, or by the next claim of this process
    uaps = load_uaps(path)
    if only:
        known = {u.name for u in uaps}
        missing = [n for n in only if n not in known]
        if missing:
            raise UapxError(f"no UAP named {missing[0]!r} in {path!r}",
                            f"choose from: {', '.join(sorted(known)[:20])}")
        uaps = [u for u in uaps if u.name in only]
    images = data.load(dataset, split, data_root, skip_unreadable=skip_unreadable,
                       image_size=image_size).subset(n_samples, seed=seed)
    if uaps and tuple(uaps[0].vector.shape) != tuple(images.shape):
        raise UapxError(f"the UAPs have shape {tuple(uaps[0].vector.shape)} but {dataset} images are "
                        f"{tuple(images.shape)}", "apply them to a data set of the same image shape")
    net = models.load(model, device=device, arch=arch, model_args=model_args, weights=weights, normalize=normalize)
    outputs = check_model_fits(net, images.images(slice(0, 1)).to(device), None, what=model, data=dataset)
    images = model_labels(images, outputs, class_index=class_index, what=model)
    distributed.init_from_env(device)
    shard = images.take(distributed.shard(len(images)))  # all of them in one process
    y_all = distributed.all_gather_rows(shard.y)  # predict() gathers every rank's predictions
    evals, extra = evaluate_many(net, shard.images(), y_all, uaps, num_classes=len(images.classes), draws=draws,
                                 seed=seed, batch_size=batch_size, device=device, precision=precision)
    res = {"uaps": str(path), "model": model, "dataset": dataset, "split": split, "n_images": len(images),
           "unreadable_skipped": {"count": len(images.skipped), "files": images.skipped[:20]}, **extra, "evaluations": {k: v.to_dict() for k, v in evals.items()}}
    if out and distributed.is_main():
        atomic.write_json(out, res)
        atomic.release(out)
    return res
