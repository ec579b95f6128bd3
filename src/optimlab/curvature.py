r"""Sharpness: the top eigenvalue of the loss Hessian, plain or preconditioned, and its edge of stability.

Gradient descent with step size :math:`\eta` on a quadratic with Hessian :math:`H` is stable only
while :math:`\lambda_{max}(H) < 2 / \eta`. Training drives the sharpness up to that edge and then
hovers there (Cohen et al., 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge
of Stability"); crossing it shows as oscillation and divergence. An adaptive method steps
:math:`\theta \leftarrow \theta - \eta P^{-1} m` with a diagonal preconditioner :math:`P`; its
stability is set by the *preconditioned* sharpness :math:`\lambda_{max}(P^{-1/2} H P^{-1/2})`
(Cohen et al., 2022, "Adaptive Gradient Methods at the Edge of Stability").

This module computes

* :func:`sharpness` / :func:`top_eigenpair`: the largest *algebraic* eigenvalue of the Hessian of
  the mean cross-entropy of a model on a batch, or of :math:`P^{-1/2} H P^{-1/2}`, by Lanczos
  iteration (:func:`lanczos`) on Hessian-vector products (double backpropagation; the Hessian is
  never formed). A network's Hessian is indefinite, so the largest-magnitude eigenvalue that plain
  power iteration finds may be a negative one; Lanczos' top Ritz value converges to the top of
  the spectrum from below.
* :func:`stability_threshold`: the sharpness at which an optimizer's update becomes unstable on a
  quadratic, from its current hyperparameters.
* :func:`preconditioner`: the :math:`P` an adaptive optimizer's update divides by, read from its state;
  :func:`initial_preconditioner`: the :math:`P` its state settles to while the minibatch gradients
  keep their distribution at initialisation (:func:`gradient_moments`), for the sharpness at step 0.
* :class:`SharpnessTracker`, :class:`SharpnessLog` and the Lightning :class:`SharpnessCallback`:
  tracking during training, warm-started from the previous eigenvector, logged to the trainer's
  loggers and summarised per epoch.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import Tensor, nn

from optimlab import optim

__all__ = [
    "DEFAULT_PROBE_SIZE", "DEFAULT_TRACKING_TOL", "Eigenpair", "GradientMoments", "SharpnessCallback", "SharpnessLog",
    "SharpnessTracker", "check_iteration", "check_tracking", "gradient_moments", "initial_preconditioner", "lanczos",
    "measurement_due", "moments_from_parts", "preconditioner", "probe_indices", "probe_parts", "ritz_error_bound", "sharpness",
    "stability_threshold", "top_eigenpair",
]

# Probe images for tracking during training. A small probe's Hessian has a larger top eigenvalue
# than the training loss's; on the default MLP after 1000 SGD steps (benchmarks/curvature.py) the
# sharpness on 1024 images was 1.13x the one on 4096, on 256 images 1.45x, on 64 images 2.1x.
DEFAULT_PROBE_SIZE = 1024
# The callback's tolerance. On the default MLP (probe 512, SGD lr 0.1, a measurement every 40 of 400
# steps, warm-started) 2e-2 took 3 Hessian-vector products per measurement (10 cold) with values within
# 7e-4 of a tight recomputation; 1e-2 took 3-4 (within 1.7e-4); sharpness's 1e-3 takes about 6.
DEFAULT_TRACKING_TOL = 2e-2

SHARPNESS_TAG = "curvature/sharpness"
THRESHOLD_TAG = "curvature/threshold"
# TensorBoard's Custom Scalars layout that draws the two on one chart.
TENSORBOARD_LAYOUT = {"curvature": {"sharpness vs threshold": ["Multiline", [f"^{SHARPNESS_TAG}$", f"^{THRESHOLD_TAG}$"]]}}


# --------------------------------------------------------------------------- eigenvalues


class Eigenpair(NamedTuple):
    """The top eigenvalue, a unit eigenvector shaped like the parameters (in the preconditioned
    coordinates when a preconditioner was given) and the number of Hessian-vector products used."""

    value: float
    vector: list[Tensor]
    iterations: int


def check_iteration(iters: object, tol: object) -> None:
    """A ValueError naming ``iters`` or ``tol`` unless they are an integer >= 1 and a finite number >= 0
    (NumPy's numbers too; not a bool)."""
    if not isinstance(iters, numbers.Integral) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"Invalid iters: {iters!r} (must be an integer >= 1)")
    if not (isinstance(tol, numbers.Real) and not isinstance(tol, bool) and 0 <= tol < math.inf):
        raise ValueError(f"Invalid tol: {tol!r} (must be a finite number >= 0)")


def lanczos(matvec: Callable[[Tensor], Tensor], v0: Tensor, iters: int = 20,
            tol: float = 1e-3) -> tuple[float, Tensor, int]:
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
    :math:`\theta_j` is exact, the top of the part of the spectrum ``v0`` reaches).

    A loose ``tol`` cannot tell apart top eigenvalues closer than about ``tol``: the residual only
    says some eigenvalue is near. From a start vector close to the second eigenvector (a warm start
    after the top two swapped) the iteration can stop on the second one, off by their gap.

    Args:
        matvec: :math:`v \mapsto A v` for a flat vector :math:`v` like ``v0``.
        v0: nonzero start vector (1-D); a good guess of the top eigenvector shortens the iteration.
        iters: at most this many products (capped at ``v0.numel()``).
        tol: relative error bound of the top Ritz value at which to stop (0: run all ``iters``).

    Returns:
        ``(eigenvalue, unit Ritz vector, number of products)``. When a product holds a NaN or an
        inf the iteration stops and returns its Rayleigh quotient, NaN or inf as it is.
    """
    check_iteration(iters, tol)
    if v0.dim() != 1 or v0.numel() == 0:
        raise ValueError(f"Invalid v0: shape {tuple(v0.shape)} (must be a non-empty 1-D tensor)")
    norm = torch.linalg.vector_norm(v0)
    if not (torch.isfinite(norm) and norm > 0):
        raise ValueError("Invalid v0: must be finite and nonzero")
    iters = min(int(iters), v0.numel())
    basis = v0.new_empty((min(iters, BASIS_ROWS), v0.numel()))
    torch.div(v0, norm, out=basis[0])
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(iters):
        w = matvec(basis[j])
        done = basis[:j + 1]
        coeffs = done @ w  # w's components along the basis; the last is alpha_j = q_j . w
        alpha = float(coeffs[-1])
        # A NaN or inf anywhere in w makes every component NaN or inf (0 * inf is NaN).
        if not math.isfinite(alpha):
            return alpha, basis[j].clone(), j + 1
        alphas.append(alpha)
        # Orthogonalising against the whole basis also removes the alpha_j q_j and beta_{j-1} q_{j-1}
        # terms of the three-term recurrence; without it the basis loses orthogonality as Ritz
        # values converge and copies of the top eigenvalue appear. One classical Gram-Schmidt pass,
        # repeated when it removed more than half of w's squared norm (then rounding leaves the
        # remainder off orthogonal; Daniel, Gragg, Kaufman & Stewart, 1976). Before the pass
        # |w|^2 = |coeffs|^2 + beta^2, so the test needs no extra pass over w.
        w = torch.addmv(w, done.T, coeffs, alpha=-1)
        beta = float(torch.linalg.vector_norm(w))
        if beta < float(torch.linalg.vector_norm(coeffs)):
            w.addmv_(done.T, done @ w, alpha=-1)
            beta = float(torch.linalg.vector_norm(w))
        top, ritz, stop = top_ritz(alphas, betas, beta, j, iters, tol)
        if stop:
            break
        betas.append(beta)
        if j + 1 == len(basis):
            basis = grown(basis, iters)
        torch.div(w, beta, out=basis[j + 1])
    # Orthonormal basis, unit Ritz coefficients: a unit vector up to rounding.
    return top, basis[:len(alphas)].T @ ritz.to(device=basis.device, dtype=basis.dtype), len(alphas)


# Lanczos vectors are stored in a basis that starts with this many rows and doubles as needed: a
# large ``iters`` reserves nothing it does not use (most calls stop within 20 products).
BASIS_ROWS = 32


def grown(basis: Tensor, limit: int) -> Tensor:
    """``basis`` (rows along dim 0) copied into one with twice the rows, at most ``limit``."""
    bigger = basis.new_empty((min(2 * len(basis), limit), *basis.shape[1:]))
    bigger[:len(basis)] = basis
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


def top_ritz(alphas: Sequence[float], betas: Sequence[float], beta: float, step: int, iters: int,
             tol: float) -> tuple[float, Tensor, bool]:
    """After Lanczos step ``step`` (0-based; ``alphas`` and ``betas`` so far, ``beta`` its new
    off-diagonal): the top Ritz value, its vector's coefficients, and whether the iteration stops,
    :func:`lanczos`' rule: ``beta`` 0 (an invariant Krylov space: the value is exact), the last of
    ``iters`` products, or from the second product on :func:`ritz_error_bound` within ``tol``."""
    evals, evecs = torch.linalg.eigh(tridiagonal(alphas, betas))
    top, ritz = float(evals[-1]), evecs[:, -1]
    stop = beta == 0.0 or step + 1 == iters or (step > 0 and ritz_error_bound(ritz, beta) <= tol * abs(top))
    return top, ritz, stop


def tridiagonal(alphas: Sequence[float], betas: Sequence[float]) -> Tensor:
    """The symmetric tridiagonal matrix (float64) with diagonal ``alphas`` and off-diagonal ``betas``."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[:len(alphas) - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t


@contextlib.contextmanager
def evaluation(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, batch norm on its running statistics) and grad mode for the block (also
    under ``torch.no_grad`` or ``torch.inference_mode``), each module's own mode restored after.
    Compiled modules run eagerly inside, since ``torch.compile`` does not support double backward."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    try:
        with torch.inference_mode(False), torch.enable_grad(), \
                (set_stance("force_eager") if set_stance else contextlib.nullcontext()):
            yield
    finally:
        for m, training in modes:
            m.training = training


def trainable(model: nn.Module) -> list[Tensor]:
    """The parameters the Hessian is taken over: those with ``requires_grad``, in module order."""
    return [p for p in model.parameters() if p.requires_grad]


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def like_parameters(name: str, tensors: object, model: nn.Module) -> list[Tensor]:
    """``tensors`` (a preconditioner or a start vector) checked against the model's trainable
    parameters and detached: one tensor per parameter, shaped like it, in their order; a list over
    all the parameters, frozen ones too, has the frozen ones' entries dropped."""
    every = list(model.parameters())
    params = [p for p in every if p.requires_grad]
    if isinstance(tensors, (Tensor, dict, str)) or not isinstance(tensors, Iterable):
        raise ValueError(f"Invalid {name}: must be a list of tensors shaped like the trainable parameters, "
                         f"got {type(tensors).__name__}")
    tensors = list(tensors)
    if not all(isinstance(t, Tensor) for t in tensors):
        raise ValueError(f"Invalid {name}: must be a list of tensors, got {[type(t).__name__ for t in tensors]}")
    if len(tensors) == len(every) != len(params):
        tensors = [t for t, p in zip(tensors, every) if p.requires_grad]
    if len(tensors) != len(params) or any(t.shape != p.shape for t, p in zip(tensors, params)):
        raise ValueError(f"Invalid {name}: must be a list of {len(params)} tensors shaped like the trainable "
                         f"parameters {[tuple(p.shape) for p in params]}, got "
                         f"{[tuple(t.shape) for t in tensors]}")
    return [t.detach() for t in tensors]


def probe_batch(x: Tensor, y: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The batch as the Hessian is taken on it: images in the parameters' dtype (as a 64-true
    trainer casts its batches), integer labels as int64 (what cross-entropy takes), and tensors made
    under ``torch.inference_mode`` copied (autograd cannot save them). Call it inside :func:`evaluation`."""
    if x.is_floating_point():
        x = x.to(dtype)
    if not y.is_floating_point():
        y = y.long()
    return x.clone() if x.is_inference() else x, y.clone() if y.is_inference() else y


def valid_preconditioner(tensors: Sequence[Tensor]) -> bool:
    """True when every entry is positive (NaN is not; +inf is, and freezes its coordinate as it
    does in the update), so :math:`P^{-1/2}` exists."""
    return all(bool((t > 0).all()) for t in tensors)


def top_eigenpair(model: nn.Module, x: Tensor, y: Tensor, preconditioner: Sequence[Tensor] | None = None,
                  iters: int = 20, tol: float = 1e-3, init: Sequence[Tensor] | None = None,
                  generator: torch.Generator | None = None) -> Eigenpair:
    r"""Top algebraic eigenvalue and eigenvector of the Hessian :math:`H` of
    ``F.cross_entropy(model(x), y)`` (the batch mean) over the model's trainable parameters, or of
    :math:`P^{-1/2} H P^{-1/2}` with :math:`P = \mathrm{diag}(\text{preconditioner})`.

    Lanczos (:func:`lanczos`) on Hessian-vector products :math:`Hv = \nabla_\theta (\nabla_\theta
    L \cdot v)`: the gradient is built once with ``create_graph=True`` and each product is one more
    backward pass through it. The model is evaluated in eval mode (dropout off, batch norm on its
    running statistics), so the result is the curvature of the deterministic network and nothing
    draws from torch's global generator; each module's mode is restored afterwards. ``p.grad``
    is never touched (``torch.autograd.grad``, not ``backward``).

    Args:
        model: a classifier returning logits. Its trainable parameters must share one dtype and
            device and be real.
        x, y: the batch (inputs and class indices).
        preconditioner: positive tensors shaped like the trainable parameters, or None
            (:math:`P = I`).
        iters, tol: see :func:`lanczos`.
        init: start vector shaped like the parameters (e.g. the previous call's ``vector``, a warm
            start); None: a standard normal draw from ``generator``.
        generator: a CPU generator for that draw; None: one seeded with 0 (a fixed start).

    Returns:
        An :class:`Eigenpair`; its vector is the eigenvector of :math:`P^{-1/2} H P^{-1/2}`.
    """
    params = trainable(model)
    if not params:
        raise ValueError("model has no trainable parameters")
    if len({(p.dtype, p.device) for p in params}) > 1 or params[0].is_complex():
        raise ValueError("the trainable parameters must be real and share one dtype and device, got "
                         f"{sorted({f'{p.dtype} on {p.device}' for p in params})}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x and y must hold the same nonzero number of examples, got {x.shape[0]} and {y.shape[0]}")
    dtype, device = params[0].dtype, params[0].device
    scale = None
    if preconditioner is not None:
        diagonal = _flat(like_parameters("preconditioner", preconditioner, model)).to(device, dtype)
        if not bool((diagonal > 0).all()):
            raise ValueError("Invalid preconditioner: every entry must be positive (NaN is not)")
        scale = diagonal.rsqrt_()
    if init is not None:
        v0 = _flat(like_parameters("init", init, model)).to(device, dtype)
    else:
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        v0 = torch.randn(sum(p.numel() for p in params), generator=generator, dtype=dtype).to(device)
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]

    with evaluation(model):
        x, y = probe_batch(x, y, dtype)
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)
        # A gradient that does not depend on the parameters contributes a zero row of H.
        live = [i for i, g in enumerate(grads) if g.requires_grad]

        def hessian_product(v: Tensor) -> Tensor:
            u = v if scale is None else v * scale
            if not live:
                return torch.zeros_like(v)
            pieces = [piece.view(shape) for piece, shape in zip(u.split(sizes), shapes)]
            hv = torch.autograd.grad([grads[i] for i in live], params, grad_outputs=[pieces[i] for i in live],
                                     retain_graph=True, materialize_grads=True)
            out = _flat(hv)
            return out if scale is None else out * scale

        value, vector, count = lanczos(hessian_product, v0, iters, tol)
    return Eigenpair(value, [piece.view(shape) for piece, shape in zip(vector.detach().split(sizes), shapes)], count)


def sharpness(model: nn.Module, x: Tensor, y: Tensor, preconditioner: Sequence[Tensor] | None = None,
              iters: int = 20, tol: float = 1e-3) -> float:
    r"""The largest algebraic eigenvalue of the Hessian of the mean cross-entropy of ``model`` on
    ``(x, y)``, or of :math:`P^{-1/2} H P^{-1/2}` when ``preconditioner`` (tensors shaped like the
    trainable parameters, :math:`P` the diagonal matrix of them) is given. A fixed start vector;
    see :func:`top_eigenpair` for the method and :class:`SharpnessTracker` for warm starts."""
    return top_eigenpair(model, x, y, preconditioner, iters, tol).value


class SharpnessTracker:
    """:func:`sharpness` warm-started from the previous call's eigenvector, for tracking a model
    during training: once the eigenvector moves little between calls, a call needs only a few
    Hessian-vector products.

    Args:
        iters, tol: see :func:`lanczos`.
        seed: seeds the first call's random start vector (a private generator; torch's global
            one is never drawn from).

    Attributes:
        vector: the last finite call's eigenvector (None before). iterations: the last call's
            number of Hessian-vector products.
    """

    def __init__(self, iters: int = 20, tol: float = 1e-3, seed: int = 0) -> None:
        check_iteration(iters, tol)
        self.iters, self.tol = iters, tol
        self.generator = torch.Generator().manual_seed(seed)
        self.vector: list[Tensor] | None = None
        self.iterations = 0

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, preconditioner: Sequence[Tensor] | None = None) -> float:
        pair = top_eigenpair(model, x, y, preconditioner, self.iters, self.tol, init=self.vector,
                             generator=self.generator)
        self.iterations = pair.iterations
        if math.isfinite(pair.value):  # a NaN vector would poison every later start
            self.vector = pair.vector
        return pair.value

    def state_dict(self) -> dict[str, Any]:
        return {"vector": None if self.vector is None else [v.cpu() for v in self.vector],
                "generator": self.generator.get_state(), "iterations": self.iterations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vector = state["vector"]
        self.generator.set_state(state["generator"])
        self.iterations = state["iterations"]


# --------------------------------------------------------------------------- optimizers

_KINDS: tuple[tuple[tuple[type, ...], str], ...] = (
    ((optim.SGD, torch.optim.SGD), "sgd"),
    ((optim.Adam, torch.optim.Adam, torch.optim.AdamW), "adam"),
    ((optim.RMSprop, torch.optim.RMSprop), "rmsprop"),
    ((optim.Adagrad, torch.optim.Adagrad), "adagrad"),
)


def _kind(optimizer: torch.optim.Optimizer) -> str:
    for classes, kind in _KINDS:
        if isinstance(optimizer, classes):
            return kind
    raise TypeError(f"no stability threshold or preconditioner known for {type(optimizer).__name__}: "
                    "supported are SGD, Adam (AdamW), RMSprop and Adagrad, optimlab's or torch.optim's")


def _momentum(name: str, value: float) -> float:
    if not 0 <= value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (the stability threshold is derived for 0 <= {name} < 1)")
    return value


def stability_threshold(optimizer: torch.optim.Optimizer, group: int = 0, lr: float | None = None) -> float:
    r"""The sharpness above which ``optimizer``'s update (param group ``group``, its current
    hyperparameters; ``lr`` instead of the group's, e.g. one member's of a member-wise group)
    diverges on a quadratic, with the preconditioner held fixed.

    On :math:`L = \tfrac{1}{2}\lambda\theta^2` (an eigendirection of :math:`P^{-1/2} H P^{-1/2}` for
    the adaptive methods), with learning rate :math:`\eta`:

    * SGD: :math:`2/\eta` (Cohen et al., 2021).
    * SGD, heavy-ball momentum :math:`\beta` (torch's form, dampening :math:`\tau`: the effective
      step is :math:`\eta(1-\tau)`): :math:`(2 + 2\beta) / ((1-\tau)\eta)` (the boundary of the
      heavy-ball iteration's stable region; Cohen et al., 2021, appendix).
    * SGD, Nesterov (torch's form, :math:`\theta \leftarrow \theta - \eta(g + \beta b)`): the
      iteration's characteristic polynomial has a root at :math:`-1` when
      :math:`\eta\lambda = 2(1 + \beta)/(1 + 2\beta)`, so :math:`(2 + 2\beta)/((1 + 2\beta)\eta)`
      (1.36/lr at 0.9; the heavy-ball formula would say 3.8/lr).
    * Adam (AdamW): :math:`(2 + 2\beta_1)/((1 - \beta_1)\eta)`, 38/lr at :math:`\beta_1 = 0.9`
      (Cohen et al., 2022; the first moment is an EMA, i.e. heavy-ball momentum with step
      :math:`(1-\beta_1)\eta`, once the bias correction has decayed).
    * RMSprop: :math:`2/\eta`; with momentum :math:`m`: :math:`(2 + 2m)/\eta`.
    * Adagrad: :math:`2/\eta_t` with the step size of the next update,
      :math:`\eta_t = \eta / (1 + t \cdot \text{lr\_decay})` after :math:`t` steps.

    Weight decay is not included (L2 decay adds ``weight_decay`` to the curvature the update sees;
    :func:`sharpness` measures the cross-entropy alone). ``lr`` may be a tensor; ``lr == 0`` gives
    ``inf``. Momentum must be in [0, 1).
    """
    kind = _kind(optimizer)
    if not 0 <= group < len(optimizer.param_groups):
        raise ValueError(f"Invalid group: {group} (the optimizer has {len(optimizer.param_groups)} param groups)")
    g = optimizer.param_groups[group]
    lr = float(g["lr"] if lr is None else lr)
    if not 0 <= lr < math.inf:
        raise ValueError(f"Invalid lr: {lr!r} (must be a finite number >= 0)")
    if kind == "sgd":
        beta, damp = _momentum("momentum", g["momentum"]), g["dampening"]
        if beta == 0:
            factor, step = 2.0, lr
        elif g["nesterov"]:
            factor, step = (2 + 2 * beta) / (1 + 2 * beta), lr
        else:
            factor, step = 2 + 2 * beta, lr * (1 - damp)
    elif kind == "adam":
        beta1 = g["betas"][0]
        factor, step = 2 + 2 * beta1, lr * (1 - beta1)
    elif kind == "rmsprop":
        factor, step = 2 + 2 * _momentum("momentum", g["momentum"]), lr
    else:
        steps = [float(optimizer.state[p]["step"]) for p in g["params"] if "step" in optimizer.state.get(p, {})]
        factor, step = 2.0, lr / (1 + max(steps, default=0.0) * g["lr_decay"])
    return factor / step if step > 0 else math.inf


def _with_groups(optimizer: torch.optim.Optimizer,
                 params: Iterable[Tensor] | None) -> list[tuple[int, Tensor, dict[str, Any]]]:
    """``(index, parameter, its param group)`` for ``params`` (None: every parameter, in group
    order); a ValueError for a parameter the optimizer does not hold or a complex one."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    params = [p for g in optimizer.param_groups for p in g["params"]] if params is None else list(params)
    out = []
    for i, p in enumerate(params):
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) is not optimized by {type(optimizer).__name__}")
        if p.is_complex():
            raise ValueError(f"parameter {i} is complex: no real diagonal preconditioner")
        out.append((i, p, group))
    return out


def preconditioner(optimizer: torch.optim.Optimizer, params: Iterable[Tensor] | None = None) -> list[Tensor] | None:
    r"""The diagonal :math:`P` that ``optimizer``'s last update divided the (momentum) gradient
    by, read from its state; None for SGD (:math:`P = I`).

    * Adam: :math:`\sqrt{v_t / (1 - \beta_2^t)} + \epsilon` with :math:`v` = ``exp_avg_sq``
      (``max_exp_avg_sq`` with amsgrad), computed as the update does
      (``sqrt(v) / sqrt(1 - beta2^t) + eps``).
    * RMSprop: :math:`\sqrt{v} + \epsilon` (``square_avg``); centered:
      :math:`\sqrt{v - \bar g^2} + \epsilon` (``grad_avg``).
    * Adagrad: :math:`\sqrt{\text{sum}} + \epsilon`.

    Args:
        optimizer: one of optimlab's or torch.optim's SGD / Adam / AdamW / RMSprop / Adagrad (the
            two share their state keys).
        params: return :math:`P` for these parameters, in this order (matched by identity, e.g. a
            model's trainable parameters); None: every parameter of every group, in group order.

    Raises:
        ValueError: a parameter is not in the optimizer, or an adaptive optimizer has no state for
            it yet (no update has divided by a preconditioner before the first step; Adagrad's
            state exists from construction).
    """
    kind = _kind(optimizer)
    if kind == "sgd":
        return None
    out = []
    for i, p, group in _with_groups(optimizer, params):
        state = optimizer.state.get(p, {})
        step = float(state["step"]) if "step" in state else 0.0
        if kind == "adam" and step >= 1:
            v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
            out.append(v.sqrt().div_((1 - group["betas"][1] ** step) ** 0.5).add_(group["eps"]))
        elif kind == "rmsprop" and step >= 1:
            v = state["square_avg"]
            if group["centered"]:
                v = torch.addcmul(v, state["grad_avg"], state["grad_avg"], value=-1)
            out.append(v.sqrt().add_(group["eps"]))
        elif kind == "adagrad" and "sum" in state:
            out.append(state["sum"].sqrt().add_(group["eps"]))
        else:
            raise ValueError(f"{type(optimizer).__name__} has no state for parameter {i} (shape {tuple(p.shape)}) "
                             "yet: its preconditioner exists after the first step that updates it")
    return out


def is_count(value: object) -> bool:
    """Whether ``value`` is an integer >= 1 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def probe_parts(n: int, batch_size: int) -> int:
    """Into how many parts of near-equal size :func:`gradient_moments` splits ``n`` probe examples:
    one per ``batch_size`` (rounded up), and at least two (a variance needs two), at most ``n``."""
    if not is_count(batch_size):
        raise ValueError(f"Invalid batch_size: {batch_size!r} (must be an integer >= 1)")
    if n < 1:
        raise ValueError(f"Invalid n: {n!r} (need at least one example)")
    return min(n, max(2, -(-n // batch_size)))


class GradientMoments(NamedTuple):
    r"""Element-wise estimates, for the gradient :math:`g_B` of a minibatch of ``batch_size`` drawn
    from a probe, of its mean square :math:`E[g_B^2]` and its variance :math:`\mathrm{Var}[g_B]`,
    shaped like the parameters (see :func:`gradient_moments`)."""

    square: list[Tensor]
    variance: list[Tensor]
    batch_size: int


def moments_from_parts(part_grads: Iterable[Sequence[Tensor]], examples: int, batch_size: int) -> GradientMoments:
    r""":class:`GradientMoments` for minibatches of ``batch_size`` from the gradients of the K
    near-equal parts that ``examples`` probe examples were split into (``part_grads``: one list of
    tensors per part). With part size :math:`b = n / K`, the parts' mean :math:`\bar g` and
    unbiased variance :math:`s^2` (which estimates :math:`V / b`, :math:`V` the per-example
    variance): :math:`\mathrm{Var}[g_B] = s^2 b / B` and :math:`E[g_B^2] = \max(\bar g^2 - s^2 / K, 0)
    + s^2 b / B` (:math:`\bar g^2 - s^2/K` estimates the squared mean without bias). One part (one
    example): no variance, NaN."""
    sums: list[Tensor] = []
    squares: list[Tensor] = []
    parts = 0
    for grads in part_grads:
        if not parts:
            sums, squares = [torch.zeros_like(g) for g in grads], [torch.zeros_like(g) for g in grads]
        parts += 1
        for total, total_sq, g in zip(sums, squares, grads, strict=True):
            total.add_(g)
            total_sq.addcmul_(g, g)
    if not parts:
        raise ValueError("moments_from_parts needs the gradients of at least one part")
    size = examples / parts
    square, variance = [], []
    for total, total_sq in zip(sums, squares):
        mean = total / parts
        spread = ((total_sq / parts - mean * mean) * (parts / (parts - 1))).clamp_(min=0) if parts > 1 \
            else torch.full_like(mean, math.nan)
        noise = spread * (size / batch_size)
        variance.append(noise)
        square.append((mean * mean - spread / parts).clamp_(min=0).add_(noise) if parts > 1 else mean * mean)
    return GradientMoments(square, variance, batch_size)


def gradient_moments(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> GradientMoments:
    r"""What an adaptive optimizer's gradient averages estimate at ``model``'s current weights when
    it trains on minibatches of ``batch_size`` drawn from ``(x, y)``: the element-wise mean square
    :math:`E[g_B^2]` (it includes the minibatch noise, so it grows as ``batch_size`` shrinks) and
    variance of the minibatch gradient :math:`g_B` of the mean cross-entropy, shaped like the
    trainable parameters.

    Every example counts: ``(x, y)`` is split into :func:`probe_parts` consecutive parts of
    near-equal size, each part's gradient taken, and :func:`moments_from_parts` scales their spread
    to ``batch_size`` (so a probe smaller than a minibatch works too). In eval mode, as
    :func:`top_eigenpair` (no draw from torch's generators, ``p.grad`` untouched)."""
    params = trainable(model)
    if not params:
        raise ValueError("model has no trainable parameters")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of examples, got {x.shape[0]} and {y.shape[0]}")
    parts = probe_parts(x.shape[0], batch_size)
    with evaluation(model):
        x, y = probe_batch(x, y, params[0].dtype)
        grads = (torch.autograd.grad(F.cross_entropy(model(xb), yb), params, materialize_grads=True)
                 for xb, yb in zip(x.tensor_split(parts), y.tensor_split(parts)))
        return moments_from_parts(grads, x.shape[0], batch_size)


def initial_preconditioner(optimizer: torch.optim.Optimizer, moments: GradientMoments,
                           params: Iterable[Tensor] | None = None) -> list[Tensor] | None:
    r"""The diagonal :math:`P` of :func:`preconditioner` that ``optimizer`` (its hyperparameters,
    not its state) reaches while its minibatch gradients keep the distribution they have at
    initialisation, estimated by ``moments`` (see :func:`gradient_moments`); None for SGD. This
    gives the preconditioned sharpness at step 0, where the state holds no :math:`P` yet, or only
    the first minibatch's, a noisy one (a coordinate that minibatch did not touch gets
    :math:`P = \epsilon` while the probe's Hessian curves along it).

    * Adam (and amsgrad): :math:`\sqrt{E[g_B^2]} + \epsilon`, what the bias-corrected average
      :math:`\hat v` estimates.
    * RMSprop: :math:`\sqrt{E[g_B^2]} + \epsilon`, where its (not bias-corrected) average settles;
      centered: :math:`\sqrt{\mathrm{Var}[g_B]} + \epsilon`.
    * Adagrad: :math:`\sqrt{a + E[g_B^2]} + \epsilon` with ``initial_accumulator_value`` :math:`a`,
      the expected accumulator of its first update (it only grows after).

    Weight decay is left out, as in :func:`stability_threshold`. The moments are in the order of
    ``params`` (None: every parameter, in group order).
    """
    kind = _kind(optimizer)
    if kind == "sgd":
        return None
    entries = _with_groups(optimizer, params)
    square, variance = list(moments.square), list(moments.variance)
    if len(square) != len(entries) or len(variance) != len(entries):
        raise ValueError(f"the moments must hold one tensor per parameter ({len(entries)}), "
                         f"got {len(square)} and {len(variance)}")
    out = []
    for (i, p, group), sq, var in zip(entries, square, variance):
        if sq.shape != p.shape or var.shape != p.shape:
            raise ValueError(f"the moments of parameter {i} must be shaped {tuple(p.shape)}")
        if kind == "rmsprop" and group["centered"]:
            v = var
        elif kind == "adagrad":
            v = sq + group["initial_accumulator_value"]
        else:
            v = sq
        out.append(v.sqrt().add_(group["eps"]))
    return out


# --------------------------------------------------------------------------- tracking


def check_tracking(every_n_steps: object, probe_size: object, batch_size: object = None) -> None:
    """A ValueError naming ``every_n_steps``, ``probe_size`` or ``batch_size`` (None: not given) unless
    each is an integer >= 1."""
    for key, value in (("every_n_steps", every_n_steps), ("probe_size", probe_size), ("batch_size", batch_size)):
        if (key != "batch_size" or value is not None) and not is_count(value):
            raise ValueError(f"Invalid {key}: {value!r} (must be an integer >= 1)")


def measurement_due(step: int, every_n_steps: int, log_spaced_start: bool) -> bool:
    """Whether tracking measures after optimizer step ``step`` (>= 1): every ``every_n_steps``, and
    with ``log_spaced_start`` also at steps 1, 2, 4, ... below it."""
    early = log_spaced_start and step < every_n_steps and step & (step - 1) == 0
    return step % every_n_steps == 0 or early


def probe_indices(n: int, size: int, seed: int) -> Tensor:
    """Which of ``n`` training examples make up a probe of ``size`` (all when fewer), chosen by ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


def _nanmax(values: Iterable[float]) -> float | None:
    values = list(values)
    if not values:
        return None
    finite_or_inf = [v for v in values if not math.isnan(v)]
    return max(finite_or_inf) if finite_or_inf else math.nan


class SharpnessLog:
    """Sharpness measurements of a run, summarised per epoch and for the whole run.

    A measurement is a crossing when ``sharpness > threshold`` (a NaN sharpness never is; an
    infinite one is unless the threshold is infinite too). The record of an epoch (see
    :meth:`epoch_record`) holds ``epoch``, ``measurements``, ``sharpness_max`` (over the non-NaN
    values; NaN if all were NaN), ``sharpness_last``, ``threshold_last``, ``first_crossing_step``
    and the sharpness and threshold measured there (``crossing_sharpness``, ``crossing_threshold``);
    values are None when the epoch had no measurement or no crossing. :attr:`series` keeps every
    measurement as ``[step, sharpness, threshold]``.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.series: list[list[float]] = []
        self.first_crossing_step: int | None = None
        self.first_crossing: tuple[float, float] | None = None  # (sharpness, threshold) there
        self.initial: tuple[int, float, float] | None = None    # the first measurement: (step, sharpness, threshold)
        self.measurements = 0
        self.sharpness_max: float | None = None
        self._epoch: int | None = None
        self._values: list[float] = []
        self._last: tuple[float, float] | None = None
        self._crossing: int | None = None
        self._crossing_values: tuple[float, float] | None = None
        self._ended = False

    def start_epoch(self, epoch: int) -> None:
        """Begin ``epoch``'s record, first ending the previous one if :meth:`end_epoch` was not
        called for it (a checkpoint saved before that call, then resumed); a no-op when ``epoch``
        is already the current one (a run resumed mid-epoch keeps what was recorded before)."""
        if epoch == self._epoch:
            return
        if self._epoch is not None and not self._ended:
            self.end_epoch()
        self._epoch, self._values, self._last, self._ended = epoch, [], None, False
        self._crossing, self._crossing_values = None, None

    def add(self, step: int, sharpness: float, threshold: float) -> bool:
        """Record one measurement at optimizer step ``step``; return whether it is a crossing."""
        crossed = sharpness > threshold
        self.series.append([step, sharpness, threshold])
        if self.initial is None:
            self.initial = (step, sharpness, threshold)
        self._values.append(sharpness)
        self._last = (sharpness, threshold)
        self.measurements += 1
        self.sharpness_max = _nanmax([sharpness] + ([] if self.sharpness_max is None else [self.sharpness_max]))
        if crossed and self._crossing is None:
            self._crossing, self._crossing_values = step, (sharpness, threshold)
        if crossed and self.first_crossing_step is None:
            self.first_crossing_step, self.first_crossing = step, (sharpness, threshold)
        return crossed

    def epoch_record(self) -> dict[str, Any]:
        """The current (or, after :meth:`end_epoch`, the just finished) epoch's record."""
        return {"epoch": self._epoch, "measurements": len(self._values), "sharpness_max": _nanmax(self._values),
                "sharpness_last": None if self._last is None else self._last[0],
                "threshold_last": None if self._last is None else self._last[1],
                "first_crossing_step": self._crossing,
                "crossing_sharpness": None if self._crossing_values is None else self._crossing_values[0],
                "crossing_threshold": None if self._crossing_values is None else self._crossing_values[1]}

    def end_epoch(self) -> dict[str, Any]:
        """Append the current epoch's record to :attr:`history` (once) and return it."""
        record = self.epoch_record()
        if not self._ended:
            self.history.append(record)
            self._ended = True
        return record

    def run_record(self) -> dict[str, Any]:
        """``measurements``, ``sharpness_max``, ``first_crossing_step`` and the sharpness and
        threshold there (``crossing_sharpness``, ``crossing_threshold``) over the whole run, the
        first measurement (``initial_step``, ``initial_sharpness``, ``initial_threshold``) and
        every measurement (``series``: ``[step, sharpness, threshold]`` rows)."""
        crossing, initial = self.first_crossing or (None, None), self.initial or (None, None, None)
        return {"measurements": self.measurements, "sharpness_max": self.sharpness_max,
                "first_crossing_step": self.first_crossing_step, "crossing_sharpness": crossing[0],
                "crossing_threshold": crossing[1], "initial_step": initial[0], "initial_sharpness": initial[1],
                "initial_threshold": initial[2], "series": [list(row) for row in self.series]}

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history], "series": [list(r) for r in self.series],
                "first_crossing_step": self.first_crossing_step,
                "first_crossing": self.first_crossing, "initial": self.initial, "measurements": self.measurements,
                "sharpness_max": self.sharpness_max, "epoch": self._epoch, "values": list(self._values),
                "last": self._last, "crossing": self._crossing, "crossing_values": self._crossing_values,
                "ended": self._ended}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state["history"]]
        self.series = [list(r) for r in state.get("series", [])]  # absent from checkpoints before it existed
        self.first_crossing_step, self.measurements = state["first_crossing_step"], state["measurements"]
        self.sharpness_max, self._epoch = state["sharpness_max"], state["epoch"]
        self._values, self._last, self._crossing = list(state["values"]), state["last"], state["crossing"]
        self.first_crossing, self._crossing_values = state["first_crossing"], state["crossing_values"]
        self.initial = state["initial"]
        self._ended = state["ended"]


def show_sharpness_chart(loggers: Iterable[Logger]) -> None:
    """Put the sharpness and its threshold on one chart in each TensorBoard logger of ``loggers``."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_custom_scalars(TENSORBOARD_LAYOUT)


class SharpnessCallback(L.Callback):
    """Track the (preconditioned) sharpness of ``pl_module.model`` every ``every_n_steps`` optimizer
    steps against the stability threshold of ``trainer.optimizers[0]``.

    At each ``trainer.global_step`` that is a positive multiple of ``every_n_steps`` (after the
    step; with ``log_spaced_start`` also at steps 1, 2, 4, ... below ``every_n_steps`` and at step 0,
    the initialisation) it computes the sharpness on a fixed probe batch, preconditioned by
    :func:`preconditioner` for the adaptive optimizers (at step 0 by :func:`initial_preconditioner`
    of the probe's minibatches of the training batch size), with a :class:`SharpnessTracker`
    (warm-started), and :func:`stability_threshold` of param group 0. Both go to every logger as
    ``curvature/sharpness`` and ``curvature/threshold`` at that step; a TensorBoard logger also
    gets a custom-scalars layout that draws the two on one chart (the "Custom Scalars" tab; it
    replaces any other layout written to the same run). :attr:`sharpness_log` (a :class:`SharpnessLog`)
    keeps per-epoch records (:meth:`epoch_record` holds the last epoch's until the next starts;
    :attr:`history` all finished ones) and the run's first crossing.

    The training trajectory is unchanged: the computation runs in eval mode and uses
    ``torch.autograd.grad`` (no dropout draws, no change to ``p.grad``), and the probe and the
    start vector come from private generators. A non-finite result (or a preconditioner with
    entries that are NaN or not positive, which is then not used) is recorded as NaN / inf and
    training goes on.

    Args:
        every_n_steps: measurement cadence in optimizer steps (>= 1).
        probe_size: images in the probe, drawn without replacement by ``seed`` from
            ``trainer.datamodule.train_x`` / ``train_y`` (all of them if fewer).
        seed: seeds the probe draw and the first start vector.
        probe: ``(x, y)`` to use instead of drawing from the data module.
        iters, tol: per measurement, see :func:`lanczos` (the tolerance is looser than
            :func:`sharpness`'s: about half the products, see ``DEFAULT_TRACKING_TOL``).
        log_spaced_start: also measure early, where a large lr's spike and the sharpness's first
            rise happen, and at the initialisation (the value the report's predicted largest stable
            lr rests on).
        batch_size: the training batch size, whose minibatch gradients the adaptive optimizers'
            preconditioner at step 0 averages (None: the datamodule's ``batch_size``; without
            one, the whole probe is one batch).

    A measurement costs roughly ``1 + iterations`` Hessian-vector products on the probe, each about
    a training step on as many images: on the 2-core CPU, the default MLP and 1024 probe images,
    30-50 training steps of batch 128 (docs/curvature.md), so ``every_n_steps`` of 150 or more keeps
    the overhead within 20%.
    """

    def __init__(self, every_n_steps: int, probe_size: int = DEFAULT_PROBE_SIZE, seed: int = 0,
                 probe: tuple[Tensor, Tensor] | None = None, iters: int = 20,
                 tol: float = DEFAULT_TRACKING_TOL, log_spaced_start: bool = False,
                 batch_size: int | None = None) -> None:
        check_tracking(every_n_steps, probe_size, batch_size)
        if probe is not None and (len(probe) != 2 or len(probe[0]) != len(probe[1]) or len(probe[1]) == 0):
            raise ValueError("Invalid probe: must be a pair (x, y) of the same nonzero length")
        self.every_n_steps, self.probe_size, self.seed = every_n_steps, probe_size, seed
        self.log_spaced_start, self.batch_size = log_spaced_start, batch_size
        self.given_probe = probe
        self.tracker = SharpnessTracker(iters, tol, seed)
        self.sharpness_log = SharpnessLog()
        self.probe: tuple[Tensor, Tensor] | None = None
        self.last_step = 0
        self._pending: dict[str, Any] | None = None  # a resumed run's saved state, until its fit applies it
        self.threshold_formula: str | None = None
        self.preconditioned = False

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.sharpness_log.history

    def epoch_record(self) -> dict[str, Any]:
        """See :meth:`SharpnessLog.epoch_record`."""
        return self.sharpness_log.epoch_record()

    def run_record(self) -> dict[str, Any]:
        """:meth:`SharpnessLog.run_record`, with ``threshold_formula`` (the threshold in words at
        the start of training, e.g. ``2/lr`` or ``38/lr``) and ``preconditioned`` (adaptive optimizers)."""
        return {**self.sharpness_log.run_record(), "threshold_formula": self.threshold_formula,
                "preconditioned": self.preconditioned}

    def draw_probe(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``probe_size`` examples of ``(x, y)`` chosen by ``seed`` (all when there are fewer)."""
        idx = probe_indices(len(y), self.probe_size, self.seed).to(y.device)
        return x[idx], y[idx]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore()
        if not isinstance(getattr(pl_module, "model", None), nn.Module):
            raise ValueError("SharpnessCallback needs the LightningModule's classifier as its .model attribute")
        optimizer = trainer.optimizers[0]
        threshold, lr = stability_threshold(optimizer), float(optimizer.param_groups[0]["lr"])  # fails here, not mid-run
        self.threshold_formula = f"{threshold * lr:.3g}/lr" if 0 < threshold * lr < math.inf else None
        self.preconditioned = _kind(optimizer) != "sgd"
        if self.given_probe is not None:
            x, y = self.given_probe
        else:
            data = trainer.datamodule
            if data is None or not hasattr(data, "train_x"):
                raise ValueError("SharpnessCallback needs probe=(x, y) or a datamodule with train_x / train_y")
            x, y = self.draw_probe(data.train_x, data.train_y)
        self.probe = (x.to(pl_module.device), y.to(pl_module.device))
        if self.batch_size is None:
            self.batch_size = getattr(trainer.datamodule, "batch_size", None) or len(y)
        show_sharpness_chart(trainer.loggers)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore()  # a resumed run with no epoch left to train never starts training

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore()  # for a strategy that loads the checkpoint after on_fit_start
        if self.log_spaced_start and trainer.global_step == 0:
            self.sharpness_log.start_epoch(trainer.current_epoch)
            self._record(trainer, pl_module, 0)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sharpness_log.start_epoch(trainer.current_epoch)

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (>= 1) is measured."""
        return measurement_due(step, self.every_n_steps, self.log_spaced_start)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # The step counter stays put when a step is skipped (e.g. a non-finite loss): measure once.
        if step == 0 or not self.due(step) or step == self.last_step:
            return
        self.last_step = step
        self._record(trainer, pl_module, step)

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        value, threshold = self.measure(pl_module.model, trainer.optimizers[0], initial=step == 0)
        self.sharpness_log.add(step, value, threshold)
        for logger in trainer.loggers:
            logger.log_metrics({SHARPNESS_TAG: value, THRESHOLD_TAG: threshold}, step=step)

    def measure(self, model: nn.Module, optimizer: torch.optim.Optimizer, initial: bool = False) -> tuple[float, float]:
        """``(sharpness, threshold)`` of ``model`` on the probe, preconditioned by ``optimizer``'s state
        (``initial``: by its :func:`initial_preconditioner` on the probe, for step 0)."""
        if self.probe is None:
            raise RuntimeError("SharpnessCallback.measure() needs the probe that on_fit_start draws")
        params = trainable(model)
        if initial and self.preconditioned:
            precond = initial_preconditioner(optimizer, gradient_moments(model, *self.probe, self.batch_size), params)
        else:
            precond = preconditioner(optimizer, params)
        if precond is not None and not valid_preconditioner(precond):
            return math.nan, stability_threshold(optimizer)
        return self.tracker(model, *self.probe, precond), stability_threshold(optimizer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sharpness_log.end_epoch()

    def state_dict(self) -> dict[str, Any]:
        return {"log": self.sharpness_log.state_dict(), "tracker": self.tracker.state_dict(),
                "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in a fit only (restore): testing a checkpoint (test_ckpt=best) loads it too, and must
        # keep this run's measurements (those after the best epoch happened too).
        self._pending = state_dict

    def restore(self) -> None:
        """A resumed run's records and warm start from its checkpoint, once."""
        saved, self._pending = self._pending, None
        if saved is None:
            return
        self.sharpness_log.load_state_dict(saved["log"])
        self.tracker.load_state_dict(saved["tracker"])
        self.last_step = saved["last_step"]
