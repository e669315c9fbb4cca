"""The 1D viscous Burgers problem of the FNO paper: Gaussian random initial conditions, a
pseudo-spectral solver, and the pairs ``u₀ ↦ u(·, 1)``.

The equation (Li et al., "Fourier Neural Operator for Parametric Partial Differential
Equations", ICLR 2021, arXiv:2010.08895, section 5.1) is

    ∂ₜu + ∂ₓ(u²/2) = ν ∂ₓₓu   on the periodic interval [0, 1), t ∈ (0, 1],  ν = 0.1,

with ``u₀ ~ N(0, 625 (−Δ + 25 I)⁻²)``. Everything here is NumPy (FFTs included) and batched
over samples: arrays are ``(samples, n)`` on the grid ``x_j = j / n``.
"""

from __future__ import annotations

import math

import numpy as np

VISCOSITY = 0.1
GRF_SIGMA2, GRF_TAU2, GRF_GAMMA = 625.0, 25.0, 2.0  # N(0, σ² (−Δ + τ² I)^−γ), the paper's field


def wavenumbers(n: int) -> np.ndarray:
    """The angular wavenumbers ``k' = 2π k`` of ``numpy.fft.rfft`` on ``n`` points."""
    return 2.0 * math.pi * np.arange(n // 2 + 1)


def grf_eigenvalues(
    n: int, sigma2: float = GRF_SIGMA2, tau2: float = GRF_TAU2, gamma: float = GRF_GAMMA
) -> np.ndarray:
    """The covariance's eigenvalues ``λ_k = σ² ((2πk)² + τ²)^−γ`` for ``k = 0 … n // 2``.

    On the periodic unit interval ``−Δ`` has the eigenfunctions ``e^{2πikx}`` with the
    eigenvalues ``(2πk)²``, so ``σ² (−Δ + τ² I)^−γ`` is diagonal in Fourier space.
    """
    return sigma2 * (wavenumbers(n) ** 2 + tau2) ** (-gamma)


def gaussian_random_field(rng: np.random.Generator, samples: int, n: int) -> np.ndarray:
    """Zero-mean samples of ``N(0, 625 (−Δ + 25 I)⁻²)`` on ``x_j = j / n`` (periodic),
    shape ``(samples, n)``.

    The Karhunen–Loève expansion ``u = Σ_{k≠0} c_k e^{2πikx}`` with independent ``c_k``
    (``c_{−k} = conj(c_k)``), ``E|c_k|² = λ_k``: the real and imaginary parts of ``c_k`` are
    normal with variance ``λ_k / 2``. Modes ``|k| ≥ n / 2`` are dropped (the Nyquist mode
    too, whose ``λ`` is below 10⁻⁷ of ``λ_1`` from ``n = 64``). The constant mode is zero,
    as in the FNO authors' generator (``GRF1(N, m = 0, …)`` sums ``k = 1 … N`` and sets the
    mean to ``m``): with it (variance ``λ_0 = 1``) the viscosity leaves little but the
    conserved mean at ``t = 1``, and returning the mean of ``u₀`` would score a test relative
    error of about 0.03.
    """
    scale = np.sqrt(grf_eigenvalues(n) / 2.0)
    shape = (samples, n // 2 + 1)
    coefficients = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) * scale
    coefficients[:, 0] = 0.0
    if n % 2 == 0:
        coefficients[:, -1] = 0.0
    return np.fft.irfft(coefficients * n, n=n, axis=-1)  # irfft divides by n


def _nonlinear(v_hat: np.ndarray, ik_half: np.ndarray, keep: np.ndarray, n: int) -> np.ndarray:
    """The transform of ``−∂ₓ(v²/2)``, dealiased by the 2/3 rule (``keep`` masks |k| ≤ n/3)."""
    v = np.fft.irfft(v_hat, n=n, axis=-1)
    return -ik_half * np.fft.rfft(v * v, axis=-1) * keep


def _ifrk4_step(v_hat, dt, linear, ik_half, keep, n):
    """One integrating-factor Runge–Kutta-4 step of ``v̂ₜ = L v̂ + N(v̂)``.

    With ``E = e^{L dt/2}`` (Trefethen, "Spectral Methods in MATLAB", 2000, program 27)::

        a = dt N(v̂),  b = dt N(E (v̂ + a/2)),  c = dt N(E v̂ + b/2),  d = dt N(E² v̂ + E c)
        v̂ ← E² v̂ + (E² a + 2 E (b + c) + d) / 6

    The stiff linear part ``L`` is integrated exactly; the error is that of RK4 on ``N``.
    """
    half = np.exp(linear * (dt / 2.0))
    full = half * half
    a = dt * _nonlinear(v_hat, ik_half, keep, n)
    b = dt * _nonlinear(half * (v_hat + a / 2.0), ik_half, keep, n)
    c = dt * _nonlinear(half * v_hat + b / 2.0, ik_half, keep, n)
    d = dt * _nonlinear(full * v_hat + half * c, ik_half, keep, n)
    return full * v_hat + (full * a + 2.0 * half * (b + c) + d) / 6.0


def solve(
    u0: np.ndarray,
    t_end: float = 1.0,
    viscosity: float = VISCOSITY,
    cfl: float = 1.0,
    dt_max: float = 1e-2,
) -> np.ndarray:
    """``u(·, t_end)`` of viscous Burgers from ``u0`` (``(samples, n)``, periodic on [0, 1)).

    Pseudo-spectral in space with 2/3-rule dealiasing; integrating-factor RK4 in time
    (:func:`_ifrk4_step`). The mean ``c = ∫u`` is conserved, so ``v = u − c`` solves
    ``vₜ + c vₓ + (v²/2)ₓ = ν vₓₓ``: both the viscous term and the advection by the mean go
    into the exactly integrated linear part ``L = −ν k'² − i c k'``, and the step size
    only has to resolve the nonlinear advection by ``v``,
    ``dt = min(dt_max, cfl / (max|v| · k'_max))`` with ``k'_max`` the largest kept
    wavenumber (``max|v|`` never grows, by the maximum principle), over the whole batch.
    """
    u0 = np.asarray(u0, dtype=np.float64)
    n = u0.shape[-1]
    k = wavenumbers(n)
    keep = (np.arange(n // 2 + 1) <= n // 3).astype(np.float64)
    u_hat = np.fft.rfft(u0, axis=-1) * keep
    mean = u_hat[:, :1].real / n
    linear = -viscosity * k**2 - 1j * mean * k
    v_hat = u_hat.copy()
    v_hat[:, 0] = 0.0
    k_max, ik_half, t = k[n // 3], 0.5j * k, 0.0
    while t < t_end * (1.0 - 1e-12):
        peak = float(np.abs(np.fft.irfft(v_hat, n=n, axis=-1)).max())
        dt = min(dt_max, t_end - t, cfl / max(peak * k_max, 1e-30))
        v_hat = _ifrk4_step(v_hat, dt, linear, ik_half, keep, n)
        t += dt
    return np.fft.irfft(v_hat, n=n, axis=-1) + mean


def generate(
    rng: np.random.Generator, samples: int, fine: int, resolution: int, chunk: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` pairs ``(u₀, u(·, 1))`` solved on ``fine`` points and subsampled to
    ``resolution`` (every ``fine / resolution``-th point), as float32 ``(samples, resolution)``.

    The batch is solved in chunks of ``chunk`` samples, each with its own step size.
    """
    if fine % resolution:
        raise ValueError(f"fine: expected a multiple of resolution={resolution}, got {fine}")
    stride = fine // resolution
    inputs, outputs = [], []
    for start in range(0, samples, chunk):
        u0 = gaussian_random_field(rng, min(chunk, samples - start), fine)
        inputs.append(u0[:, ::stride])
        outputs.append(solve(u0)[:, ::stride])
    return np.concatenate(inputs).astype(np.float32), np.concatenate(outputs).astype(np.float32)
