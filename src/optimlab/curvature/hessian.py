r"""The sharpness of a model on a batch: the largest algebraic eigenvalue of the Hessian of its mean
cross-entropy, or of :math:`P^{-1/2} H P^{-1/2}` for a diagonal preconditioner :math:`P`, by Lanczos on
Hessian-vector products (double backpropagation; the Hessian is never formed)."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from optimlab.curvature.lanczos import check_iteration, lanczos


class Eigenpair(NamedTuple):
    """The top eigenvalue, a unit eigenvector shaped like the parameters (in the preconditioned
    coordinates when a preconditioner was given), the number of Hessian-vector products used, and
    whether the iteration converged (False where ``iters`` ended it first; see :func:`lanczos`)."""

    value: float
    vector: list[Tensor]
    iterations: int
    converged: bool


@contextlib.contextmanager
def evaluation(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, batch norm on its running statistics) and grad mode for the block (also
    under ``torch.no_grad`` or ``torch.inference_mode``), each module's own mode restored after.
    Compiled modules run eagerly inside, since ``torch.compile`` does not support double backward, and
    attention (``scaled_dot_product_attention``) on its math kernel: the CPU's flash kernel has none either."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    try:
        with torch.inference_mode(False), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), \
                (set_stance("force_eager") if set_stance else contextlib.nullcontext()):
            yield
    finally:
        # by train(), which a module may override (to freeze a part in eval mode, say): its effects are undone
        # too; in module order, parents first, as train() sets a module's children with it
        for m, training in modes:
            if m.training != training:
                m.train(training)


def trainable(model: nn.Module) -> list[Tensor]:
    """The parameters the Hessian is taken over: those with ``requires_grad``, in module order; a
    ValueError where there are none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    return params


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def like_parameters(name: str, tensors: object, model: nn.Module) -> list[Tensor]:
    """``tensors`` (a preconditioner or a start vector) checked against the model's trainable
    parameters and detached: one tensor per parameter, shaped like it, in their order; a list over
    all the parameters, frozen ones too, has the frozen ones' entries dropped."""
    every, params = list(model.parameters()), trainable(model)
    if isinstance(tensors, (Tensor, dict, str)) or not isinstance(tensors, Iterable):
        raise ValueError(f"Invalid {name}: must be a list of tensors shaped like the trainable parameters, "
                         f"got {type(tensors).__name__}")
    tensors = list(tensors)
    if not all(isinstance(t, Tensor) for t in tensors):
        raise ValueError(f"Invalid {name}: must be a list of tensors, got {[type(t).__name__ for t in tensors]}")
    if any(t.is_complex() or t.dtype == torch.bool for t in tensors):
        raise ValueError(f"Invalid {name}: must be real numbers, got {sorted({str(t.dtype) for t in tensors})}")
    if len(tensors) == len(every) != len(params):
        if any(t.shape != p.shape for t, p in zip(tensors, every)):
            raise ValueError(f"Invalid {name}: a list over all the parameters must be shaped like them "
                             f"{[tuple(p.shape) for p in every]}, got {[tuple(t.shape) for t in tensors]}")
        tensors = [t for t, p in zip(tensors, every) if p.requires_grad]
    if len(tensors) != len(params) or any(t.shape != p.shape for t, p in zip(tensors, params)):
        raise ValueError(f"Invalid {name}: must be a list of {len(params)} tensors shaped like the trainable "
                         f"parameters {[tuple(p.shape) for p in params]}, got "
                         f"{[tuple(t.shape) for t in tensors]}")
    return [t.detach() for t in tensors]


def probe_batch(x: Tensor, y: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The batch as the Hessian is taken on it: images in the parameters' dtype (as a 64-true
    trainer casts its batches), integer labels as int64 (what cross-entropy takes), and tensors made
    under ``torch.inference_mode`` copied (autograd cannot save them); a ValueError for complex images or
    complex or boolean labels (which a conversion would silently turn into other classes). Call it inside
    :func:`evaluation`."""
    if x.is_complex():
        raise ValueError(f"Invalid x: must be real, got {x.dtype}")
    if y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"Invalid y: class indices (integers) or class probabilities (floating point) required, "
                         f"got {y.dtype}")
    if x.is_floating_point():
        x = x.to(dtype)
    if not y.is_floating_point():
        y = y.long()
    return x.clone() if x.is_inference() else x, y.clone() if y.is_inference() else y


def check_batch(x: Tensor, y: Tensor) -> None:
    """A ValueError unless ``x`` and ``y`` are tensors holding the same nonzero number of examples."""
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
        raise ValueError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x and y must hold the same nonzero number of examples, got shapes {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")


def check_targets(logits: Tensor, y: Tensor) -> None:
    """A ValueError unless ``y`` is what the mean cross-entropy of ``logits`` (``[N, C, ...]``) takes, on
    their device: class indices shaped ``[N, ...]`` in ``[0, C)`` (or cross-entropy's ignored index -100),
    or floating-point class probabilities shaped like the logits."""
    if not isinstance(logits, Tensor) or logits.dim() < 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"the model's output must be logits shaped [N, classes, ...], got {got}")
    if y.device != logits.device:
        raise ValueError(f"Invalid y: on {y.device}, the model's output on {logits.device}")
    if y.is_floating_point():
        if y.shape != logits.shape:
            raise ValueError(f"Invalid y: floating-point targets are class probabilities shaped like the logits "
                             f"{tuple(logits.shape)}, got {tuple(y.shape)} (class indices must be integers)")
        return
    if y.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"Invalid y: class indices for logits {tuple(logits.shape)} are shaped "
                         f"{tuple(logits.shape[:1] + logits.shape[2:])}, got {tuple(y.shape)}")
    classes = logits.shape[1]
    outside = (y < 0) & (y != -100) | (y >= classes)
    if bool(outside.any()):
        raise ValueError(f"Invalid y: class indices must lie in [0, {classes}) (or be -100, ignored), "
                         f"got {y[outside][0].item()}")


def valid_preconditioner(tensors: Sequence[Tensor]) -> bool:
    """True when every entry is positive (NaN is not; +inf is, and freezes its coordinate as it
    does in the update), so :math:`P^{-1/2}` exists."""
    return all(bool((t > 0).all()) for t in tensors)


def inverse_sqrt(given: Sequence[Tensor], diagonal: Tensor) -> Tensor:
    """:math:`P^{-1/2}`: ``diagonal`` (the entries of the preconditioner ``given``, flattened in the
    parameters' dtype and device) to the power -1/2. A ValueError naming an entry that is not positive, or
    one below the dtype's smallest normal number (there :math:`P^{-1/2} H P^{-1/2}` overflows where H does not)."""
    if not valid_preconditioner(given):
        index, bad = next((i, t[~(t > 0)]) for i, t in enumerate(given) if not bool((t > 0).all()))
        raise ValueError(f"Invalid preconditioner: every entry must be positive (NaN is not), got "
                         f"{bad[0].item():.6g} in its tensor {index} (shaped {tuple(given[index].shape)})")
    smallest = torch.finfo(diagonal.dtype).tiny
    if not bool((diagonal >= smallest).all()):
        raise ValueError(f"Invalid preconditioner: entries as small as {min(float(t.min()) for t in given):.3g} lie "
                         f"below the smallest normal {str(diagonal.dtype).removeprefix('torch.')} ({smallest:.3g})")
    return diagonal.rsqrt()


def hessian_vector_product(grads: Sequence[Tensor], params: Sequence[Tensor], split: Callable[[Tensor], list[Tensor]],
                           join: Callable[[Sequence[Tensor]], Tensor],
                           scale: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    r""":math:`v \mapsto S H S v` (:math:`S` = ``scale``, :math:`P^{-1/2}`, or the identity) for flat vectors:
    ``split`` cuts one into pieces shaped like ``params``, ``join`` flattens the product's pieces back. ``grads``:
    the loss's gradient built with ``create_graph=True``; each product is one more backward pass through it. A
    gradient that does not depend on the parameters contributes a zero row of H."""
    live = [i for i, g in enumerate(grads) if g.requires_grad]

    def product(v: Tensor) -> Tensor:
        u = v if scale is None else v * scale
        if not live:
            return torch.zeros_like(v)
        pieces = split(u)
        hv = torch.autograd.grad([grads[i] for i in live], params, grad_outputs=[pieces[i] for i in live],
                                 retain_graph=True, materialize_grads=True)
        out = join(hv)
        return out if scale is None else out * scale

    return product


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
        An :class:`Eigenpair`; its vector is the eigenvector of :math:`P^{-1/2} H P^{-1/2}`. A
        non-finite loss gives NaN (and the start vector, no product).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model: must be a torch.nn.Module, got {type(model).__name__}")
    check_iteration(iters, tol)
    params = trainable(model)
    if len({(p.dtype, p.device) for p in params}) > 1 or params[0].is_complex():
        raise ValueError("the trainable parameters must be real and share one dtype and device, got "
                         f"{sorted({f'{p.dtype} on {p.device}' for p in params})}")
    check_batch(x, y)
    dtype, device = params[0].dtype, params[0].device
    scale = None
    if preconditioner is not None:
        given = like_parameters("preconditioner", preconditioner, model)
        scale = inverse_sqrt(given, _flat(given).to(device, dtype))
    if init is not None:
        v0 = _flat(like_parameters("init", init, model)).to(device, dtype)
    else:
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        v0 = torch.randn(sum(p.numel() for p in params), generator=generator, dtype=dtype).to(device)
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]

    def unflat(vector: Tensor) -> list[Tensor]:
        return [piece.view(shape) for piece, shape in zip(vector.detach().split(sizes), shapes)]

    with evaluation(model):
        x, y = probe_batch(x, y, dtype)
        logits = model(x)
        check_targets(logits, y)
        loss = F.cross_entropy(logits, y)
        if not bool(torch.isfinite(loss)):  # its Hessian is not defined (every label ignored: 0/0)
            return Eigenpair(math.nan, unflat(v0), 0, False)
        if not loss.requires_grad:  # no trainable parameter reaches the loss: its Hessian is zero
            return Eigenpair(0.0, unflat(v0 / torch.linalg.vector_norm(v0)), 0, True)
        grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)
        product = hessian_vector_product(grads, params, unflat, _flat, scale)
        value, vector, count, converged = lanczos(product, v0, iters, tol)
    return Eigenpair(value, unflat(vector), count, converged)


def sharpness(model: nn.Module, x: Tensor, y: Tensor, preconditioner: Sequence[Tensor] | None = None,
              iters: int = 20, tol: float = 1e-3) -> float:
    r"""The largest algebraic eigenvalue of the Hessian of the mean cross-entropy of ``model`` on
    ``(x, y)``, or of :math:`P^{-1/2} H P^{-1/2}` when ``preconditioner`` (tensors shaped like the
    trainable parameters, :math:`P` the diagonal matrix of them) is given. A fixed start vector;
    see :func:`top_eigenpair` for the method and :class:`SharpnessTracker` for warm starts. A
    RuntimeWarning says when ``iters`` products ended the iteration before its error bound met
    ``tol`` (the value may then be further below the top eigenvalue: raise ``iters``); ``tol=0`` asks
    for exactly ``iters`` products, so it warns of nothing."""
    pair = top_eigenpair(model, x, y, preconditioner, iters, tol)
    if not pair.converged and tol > 0 and math.isfinite(pair.value):
        warnings.warn(f"sharpness: {iters} Hessian-vector products ended the iteration before its error bound met "
                      f"tol={tol}; the value {pair.value:.6g} may be low (raise iters)", RuntimeWarning, stacklevel=2)
    return pair.value
