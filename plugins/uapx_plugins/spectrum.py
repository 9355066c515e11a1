"""Built-in diagnostic ``spectrum``: the singular values of the perturbation matrix.

Global and per class: singular values, explained-variance ratios, sigma1/sigma2, the effective
rank exp(H(p)) with p_i = sigma_i / sum(sigma) (Roy and Vetterli, 2007), and the number of
singular values above a fraction of sigma1.
"""
from __future__ import annotations

import math

import torch
from matplotlib.ticker import MaxNLocator

import uapx
from uapx.diagnostics import Diagnostic, DiagnosticResult
from uapx import distributed, stats
from uapx.linalg import exact_svd_fits, randomized_svd, row_gram, top_svd_gram
from uapx.plots import class_name, figure_vs_control, plt


def spectrum_figures(S: torch.Tensor, total_energy: float, *, fraction: float) -> dict:
    """Summary numbers of a full spectrum ``S`` (descending, ``(r,)``)."""
    s = S.double()
    p = s / s.sum().clamp_min(1e-300)
    nz = p[p > 0]
    return {
        "singular_values": s.tolist(),
        "explained_variance": (s ** 2 / max(total_energy, 1e-300)).tolist(),
        "sigma1_over_sigma2": float(s[0] / s[1]) if s.numel() > 1 and s[1] > 0 else math.inf,
        "effective_rank": float(torch.exp(-(nz * nz.log()).sum())),
        f"count_above_{fraction:g}_sigma1": int((s >= fraction * s[0]).sum()),
    }


def talk_figures(S: torch.Tensor, total_energy: float) -> dict:
    """The ratios the study's criteria read, from singular values ``S`` (descending): sigma1/sigma2,
    sigma1/sigma10, sigma5/sigma1, and the energy share sigma1^2 / ||D||_F^2."""
    s = S.double()

    def at(i: int) -> float:
        return float(s[i]) if s.numel() > i else float("nan")

    return {"sigma1_over_sigma2": at(0) / at(1) if at(1) > 0 else math.inf,
            "sigma1_over_sigma10": at(0) / at(9) if at(9) > 0 else math.inf,
            "sigma5_over_sigma1": at(4) / at(0) if at(0) > 0 else float("nan"),
            "energy_share": at(0) ** 2 / max(total_energy, 1e-300)}


TALK_KEYS = ("sigma1_over_sigma2", "sigma1_over_sigma10", "sigma5_over_sigma1", "energy_share")


def _ratios_from_gram(G: torch.Tensor, k: int = 0) -> torch.Tensor:
    """``TALK_KEYS`` and the top ``k`` eigenvalues of the second-moment matrix ``R^T R / m`` (nan past
    the rank), ``(4 + k,)``, from a row Gram matrix ``G = R R^T`` ``(m, m)``: its eigenvalues are the
    squared singular values of ``R`` and its trace is ``||R||_F^2``."""
    ev = torch.linalg.eigvalsh(G).flip(0).clamp_min(0)
    f = talk_figures(ev[:10].sqrt(), float(G.diagonal().sum()))
    lam = torch.full((k,), math.nan, dtype=torch.float64)
    lam[:min(k, len(ev))] = ev[:k] / G.shape[0]
    return torch.cat([torch.tensor([f[key] for key in TALK_KEYS], dtype=torch.float64), lam])


def ratio_intervals(chunks, n: int, d: int, value: dict, *, singular_values: list[float] | None = None, seed: int,
                    reps: int = stats.SUBSAMPLE_REPS) -> dict:
    """95 % half-sampling intervals (:func:`uapx.stats.subsample_interval`) of ``TALK_KEYS`` of a
    matrix streamed as ``chunks`` (``n`` rows of ``d`` in this process; under torch.distributed each
    rank's rows, a collective whose answer is every rank's and the single process's), around its
    full-matrix figures ``value``; with the
    matrix's top ``singular_values`` ``sigma_i``, also of the second-moment eigenvalues
    ``lambda_i = sigma_i^2 / n`` (the subsample's ``sigma_i(S)^2 / m``; a figure that does not grow
    with the rows) and, through ``sigma_i = sqrt(n lambda_i)``, of the singular values.

    The row Gram matrix of a pool of ``P = min(n, SUBSAMPLE_POOL_ROWS)`` rows (a seeded draw) is built
    once, in one pass that holds only those rows; each replicate is the eigenvalues of an ``m x m``
    principal submatrix of it, ``m = min(P / 2, SUBSAMPLE_MAX_ROWS)``: the cost is bounded whatever ``n``.  Returns
    ``{key: {"se", "low", "high", "shift"}}``, ``"eigenvalues_second_moment"`` (the same, as lists),
    ``"singular_values"`` (``{"low", "high"}`` lists) and ``"method"``: the rows, pool and replicates used."""
    n_local, n = n, distributed.row_offset(n)[1]
    pool = stats.subsample_pool(n, seed=seed)
    G = row_gram(chunks, n_local, d, pool)
    sv = torch.tensor(singular_values or [], dtype=torch.float64)
    v = torch.cat([torch.tensor([value[k] for k in TALK_KEYS], dtype=torch.float64), sv ** 2 / n])
    r = stats.subsample_interval(lambda idx: _ratios_from_gram(G[idx][:, idx], len(sv)), v, len(pool), n=n,
                                 seed=seed + 1, reps=reps)
    stat_keys = ("se", "low", "high", "shift")
    out = {k: {s_: r[s_][i] for s_ in stat_keys} for i, k in enumerate(TALK_KEYS)}
    if len(sv):
        lam = {s_: r[s_][len(TALK_KEYS):] for s_ in stat_keys}
        out["eigenvalues_second_moment"] = lam
        out["singular_values"] = {b: [math.sqrt(n * max(x, 0.0)) for x in lam[b]] for b in ("low", "high")}
    out["method"] = {"what": f"half-sampling without replacement: {r['reps']} subsamples of {r['rows']} of "
                             f"{r['pool']} rows{' (a seeded draw of the ' + str(n) + ')' if r['pool'] < n else ''}, "
                             "reflected quantile interval centred on the estimate, width scaled by "
                             f"sqrt(m P / (N (P - m))) = {r['scale']:.3g}",
                     **{k: r[k] for k in ("rows", "pool", "reps", "scale")}, "n": n}
    return out


def random_rows_like(chunks, *, seed: int):
    """The control matrix, chunk by chunk: Gaussian rows rescaled to the row norms of ``chunks``."""
    g = torch.Generator().manual_seed(seed)
    for block in chunks:
        r = torch.randn(block.shape, generator=g, dtype=torch.float64)
        yield (r * (block.double().norm(dim=1, keepdim=True) / r.norm(dim=1, keepdim=True).clamp_min(1e-30))).float()


def controlled_figures(pset, *, seed: int, top: int, bootstrap: bool = True) -> dict:
    """The talk's figures of ``pset``'s matrix D beside its random control (rows of the same norms),
    each with a 95 % half-sampling interval over rows (:func:`ratio_intervals`), and the eigenvalues of
    the second-moment matrix D^T D / N and of the covariance matrix of the rows (the talk's eigen-spectra)."""
    res = top_svd_gram(pset.chunks(), pset.d, pset.d, center=False)
    cen = top_svd_gram(pset.chunks(), pset.d, pset.d, center=True)
    ctl = top_svd_gram(random_rows_like(pset.chunks(), seed=seed), pset.d, pset.d, center=False)
    n = max(res.n, 1)
    out = {"figures": talk_figures(res.S, res.total_energy),
           "control": {**talk_figures(ctl.S, ctl.total_energy),
                       "singular_values": ctl.S.double()[:top].tolist(),
                       "what": "random Gaussian rows rescaled to the perturbations' row norms"},
           "eigenvalues_second_moment": (res.S.double()[:top] ** 2 / n).tolist(),
           "eigenvalues_covariance": (cen.S.double()[:top] ** 2 / max(n - 1, 1)).tolist()}
    ev = out["eigenvalues_second_moment"]
    out["figures"]["eigenvalue1_over_eigenvalue2"] = ev[0] / ev[1] if len(ev) > 1 and ev[1] > 0 else math.inf
    out["figures"]["eigenvalue5_over_eigenvalue1"] = ev[4] / ev[0] if len(ev) > 4 and ev[0] > 0 else math.nan
    if bootstrap and res.n > 2:
        n, d = len(pset), pset.d  # this process's rows
        out["bootstrap95"] = ratio_intervals(pset.chunks(), n, d, out["figures"],
                                             singular_values=res.S.double()[:top].tolist(), seed=seed)
        out["control"]["bootstrap95"] = ratio_intervals(random_rows_like(pset.chunks(), seed=seed), n, d,
                                                        out["control"], singular_values=out["control"]["singular_values"],
                                                        seed=seed + 2)
    return out


class SpectrumDiagnostic(Diagnostic):
    """Singular-value spectrum of the perturbation matrix, global and per class."""

    name = "spectrum"
    supports_distributed = True
    description = "singular values of the perturbation matrix: decay, sigma1/sigma2, effective rank"

    def __init__(self, *, top: int = 20, fraction: float = 0.5, center: bool = False) -> None:
        self.top, self.fraction, self.center = top, fraction, center

    def _one(self, pset) -> dict:
        if not exact_svd_fits(len(pset), pset.d):  # ImageNet-size d: the top values, randomized and streamed
            res = randomized_svd(pset.chunks, len(pset), pset.d, min(self.top, len(pset), pset.d), center=self.center,
                                 seed=0)
            figs = spectrum_figures(res.S, res.total_energy, fraction=self.fraction)
            figs["effective_rank"] = None  # needs every singular value
            figs.update(solver="randomized", n=res.n)
            return figs
        res = top_svd_gram(pset.chunks(), pset.d, pset.d, center=self.center)  # all of them: d x d eigh
        figs = spectrum_figures(res.S, res.total_energy, fraction=self.fraction)
        figs["solver"] = "exact"
        figs["singular_values"] = figs["singular_values"][: self.top]
        figs["explained_variance"] = figs["explained_variance"][: self.top]
        figs["n"] = res.n  # over every rank under torchrun
        return figs

    def run(self, analysis):
        pset = analysis.pset
        glob = self._one(pset)
        per_class = {str(c): self._one(pset.where(pset.labels == c)) for c in pset.classes}
        if pset.d <= 4096:  # exact d x d spectra: the figures beside their control, with intervals
            glob["talk"] = controlled_figures(pset, seed=analysis.seed, top=self.top)
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        k = len(glob["singular_values"])
        ax.semilogy(range(1, k + 1), glob["singular_values"], "o-", color="k", label="all images", zorder=3)
        for c, f in per_class.items():
            ax.semilogy(range(1, len(f["singular_values"]) + 1), f["singular_values"], alpha=0.4, lw=1,
                        label=class_name(analysis, int(c)))
        ax.set_xlabel("index")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # indices are whole numbers
        ax.set_ylabel("singular value")
        ax.legend(fontsize=6, ncol=2)
        ax.set_title(f"{analysis.model_id}, eps {analysis.eps:g}", fontsize=9)
        s = glob["singular_values"]
        summary = (f"Top singular values {', '.join(f'{v:.3g}' for v in s[:5])}; sigma1/sigma2 = "
                   f"{glob['sigma1_over_sigma2']:.3g}; " + (
                       f"effective rank {glob['effective_rank']:.1f} of {pset.d}." if glob["effective_rank"] is not None
                       else f"top {k} values by randomized SVD (d = {pset.d} is too large for the exact spectrum)."))
        if "talk" in glob:
            t, cs = glob["talk"], glob["talk"]["control"]["singular_values"]
            ax.semilogy(range(1, len(cs) + 1), cs, "x:", color="grey", label="control (random rows)")
            for src, vals, color in ((t.get("bootstrap95", {}), glob["singular_values"], "k"),
                                     (t["control"].get("bootstrap95", {}), cs, "grey")):
                b = src.get("singular_values")
                if b:  # 95 % half-sampling intervals over rows
                    j = min(len(vals), len(b["low"]))
                    ax.errorbar(range(1, j + 1), vals[:j], yerr=[[max(0.0, v - lo) for v, lo in zip(vals, b["low"])],
                                                                  [max(0.0, hi - v) for v, hi in zip(vals, b["high"])]],
                                fmt="none", color=color, capsize=2, lw=0.8, zorder=4)
            ax.legend(fontsize=6, ncol=2)
            bi = t.get("bootstrap95", {})

            def ci(key: str, src: dict) -> str:
                b = src.get(key)
                return f" [{b['low']:.3g}, {b['high']:.3g}]" if b else ""

            summary += " Against the random-rows control: " + "; ".join(
                f"{k} {t['figures'][k]:.3g}{ci(k, bi)} vs {t['control'][k]:.3g}"
                f"{ci(k, t['control'].get('bootstrap95', {}))}"
                for k in ("sigma1_over_sigma2", "sigma1_over_sigma10", "energy_share")) + "."
            if "method" in bi:
                how = bi["method"]
                summary += (f" 95 % intervals by half-sampling rows without replacement ({how['reps']} subsamples "
                            f"of {how['rows']} rows" + (f", drawn from {how['pool']} of the {how['n']} rows: the "
                                                        f"interval was computed on subsamples of {how['rows']} rows"
                                                        if how["pool"] < how["n"] else "") + ").")
        figures = {"images": glob["n"], stats.IMAGES_PER_CLASS: stats.class_counts(pset.labels, over_ranks=True),
                   "global": glob, "per_class": per_class, "center": self.center}
        plots = [("singular-values", fig, "Singular values of the perturbation matrix (log scale), all images and "
                                          "each class, and the random-rows control; error bars: 95 % half-sampling "
                                          "intervals over rows (all images and control).")]
        if "talk" in glob:
            plots.append(("ratios", _ratios_plot(glob["talk"]), "The talk's ratios of the perturbation matrix beside "
                          "those of its random-rows control (random rows with the same norms; log scale), with 95 % "
                          "half-sampling intervals over rows where measured."))
        return DiagnosticResult(figures, plots, summary)


def _ratios_plot(talk: dict):
    """sigma1/sigma2, sigma1/sigma10 and the energy share beside the control's, with their intervals."""
    keys = ("sigma1_over_sigma2", "sigma1_over_sigma10", "energy_share")

    def rows(src: dict) -> list:
        b = src.get("bootstrap95", {})
        return [(src[k], b[k]["low"], b[k]["high"]) if k in b else (src[k], src[k], src[k]) for k in keys]

    t = {**talk["figures"], "bootstrap95": talk.get("bootstrap95", {})}
    return figure_vs_control(["sigma1/sigma2", "sigma1/sigma10", "sigma1^2/||D||_F^2"], rows(t), rows(talk["control"]),
                             ylabel="ratio (log scale)", figure_label="perturbations",
                             control_label="control: random rows, same norms", log=True)


@uapx.hookimpl
def uapx_add_diagnostics():
    return [SpectrumDiagnostic]
