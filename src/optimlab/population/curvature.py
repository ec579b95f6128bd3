r"""Every member's sharpness at once: Lanczos with one batched Hessian-vector product per step.

The loss of a population is the sum of its members' losses and no operation mixes members, so its
Hessian over the stacked parameters is block-diagonal, one block per member. One Hessian-vector
product of the summed loss with a stacked vector ``v`` (member m's piece in slice m of every
parameter) is therefore every member's own product at once: :math:`(Hv)_m = H_m v_m`. Lanczos
runs side by side on the P blocks (:func:`lanczos_members`): inner products, norms and the
reorthogonalisation are per member, each member has its own tridiagonal matrix and stops on its
own tolerance, and the iteration ends when every member has stopped. A member whose product is
non-finite stops there with NaN or inf, as :func:`optimlab.curvature.lanczos` does, and nothing of
it reaches another member.

:func:`member_eigenpairs` is :func:`optimlab.curvature.top_eigenpair` for every member of a
:class:`~optimlab.population.stacked.StackedModel`: member m's value is the top eigenvalue of the
Hessian of its mean cross-entropy on its own batch (plain or preconditioned), the value its single
model gives (tested against :func:`~optimlab.curvature.sharpness` in float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from optimlab.curvature import evaluation, tridiagonal
from optimlab.population.stacked import StackedModel


class MemberEigenpairs(NamedTuple):
    """Each member's top eigenvalue (``[P]``, float64), unit eigenvector (stacked like the
    parameters: member m's in slice m) and number of Hessian-vector products it used (``[P]``)."""

    values: Tensor
    vectors: list[Tensor]
    iterations: Tensor


def lanczos_members(matvec: Callable[[Tensor], Tensor], v0: Tensor, iters: int = 20,
                    tol: float = 1e-3) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`optimlab.curvature.lanczos` for P symmetric operators at once.

    Args:
        matvec: ``V [P, n] -> [P, n]``, row m mapped by operator m (one batched product).
        v0: ``[P, n]``, every row finite and nonzero.
        iters, tol: per member, as in :func:`~optimlab.curvature.lanczos`.

    Returns:
        ``(values [P] float64, unit Ritz vectors [P, n], products [P])``; a member whose product
        holds a NaN or an inf gets that Rayleigh quotient (NaN or inf) and its last basis vector.
    """
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"Invalid iters: {iters!r} (must be an integer >= 1)")
    if not (isinstance(tol, (int, float)) and 0 <= tol < math.inf):
        raise ValueError(f"Invalid tol: {tol!r} (must be a finite number >= 0)")
    if v0.dim() != 2 or v0.numel() == 0:
        raise ValueError(f"Invalid v0: shape {tuple(v0.shape)} (must be a non-empty [members, n] tensor)")
    norms = torch.linalg.vector_norm(v0, dim=1)
    if not bool((torch.isfinite(norms) & (norms > 0)).all()):
        raise ValueError("Invalid v0: every row must be finite and nonzero")
    members, n = v0.shape
    iters = min(iters, n)
    basis = v0.new_zeros((iters, members, n))
    torch.div(v0, norms[:, None], out=basis[0])
    alphas: list[list[float]] = [[] for _ in range(members)]
    betas: list[list[float]] = [[] for _ in range(members)]
    top = [math.nan] * members
    ritz: list[Tensor | None] = [None] * members
    stopped_at: list[int | None] = [None] * members  # the step whose basis vector a non-finite member returns
    active = [True] * members
    for j in range(iters):
        w = matvec(basis[j])
        done = basis[:j + 1]
        coeffs = torch.einsum("jpn,pn->jp", done, w)  # per member: w's components along its basis
        alpha = coeffs[-1].tolist()
        for m in range(members):
            if not active[m]:
                continue
            if not math.isfinite(alpha[m]):
                top[m], stopped_at[m], active[m] = alpha[m], j, False
                continue
            alphas[m].append(alpha[m])
            previous = top[m]
            evals, evecs = torch.linalg.eigh(tridiagonal(alphas[m], betas[m]))
            top[m], ritz[m] = float(evals[-1]), evecs[:, -1]
            if (j > 0 and abs(top[m] - previous) <= tol * abs(top[m])) or j + 1 == iters:
                active[m] = False
        if not any(active):
            break
        # Full reorthogonalisation per member (see lanczos), a second pass where the first removed
        # more than half of w's squared norm.
        w = w - torch.einsum("jp,jpn->pn", coeffs, done)
        beta = torch.linalg.vector_norm(w, dim=1)
        again = beta < torch.linalg.vector_norm(coeffs, dim=0)
        if bool(again.any()):
            w = torch.where(again[:, None], w - torch.einsum("jp,jpn->pn", torch.einsum("jpn,pn->jp", done, w), done), w)
            beta = torch.linalg.vector_norm(w, dim=1)
        beta_list = beta.tolist()
        for m in range(members):
            if active[m]:
                if beta_list[m] == 0.0:  # an invariant Krylov space: the Ritz value is exact
                    active[m] = False
                else:
                    betas[m].append(beta_list[m])
        if not any(active):
            break
        keep = torch.tensor(active, device=w.device)[:, None]
        # Stopped members get zero vectors: their products are zero and touch nothing.
        basis[j + 1] = torch.where(keep, w / torch.where(beta > 0, beta, 1.0)[:, None], 0.0)
    vectors = v0.new_empty((members, n))
    for m in range(members):
        if stopped_at[m] is not None:
            vectors[m] = basis[stopped_at[m], m]
        else:
            k = len(alphas[m])
            vectors[m] = basis[:k, m].T @ ritz[m].to(basis.dtype)  # type: ignore[union-attr]
    iterations = [len(alphas[m]) + (stopped_at[m] is not None) for m in range(members)]
    return torch.tensor(top, dtype=torch.float64), vectors, torch.tensor(iterations)


def member_eigenpairs(model: StackedModel, x: Tensor, y: Tensor, preconditioner: Sequence[Tensor] | None = None,
                      iters: int = 20, tol: float = 1e-3, init: Sequence[Tensor] | None = None,
                      generator: torch.Generator | None = None) -> MemberEigenpairs:
    r"""Every member's :func:`~optimlab.curvature.top_eigenpair` with batched products.

    Args:
        model: the stacked members (parameters ``[P, ...]``, one dtype and device).
        x, y: member m's probe in ``x[m]`` (``[P, N, C, H, W]``) and ``y[m]`` (``[P, N]``).
        preconditioner: positive tensors shaped like the stacked parameters (member m's
            :math:`P` in slice m, e.g. a member-wise optimizer's state), or None (:math:`P = I`).
        iters, tol: per member, see :func:`optimlab.curvature.lanczos`.
        init: start vectors stacked like the parameters (e.g. the previous call's, a warm start);
            None: a standard normal draw from ``generator`` (None: seeded with 0).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    members = model.members
    if x.dim() != 5 or x.shape[0] != members or y.shape != x.shape[:2] or x.shape[1] == 0:
        raise ValueError(f"x must be [{members}, N, C, H, W] and y [{members}, N] with N > 0, got "
                         f"{list(x.shape)} and {list(y.shape)}")
    dtype, device = params[0].dtype, params[0].device
    sizes, shapes = [p[0].numel() for p in params], [p.shape for p in params]

    def stacked_flat(tensors: Sequence[Tensor], name: str) -> Tensor:
        tensors = list(tensors)
        if len(tensors) != len(params) or any(t.shape != p.shape for t, p in zip(tensors, params)):
            raise ValueError(f"Invalid {name}: must be {len(params)} tensors shaped like the stacked parameters "
                             f"{[tuple(s) for s in shapes]}")
        return torch.cat([t.reshape(members, -1) for t in tensors], 1).to(device, dtype)

    scale = None
    if preconditioner is not None:
        diagonal = stacked_flat(preconditioner, "preconditioner")
        if not bool((diagonal > 0).all()):
            raise ValueError("Invalid preconditioner: every entry must be positive (NaN is not)")
        scale = diagonal.rsqrt_()
    if init is not None:
        v0 = stacked_flat(init, "init")
    else:
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        v0 = torch.randn(members, sum(sizes), generator=generator, dtype=dtype).to(device)

    def unflat(v: Tensor) -> list[Tensor]:
        return [piece.reshape(shape) for piece, shape in zip(v.split(sizes, 1), shapes)]

    with evaluation(model):
        logits = model(x.to(dtype))
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
        grads = torch.autograd.grad(losses.sum(), params, create_graph=True, materialize_grads=True)
        live = [i for i, g in enumerate(grads) if g.requires_grad]

        def hessian_products(v: Tensor) -> Tensor:
            u = v if scale is None else v * scale
            if not live:
                return torch.zeros_like(v)
            pieces = unflat(u)
            hv = torch.autograd.grad([grads[i] for i in live], params, grad_outputs=[pieces[i] for i in live],
                                     retain_graph=True, materialize_grads=True)
            out = torch.cat([h.reshape(members, -1) for h in hv], 1)
            return out if scale is None else out * scale

        values, vectors, iterations = lanczos_members(hessian_products, v0, iters, tol)
    return MemberEigenpairs(values, [v.detach() for v in unflat(vectors)], iterations)
