"""The neural-operator data: the Burgers solver against the Cole–Hopf solution and under
refinement, the Gaussian random fields' spectra against their covariances, the Darcy solver
against manufactured solutions and its matrix's spectrum, and the cache."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import operator_data
from benchmarks.operator_data import burgers, darcy


# ------------------------------------------------------------------------------ Burgers
def cole_hopf(n: int, amplitude: float, mean: float, viscosity: float, t: float) -> np.ndarray:
    """The exact ``u(·, t)`` from ``u₀ = mean + amplitude · sin 2πx``: ``v = u − mean`` is
    ``−2ν φₓ/φ`` with ``φ`` solving the heat equation ``φₜ = ν φₓₓ`` from
    ``φ₀ = exp(−∫₀ˣ v₀ / 2ν)``, carried along by the mean: ``u(x, t) = mean + v(x − mean t, t)``."""
    x = np.arange(n) / n
    phi0 = np.exp(-amplitude * (1.0 - np.cos(2 * math.pi * x)) / (4 * math.pi * viscosity))
    k = 2 * math.pi * np.fft.fftfreq(n, 1.0 / n)
    phi_hat = np.fft.fft(phi0) * np.exp(-viscosity * k**2 * t - 1j * k * mean * t)
    phi, phi_x = np.fft.ifft(phi_hat).real, np.fft.ifft(1j * k * phi_hat).real
    return mean - 2 * viscosity * phi_x / phi


@pytest.mark.parametrize(
    ("viscosity", "n", "amplitude", "mean", "t"),
    [(0.1, 256, 1.0, 0.7, 1.0), (0.1, 256, 3.0, 0.0, 0.3), (0.02, 512, 1.0, -0.4, 1.0)],
)
def test_burgers_matches_the_cole_hopf_solution(viscosity, n, amplitude, mean, t):
    u0 = mean + amplitude * np.sin(2 * math.pi * np.arange(n) / n)
    u = burgers.solve(np.stack([u0, u0]), t_end=t, viscosity=viscosity)
    exact = cole_hopf(n, amplitude, mean, viscosity, t)
    assert np.abs(u - exact).max() < 1e-7 * np.abs(exact).max()


def test_burgers_changes_by_less_than_its_tolerance_when_dt_halves_or_the_grid_doubles():
    rng = np.random.default_rng(1)
    u0 = burgers.gaussian_random_field(rng, 4, 128)
    coarse = burgers.solve(u0)
    assert np.abs(burgers.solve(u0, cfl=0.5) - coarse).max() < 1e-6 * np.abs(coarse).max()
    padded = np.fft.irfft(np.fft.rfft(u0) * 2, n=256)  # the same band-limited u₀ on 256 points
    assert np.allclose(padded[:, ::2], u0, atol=1e-12)
    fine = burgers.solve(padded)[:, ::2]
    assert np.abs(fine - coarse).max() < 1e-6 * np.abs(coarse).max()


def test_burgers_conserves_mass_and_obeys_the_maximum_principle():
    u0 = burgers.gaussian_random_field(np.random.default_rng(2), 8, 128)
    u1 = burgers.solve(u0)
    assert np.allclose(u1.sum(-1), u0.sum(-1), rtol=0, atol=1e-10 * np.abs(u0).sum())
    assert np.all(u1.max(-1) <= u0.max(-1) + 1e-12) and np.all(u1.min(-1) >= u0.min(-1) - 1e-12)
    assert np.all(np.abs(u1 - u0).max(-1) > 0.05)  # it did move


def test_the_periodic_field_has_the_spectrum_of_its_covariance():
    """``E|û_k|² = λ_k = 625 ((2πk)² + 25)⁻²`` for the discrete Fourier coefficients
    ``k ≠ 0``; the mean (and the Nyquist mode) is zero."""
    n, samples = 64, 4000
    u = burgers.gaussian_random_field(np.random.default_rng(3), samples, n)
    power = (np.abs(np.fft.rfft(u, axis=-1) / n) ** 2).mean(0)
    expected = 625.0 / ((2 * math.pi * np.arange(n // 2 + 1)) ** 2 + 25.0) ** 2
    assert np.allclose(power[1:9], expected[1:9], rtol=0.1)
    assert power[0] == pytest.approx(0.0, abs=1e-20) and power[-1] == pytest.approx(0, abs=1e-20)
    assert u.var() == pytest.approx(2 * expected[1:-1].sum(), rel=0.05)


# ------------------------------------------------------------------------------- Darcy
def test_the_neumann_field_has_the_spectrum_of_its_covariance():
    """Projections on ``e_k(x) e_l(y)`` (trapezoidal rule) have variances
    ``μ_kl = (π²(k² + l²) + 9)⁻²`` and are uncorrelated."""
    n, samples = 33, 2000
    psi = darcy.gaussian_random_field(np.random.default_rng(4), samples, n)
    x = np.linspace(0.0, 1.0, n)
    weights = np.full(n, 1.0 / (n - 1))
    weights[[0, -1]] /= 2
    basis = np.sqrt(2.0) * np.cos(math.pi * np.outer(x, np.arange(3)))
    basis[:, 0] = 1.0
    coefficients = np.einsum("i,ik,sij,j,jl->skl", weights, basis, psi, weights, basis)
    variance = coefficients.var(0)
    k2 = np.arange(3) ** 2
    assert np.allclose(variance, (math.pi**2 * (k2[:, None] + k2[None, :]) + 9.0) ** -2, rtol=0.15)
    flat = coefficients.reshape(samples, -1)
    correlation = np.corrcoef(flat.T) - np.eye(flat.shape[1])
    assert np.abs(correlation).max() < 0.1


def manufactured(n: int, smooth_coefficient: bool) -> float:
    """The largest nodal error for ``u = sin πx sin πy`` with ``a = 1`` or ``a = 1 + x + y²/2``
    and ``f = −∇·(a∇u)`` worked out by hand."""
    x = np.linspace(0.0, 1.0, n)
    X, Y = np.meshgrid(x, x, indexing="ij")
    sx, sy, cx, cy = (np.sin(math.pi * X), np.sin(math.pi * Y),
                      np.cos(math.pi * X), np.cos(math.pi * Y))  # fmt: skip
    exact = sx * sy
    if smooth_coefficient:
        a = 1.0 + X + 0.5 * Y**2
        f = 2 * math.pi**2 * a * exact - math.pi * cx * sy - Y * math.pi * sx * cy
    else:
        a, f = np.ones_like(X), 2 * math.pi**2 * exact
    return float(np.abs(darcy.solve(a, f[1:-1, 1:-1]) - exact).max())


@pytest.mark.parametrize("smooth_coefficient", [False, True])
def test_darcy_converges_at_second_order_on_manufactured_solutions(smooth_coefficient):
    errors = [manufactured(n, smooth_coefficient) for n in (17, 33, 65)]
    assert errors[-1] < 3e-4
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert 3.6 < coarse / fine < 4.4


def test_the_constant_coefficient_matrix_has_the_laplacians_eigenvalues():
    n = 9
    h = 1.0 / (n - 1)
    s = np.sin(math.pi * np.arange(1, n - 1) * h / 2) ** 2
    expected = np.sort((4 / h**2 * (s[:, None] + s[None, :])).ravel())
    matrix = darcy.operator(np.full((n, n), 2.5)).toarray()
    assert np.allclose(np.linalg.eigvalsh(matrix), 2.5 * expected)


def test_the_darcy_matrix_is_symmetric_positive_definite_within_the_coefficients_bounds():
    n = 11
    h = 1.0 / (n - 1)
    a = darcy.threshold(darcy.gaussian_random_field(np.random.default_rng(5), 1, n)[0])
    assert set(np.unique(a)) == {darcy.LOW, darcy.HIGH}
    matrix = darcy.operator(a).toarray()
    assert np.array_equal(matrix, matrix.T)
    eigenvalues = np.linalg.eigvalsh(matrix)
    s = np.sin(math.pi * np.arange(1, n - 1) * h / 2) ** 2
    laplacian_min, laplacian_max = 8 / h**2 * s.min(), 8 / h**2 * s.max()
    assert eigenvalues.min() >= darcy.LOW * laplacian_min * (1 - 1e-12)
    assert eigenvalues.max() <= darcy.HIGH * laplacian_max * (1 + 1e-12)
    np.linalg.cholesky(matrix)


def test_darcy_pairs_are_positive_inside_and_zero_on_the_boundary():
    a, u = darcy.generate(np.random.default_rng(6), 3, fine=33, resolution=9)
    assert a.shape == u.shape == (3, 9, 9)
    assert np.all(u[:, 0, :] == 0) and np.all(u[:, -1, :] == 0)
    assert np.all(u[:, :, 0] == 0) and np.all(u[:, :, -1] == 0)
    assert np.all(u[:, 1:-1, 1:-1] > 0)
    with pytest.raises(ValueError, match="fine"):
        darcy.generate(np.random.default_rng(6), 1, fine=32, resolution=9)


def test_the_darcy_compliance_lies_between_those_of_the_constant_coefficients():
    """``A(3) ⪯ A(a) ⪯ A(12)`` (every face coefficient lies in [3, 12]), so the compliance
    ``Σ u = 1ᵀ A(a)⁻¹ 1`` lies between ``Σ u₁ / 12`` and ``Σ u₁ / 3`` (``u₁``: ``a = 1``)."""
    n = 33
    a = darcy.threshold(darcy.gaussian_random_field(np.random.default_rng(7), 1, n)[0])
    compliance, unit = darcy.solve(a).sum(), darcy.solve(np.ones((n, n))).sum()
    assert unit / darcy.HIGH < compliance < unit / darcy.LOW


# ------------------------------------------------------------------------------- cache
def test_the_cache_returns_identical_arrays_the_second_time(tmp_path, monkeypatch):
    spec = operator_data.SIZES["quick"]["darcy"]
    first = operator_data.load(spec, cache=tmp_path)
    assert (tmp_path / spec.filename()).is_file()
    assert first["x_train"].shape == (spec.train, spec.resolution, spec.resolution)
    assert first["x_test"].shape[0] == spec.test and float(first["seconds"]) > 0

    def refuse(spec):
        raise AssertionError("solved again instead of reading the cache")

    monkeypatch.setattr(operator_data, "generate", refuse)
    monkeypatch.setenv("CURVEBALL_CACHE", str(tmp_path))
    second = operator_data.load(spec)  # the same folder, through the environment variable
    assert sorted(second) == sorted(first)
    for key in first:
        assert np.array_equal(second[key], first[key]) and second[key].dtype == first[key].dtype


def test_the_cache_keys_on_every_field_of_the_spec(tmp_path):
    spec = operator_data.SIZES["quick"]["burgers"]
    other = operator_data.DataSpec(**{**spec.__dict__, "seed": 1})
    assert spec.filename() != other.filename()
    a, b = operator_data.load(spec, tmp_path), operator_data.load(other, tmp_path)
    assert not np.array_equal(a["x_train"], b["x_train"])
    assert np.array_equal(a["x_train"], operator_data.generate(spec)["x_train"])  # deterministic
    assert operator_data.cache_folder(None).name  # resolves without a folder given
