"""The largest algebraic eigenvalue of a symmetric operator given only as a matrix-vector product:
Lanczos iteration with full reorthogonalization and a residual stopping rule (plain linear algebra,
no model), for one operator (:func:`lanczos`) or P side by side with one batched product per step
(:func:`lanczos_members`, which the single case runs with P = 1)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

# Lanczos vectors are stored in a basis that starts with this many rows and doubles as needed: a
# large ``iters`` reserves nothing it does not use (most calls stop within 20 products).
BASIS_ROWS = 32
# A single operator's basis on the CPU starts with at most the rows that fit in this many bytes (at least 2):
# glibc maps a block over 32 MiB afresh at every call, and the kernel's faulting and zeroing of its pages
# cost 15% of a warm 4-product measurement of the default MLP (936k parameters, 64 probe images) when 20
# rows were reserved. (A population's keeps its rows: its memory plan counts them, not a doubling's peak.)
CPU_BASIS_BYTES = 16 * 2**20


def check_iteration(iters: object, tol: object) -> None:
    """A ValueError naming ``iters`` or ``tol`` unless they are an integer >= 1 and a number in [0, 1)
    (NumPy's numbers too; not a bool): a relative error bound of 1 or more holds for any value between
    0 and twice the top eigenvalue, so it stopped at the second product far below it."""
    if not isinstance(iters, numbers.Integral) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"Invalid iters: {iters!r} (must be an integer >= 1)")
    if not (isinstance(tol, numbers.Real) and not isinstance(tol, bool) and 0 <= tol < 1):
        raise ValueError(f"Invalid tol: {tol!r} (must be a number in [0, 1))")


def lanczos(matvec: Callable[[Tensor], Tensor], v0: Tensor, iters: int = 20,
            tol: float = 1e-3) -> tuple[float, Tensor, int, bool]:
    r"""Largest algebraic eigenvalue of a symmetric operator by Lanczos iteration with full
    reorthogonalisation.

    Starting from :math:`q_1 = v_0 / \|v_0\|`, step :math:`j` computes :math:`w = A q_j`,
    :math:`\alpha_j = q_j^\top w`, orthogonalises :math:`w` against every :math:`q` so far (full
    reorthogonalisation, which keeps the basis orthonormal to working precision) and sets
    :math:`\beta_j = \|w\|`, :math:`q_{j+1} = w / \beta_j`. The tridiagonal
    :math:`T_j = \mathrm{tridiag}(\beta, \alpha, \beta)` is :math:`Q_j^\top A Q_j`; its largest
    eigenvalue :math:`\theta_j` (the top Ritz value) increases towards :math:`\lambda_{max}(A)`.
    Iteration stops when the error bound of :math:`\theta_j` (:func:`ritz_error_bound`) is at most
    :math:`tol \cdot |\theta_j|` from the second product on (a start vector at or near an
    eigenvector of any eigenvalue has a small residual after one), after ``iters`` products, when the
    basis spans the whole space, or when :math:`\beta_j = 0` (the Krylov space is invariant:
    :math:`\theta_j` is exact, the top of the part of the spectrum ``v0`` reaches). Where the products'
    squared norms would overflow or underflow, they are divided by a power of two
    (:func:`power_of_two_scale`) and the eigenvalue multiplied back.

    The residual only says that *some* eigenvalue lies within ``tol * |theta|``, usually the top one
    (then the error is nearer the residual's square over the gap). Where the top eigenvalues are
    closer than about ``tol``, or the start vector barely reaches the top eigenvector (a warm start
    after the top two swapped, an unlucky random one), the iteration can stop on a lower one, off by
    their gap; a smaller ``tol`` makes that rarer.

    Args:
        matvec: :math:`v \mapsto A v` for a flat vector :math:`v` like ``v0``.
        v0: nonzero start vector (1-D); a good guess of the top eigenvector shortens the iteration.
        iters: at most this many products (capped at ``v0.numel()``); an iteration they end before the
            error bound meets ``tol`` (then the returned count equals ``iters``) may be further off.
        tol: relative error bound of the top Ritz value at which to stop (0: run all ``iters``).

    Returns:
        ``(eigenvalue, unit Ritz vector, number of products, converged)``; ``converged`` is False
        where ``iters`` ended the iteration before the error bound met ``tol`` (or a product was not
        finite). When a product holds a NaN or an inf the iteration stops and returns its Rayleigh
        quotient, NaN or inf as it is.
    """
    if v0.dim() != 1 or v0.numel() == 0:
        raise ValueError(f"Invalid v0: shape {tuple(v0.shape)} (must be a non-empty 1-D tensor)")
    values, vectors, products, converged = lanczos_members(lambda v: matvec(v[0])[None], v0[None], iters, tol)
    return float(values[0]), vectors[0], int(products[0]), bool(converged[0])


def lanczos_members(matvec: Callable[[Tensor], Tensor], v0: Tensor, iters: int | Sequence[int] = 20,
                    tol: float = 1e-3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`lanczos` for P symmetric operators at once: inner products, norms and the
    reorthogonalisation per member, a tridiagonal matrix and a stop (its own ``tol``) per member; the
    iteration ends when every member has stopped.

    Args:
        matvec: ``V [P, n] -> [P, n]``, row m mapped by operator m (one batched product).
        v0: ``[P, n]``, every row finite and nonzero.
        iters, tol: per member, as in :func:`~optimlab.curvature.lanczos`; ``iters`` also one per member.

    Returns:
        ``(values [P] float64, unit Ritz vectors [P, n], products [P], converged [P] bool)``; a member
        whose product holds a NaN or an inf gets that Rayleigh quotient (NaN or inf) and its last
        basis vector (not converged).
    """
    caps = iters.tolist() if hasattr(iters, "tolist") else iters  # NumPy numbers and arrays, tensors
    caps = list(caps) if isinstance(caps, Iterable) and not isinstance(caps, (str, bytes)) else [caps]
    for cap in caps:
        check_iteration(cap, tol)
    v0 = v0.detach()  # a start vector, not a leaf of anything the iteration differentiates
    if v0.dim() != 2 or v0.numel() == 0:
        raise ValueError(f"Invalid v0: shape {tuple(v0.shape)} (must be a non-empty [members, n] tensor)")
    norms = torch.linalg.vector_norm(v0, dim=1)
    if not bool((torch.isfinite(norms) & (norms > 0)).all()):
        raise ValueError("Invalid v0: must be finite and nonzero (each row)")
    members, n = v0.shape
    if len(caps) not in (1, members):
        raise ValueError(f"Invalid iters: {len(caps)} values for {members} members (must be one, or one per member)")
    caps = [min(int(cap), n) for cap in (caps * members if len(caps) == 1 else caps)]
    iters = max(caps)
    # Member m's basis vectors are the rows of basis[m]: the products with them are batched matrix
    # products, one matrix-vector product each for a single operator.
    rows = min(iters, BASIS_ROWS)
    if members == 1 and v0.device.type == "cpu":
        rows = min(rows, max(2, CPU_BASIS_BYTES // (n * v0.element_size())))
    basis = v0.new_empty((members, rows, n))
    torch.div(v0, norms[:, None], out=basis[:, 0])
    alphas: list[list[float]] = [[] for _ in range(members)]
    betas: list[list[float]] = [[] for _ in range(members)]
    top = [math.nan] * members
    ritz: list[Tensor | None] = [None] * members
    stopped_at: list[int | None] = [None] * members  # the step whose basis vector a non-finite member returns
    active = [True] * members
    converged = [False] * members
    scale: Tensor | None = None
    for j in range(iters):
        w = matvec(basis[:, j])
        if j == 0:
            scale = power_of_two_scale(w)
        if scale is not None:  # out of place: matvec may return its input
            w = w / scale[:, None]
        done = basis[:, :j + 1]
        coeffs = torch.bmm(done, w[:, :, None])  # [P, j + 1, 1]: w's components along each member's basis
        alpha = coeffs[:, -1, 0].tolist()
        for m in range(members):
            if not active[m]:
                continue
            if not math.isfinite(alpha[m]):
                top[m], stopped_at[m], active[m] = alpha[m], j, False
                continue
            alphas[m].append(alpha[m])
        if not any(active):
            break
        # Orthogonalising against the whole basis also removes the alpha_j q_j and beta_{j-1} q_{j-1}
        # terms of the three-term recurrence; without it the basis loses orthogonality as Ritz
        # values converge and copies of the top eigenvalue appear. One classical Gram-Schmidt pass
        # per member, repeated where it removed more than half of w's squared norm (then rounding
        # leaves the remainder off orthogonal; Daniel, Gragg, Kaufman & Stewart, 1976). Before the
        # pass |w|^2 = |coeffs|^2 + beta^2, so the test needs no extra pass over w.
        # a new tensor: matvec may return its input
        w = torch.baddbmm(w[:, :, None], done.transpose(1, 2), coeffs, alpha=-1)[:, :, 0]
        beta = torch.linalg.vector_norm(w, dim=1)
        again = beta < torch.linalg.vector_norm(coeffs, dim=(1, 2))
        if bool(again.any()):  # in place; the members without a second pass get a zero correction
            correction = torch.bmm(done, w[:, :, None]) * again[:, None, None]
            w[:, :, None].baddbmm_(done.transpose(1, 2), correction, alpha=-1)
            beta = torch.linalg.vector_norm(w, dim=1)
        beta_list = beta.tolist()
        for m in range(members):
            if not active[m]:
                continue
            top[m], ritz[m], converged[m] = top_ritz(alphas[m], betas[m], beta_list[m], j, n, tol)
            if converged[m] or j + 1 == caps[m]:
                active[m] = False
            else:
                betas[m].append(beta_list[m])
        if not any(active):
            break
        if j + 1 == basis.shape[1]:
            basis = grown(basis, iters)
        # Divided into the basis in place: a where over the whole row cost 40x the division (one operator).
        torch.div(w, torch.where(beta > 0, beta, 1.0)[:, None], out=basis[:, j + 1])
        # Stopped members get zero vectors: their products are zero and touch nothing.
        stopped = [m for m in range(members) if not active[m]]
        if stopped:
            basis[stopped, j + 1] = 0.0
    vectors = v0.new_empty((members, n))
    for m in range(members):
        if stopped_at[m] is not None:
            vectors[m] = basis[m, stopped_at[m]]
        else:
            k = len(alphas[m])
            # coefficients @ rows: a transposed basis times the coefficients (addmv) took 4x as long (1M parameters)
            vectors[m] = ritz[m].to(device=basis.device, dtype=basis.dtype) @ basis[m, :k]  # type: ignore[union-attr]
    iterations = [len(alphas[m]) + (stopped_at[m] is not None) for m in range(members)]
    values = torch.tensor(top, dtype=torch.float64)
    values = values if scale is None else values * scale.to("cpu", torch.float64)
    return values, vectors, torch.tensor(iterations), torch.tensor(converged)


def power_of_two_scale(w: Tensor) -> Tensor | None:
    """Per row of a first product ``w`` (``[members, n]``), a power of two to divide every product by so
    that their squared norms neither overflow nor underflow ``w``'s dtype (a preconditioner of 1e-20 in
    float32: eigenvalues near 1e20, whose squares are not float32 numbers), 1 for a row that is safe; None
    when every row is. Division by a power of two is exact (but where a quotient falls below the dtype's
    normal range), so nothing else about the iteration changes; the power is at most the row's largest
    entry, so it stays finite at the top of the dtype's range."""
    info, n = torch.finfo(w.dtype), w.shape[1]
    largest = w.detach().abs().amax(dim=1).double()
    low, high = math.sqrt(info.tiny) * 2.0**20, math.sqrt(info.max / n) / 2.0**20  # room for later products
    unsafe = (largest > 0) & torch.isfinite(largest) & ((largest < low) | (largest > high))
    if not bool(unsafe.any()):
        return None
    return torch.where(unsafe, torch.exp2(torch.floor(torch.log2(largest))), 1.0).to(w.dtype)


def grown(basis: Tensor, limit: int) -> Tensor:
    """``basis`` (``[members, rows, n]``) copied into one with twice the rows, at most ``limit``."""
    members, rows, n = basis.shape
    bigger = basis.new_empty((members, min(2 * rows, limit), n))
    bigger[:, :rows] = basis
    return bigger


def ritz_error_bound(ritz: Tensor, beta: float) -> float:
    r"""How far the top Ritz value :math:`\theta` of a Lanczos step can be from an eigenvalue: the
    residual :math:`\|A y - \theta y\| = \beta_j |s_j|` of its Ritz vector :math:`y` (``beta`` the
    step's new off-diagonal, :math:`s_j` the last entry of the top eigenvector ``ritz`` of
    :math:`T_j`); an eigenvalue of :math:`A` lies within it (Parlett, *The Symmetric Eigenvalue
    Problem*, 11.4), and where the top one is separated the error is nearer its square over the gap.
    A stop on the Ritz value's change instead ended early where the iteration stalled (1.8% low at
    tol 1e-3 on a small ReLU network, ``tests/test_curvature.py``); a bound on the residual with
    Ritz values' gap in place of the unknown eigengap ended early too."""
    return beta * abs(float(ritz[-1]))


def top_ritz(alphas: Sequence[float], betas: Sequence[float], beta: float, step: int, n: int,
             tol: float) -> tuple[float, Tensor, bool]:
    """After Lanczos step ``step`` (0-based; ``alphas`` and ``betas`` so far, ``beta`` its new
    off-diagonal) on an ``n``-dimensional space: the top Ritz value, its vector's coefficients, and
    whether it has converged, :func:`lanczos`' rule: ``beta`` 0 (an invariant Krylov space: the value
    is exact), a basis of the whole space, or from the second product on :func:`ritz_error_bound`
    within ``tol``."""
    evals, evecs = torch.linalg.eigh(tridiagonal(alphas, betas))
    top, ritz = float(evals[-1]), evecs[:, -1]
    bounded = step > 0 and tol > 0 and ritz_error_bound(ritz, beta) <= tol * abs(top)  # a bound may underflow to 0
    return top, ritz, beta == 0.0 or step + 1 == n or bounded


def tridiagonal(alphas: Sequence[float], betas: Sequence[float]) -> Tensor:
    """The symmetric tridiagonal matrix (float64) with diagonal ``alphas`` and off-diagonal ``betas``."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[:len(alphas) - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t

