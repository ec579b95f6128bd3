"""What our optimizers share: argument checks, the step() protocol, grouping, hyperparameters given
as tensors (torch.optim's tensor ``lr``, and one value per member in a member-wise group), gradient
noise and the CPU's reusable scratch buffers.

Each optimizer subclasses :class:`Optimizer` and writes only its state initialisation and update
rule, as multi-tensor ``torch._foreach_*`` calls over one (device, dtype) bucket of parameters at a
time. Where a hyperparameter scales a tensor, the rule calls :func:`add_scaled_`,
:func:`mul_scaled_` or :meth:`Optimizer._addcdiv_scaled_`, which take the coefficient in any of the
forms described in :class:`Optimizer`.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from optimlab.checks import is_count

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]
# A coefficient of the update: a Python number; a 0-d tensor (a tensor lr: torch.optim does its
# arithmetic in the tensor's dtype, then uses its value); or, in a member-wise group, a 1-D tensor
# holding one value per member.
Coef = float | Tensor

# torch.optim's implementation switches. We have one implementation (multi-tensor), which computes
# what torch's for-loop path computes: foreach and fused (None, False or True) select nothing;
# differentiable=True records the update for autograd, as torch's does; capturable (CUDA graphs: every
# hyperparameter read on the device) only off.
UNSUPPORTED_WHEN_ON = ("capturable",)
# The device types torch.optim's fused=True takes (it refuses other parameters, as ours does; the last is
# torch's name for an out-of-tree backend).
FUSED_DEVICE_TYPES = ("mps", "cuda", "xpu", "hpu", "cpu", "mtia", "privateuseone")


def scalar_dtype() -> torch.dtype:
    """The dtype of a ``step`` counter, as torch.optim chooses it (float64 only under a float64 default)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def zeros_step() -> Tensor:
    """A fresh ``step`` counter, as torch.optim stores it (a scalar on the CPU)."""
    return torch.tensor(0.0, dtype=scalar_dtype())


def check_hyperparameter(label: str, value: Any, low: float = 0.0, high: float = math.inf, *,
                         high_open: bool = False, tensor_name: str | None = None) -> None:
    """Raise ``ValueError("Invalid <label>: <value> (...)")`` unless ``low <= value <= high`` (``< high``
    when ``high_open``); NaN and infinities fail. The message starts with torch.optim's words, so code
    matching torch's errors matches ours; the parenthesis gives our rule.

    With ``tensor_name`` the value may also be a 1-element tensor, as torch.optim takes one wherever it compares
    a number (its tensor ``lr``, ``betas``, ``eps``, ...); other tensors fail with torch's
    ``"Tensor <name> must be 1-element"``.
    """
    if isinstance(value, Tensor) and tensor_name is not None:
        if value.numel() != 1:
            hint = "; one value per member needs a member-wise group, see optimlab.optim.Optimizer" \
                if tensor_name in ("lr", "weight_decay") else ""
            raise ValueError(f"Tensor {tensor_name} must be 1-element (got shape {list(value.shape)}{hint})")
        number: Any = value.item()
    else:
        number = value
    if not isinstance(number, numbers.Real):  # where torch.optim's comparison fails with a TypeError
        raise TypeError(f"Invalid {label}: {value!r} (must be a real number)")
    ok = math.isfinite(number)  # NumPy's scalars and bools too, as torch.optim takes them
    if not (ok and low <= number and (number < high if high_open else number <= high)):
        bound = f">= {low}" if high == math.inf else f"in [{low}, {high})" if high_open else f"in [{low}, {high}]"
        raise ValueError(f"Invalid {label}: {value} (must be a finite number {bound})")


def check_lr(lr: Any) -> None:
    """torch.optim's checks of ``lr`` (a number or a 1-element tensor, >= 0), in its words."""
    check_hyperparameter("learning rate", lr, tensor_name="lr")


def as_hyperparameter(value: Any) -> Any:
    """A 1-element tensor as a 0-d tensor (as torch.optim stores tensor betas); anything else as is."""
    return value.reshape(()) if isinstance(value, Tensor) else value


def scalar(value: Coef) -> float:
    """A coefficient as the multi-tensor ops take it: a Python number (a 0-d tensor gives its value)."""
    return value.item() if isinstance(value, Tensor) else value


def nonzero(value: Coef) -> bool:
    """Whether a coefficient is nonzero; one per member counts as nonzero unread (reading it would
    synchronise a GPU each step; a member's zero then adds or multiplies exactly as nothing)."""
    if isinstance(value, Tensor):
        return per_member(value) or bool(value != 0)
    return value != 0


def l2_decay(group: dict[str, Any]) -> bool:
    """Whether the group's ``weight_decay`` is added to the gradient (L2; not AdamW's decoupled decay)."""
    return not group.get("decoupled_weight_decay", False) and nonzero(group["weight_decay"])


def per_member(value: Any) -> bool:
    """Whether a coefficient holds one value per member (a 1-D tensor; see :class:`Optimizer`)."""
    return isinstance(value, Tensor) and value.dim() == 1


def applied_as_tensor(value: Any) -> bool:
    """Whether a coefficient is applied as a tensor, never read as a number: one value per member, or a
    tensor autograd records (one that requires grad, in a step of ``differentiable=True``)."""
    return per_member(value) or (isinstance(value, Tensor) and value.requires_grad and torch.is_grad_enabled())


def coefficient(value: Coef) -> Coef:
    """A coefficient as the update applies it: a tensor (:func:`applied_as_tensor`) as it is, else a number."""
    return value if applied_as_tensor(value) else scalar(value)


def member_views(value: Tensor, like: list[Tensor]) -> list[Tensor]:
    """One value per member, shaped ``[P, 1, ...]`` to broadcast over each tensor's dim 0, in the
    dtype the tensor's ops compute in (float32 for 16-bit floats), as a scalar would be used."""
    views = []
    for t in like:
        coef = value.to(dtype=torch.promote_types(t.dtype, torch.float32))
        views.append(coef.view((-1,) + (1,) * (t.dim() - 1)) if coef.dim() else coef)  # (a 0-d one broadcasts)
    return views


def recorded_copies(tensors: list[Tensor]) -> list[Tensor]:
    """``tensors``, or copies of them while autograd records the update (``differentiable=True``): a product
    keeps its factors for the backward pass, and a parameter or a state tensor is changed in place later."""
    return [t.clone() for t in tensors] if torch.is_grad_enabled() else tensors


def add_scaled_(targets: list[Tensor], tensors: list[Tensor], scale: Coef) -> None:
    """``targets += scale * tensors``."""
    if applied_as_tensor(scale):
        torch._foreach_addcmul_(targets, recorded_copies(tensors), member_views(scale, targets))
    else:
        torch._foreach_add_(targets, tensors, alpha=scalar(scale))


def add_scaled(out: list[Tensor] | None, xs: list[Tensor], ys: list[Tensor], scale: Coef) -> list[Tensor]:
    """``xs + scale * ys``, into ``out`` when given (see :func:`foreach_into`)."""
    if applied_as_tensor(scale):
        return foreach_into(out, torch._foreach_addcmul, torch.addcmul, xs, ys, member_views(scale, ys))
    return foreach_into(out, torch._foreach_add, torch.add, xs, ys, alpha=scalar(scale))


def beyond_dtype(scale: Coef | list[Coef], like: Tensor) -> bool:
    """Whether a Python coefficient (or one of a list) lies beyond ``like``'s dtype: torch refuses to
    convert it ("without overflow"; float32 Adam at lr 3.4e37: lr / (1 - beta1)), where the update has
    no finite value. The callers then apply it as a tensor, which holds inf: the weights go non-finite,
    a diverging run's result (as a population member's, whose coefficients are tensors), not a crash."""
    if not like.is_floating_point():
        return False
    largest = torch.finfo(like.dtype).max
    scales = scale if isinstance(scale, list) else [scale]
    # NumPy scalars compared as floats
    return any(not isinstance(s, Tensor) and abs(float(s)) > largest for s in scales)


def mul_scaled_(targets: list[Tensor], scale: Coef) -> None:
    """``targets *= scale`` (tensors of one dtype: a bucket's)."""
    if beyond_dtype(scale, targets[0]):
        for t in targets:
            t.mul_(torch.tensor(scale, dtype=t.dtype, device=t.device))
    elif applied_as_tensor(scale):
        torch._foreach_mul_(targets, member_views(scale, targets))
    elif targets[0].dtype in (torch.float16, torch.bfloat16):
        # the multi-tensor op in place rounds a number to a 16-bit dtype first, where torch.optim's per-tensor
        # mul_ multiplies by it in float32 (CPU, torch 2.14: its momentum buffers 1-2 ulp apart a step)
        for t in targets:
            t.mul_(scalar(scale))
    else:
        torch._foreach_mul_(targets, scalar(scale))


def foreach_into(out: list[Tensor] | None, foreach_op: Callable[..., list[Tensor]], op: Callable[..., Tensor],
                 *args: Any, **kwargs: Any) -> list[Tensor]:
    """``foreach_op(*args, **kwargs)``, a fresh list from one multi-tensor call when ``out`` is None;
    else written into the ``out`` buffers by the per-tensor ``op(..., out=)`` (list arguments are
    taken item by item; an argument may be ``out`` itself). Both give the same numbers. While autograd
    records the update (``differentiable=True``), fresh tensors from the per-tensor ``op``: a multi-tensor
    op saves every input for its backward, and the update then changes some of them in place."""
    if out is None and not torch.is_grad_enabled():
        return foreach_op(*args, **kwargs)
    outs = out or [None] * len(args[0])
    return [op(*(a[i] if isinstance(a, list) else a for a in args), out=buf, **kwargs) for i, buf in enumerate(outs)]


def in_place(op_: Callable[..., None], op: Callable[..., list[Tensor]], tensors: list[Tensor],
             *args: Any) -> list[Tensor]:
    """``op_(tensors, *args)``, a multi-tensor op in place, and ``tensors``; while autograd records the update
    (``differentiable=True``), ``op(tensors, *args)``: fresh tensors, for the op that made ``tensors`` may read
    them in its backward pass (a square root reads its output)."""
    if torch.is_grad_enabled():
        return op(tensors, *args)
    op_(tensors, *args)
    return tensors


def zeros_state(states: list[dict[str, Any]], key: str, params: list[Tensor]) -> list[Tensor]:
    """Each state's ``key`` tensor, created as zeros like its parameter where missing (a state_dict
    saved with other options lacks it). Only then: ``setdefault(key, zeros_like(p))`` would
    allocate and fill a parameter-sized tensor on every step."""
    for state, p in zip(states, params):
        if key not in state:
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return [state[key] for state in states]


class Optimizer(torch.optim.Optimizer):
    """Base class: ``step(closure)`` calls the closure under grad mode, returns its loss, skips
    parameters whose ``grad`` is None and hands each (device, dtype) bucket to :meth:`_update`.

    **Drop-in for torch.optim.** Argument checks raise torch's errors with torch's message first.
    ``lr`` (and ``weight_decay``) may be a 1-element tensor, also set in a param group later (for
    example by an LR scheduler): it is used as torch.optim's for-loop path uses it (its arithmetic
    in the tensor's dtype, then its value), so trajectories match torch's. The implementation
    switches are accepted and stored like torch's, so state_dicts interchange with the same keys:
    ``foreach`` and ``fused`` select nothing (ours is multi-tensor and computes what torch's for-loop
    path computes; ``fused=True`` refuses what torch's refuses: both with ``foreach`` or
    ``differentiable``, a parameter that is not floating point or on a device torch has fused kernels
    for); ``differentiable=True`` lets autograd record the update, with respect to the parameters,
    gradients and state and to a hyperparameter given as a tensor that requires grad (``lr``,
    ``weight_decay``, Adam's ``betas``: applied as a tensor, never read as a number); ``capturable``
    only off. Complex parameters are updated as pairs of reals
    with complex state; sparse gradients work where torch.optim takes them (SGD, Adagrad).
    ``load_state_dict`` fills keys an older state_dict lacks with the constructor's default (the
    option off) and turns a ``step`` saved as a number into a tensor, as torch.optim does.

    **Member-wise groups** (population training). A param group with the key ``members: P`` (an
    int) holds parameters that stack P independent members along dim 0: every parameter has shape
    ``[P, ...]``. Its ``lr`` and ``weight_decay`` may then be 1-D tensors of length P (a number or
    1-element tensor applies to every member). One step equals P optimizers, member m's with
    ``lr[m]`` and ``weight_decay[m]``, each stepping slice m: bitwise on the CPUs measured, and
    within 1e-12 relative in float64 wherever torch's ``add`` with a scalar ``alpha`` fuses its
    multiply-add (a product by a per-member coefficient then rounds once more). Slice m of every
    state tensor is member m's state; the ``step`` count is shared (all members step together).
    Every operation is elementwise, so nothing crosses members: a caller can freeze a member that must
    stop (diverged) by setting its ``lr`` to 0 and zeroing its gradient (the population loop restores its
    last finite weights instead), and NaN or infinity in it never reaches the others. The tensors are
    used in float64 on the parameters' device: keep them there
    (a tensor elsewhere is copied each step, P numbers, which on a GPU waits for its queue);
    per-member arithmetic never reads them back. Without ``members`` a tensor ``lr`` with more
    than one element is torch's error ("Tensor lr must be 1-element"), and a group without the key
    behaves exactly as without this feature. LR schedulers write one number into ``lr`` and so do
    not apply to member-wise groups; set ``group["lr"]`` yourself. Sparse gradients are not
    supported in member-wise groups.

    Every subclass takes ``grad_noise_std`` (default 0, off): Gaussian noise of that standard
    deviation is added to each gradient before the update (the Keras notebook's experiment). The
    noise draws from torch's global generator, so a seeded run is reproducible.
    """

    # Whether the update rule takes sparse gradients (torch.optim's SGD and Adagrad do), and what
    # torch.optim's refusal adds after "<name> does not support sparse gradients".
    supports_sparse_grads: ClassVar[bool] = False
    sparse_advice: ClassVar[str] = ""
    # torch.optim's refusal of a sparse gradient under fused=True (where the class takes sparse ones).
    fused_sparse_error: ClassVar[str] = ""
    # Whether complex parameters are updated as pairs of reals (torch.optim's rules with squares and
    # roots), or as complex tensors (its SGD: a complex product rounds otherwise than two real ones).
    complex_as_real: ClassVar[bool] = True

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        check_hyperparameter("grad_noise_std value", defaults.get("grad_noise_std", 0.0))
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for flag in UNSUPPORTED_WHEN_ON:
            if group.get(flag):
                raise ValueError(f"{flag}=True is not supported: optimlab's {type(self).__name__} has one "
                                 f"implementation (multi-tensor, not {flag}); leave {flag} unset or False")
        if group.get("fused"):  # torch.optim's refusals, in its words
            if group.get("differentiable"):
                raise RuntimeError("`fused` does not support `differentiable`")
            if group.get("foreach"):
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        members = group.get("members")
        if members is not None:
            if not is_count(members):
                raise ValueError(f"Invalid members value: {members!r} (must be a positive int, the size of "
                                 "dim 0 of every parameter in the group)")
            for p in group["params"]:
                if p.dim() == 0 or p.shape[0] != members:
                    raise ValueError(f"members={members}: every parameter of the group must have shape "
                                     f"[{members}, ...], got {list(p.shape)}")
        for key in ("lr", "weight_decay"):
            value = group.get(key)
            if isinstance(value, Tensor):
                member_tensor(key, value, members)
                if not bool(torch.isfinite(value).all() and (value >= 0).all()):
                    label = "learning rate" if key == "lr" else f"{key} value"
                    raise ValueError(f"Invalid {label}: {value} (every value must be a finite number >= 0)")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A key an older state_dict lacks (or torch.optim's lacks: grad_noise_std) means the option
        # did not exist when it was saved: the option off, the constructor's default.
        fill = self._constructor_defaults()
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, fill.get(key, value))
            for p in group["params"]:
                p_state = self.state.get(p)
                if not p_state or "step" not in p_state:
                    continue
                step = p_state["step"]
                if not torch.is_tensor(step):  # older state_dicts store step as a number
                    p_state["step"] = torch.tensor(float(step), dtype=scalar_dtype())
                elif step.device.type != "cpu":
                    # Loaded onto a GPU (torch.load's map_location): the update reads the count as a
                    # number every step, which there would wait for the device each time.
                    p_state["step"] = step.cpu()

    @classmethod
    @functools.cache
    def _constructor_defaults(cls) -> dict[str, Any]:
        """Each keyword argument's default in the subclass's signature."""
        return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Autograd records the update only with differentiable=True (torch.optim's rule: the constructor's flag).
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable"))):
            self._step_groups()
        return loss

    def _step_groups(self) -> None:
        for group in self.param_groups:
            buckets: dict[tuple[torch.device, torch.dtype, bool], list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    if group.get("fused"):
                        check_fusable(p)
                    buckets[(p.device, p.dtype, p.grad.is_sparse)].append(p)
            hypers = {device: self._hyperparameters(group, device) for device, _, _ in buckets}
            for device, _, sparse in buckets:  # before any update, as torch.optim refuses: the group stays as it was
                if sparse:
                    self._check_sparse(hypers[device])
            for (device, dtype, sparse), params in buckets.items():
                hyper = hypers[device]
                states = [self._state_for(p, hyper) for p in params]
                grads = [p.grad for p in params]
                if dtype.is_complex and self.complex_as_real:
                    self._update_as_real(hyper, params, grads, states)
                else:
                    self._update(hyper, params, self._prepared_grads(hyper, params, grads), states)

    def _hyperparameters(self, group: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The group as the update rule reads it: the group itself when ``lr`` and ``weight_decay``
        are numbers (the fast path); else a copy with 1-element tensors as 0-d tensors and
        member-wise ones in float64 on ``device``. Checked here too: ``lr`` may be set at any time."""
        lr, decay, members = group["lr"], group.get("weight_decay", 0.0), group.get("members")
        if members is None and not isinstance(lr, Tensor) and not isinstance(decay, Tensor):
            return group
        hyper = dict(group)
        for key in ("lr", "weight_decay"):
            value = group.get(key)
            if isinstance(value, Tensor):
                value = member_tensor(key, value, members)
                hyper[key] = value.to(device=device, dtype=torch.float64) if value.dim() else value
        return hyper

    def _check_sparse(self, group: dict[str, Any]) -> None:
        """A RuntimeError where the group cannot take a sparse gradient (torch.optim's words where it has them)."""
        if not self.supports_sparse_grads:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients{self.sparse_advice}")
        if group.get("fused"):
            raise RuntimeError(self.fused_sparse_error)
        if group.get("members") is not None:
            raise RuntimeError("sparse gradients are not supported in a member-wise group")
        if l2_decay(group):
            raise RuntimeError("weight_decay option is not compatible with sparse gradients")
        if group["grad_noise_std"] > 0:
            raise RuntimeError("grad_noise_std is not supported with sparse gradients")

    def _update_as_real(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                        states: list[dict[str, Any]]) -> None:
        """Update complex parameters as torch.optim does: as pairs of reals (``view_as_real``), so
        squares and square roots act on the real and imaginary parts separately, from a gradient
        prepared in complex arithmetic (torch.optim adds the L2 decay before the real view; on the real
        views it rounded otherwise). State stays complex (torch.optim's dtypes); tensors the update
        creates are stored back as complex."""
        views = [{k: torch.view_as_real(v) if isinstance(v, Tensor) and v.is_complex() else v
                  for k, v in state.items()} for state in states]
        before = [dict(view) for view in views]
        grads = [torch.view_as_real(g) for g in self._prepared_grads(group, params, grads)]
        self._update(group, [torch.view_as_real(p) for p in params], grads, views)
        for state, view, old in zip(states, views, before):
            for key, value in view.items():
                if value is not old.get(key):
                    state[key] = torch.view_as_complex(value) if isinstance(value, Tensor) else value

    def _prepared_grads(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """The gradients the update rule sees: negated for ``maximize``, plus noise, plus L2 decay.

        ``p.grad`` itself is never modified; any change works on a copy, as torch.optim does.
        """
        l2 = l2_decay(group)
        noise = group["grad_noise_std"]
        if not (group["maximize"] or noise > 0 or l2):
            return grads
        out = self._scratch(grads, "grad")
        if group["maximize"]:
            grads = foreach_into(out, torch._foreach_neg, torch.neg, grads)
        if noise > 0:
            # a standard normal draw per real number (a complex randn would give each part variance 1/2)
            noise_draws = [torch.view_as_complex(torch.randn_like(torch.view_as_real(g))) if g.is_complex()
                           else torch.randn_like(g) for g in grads]
            grads = foreach_into(out, torch._foreach_add, torch.add, grads, noise_draws, alpha=noise)
        if l2:
            grads = add_scaled(out, grads, recorded_copies(params), group["weight_decay"])
        return grads

    def _addcdiv_scaled_(self, targets: list[Tensor], tensor1: list[Tensor], tensor2: list[Tensor],
                         scale: Coef | list[Coef]) -> None:
        """``targets += scale * tensor1 / tensor2``; ``scale`` one coefficient or one per target."""
        first = scale[0] if isinstance(scale, list) else scale
        scales = scale if isinstance(scale, list) else [scale] * len(targets)
        tensor1 = recorded_copies(tensor1)
        if beyond_dtype(scales, targets[0]):
            for t, a, b, s in zip(targets, tensor1, tensor2, scales):
                t.addcdiv_(a * torch.tensor(scalar(s), dtype=t.dtype, device=t.device), b)
        elif applied_as_tensor(first):
            views = [member_views(s, [t])[0] for s, t in zip(scales, targets)]
            # Scale first, then divide: the order of torch's addcdiv (value * tensor1 / tensor2).
            scaled = foreach_into(self._scratch(targets, "scaled"), torch._foreach_mul, torch.mul, tensor1, views)
            torch._foreach_addcdiv_(targets, scaled, tensor2)
        elif isinstance(scale, list):
            torch._foreach_addcdiv_(targets, tensor1, tensor2, [scalar(s) for s in scale]
                                    if isinstance(first, Tensor) else scale)
        else:
            torch._foreach_addcdiv_(targets, tensor1, tensor2, value=scalar(scale))

    def _scratch(self, like: list[Tensor], slot: str) -> list[Tensor] | None:
        """Buffers for an update's temporaries shaped like ``like`` (one set per ``slot``), reused from
        step to step on the CPU; None on other devices, whose caching allocators make fresh
        temporaries free, for sparse tensors, and while autograd records the update
        (``differentiable=True``: it does not record writes into ``out=``). On the CPU, fresh multi-megabyte temporaries
        every step made steps up to 1.6x slower at random: glibc may hand large freed blocks back
        to the OS, and every new one then page-faults in again (measured: up to 140 faults a step).
        Not state: never saved. Keyed by the bucket's dtype and shapes, not by tensor (complex
        parameters arrive as fresh real views each step); buckets are updated one after another,
        so they may share buffers. Made as normal tensors also in a step under ``torch.inference_mode``
        (an inference tensor could not be written by a later step outside it)."""
        first = like[0]
        if first.device.type != "cpu" or first.is_sparse or torch.is_grad_enabled():
            return None
        key = (slot, first.dtype, tuple(t.shape for t in like))
        cache = self.__dict__.setdefault("_scratch_buffers", {})
        out = cache.get(key)
        if out is None:
            with torch.inference_mode(False):
                out = cache[key] = [torch.empty_like(t, memory_format=torch.preserve_format) for t in like]
        return out

    def _state_for(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            self._init_state(p, group, state)
        return state

    @staticmethod
    def _advance_steps(states: list[dict[str, Any]]) -> list[float]:
        """Increment each parameter's ``step`` tensor (kept on the CPU, as torch.optim keeps it)
        and return the new counts as Python floats for the scalar arithmetic."""
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        return [float(t) for t in steps]

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Fill a parameter's state on its first update (torch.optim's keys and dtypes)."""
        raise NotImplementedError

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]]) -> None:
        """Apply one update to ``params`` (one device and dtype) given prepared ``grads``."""
        raise NotImplementedError


def check_fusable(p: Tensor) -> None:
    """torch.optim's refusal, before any update, of a parameter its fused kernels do not take."""
    if not (p.device.type in FUSED_DEVICE_TYPES and torch.is_floating_point(p)):
        raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices: "
                           f"{list(FUSED_DEVICE_TYPES)} but {p.dtype} and {p.device.type}")


def member_tensor(key: str, value: Tensor, members: int | None) -> Tensor:
    """A tensor hyperparameter of a group checked for its shape: one value per member (``[P]`` in a group
    with ``members: P``, also for P = 1: a 0-d value would be read on the host each step), else a
    1-element tensor as a 0-d tensor (any group)."""
    if members is not None and value.shape == (members,):
        return value
    if value.numel() == 1:
        return value.reshape(())
    if members is None:
        raise ValueError(f"Tensor {key} must be 1-element (got shape {list(value.shape)}; for one value per "
                         "member, stack the members along dim 0 and give the group a 'members' key)")
    raise ValueError(f"Tensor {key} must be 1-element or hold one value per member: shape [{members}] "
                     f"for members={members}, got {list(value.shape)}")
