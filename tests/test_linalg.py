"""Randomized SVD, the single-pass sketch (uapx.linalg) and the ``rsvd`` plugin, against exact SVD.

References are independent of the code under test: NumPy's LAPACK SVD of the whole matrix in
float64, SciPy's principal angles, and the error bound of Tropp, Yurtsever, Udell and Cevher
(2017) evaluated from the exact singular values.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from uapx.errors import UapxError
from uapx.linalg import randomized_svd, single_pass_sketch, single_pass_svd
from uapx.perturbations import PerturbationSet
from uapx.registry import get_registry

J = np.arange(200, dtype=np.float64)
SPECTRA = {  # singular values sigma_1 >= sigma_2 >= ... of the test matrices
    "geometric": 0.85 ** J,
    "polynomial": (J + 1) ** -1.0,
    "low-rank-plus-noise": np.r_[10 * 0.8 ** np.arange(12), 0.3 * np.ones(188)],
}


def with_spectrum(n: int, d: int, sigma: np.ndarray, seed: int = 0) -> torch.Tensor:
    """``(n, d)`` float64 ``U diag(sigma) V^T`` with random orthonormal ``U`` ``(n, r)`` and ``V`` ``(d, r)``."""
    g = torch.Generator().manual_seed(seed)
    r = len(sigma)
    u = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64)).Q
    return (u * torch.as_tensor(sigma)) @ v.T


def exact_svd(a: torch.Tensor, center: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """NumPy's singular values ``(r,)`` and right singular vectors ``(r, d)`` of ``a`` in float64."""
    m = a.double().numpy()
    if center:
        m = m - m.mean(0)
    _, s, vt = np.linalg.svd(m, full_matrices=False)
    return s, vt


def max_angle(v: torch.Tensor, vt_ref: np.ndarray, m: int) -> float:
    """Largest principal angle (radians) between the spans of the first ``m`` rows of ``v`` and ``vt_ref``."""
    return float(scipy.linalg.subspace_angles(v[:m].double().numpy().T, vt_ref[:m].T).max())


def make_set(deltas: torch.Tensor, labels: torch.Tensor | None = None, shape=(1, 4, 4)) -> PerturbationSet:
    labels = labels if labels is not None else torch.zeros(deltas.shape[0], dtype=torch.long)
    return PerturbationSet(deltas.float(), labels, labels.clone(), labels.clone(), shape, eps=1.0)


def rsvd_method(**settings):
    return get_registry().get("rsvd", "method").cls(**settings)


# -- randomized SVD against exact SVD -----------------------------------------------------------


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
def test_randomized_svd_matches_exact_on_decaying_spectra(spectrum):
    a = with_spectrum(1000, 200, SPECTRA[spectrum]).float()  # float32, as perturbation sets are
    s, vt = exact_svd(a)
    res = randomized_svd(lambda: a.split(256), 1000, 200, 10)  # the defaults: oversample 10, 2 iterations
    assert res.S.shape == (10,) and res.V.shape == (10, 200)
    np.testing.assert_allclose(res.S.double().numpy(), s[:10], rtol=1e-3)
    assert max_angle(res.V, vt, 5) < 1e-3  # these spectra have gaps, so the top-5 subspace is well defined
    np.testing.assert_allclose(res.V.double().norm(dim=1).numpy(), 1.0, atol=1e-6)
    assert res.total_energy == pytest.approx(float((s ** 2).sum()), rel=1e-5)


def test_power_iterations_are_what_make_it_accurate():
    """Without subspace iterations the slowly decaying spectrum misses the tolerance above."""
    a = with_spectrum(1000, 200, SPECTRA["polynomial"]).float()
    s, _ = exact_svd(a)
    errors = [np.abs(randomized_svd(lambda: a.split(256), 1000, 200, 10, power_iters=q).S.double().numpy()
                     / s[:10] - 1).max() for q in (0, 1, 2)]
    assert errors[0] > 1e-2 and errors[2] < 1e-3
    assert errors[0] > errors[1] > errors[2]


@pytest.fixture(scope="module")
def real_pset() -> PerturbationSet:
    """Real L2 PGD perturbations (eps 2, 10 steps of 0.5) of 300 MNIST test images on the zoo model."""
    import uapx.attacks
    import uapx.data
    import uapx.models

    model = uapx.models.load("zoo:mnist-natural")
    images = uapx.data.load("mnist", "test").subset(300)
    x, y = images.images(), images.y
    x_adv = uapx.attacks.pgd(model, x, y, norm="l2", eps=2.0, steps=10, step_size=0.5)
    with torch.no_grad():
        clean, adv = model(x).argmax(1), model(x_adv).argmax(1)
    deltas = (x_adv - x).reshape(len(x), -1)
    assert float(deltas.norm(dim=1).max()) <= 2.0 + 1e-4  # a real attack within its budget
    return PerturbationSet(deltas, y.clone(), clean, adv, images.shape, 2.0, "l2", "zoo:mnist-natural")


def test_randomized_svd_on_real_perturbations(real_pset):
    """MNIST perturbations have a slowly decaying spectrum (8.3, 8.0, 6.9, 6.7, ...), so this needs
    more than the defaults: oversample 20 and 4 iterations reach 1e-3 (the defaults give ~2e-2 on
    sigma_10)."""
    n, d = len(real_pset), real_pset.d
    s, vt = exact_svd(real_pset.matrix())
    res = randomized_svd(real_pset.chunks, n, d, 10, oversample=20, power_iters=4)
    np.testing.assert_allclose(res.S.double().numpy(), s[:10], rtol=1e-3)
    # Subspaces ending at a gap in the exact spectrum are well defined (Wedin: angle ~ residual / gap).
    gaps = s[:10] / s[1:11]
    for m in (1 + int(np.argmax(gaps[:3])), 1 + int(np.argmax(gaps[:6]))):
        assert max_angle(res.V, vt, m) < 1e-2, m
    # the plugin on the same set agrees with the exact svd plugin
    svd = get_registry().get("svd", "method").cls(k=5, per_class=False)(real_pset, eps=2.0)
    rsvd = rsvd_method(k=5, oversample=20, power_iters=4, per_class=False)(real_pset, eps=2.0)
    assert [u.name for u in rsvd] == [f"rsvd:v{i}" for i in range(1, 6)]
    np.testing.assert_allclose([u.meta["singular_value"] for u in rsvd], [u.meta["singular_value"] for u in svd],
                               rtol=1e-3)
    assert abs(float(rsvd[0].vector.flatten() @ svd[0].vector.flatten())) / 4.0 > 1 - 1e-3  # both have norm 2


# -- streaming, centring, determinism -----------------------------------------------------------


def test_randomized_svd_makes_2q_plus_2_passes_and_chunking_does_not_change_it():
    a = with_spectrum(2500, 120, SPECTRA["polynomial"][:120])
    calls = []

    def chunks(size):
        def fn():
            calls.append(size)
            return a.split(size)
        return fn

    whole = randomized_svd(chunks(2500), 2500, 120, 6, power_iters=3, seed=5)
    assert len(calls) == 2 * 3 + 2
    for size in (37, 1000):
        part = randomized_svd(chunks(size), 2500, 120, 6, power_iters=3, seed=5)
        torch.testing.assert_close(part.S, whole.S, rtol=1e-6, atol=0)
        torch.testing.assert_close(part.V, whole.V, rtol=0, atol=1e-6)  # same signs too


def test_single_pass_reads_once_and_chunking_does_not_change_it():
    """Psi is drawn in blocks of 1024 rows; chunk sizes 37 and 1500 straddle those blocks."""
    a = with_spectrum(2500, 120, SPECTRA["polynomial"][:120])
    whole = single_pass_sketch(iter([a]), 2500, 120, range_dim=9, corange_dim=19, seed=3)
    for size in (37, 1500):
        part = single_pass_sketch(iter(a.split(size)), 2500, 120, range_dim=9, corange_dim=19, seed=3)  # one-shot
        torch.testing.assert_close(part.Q, whole.Q, rtol=0, atol=1e-10)
        torch.testing.assert_close(part.X, whole.X, rtol=0, atol=1e-10)
    top = single_pass_svd(iter(a.split(37)), 2500, 120, 4, range_dim=9, corange_dim=19, seed=3)
    _, s_x, vt_x = np.linalg.svd(whole.X.numpy(), full_matrices=False)  # the top-4 SVD of Q X is that of X
    np.testing.assert_allclose(top.S.double().numpy(), s_x[:4], rtol=1e-6)
    np.testing.assert_allclose(np.abs((top.V.double().numpy() * vt_x[:4]).sum(1)), 1.0, atol=1e-6)


def test_single_pass_recovers_a_matrix_of_the_sketch_rank_exactly():
    """If rank(A) <= r, range(A Omega) = range(A) and X = (Psi Q)^+ Psi Q Q^T A = Q^T A: A_hat = A."""
    a = with_spectrum(400, 90, np.linspace(3.0, 1.0, 11))  # rank 11
    exact = single_pass_sketch(a.split(50), 400, 90, range_dim=11, corange_dim=23)
    assert exact.Q.shape == (400, 11) and exact.X.shape == (11, 90)
    assert float((a - exact.matrix()).norm()) < 1e-10 * float(a.norm())
    short = single_pass_sketch(a.split(50), 400, 90, range_dim=10, corange_dim=23)
    assert float((a - short.matrix()).norm()) > 0.1 * float(a.norm())  # one column short: not exact


@pytest.mark.parametrize("single_pass", [False, True])
def test_centring_is_the_svd_of_the_centred_matrix(single_pass):
    g = torch.Generator().manual_seed(4)
    a = with_spectrum(800, 100, SPECTRA["geometric"][:100]) + 3.0 * torch.randn(100, generator=g, dtype=torch.float64)
    centred = a - a.mean(0)

    def run(m: torch.Tensor, center: bool):
        if single_pass:
            return single_pass_svd(m.split(100), 800, 100, 5, center=center, seed=1)
        return randomized_svd(lambda: m.split(100), 800, 100, 5, center=center, seed=1)

    res, ref = run(a, True), run(centred, False)
    # Centring is folded into the products; it must equal sketching the centred matrix itself.
    torch.testing.assert_close(res.S, ref.S, rtol=1e-6, atol=0)
    torch.testing.assert_close(res.V, ref.V, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.mean.double(), a.mean(0), rtol=1e-6, atol=1e-6)
    assert res.total_energy == pytest.approx(float((centred ** 2).sum()), rel=1e-9)
    s, vt = exact_svd(a, center=True)
    if not single_pass:  # ... and agree with the exact SVD of the centred matrix
        np.testing.assert_allclose(res.S.double().numpy(), s[:5], rtol=1e-3)
        assert max_angle(res.V, vt, 5) < 1e-3
    s_raw, _ = exact_svd(a)
    assert s_raw[0] > 2 * s[0]  # the mean dominates the uncentred matrix: centring is visible


def test_a_fixed_seed_is_deterministic_and_seeds_differ():
    a = with_spectrum(600, 80, SPECTRA["polynomial"][:80]).float()
    for run in (lambda seed: randomized_svd(lambda: a.split(128), 600, 80, 5, seed=seed),
                lambda seed: single_pass_svd(a.split(128), 600, 80, 5, seed=seed)):
        first, again, other = run(7), run(7), run(8)
        assert torch.equal(first.S, again.S) and torch.equal(first.V, again.V)
        assert not torch.equal(first.V, other.V)


# -- the single-pass error bound ----------------------------------------------------------------


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
def test_single_pass_error_is_within_the_tropp_et_al_bound(spectrum):
    """Tropp, Yurtsever, Udell and Cevher (2017), Theorem 4.3, for Gaussian test matrices and real A::

        E ||A - Q X||_F^2 <= (1 + f(r, l)) * min_{0 <= rho <= r-2} (1 + f(rho, r)) * tau_{rho+1}^2(A)

    with ``f(s, t) = s / (t - s - 1)``, ``tau_{j}^2 = sum_{i >= j} sigma_i^2``, ``r`` the range and
    ``l`` the co-range sketch size.  Its first factor is an equality given ``Q``:
    ``E_Psi ||A - Q X||_F^2 = (1 + f(r, l)) ||A - Q Q^T A||_F^2``, tested here as well (two-sided).

    Sizes: single_pass_svd's defaults for k = 5 (r = 2k + 1, l = 2r + 1).  Expectation vs sample:
    40 seeds; a claim fails when the sample mean lies more than 3 standard errors beyond it
    (one-sided, ~0.1 % false alarms by the central limit theorem).  The sample means come to
    0.3-0.65 of the bound, 3 standard errors to ~0.05 of it.
    """
    n, d, k, seeds = 300, 200, 5, 40
    r, l = 2 * k + 1, 4 * k + 3
    a = with_spectrum(n, d, SPECTRA[spectrum])
    s = np.linalg.svd(a.numpy(), compute_uv=False)

    def tail(j: int) -> float:
        return float((s[j:] ** 2).sum())  # tau_{j+1}^2

    def f(a_: int, b_: int) -> float:
        return a_ / (b_ - a_ - 1)

    bound = (1 + f(r, l)) * min((1 + f(rho, r)) * tail(rho) for rho in range(0, r - 1))
    assert bound < tail(0)  # the bound beats A_hat = 0: it says something
    errors, ratios, trunc = [], [], []
    for seed in range(seeds):
        sk = single_pass_sketch(a.split(64), n, d, range_dim=r, corange_dim=l, seed=seed)
        err = float(((a - sk.matrix()) ** 2).sum())
        errors.append(err)
        ratios.append(err / float(((a - sk.Q @ (sk.Q.T @ a)) ** 2).sum()))
        u, sx, vt = np.linalg.svd(sk.X.numpy(), full_matrices=False)  # best rank-k part of Q X
        a_k = sk.Q.numpy() @ (u[:, :k] * sx[:k]) @ vt[:k]
        trunc.append(float(np.linalg.norm(a.numpy() - a_k)))
    errors, ratios, trunc = np.array(errors), np.array(ratios), np.array(trunc)

    def se(x: np.ndarray) -> float:
        return float(x.std(ddof=1) / np.sqrt(len(x)))

    assert errors.mean() <= bound + 3 * se(errors), (errors.mean(), se(errors), bound)
    assert abs(ratios.mean() - (1 + f(r, l))) <= 4 * se(ratios), (ratios.mean(), se(ratios), 1 + f(r, l))
    # the rank-k output: ||A - [A_hat]_k||_F <= tau_{k+1} + 2 ||A - A_hat||_F, in expectation (Jensen)
    assert trunc.mean() <= np.sqrt(tail(k)) + 2 * np.sqrt(bound) + 3 * se(trunc)
    assert (trunc >= np.sqrt(tail(k)) * (1 - 1e-9)).all()  # no rank-k matrix beats the truncated SVD


# -- the rsvd plugin ----------------------------------------------------------------------------


@pytest.mark.parametrize("single_pass", [False, True])
def test_rsvd_recovers_a_planted_direction(single_pass):
    g = torch.Generator().manual_seed(2)
    v = torch.randn(16, generator=g)
    v /= v.norm()
    coeff = 3.0 * torch.sign(torch.randn(300, 1, generator=g))  # +/- v: the average cancels
    d = coeff * v + 0.05 * torch.randn(300, 16, generator=g)
    uaps = rsvd_method(k=2, single_pass=single_pass, per_class=False)(make_set(d), eps=1.0)
    assert [u.name for u in uaps] == ["rsvd:v1", "rsvd:v2"] and all(u.signless for u in uaps)
    assert abs(float(uaps[0].vector.reshape(-1) @ v)) > 0.999
    assert uaps[0].meta["singular_value"] > 10 * uaps[1].meta["singular_value"]
    total = float((d.double() ** 2).sum())
    assert uaps[0].meta["explained_variance"] == pytest.approx(uaps[0].meta["singular_value"] ** 2 / total, rel=1e-5)
    assert uaps[0].meta["explained_variance"] > 0.95


def test_rsvd_plugin_per_class_and_settings():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(90, 16, generator=g) @ torch.randn(16, 16, generator=g)
    labels = torch.arange(90) % 3
    assert repr(rsvd_method()) == ("RandomizedSVDUAP(k=5, oversample=10, power_iters=2, center=False, "
                                   "single_pass=False, seed=0, per_class=True, norm=None)")
    method = rsvd_method(k=3, oversample=13, center=True)  # k + oversample = d: the sketch spans all of A
    uaps = method(make_set(d, labels), eps=[0.5, 1.0])
    names = {u.name for u in uaps}
    assert "rsvd:v1@0.5" in names and "rsvd:v3:class-2@1" in names and len(uaps) == (1 + 3) * 3 * 2
    for u in uaps:
        assert float(u.vector.norm()) == pytest.approx(u.eps, rel=1e-5)
    # a class's directions are the exact SVD of that class's centred rows
    s, vt = exact_svd(d[labels == 1], center=True)
    v1 = next(u for u in uaps if u.name == "rsvd:v1:class-1@1").vector.reshape(-1).double().numpy()
    assert abs(float(v1 @ vt[0])) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UapxError, match="power_iters"):
        rsvd_method(power_iters=-1)
    with pytest.raises(UapxError, match="k must"):
        rsvd_method(k=0)


@pytest.mark.parametrize("single_pass", [False, True])
def test_rsvd_streams_a_set_from_disk(tmp_path, single_pass):
    """A set kept on disk (chunk files of 64 rows, per-class views by mask) gives what the same set
    in memory gives."""
    g = torch.Generator().manual_seed(5)
    d = torch.randn(500, 16, generator=g) @ torch.randn(16, 16, generator=g)
    in_memory = make_set(d, torch.arange(500) % 2)
    in_memory.save(tmp_path / "set", chunk_size=64)
    on_disk = PerturbationSet.load(tmp_path / "set")
    assert on_disk.deltas is None
    method = rsvd_method(k=3, oversample=4, power_iters=1, single_pass=single_pass)
    expected, streamed = method(in_memory, eps=1.0), method(on_disk, eps=1.0)
    assert [u.name for u in streamed] == [u.name for u in expected] and len(expected) == 9
    for got, want in zip(streamed, expected):
        torch.testing.assert_close(got.vector, want.vector, rtol=0, atol=1e-5)
        assert got.meta["singular_value"] == pytest.approx(want.meta["singular_value"], rel=1e-5)


def test_errors_name_the_fix():
    a = torch.randn(50, 8, dtype=torch.float64)
    with pytest.raises(UapxError, match="held 50 rows, expected 60"):
        randomized_svd(lambda: a.split(16), 60, 8, 2)
    with pytest.raises(UapxError, match="does not fit"):
        single_pass_svd(a.split(16), 40, 8, 2)
    with pytest.raises(UapxError, match="does not fit"):
        randomized_svd(lambda: a.split(16), 50, 9, 2)
    with pytest.raises(UapxError, match="k must be"):
        randomized_svd(lambda: a.split(16), 50, 8, 0)
    with pytest.raises(UapxError, match="corange_dim"):
        single_pass_svd(a.split(16), 50, 8, 2, range_dim=5, corange_dim=4)
    with pytest.raises(UapxError, match="range_dim=2 is smaller than k=3"):
        single_pass_svd(a.split(16), 50, 8, 3, range_dim=2)


@pytest.mark.parametrize("n,d", [(40, 300), (300, 300), (900, 300)])
@pytest.mark.parametrize("center", [False, True])
def test_exact_svd_of_wide_and_tall_matrices_matches_scipy(n, d, center):
    """top_svd_gram takes LAPACK's SVD of a wide matrix (N < d) and the Gram matrix of a tall one;
    both give SciPy's singular values and vectors, however the rows are chunked."""
    from uapx.linalg import top_svd_gram

    g = np.random.default_rng(n + d)
    a = g.standard_normal((n, 20)) @ g.standard_normal((20, d)) + 0.1 * g.standard_normal((n, d)) + 0.3
    ref = a - a.mean(0) if center else a
    _, s, vh = scipy.linalg.svd(ref, full_matrices=False)
    res = top_svd_gram(torch.from_numpy(a).float().split(128), d, 6, center=center)
    np.testing.assert_allclose(res.S.numpy(), s[:6], rtol=1e-4)
    for i in range(6):
        assert abs(float(res.V[i].double() @ torch.from_numpy(vh[i]))) == pytest.approx(1.0, abs=1e-4)
    assert res.n == n and res.total_energy == pytest.approx(float((ref ** 2).sum()), rel=1e-5)
