"""The 2D Darcy-flow problem of the FNO paper: thresholded Gaussian random coefficients, a
five-point finite-difference solver, and the pairs ``a ↦ u``.

The equation (Li et al., "Fourier Neural Operator for Parametric Partial Differential
Equations", ICLR 2021, arXiv:2010.08895, section 5.2) is

    −∇·(a(x) ∇u(x)) = 1   on the unit square,   u = 0 on its boundary,

with ``a = 12`` where ``ψ ≥ 0`` and ``a = 3`` where ``ψ < 0``, ``ψ ~ N(0, (−Δ + 9 I)⁻²)``.
Fields live on the ``n × n`` nodes ``(i h, j h)``, ``h = 1 / (n − 1)``, boundary included;
arrays are ``(samples, n, n)`` (first index along ``x``).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

HIGH, LOW = 12.0, 3.0  # the coefficient where ψ ≥ 0 and where ψ < 0
GRF_TAU2, GRF_ALPHA = 9.0, 2.0  # ψ ~ N(0, (−Δ + τ² I)^−α)


def grf_eigenvalues(modes: int, tau2: float = GRF_TAU2, alpha: float = GRF_ALPHA) -> np.ndarray:
    """``μ_{kl} = (π² (k² + l²) + τ²)^−α`` for ``0 ≤ k, l < modes``, shape ``(modes, modes)``.

    ``−Δ`` with Neumann boundary conditions on the unit square has the eigenfunctions
    ``e_k(x) e_l(y)`` (:func:`cosine_basis`) with the eigenvalues ``π² (k² + l²)``.
    """
    k2 = np.arange(modes, dtype=np.float64) ** 2
    return (math.pi**2 * (k2[:, None] + k2[None, :]) + tau2) ** (-alpha)


def cosine_basis(points: np.ndarray, modes: int) -> np.ndarray:
    """The orthonormal Neumann eigenfunctions on [0, 1], ``e_0 = 1``, ``e_k = √2 cos(πkx)``,
    at ``points``: shape ``(len(points), modes)``."""
    basis = math.sqrt(2.0) * np.cos(math.pi * np.outer(points, np.arange(modes)))
    basis[:, 0] = 1.0
    return basis


def gaussian_random_field(
    rng: np.random.Generator, samples: int, n: int, modes: int | None = None
) -> np.ndarray:
    """Samples of ``N(0, (−Δ + 9 I)⁻²)`` (Neumann ``−Δ``) on the ``n × n`` nodes.

    The Karhunen–Loève expansion ``ψ = Σ_{k,l} ξ_{kl} √μ_{kl} e_k(x) e_l(y)`` with
    independent standard normal ``ξ``, truncated to ``k, l < modes`` (default ``n // 2``,
    below the grid's Nyquist mode ``n − 1`` so that the trapezoidal rule on the nodes
    recovers every coefficient exactly).
    """
    modes = n // 2 if modes is None else modes
    basis = cosine_basis(np.linspace(0.0, 1.0, n), modes)
    xi = rng.standard_normal((samples, modes, modes)) * np.sqrt(grf_eigenvalues(modes))
    return np.einsum("ik,skl,jl->sij", basis, xi, basis, optimize=True)


def threshold(psi: np.ndarray) -> np.ndarray:
    """The FNO paper's piecewise-constant coefficient: 12 where ``ψ ≥ 0``, 3 where ``ψ < 0``."""
    return np.where(psi >= 0.0, HIGH, LOW)


def harmonic_faces(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The coefficient on the faces between neighbouring nodes, by harmonic averaging:
    ``a_{i+½,j} = 2 a_{ij} a_{i+1,j} / (a_{ij} + a_{i+1,j})`` (shape ``(n − 1, n)``) and
    ``a_{i,j+½}`` likewise (shape ``(n, n − 1)``).

    The harmonic mean is the effective conductivity of two conductors in series, so the
    flux ``a ∂u/∂n`` stays continuous across a jump of ``a`` (arithmetic averaging would
    overweight the larger value there); for a smooth ``a`` it equals ``a`` at the face
    midpoint up to ``O(h²)``, which keeps the scheme second-order.
    """
    x_faces = 2.0 * a[1:, :] * a[:-1, :] / (a[1:, :] + a[:-1, :])
    y_faces = 2.0 * a[:, 1:] * a[:, :-1] / (a[:, 1:] + a[:, :-1])
    return x_faces, y_faces


def operator(a: np.ndarray) -> sp.csr_matrix:
    """The five-point matrix of ``u ↦ −∇·(a ∇u)`` on the interior nodes, zero Dirichlet data.

    With the face coefficients of :func:`harmonic_faces`, row ``(i, j)`` reads::

        [a_{i+½,j}(u_{ij} − u_{i+1,j}) + a_{i−½,j}(u_{ij} − u_{i−1,j})
         + a_{i,j+½}(u_{ij} − u_{i,j+1}) + a_{i,j−½}(u_{ij} − u_{i,j−1})] / h²

    (boundary neighbours are zero). Unknowns are numbered row-major over ``(i, j)``,
    ``1 ≤ i, j ≤ n − 2``. The matrix is symmetric (one coefficient per face) and positive
    definite (a weighted graph Laplacian with a positive Dirichlet part).
    """
    n = a.shape[0]
    m, h2 = n - 2, (1.0 / (n - 1)) ** 2
    x_faces, y_faces = harmonic_faces(a)
    index = np.arange(m * m).reshape(m, m)
    diagonal = x_faces[1:, 1:-1] + x_faces[:-1, 1:-1] + y_faces[1:-1, 1:] + y_faces[1:-1, :-1]
    rows = [index.ravel(), index[:-1, :].ravel(), index[1:, :].ravel()]
    cols = [index.ravel(), index[1:, :].ravel(), index[:-1, :].ravel()]
    inner_x = -x_faces[1:-1, 1:-1].ravel()  # faces between interior rows i, i+1
    values = [diagonal.ravel(), inner_x, inner_x]
    inner_y = -y_faces[1:-1, 1:-1].ravel()  # faces between interior columns j, j+1
    rows += [index[:, :-1].ravel(), index[:, 1:].ravel()]
    cols += [index[:, 1:].ravel(), index[:, :-1].ravel()]
    values += [inner_y, inner_y]
    matrix = sp.coo_matrix(
        (np.concatenate(values) / h2, (np.concatenate(rows), np.concatenate(cols))),
        shape=(m * m, m * m),
    )
    return matrix.tocsr()


def solve(a: np.ndarray, f: float | np.ndarray = 1.0) -> np.ndarray:
    """``u`` with ``−∇·(a ∇u) = f`` inside and ``u = 0`` on the boundary, on the nodes of
    ``a`` (``(n, n)``); ``f`` is a constant or the ``(n − 2, n − 2)`` interior values.
    One sparse LU solve (``scipy.sparse.linalg.spsolve``)."""
    n = a.shape[0]
    rhs = np.broadcast_to(np.asarray(f, dtype=np.float64), (n - 2, n - 2)).ravel()
    u = np.zeros((n, n))
    u[1:-1, 1:-1] = spla.spsolve(operator(a).tocsc(), rhs).reshape(n - 2, n - 2)
    return u


def generate(
    rng: np.random.Generator, samples: int, fine: int, resolution: int
) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` pairs ``(a, u)`` solved on ``fine × fine`` nodes and subsampled to
    ``resolution × resolution`` (every ``(fine − 1) / (resolution − 1)``-th node, so both
    grids keep the boundary, as the paper's 421 → 85), as float32 arrays."""
    if (fine - 1) % (resolution - 1):
        raise ValueError(
            f"fine: expected fine − 1 a multiple of resolution − 1 = {resolution - 1}, got {fine}"
        )
    stride = (fine - 1) // (resolution - 1)
    a = threshold(gaussian_random_field(rng, samples, fine))
    u = np.stack([solve(sample) for sample in a])
    return a[:, ::stride, ::stride].astype(np.float32), u[:, ::stride, ::stride].astype(np.float32)
