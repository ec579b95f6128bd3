"""What our optimizers share: argument checks, the step() protocol, grouping, gradient noise and
the CPU's reusable scratch buffers.

Each optimizer subclasses :class:`Optimizer` and writes only its update rule, as multi-tensor
``torch._foreach_*`` calls over one (device, dtype) bucket of parameters at a time.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


def check_range(name: str, value: Any, low: float, high: float = math.inf, *, high_open: bool = False) -> None:
    """Raise ``ValueError`` unless ``low <= value <= high`` (``< high`` when ``high_open``); NaN fails."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value
    ok = ok and (value < high if high_open else value <= high)
    if not ok or (high == math.inf and not math.isfinite(value)):
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number in {bound})")


class Optimizer(torch.optim.Optimizer):
    """Base class: ``step(closure)`` calls the closure under grad mode, returns its loss, skips
    parameters whose ``grad`` is None and hands each (device, dtype) bucket to :meth:`_update`.

    Complex parameters are updated as pairs of reals with complex state, as torch.optim does.

    Every subclass takes ``grad_noise_std`` (default 0, off): Gaussian noise of that standard
    deviation is added to each gradient before the update (the Keras notebook's experiment). The
    noise draws from torch's global generator, so a seeded run is reproducible.
    """

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        check_range("lr", defaults["lr"], 0.0)
        check_range("weight_decay", defaults.get("weight_decay", 0.0), 0.0)
        check_range("grad_noise_std", defaults.get("grad_noise_std", 0.0), 0.0)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A state_dict saved by torch.optim lacks our extra keys (grad_noise_std): fill defaults.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                    buckets[(p.device, p.dtype)].append(p)
            for (_, dtype), params in buckets.items():
                states = [self._state_for(p, group) for p in params]
                grads = [p.grad for p in params]
                if dtype.is_complex:
                    self._update_as_real(group, params, grads, states)
                else:
                    self._update(group, params, self._prepared_grads(group, params, grads), states)
        return loss

    def _update_as_real(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                        states: list[dict[str, Any]]) -> None:
        """Update complex parameters as torch.optim does: as pairs of reals (``view_as_real``), so
        squares and square roots act on the real and imaginary parts separately. State stays
        complex (torch.optim's dtypes); tensors the update creates are stored back as complex."""
        views = [{k: torch.view_as_real(v) if isinstance(v, Tensor) and v.is_complex() else v
                  for k, v in state.items()} for state in states]
        before = [dict(view) for view in views]
        real_params = [torch.view_as_real(p) for p in params]
        grads = self._prepared_grads(group, real_params, [torch.view_as_real(g) for g in grads])
        self._update(group, real_params, grads, views)
        for state, view, old in zip(states, views, before):
            for key, value in view.items():
                if value is not old.get(key):
                    state[key] = torch.view_as_complex(value) if isinstance(value, Tensor) else value

    def _prepared_grads(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """The gradients the update rule sees: negated for ``maximize``, plus noise, plus L2 decay.

        ``p.grad`` itself is never modified; any change works on a copy, as torch.optim does.
        """
        decay = group["weight_decay"] != 0 and not group.get("decoupled_weight_decay", False)
        if not (group["maximize"] or group["grad_noise_std"] > 0 or decay):
            return grads
        out = self._scratch(params, "grad")
        if group["maximize"]:
            grads = foreach_into(out, torch._foreach_neg, torch.neg, grads)
        if group["grad_noise_std"] > 0:
            noise = [torch.randn_like(g) for g in grads]
            grads = foreach_into(out, torch._foreach_add, torch.add, grads, noise, alpha=group["grad_noise_std"])
        if decay:
            grads = foreach_into(out, torch._foreach_add, torch.add, grads, params, alpha=group["weight_decay"])
        return grads

    def _scratch(self, params: list[Tensor], slot: str) -> list[Tensor] | None:
        """Buffers for an update's parameter-sized temporaries (one set per ``slot``), reused from
        step to step on the CPU; None on other devices, whose caching allocators make fresh
        temporaries free. On the CPU, fresh multi-megabyte temporaries every step made steps up to
        1.6x slower at random: glibc may hand large freed blocks back to the OS, and every new one
        then page-faults in again (measured: up to 140 faults a step). Not state: never saved.
        Keyed by the bucket's dtype and shapes, not by tensor (complex parameters arrive as fresh
        real views each step); buckets are updated one after another, so they may share buffers."""
        if params[0].device.type != "cpu":
            return None
        key = (slot, params[0].dtype, tuple(p.shape for p in params))
        cache = self.__dict__.setdefault("_scratch_buffers", {})
        out = cache.get(key)
        if out is None:
            out = cache[key] = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
        return out

    def _state_for(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            self._init_state(p, group, state)
        return state

    @staticmethod
    def _advance_steps(states: list[dict[str, Any]]) -> list[float]:
        """Increment each parameter's float32 ``step`` tensor (kept on the CPU, as torch.optim
        keeps it) and return the new counts as Python floats for the scalar arithmetic."""
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


def foreach_into(out: list[Tensor] | None, foreach_op: Callable[..., list[Tensor]], op: Callable[..., Tensor],
                 *args: Any, **kwargs: Any) -> list[Tensor]:
    """``foreach_op(*args, **kwargs)``, a fresh list from one multi-tensor call when ``out`` is None;
    else written into the ``out`` buffers by the per-tensor ``op(..., out=)`` (list arguments are
    taken item by item; an argument may be ``out`` itself). Both give the same numbers."""
    if out is None:
        return foreach_op(*args, **kwargs)
    for i, buf in enumerate(out):
        op(*(a[i] if isinstance(a, list) else a for a in args), out=buf, **kwargs)
    return out


def zeros_state(states: list[dict[str, Any]], key: str, params: list[Tensor]) -> list[Tensor]:
    """Each state's ``key`` tensor, created as zeros like its parameter where missing (a state_dict
    saved with other options lacks it). Only then: ``setdefault(key, zeros_like(p))`` would
    allocate and fill a parameter-sized tensor on every step."""
    for state, p in zip(states, params):
        if key not in state:
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return [state[key] for state in states]


def zeros_step() -> Tensor:
    """A fresh ``step`` counter, as torch.optim stores it (float32 scalar on the CPU)."""
    return torch.tensor(0.0, dtype=torch.float32)
