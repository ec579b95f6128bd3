"""optimlab.optim's SGD, Adagrad, Adam and RMSprop against torch.optim.

Each of our optimizers claims to be numerically identical to its torch.optim counterpart. These
tests feed both the same deterministic gradient sequence (set directly on ``p.grad``) and compare
the parameter trajectories and the optimizer state, over every combination of each optimizer's
options, in float64 (to ~1e-10) and float32 (bitwise), and in float16/bfloat16 and complex
parameters. They also cover param groups, missing gradients, LR schedulers, state_dict
interchange with torch.optim, closures, argument checks and the gradient-noise extension.
Everything runs on small CPU tensors in a few seconds.
"""

from __future__ import annotations

import copy
import inspect
import io
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import nn

from optimlab.optim import SGD, Adagrad, Adam, RMSprop
from optimlab.optim.base import Optimizer

SHAPES: list[tuple[int, ...]] = [(5, 3), (4,), (2, 3, 2)]
N_STEPS = 60
F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=1e-5, atol=1e-6)
EXACT = dict(rtol=0.0, atol=0.0)

OURS: dict[str, type[torch.optim.Optimizer]] = {"SGD": SGD, "Adagrad": Adagrad, "Adam": Adam, "RMSprop": RMSprop}
TORCH: dict[str, type[torch.optim.Optimizer]] = {
    "SGD": torch.optim.SGD, "Adagrad": torch.optim.Adagrad, "Adam": torch.optim.Adam, "RMSprop": torch.optim.RMSprop,
}
# A learning rate per optimizer large enough that the options visibly change the trajectory.
LR = {"SGD": 0.05, "Adagrad": 0.1, "Adam": 0.01, "RMSprop": 0.01}
# Every state key torch.optim may create, per optimizer.
# torch.optim's implementation switches, which we accept and store but which select nothing in ours.
IMPLEMENTATION_SWITCHES = {"foreach", "fused", "capturable", "differentiable"}
TORCH_STATE_KEYS = {
    "SGD": {"momentum_buffer"},
    "Adagrad": {"step", "sum"},
    "Adam": {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    "RMSprop": {"step", "square_avg", "momentum_buffer", "grad_avg"},
}


# --------------------------------------------------------------------------- option grids


def _grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


def _sgd_valid(kw: dict[str, Any]) -> bool:
    return not kw["nesterov"] or (kw["momentum"] > 0 and kw["dampening"] == 0)


GRIDS: dict[str, list[dict[str, Any]]] = {
    "SGD": [kw for kw in _grid(momentum=[0.0, 0.9], dampening=[0.0, 0.1], weight_decay=[0.0, 0.01],
                               nesterov=[False, True], maximize=[False, True]) if _sgd_valid(kw)],
    "Adagrad": _grid(lr_decay=[0.0, 0.01], weight_decay=[0.0, 0.1], initial_accumulator_value=[0.0, 0.1],
                     maximize=[False, True]),
    "Adam": _grid(amsgrad=[False, True], weight_decay=[0.0, 0.1], decoupled_weight_decay=[False, True],
                  maximize=[False, True], betas=[(0.9, 0.999), (0.5, 0.9)]),
    "RMSprop": _grid(momentum=[0.0, 0.5], centered=[False, True], weight_decay=[0.0, 0.1],
                     maximize=[False, True], alpha=[0.99, 0.9]),
}


def _case_id(name: str, kw: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "T" if v else "F"
        if isinstance(v, tuple):
            return "/".join(map(str, v))
        return str(v)
    return name + "-" + ",".join(f"{k}={fmt(v)}" for k, v in kw.items())


ALL_CASES = [pytest.param(name, kw, id=_case_id(name, kw)) for name, grid in GRIDS.items() for kw in grid]

# A few option sets per optimizer for the tests that need not sweep the whole grid: the defaults
# and one with every stateful option on.
RICH: dict[str, list[dict[str, Any]]] = {
    "SGD": [{}, dict(momentum=0.9, dampening=0.1, weight_decay=0.01, maximize=True),
            dict(momentum=0.9, nesterov=True, weight_decay=0.01)],
    "Adagrad": [{}, dict(lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1, maximize=True)],
    "Adam": [{}, dict(amsgrad=True, weight_decay=0.1, betas=(0.5, 0.9)),
             dict(amsgrad=True, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)],
    "RMSprop": [{}, dict(momentum=0.5, centered=True, weight_decay=0.1, alpha=0.9, maximize=True)],
}
RICH_CASES = [pytest.param(name, kw, id=_case_id(name, kw)) for name, kws in RICH.items() for kw in kws]


# --------------------------------------------------------------------------- helpers


def make_params(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


def clone_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def make_grads(n_steps: int = N_STEPS, dtype: torch.dtype = torch.float64, seed: int = 1) -> list[list[torch.Tensor]]:
    """A deterministic gradient sequence: Gaussian, with varying scale and ~20% exact zeros
    (so that epsilon terms and zero second moments are exercised)."""
    g = torch.Generator().manual_seed(seed)
    seq = []
    for t in range(n_steps):
        scale = 0.1 + 2.0 * (t % 7) / 7
        step = []
        for s in SHAPES:
            x = torch.randn(s, generator=g, dtype=torch.float64) * scale
            x = x * (torch.rand(s, generator=g, dtype=torch.float64) > 0.2)
            step.append(x.to(dtype))
        seq.append(step)
    return seq


def run(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: list[list[torch.Tensor]], *,
        skip: Callable[[int, int], bool] | None = None, after_step: Callable[[int], None] | None = None,
        check_grad_untouched: bool = False) -> list[list[torch.Tensor]]:
    """Run ``len(grads)`` steps and return the parameter snapshots after each step.

    ``skip(t, i)`` True leaves parameter ``i`` without a gradient (None) at step ``t``."""
    traj = []
    for t, step_grads in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = None if skip is not None and skip(t, i) else g.clone()
        opt.step()
        if check_grad_untouched:
            for i, (p, g) in enumerate(zip(params, step_grads)):
                if p.grad is not None:
                    assert torch.equal(p.grad, g), f"step() modified p.grad of param {i} at step {t}"
        if after_step is not None:
            after_step(t)
        traj.append([p.detach().clone() for p in params])
    return traj


def assert_traj_close(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]], tol: dict[str, float],
                      what: str = "") -> None:
    assert len(a) == len(b)
    flat_a = torch.stack([torch.cat([x.reshape(-1) for x in step]) for step in a])
    flat_b = torch.stack([torch.cat([x.reshape(-1) for x in step]) for step in b])
    try:
        torch.testing.assert_close(flat_a, flat_b, **tol)
    except AssertionError:  # report the first step and parameter that differ
        for t, (pa, pb) in enumerate(zip(a, b)):
            for i, (x, y) in enumerate(zip(pa, pb)):
                torch.testing.assert_close(x, y, **tol, msg=lambda m, t=t, i=i: f"{what} step {t} param {i}: {m}")
        raise


def assert_state_close(ours: torch.optim.Optimizer, ref: torch.optim.Optimizer, params_ours: Sequence[torch.Tensor],
                       params_ref: Sequence[torch.Tensor], tol: dict[str, float]) -> None:
    for i, (po, pr) in enumerate(zip(params_ours, params_ref)):
        so, sr = ours.state.get(po, {}), ref.state.get(pr, {})
        assert set(so) == set(sr), f"param {i}: state keys {sorted(so)} != torch's {sorted(sr)}"
        for key in sr:
            vo, vr = so[key], sr[key]
            if key == "step":
                assert vo.dtype == vr.dtype and vo.device == vr.device, f"param {i} step: {vo!r} vs {vr!r}"
                assert torch.equal(vo, vr), f"param {i} step: {vo} != {vr}"
            elif vr is None:
                assert vo is None
            else:
                assert vo.dtype == vr.dtype and vo.shape == vr.shape, f"param {i} {key}"
                torch.testing.assert_close(vo, vr, **tol, msg=lambda m, i=i, key=key: f"param {i} {key}: {m}")


def ours_and_torch(name: str, kw: dict[str, Any], lr: float | None = None, **torch_kw: Any):
    lr = LR[name] if lr is None else lr
    return (lambda ps: OURS[name](ps, lr=lr, **kw)), (lambda ps: TORCH[name](ps, lr=lr, **kw, **torch_kw))


# --------------------------------------------------------------------------- 1. every option combination


@pytest.mark.parametrize("buffers", ["reused", "fresh"])
@pytest.mark.parametrize("name,kw", ALL_CASES)
def test_matches_torch_float64(name: str, kw: dict[str, Any], buffers: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if buffers == "fresh":  # what a GPU runs: temporaries straight from the multi-tensor ops
        monkeypatch.setattr(Optimizer, "_scratch", lambda self, params, slot: None)
    grads = make_grads()
    init = make_params()
    p_ours = clone_params(init)
    opt_ours = OURS[name](p_ours, lr=LR[name], **kw)
    traj_ours = run(opt_ours, p_ours, grads, check_grad_untouched=True)
    assert not torch.equal(traj_ours[-1][0], init[0]), "the parameters did not move"
    for foreach in (False, True):
        p_ref = clone_params(init)
        opt_ref = TORCH[name](p_ref, lr=LR[name], foreach=foreach, **kw)
        traj_ref = run(opt_ref, p_ref, grads)
        assert_traj_close(traj_ours, traj_ref, F64, f"foreach={foreach}")
        assert_state_close(opt_ours, opt_ref, p_ours, p_ref, F64)


@pytest.mark.parametrize("name,kw", ALL_CASES)
def test_matches_torch_float32(name: str, kw: dict[str, Any]) -> None:
    grads = make_grads(dtype=torch.float32)
    init = make_params(torch.float32)
    p_ours, p_ref = clone_params(init), clone_params(init)
    opt_ours = OURS[name](p_ours, lr=LR[name], **kw)
    opt_ref = TORCH[name](p_ref, lr=LR[name], foreach=False, **kw)
    traj_ours, traj_ref = run(opt_ours, p_ours, grads), run(opt_ref, p_ref, grads)
    assert all(x.dtype == torch.float32 for x in traj_ours[-1])
    # On the CPU the same elementwise operations in the same order: bitwise equal, not just close.
    assert_traj_close(traj_ours, traj_ref, EXACT)
    assert_state_close(opt_ours, opt_ref, p_ours, p_ref, EXACT)


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64], ids=["complex128", "complex64"])
@pytest.mark.parametrize("name,kw", RICH_CASES)
def test_complex_parameters_match_torch(name: str, kw: dict[str, Any], dtype: torch.dtype) -> None:
    """torch.optim updates a complex parameter as a pair of reals (squares and roots act on the
    real and imaginary parts separately), SGD as a complex tensor, and keeps complex state; so must
    ours: bitwise as its default path (SGD as pairs of reals, and L2 decay added on the real views,
    rounded otherwise, ~1e-7 in complex64; a probe), to rounding as its foreach path."""
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=dtype) for s in SHAPES] for _ in range(N_STEPS)]
    p_ours = clone_params(init)
    opt_ours = OURS[name](p_ours, lr=LR[name], **kw)
    traj_ours = run(opt_ours, p_ours, grads, check_grad_untouched=True)
    for foreach in (False, True):
        tol = EXACT if not foreach or name == "SGD" else F64 if dtype == torch.complex128 else F32
        p_ref = clone_params(init)
        opt_ref = TORCH[name](p_ref, lr=LR[name], foreach=foreach, **kw)
        assert_traj_close(traj_ours, run(opt_ref, p_ref, grads), tol, f"foreach={foreach}")
        assert_state_close(opt_ours, opt_ref, p_ours, p_ref, tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name,kw", ALL_CASES)
def test_matches_torch_half_precision(name: str, kw: dict[str, Any], dtype: torch.dtype) -> None:
    """In 16-bit floats torch.optim's own for-loop and multi-tensor paths round differently (up to
    ~2% apart after 30 steps in bfloat16); ours follows the for-loop path, torch's default on the CPU,
    bitwise (a probe: its momentum buffers and averages had followed the multi-tensor path's, one unit of
    rounding a step apart). The default eps underflows to 0 in float16 (then a zero
    gradient gives 0/0 = NaN, for torch.optim as for ours), so eps is 1e-4 here."""
    if name != "SGD":
        kw = {**kw, "eps": 1e-4}
    grads = make_grads(30, dtype=dtype)
    init = make_params(dtype)
    p_ours = clone_params(init)
    traj_ours = run(OURS[name](p_ours, lr=LR[name], **kw), p_ours, grads)
    assert all(x.dtype == dtype for x in traj_ours[-1])
    ours = torch.cat([x.reshape(-1) for x in traj_ours[-1]]).double()
    deviations = []
    for foreach in (False, True):
        p_ref = clone_params(init)
        traj_ref = run(TORCH[name](p_ref, lr=LR[name], foreach=foreach, **kw), p_ref, grads)
        ref = torch.cat([x.reshape(-1) for x in traj_ref[-1]]).double()
        deviations.append(((ours - ref).abs().max() / ref.abs().max()).item())
    assert deviations[0] == 0, f"relative deviation from torch's paths (for-loop, multi-tensor): {deviations}"


@pytest.mark.parametrize("name", list(OURS))
def test_constructor_arguments_are_torchs(name: str) -> None:
    """Torch's arguments, in its order, kinds and defaults (a probe: ours wrote 0.0 where torch writes 0, which
    showed in repr() and in state_dict()); then ours: grad_noise_std."""
    def arguments(cls: type) -> list[tuple[str, Any, Any]]:
        return [(a.name, a.kind, repr(a.default)) for a in inspect.signature(cls).parameters.values()]

    ours, theirs = arguments(OURS[name]), arguments(TORCH[name])
    assert [a for a in ours if a[0] != "grad_noise_std"] == theirs and ours[-1][:1] == ("grad_noise_std",)
    assert repr(OURS[name](make_params())).replace("    grad_noise_std: 0.0\n", "") == repr(TORCH[name](make_params()))


def test_grid_sizes() -> None:
    # SGD: 32 combinations less 8 (nesterov, momentum 0) and 4 (nesterov with dampening).
    assert {k: len(v) for k, v in GRIDS.items()} == {"SGD": 20, "Adagrad": 16, "Adam": 32, "RMSprop": 32}


# --------------------------------------------------------------------------- 2. param groups


GROUP_OPTIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "SGD": (dict(lr=0.05, momentum=0.9, dampening=0.1), dict(lr=0.02, momentum=0.5, nesterov=True, weight_decay=0.01)),
    # (A per-group initial_accumulator_value is test_adagrad_per_group_initial_accumulator_value.)
    "Adagrad": (dict(lr=0.1), dict(lr=0.03, lr_decay=0.05, eps=1e-6, weight_decay=0.1, maximize=True)),
    "Adam": (dict(lr=0.01), dict(lr=0.003, betas=(0.5, 0.9), amsgrad=True, weight_decay=0.1,
                                 decoupled_weight_decay=True)),
    "RMSprop": (dict(lr=0.01), dict(lr=0.002, alpha=0.9, momentum=0.5, centered=True, weight_decay=0.1)),
}


@pytest.mark.parametrize("name", list(OURS))
@pytest.mark.parametrize("foreach", [False, True])
def test_param_groups(name: str, foreach: bool) -> None:
    first, second = GROUP_OPTIONS[name]
    grads, init = make_grads(), make_params()

    def groups(ps: list[torch.Tensor]) -> list[dict[str, Any]]:
        return [dict(params=ps[:2], **first), dict(params=ps[2:], **second)]

    p_ours, p_ref = clone_params(init), clone_params(init)
    opt_ours, opt_ref = OURS[name](groups(p_ours)), TORCH[name](groups(p_ref), foreach=foreach)
    assert [g["lr"] for g in opt_ours.param_groups] == [first["lr"], second["lr"]]
    traj_ours, traj_ref = run(opt_ours, p_ours, grads), run(opt_ref, p_ref, grads)
    assert_traj_close(traj_ours, traj_ref, F64)
    assert_state_close(opt_ours, opt_ref, p_ours, p_ref, F64)
    # The groups really differ: the same start under group 1's options alone ends elsewhere.
    p_single = clone_params(init)
    traj_single = run(OURS[name](p_single, **first), p_single, grads)
    assert not torch.allclose(traj_single[-1][2], traj_ours[-1][2])


# torch.optim.Adagrad fills 'sum' with the constructor's initial_accumulator_value for every
# group, ignoring a per-group value; we follow it so trajectories stay identical.
@pytest.mark.parametrize("foreach", [False, True])
def test_adagrad_per_group_initial_accumulator_value(foreach: bool) -> None:
    grads, init = make_grads(), make_params()

    def groups(ps: list[torch.Tensor]) -> list[dict[str, Any]]:
        return [dict(params=ps[:2]), dict(params=ps[2:], initial_accumulator_value=0.2)]

    p_ours, p_ref = clone_params(init), clone_params(init)
    opt_ours, opt_ref = Adagrad(groups(p_ours), lr=0.1), torch.optim.Adagrad(groups(p_ref), lr=0.1, foreach=foreach)
    assert_traj_close(run(opt_ours, p_ours, grads), run(opt_ref, p_ref, grads), F64)


# --------------------------------------------------------------------------- 3. missing gradients


@pytest.mark.parametrize("name,kw", RICH_CASES)
@pytest.mark.parametrize("foreach", [False, True])
def test_grad_none_some_steps(name: str, kw: dict[str, Any], foreach: bool) -> None:
    grads, init = make_grads(), make_params()

    def skip(t: int, i: int) -> bool:
        return i == 1 and t % 3 == 0  # param 1 has no gradient on steps 0, 3, 6, ...

    p_ours, p_ref = clone_params(init), clone_params(init)
    opt_ours = OURS[name](p_ours, lr=LR[name], **kw)
    opt_ref = TORCH[name](p_ref, lr=LR[name], foreach=foreach, **kw)

    def check_first_step(t: int) -> None:
        if t == 0:
            assert torch.equal(p_ours[1], init[1]), "a parameter without gradient moved"
            if name != "Adagrad":  # Adagrad (ours and torch) creates its state at construction
                assert not opt_ours.state.get(p_ours[1]), "state created before the first gradient"

    traj_ours = run(opt_ours, p_ours, grads, skip=skip, after_step=check_first_step)
    traj_ref = run(opt_ref, p_ref, grads, skip=skip)
    assert_traj_close(traj_ours, traj_ref, F64)
    assert_state_close(opt_ours, opt_ref, p_ours, p_ref, F64)
    if "step" in TORCH_STATE_KEYS[name]:
        assert opt_ours.state[p_ours[0]]["step"].item() == N_STEPS
        assert opt_ours.state[p_ours[1]]["step"].item() == N_STEPS - len(range(0, N_STEPS, 3))


# --------------------------------------------------------------------------- 4. schedulers / live hyperparameters


@pytest.mark.parametrize("name,kw", RICH_CASES)
@pytest.mark.parametrize("every", [1, 10])
def test_step_lr_scheduler(name: str, kw: dict[str, Any], every: int) -> None:
    grads, init = make_grads(), make_params()
    results = []
    for factory in ours_and_torch(name, kw, foreach=False):
        ps = clone_params(init)
        opt = factory(ps)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)

        def after(t: int, sched=sched) -> None:
            if (t + 1) % every == 0:
                sched.step()

        results.append((run(opt, ps, grads, after_step=after), opt, ps))
    (traj_ours, opt_ours, p_ours), (traj_ref, opt_ref, p_ref) = results
    n_sched = N_STEPS // every
    assert opt_ours.param_groups[0]["lr"] == pytest.approx(LR[name] * 0.5 ** (n_sched // 5))
    assert_traj_close(traj_ours, traj_ref, F64)
    assert_state_close(opt_ours, opt_ref, p_ours, p_ref, F64)
    # And the schedule matters: without it the trajectory differs.
    p_plain = clone_params(init)
    traj_plain = run(OURS[name](p_plain, lr=LR[name], **kw), p_plain, grads)
    assert not torch.allclose(traj_plain[-1][0], traj_ours[-1][0])


# Hyperparameters (other than lr) edited in the param group mid-run take effect on the next step.
LIVE_EDITS: dict[str, dict[str, Any]] = {
    "SGD": dict(lr=0.01, dampening=0.3, weight_decay=0.05),
    "Adagrad": dict(lr=0.05, lr_decay=0.1, weight_decay=0.2, eps=1e-3),
    "Adam": dict(lr=0.02, betas=(0.7, 0.95), eps=1e-3, weight_decay=0.05),
    "RMSprop": dict(lr=0.02, alpha=0.8, eps=1e-3, weight_decay=0.05, momentum=0.2),
}


@pytest.mark.parametrize("name,kw", RICH_CASES)
def test_hyperparameters_read_every_step(name: str, kw: dict[str, Any]) -> None:
    grads, init = make_grads(), make_params()
    edits = dict(LIVE_EDITS[name])
    if name in ("SGD", "RMSprop") and not kw.get("momentum"):
        edits.pop("momentum", None)  # torch.optim creates momentum buffers only if momentum was on at init
    if name == "SGD" and kw.get("nesterov"):
        edits.pop("dampening")
    trajs = []
    for factory in ours_and_torch(name, kw, foreach=False):
        ps = clone_params(init)
        opt = factory(ps)

        def after(t: int, opt=opt) -> None:
            if t == N_STEPS // 2:
                opt.param_groups[0].update(edits)

        trajs.append(run(opt, ps, grads, after_step=after))
    assert_traj_close(trajs[0], trajs[1], F64)


# --------------------------------------------------------------------------- 5. state_dict interchange


def _roundtrip(sd: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name,kw", RICH_CASES + [
    pytest.param("RMSprop", dict(momentum=0.5), id="RMSprop-momentum=0.5"),
    pytest.param("RMSprop", dict(centered=True), id="RMSprop-centered=T"),
    pytest.param("Adam", dict(amsgrad=True), id="Adam-amsgrad=T"),
    pytest.param("SGD", dict(momentum=0.9), id="SGD-momentum=0.9"),
])
@pytest.mark.parametrize("direction", ["ours->torch", "torch->ours", "ours->ours"])
def test_state_dict_interchange(name: str, kw: dict[str, Any], direction: str) -> None:
    grads, init = make_grads(40), make_params()
    make_ours, make_torch = ours_and_torch(name, kw, foreach=False)
    src_factory, dst_factory = {
        "ours->torch": (make_ours, make_torch), "torch->ours": (make_torch, make_ours),
        "ours->ours": (make_ours, make_ours),
    }[direction]

    # Uninterrupted reference runs (ours and torch agree, as tested above).
    p_full = clone_params(init)
    traj_full = run(make_torch(p_full), p_full, grads)

    # 20 steps on the source side, then save.
    p_src = clone_params(init)
    opt_src = src_factory(p_src)
    traj_first = run(opt_src, p_src, grads[:20])
    sd = _roundtrip(copy.deepcopy(opt_src.state_dict()))

    # Keys: the saved state has exactly torch.optim's keys for these options.
    p_tmp = clone_params(init)
    opt_tmp = make_torch(p_tmp)
    run(opt_tmp, p_tmp, grads[:20])
    sd_torch = opt_tmp.state_dict()
    # (Which parameters have a state entry at all is checked in test_state_dict_keys_match_torch.)
    assert {i for i, st in sd["state"].items() if st} == {i for i, st in sd_torch["state"].items() if st}
    for idx in sd_torch["state"]:
        assert set(sd["state"][idx]) == set(sd_torch["state"][idx]), f"param {idx}"
        assert set(sd["state"][idx]) <= TORCH_STATE_KEYS[name]
    for g_src, g_ref in zip(sd["param_groups"], sd_torch["param_groups"]):
        for key in (set(g_src) & set(g_ref)) - IMPLEMENTATION_SWITCHES:  # torch's side set foreach=False
            assert g_src[key] == g_ref[key], key

    # Load into a fresh optimizer over identical parameter copies and continue 20 steps; the
    # source optimizer also continues. Both must follow the uninterrupted trajectory.
    p_dst = [p.detach().clone().requires_grad_() for p in p_src]
    opt_dst = dst_factory(p_dst)
    opt_dst.load_state_dict(sd)
    traj_dst = run(opt_dst, p_dst, grads[20:])
    traj_src = run(opt_src, p_src, grads[20:])
    assert_traj_close(traj_first + traj_src, traj_full, F64, "source")
    assert_traj_close(traj_first + traj_dst, traj_full, F64, f"{direction} loaded")
    assert_state_close(opt_dst, opt_src, p_dst, p_src, F64)
    if "step" in TORCH_STATE_KEYS[name]:
        assert opt_dst.state[p_dst[0]]["step"].item() == 40


@pytest.mark.parametrize("name,kw", ALL_CASES)
def test_state_dict_keys_match_torch(name: str, kw: dict[str, Any]) -> None:
    grads, init = make_grads(3), make_params()
    sds = []
    for factory in ours_and_torch(name, kw, foreach=False):
        ps = clone_params(init)
        opt = factory(ps)
        before = opt.state_dict()
        run(opt, ps, grads)
        sds.append((before, opt.state_dict()))
    (ours_before, ours_after), (ref_before, ref_after) = sds
    for ours_sd, ref_sd in ((ours_before, ref_before), (ours_after, ref_after)):
        assert set(ours_sd["state"]) == set(ref_sd["state"])
        for idx, ref_state in ref_sd["state"].items():
            assert set(ours_sd["state"][idx]) == set(ref_state)
    # Our group keys are torch's (its implementation switches included) plus grad_noise_std.
    ours_keys, ref_keys = set(ours_after["param_groups"][0]), set(ref_after["param_groups"][0])
    assert ours_keys == ref_keys | {"grad_noise_std"}


# --------------------------------------------------------------------------- 6. closures


@pytest.mark.parametrize("name,kw", RICH_CASES)
def test_step_with_closure(name: str, kw: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randn(16, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model_ours = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model_ref = copy.deepcopy(model_ours)
    opt_ours = OURS[name](model_ours.parameters(), lr=LR[name], **kw)
    opt_ref = TORCH[name](model_ref.parameters(), lr=LR[name], foreach=False, **kw)

    def closure_for(model: nn.Module, opt: torch.optim.Optimizer, log: list):
        def closure() -> torch.Tensor:
            log.append(torch.is_grad_enabled())
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            log.append(loss)
            return loss
        return closure

    losses = []
    for _ in range(15):
        log_ours, log_ref = [], []
        with torch.no_grad():  # step() must still enable grad for the closure
            loss_ours = opt_ours.step(closure_for(model_ours, opt_ours, log_ours))
        loss_ref = opt_ref.step(closure_for(model_ref, opt_ref, log_ref))
        assert len(log_ours) == 2 and log_ours[0] is True, "closure not called once with grad enabled"
        assert loss_ours is log_ours[1], "step(closure) must return the closure's loss"
        torch.testing.assert_close(loss_ours, loss_ref, **F64)
        losses.append(loss_ours.item())
    for po, pr in zip(model_ours.parameters(), model_ref.parameters()):
        torch.testing.assert_close(po, pr, **F64)
    if not kw.get("maximize"):
        assert losses[-1] < losses[0]
    else:
        assert losses[-1] > losses[0]
    assert OURS[name](model_ours.parameters(), lr=LR[name]).step() is None  # no closure: None


# --------------------------------------------------------------------------- 7. argument checks


INVALID = [
    (SGD, dict(lr=-0.1)), (SGD, dict(lr=float("nan"))), (SGD, dict(momentum=-0.5)),
    (SGD, dict(weight_decay=-1e-4)), (SGD, dict(dampening=-0.1)),
    (SGD, dict(nesterov=True, momentum=0.0)), (SGD, dict(nesterov=True, momentum=0.9, dampening=0.1)),
    (Adagrad, dict(lr=-1.0)), (Adagrad, dict(lr=float("nan"))), (Adagrad, dict(lr_decay=-0.01)),
    (Adagrad, dict(initial_accumulator_value=-0.1)), (Adagrad, dict(eps=-1e-10)),
    (Adagrad, dict(weight_decay=-0.1)),
    (Adam, dict(lr=-1e-3)), (Adam, dict(lr=float("nan"))), (Adam, dict(betas=(1.0, 0.999))),
    (Adam, dict(betas=(0.9, 1.5))), (Adam, dict(betas=(-0.1, 0.9))), (Adam, dict(betas=(0.9, -0.1))),
    (Adam, dict(betas=(0.9, 1.0))), (Adam, dict(eps=-1e-8)), (Adam, dict(weight_decay=-0.1)),
    (RMSprop, dict(lr=-0.01)), (RMSprop, dict(lr=float("nan"))), (RMSprop, dict(alpha=1.5)),
    (RMSprop, dict(alpha=-0.1)), (RMSprop, dict(eps=-1e-8)), (RMSprop, dict(momentum=-0.1)),
    (RMSprop, dict(weight_decay=-0.1)),
] + [(cls, dict(grad_noise_std=-1.0)) for cls in (SGD, Adagrad, Adam, RMSprop)]


@pytest.mark.parametrize("cls,kw", [pytest.param(c, k, id=f"{c.__name__}-{k}") for c, k in INVALID])
def test_invalid_hyperparameters(cls: type, kw: dict[str, Any]) -> None:
    # torch.optim's words first ("Invalid momentum value: -0.5"), our rule after them.
    with pytest.raises(ValueError, match=r"^(Invalid [a-z_ ]+\d?: \S+ \(must be |Nesterov momentum requires a momentum "
                                         r"and zero dampening \()"):
        cls(make_params(), **kw)


@pytest.mark.parametrize("cls", [SGD, Adagrad, Adam, RMSprop])
def test_valid_edge_hyperparameters(cls: type) -> None:
    cls(make_params(), lr=0.0, weight_decay=0.0)  # zero lr / decay are allowed
    if cls is Adam:
        cls(make_params(), betas=(0.0, 0.0), eps=0.0)
    if cls is RMSprop:
        cls(make_params(), alpha=1.0)
    if cls is SGD:
        cls(make_params(), momentum=0.9, nesterov=True)


# --------------------------------------------------------------------------- 8. gradient noise


@pytest.mark.parametrize("name,kw", RICH_CASES)
def test_grad_noise_deterministic_and_effective(name: str, kw: dict[str, Any]) -> None:
    grads, init = make_grads(20), make_params()

    def noisy_run(std: float, seed: int = 1234) -> list[list[torch.Tensor]]:
        torch.manual_seed(seed)
        ps = clone_params(init)
        opt = OURS[name](ps, lr=LR[name], grad_noise_std=std, **kw)
        return run(opt, ps, grads, check_grad_untouched=True)

    a, b = noisy_run(0.5), noisy_run(0.5)
    assert_traj_close(a, b, dict(rtol=0, atol=0))
    clean = noisy_run(0.0)
    assert not torch.allclose(a[-1][0], clean[-1][0]), "noise had no effect"
    assert not torch.allclose(noisy_run(0.5, seed=99)[-1][0], a[-1][0]), "noise ignores the seed"
    # grad_noise_std=0 is exactly torch.optim.
    p_ref = clone_params(init)
    assert_traj_close(clean, run(TORCH[name](p_ref, lr=LR[name], **kw), p_ref, grads), F64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=["float64", "complex128"])
def test_grad_noise_distribution(dtype: torch.dtype) -> None:
    # Zero gradient, lr 1, plain SGD: the update is exactly minus the noise, N(0, std^2) in every real
    # number (a complex gradient drew std/sqrt(2) per part until 2026-12-07, when complex gradients were
    # first prepared in complex arithmetic; the classes that update complex parameters as pairs of reals had
    # drawn std per part).
    std = 0.5
    p = torch.zeros(20000, dtype=dtype, requires_grad=True)
    p.grad = torch.zeros_like(p)
    torch.manual_seed(0)
    SGD([p], lr=1.0, grad_noise_std=std).step()
    assert torch.equal(p.grad, torch.zeros_like(p))
    for noise in (torch.view_as_real(-p.detach()).unbind(-1) if dtype.is_complex else [-p.detach()]):
        assert abs(noise.mean().item()) < 4 * std / math.sqrt(p.numel())
        assert noise.std().item() == pytest.approx(std, rel=0.03)


# --------------------------------------------------------------------------- 9. no per-step temporaries on the CPU


@pytest.mark.parametrize("name,kw", RICH_CASES)
def test_cpu_steps_allocate_no_parameter_sized_temporaries(name: str, kw: dict[str, Any]) -> None:
    # Fresh parameter-sized temporaries on every step page-fault on the CPU (Optimizer._scratch);
    # after the first step (state and scratch buffers), a step allocates at most a few scalars.
    from torch.profiler import ProfilerActivity, profile

    params = [torch.randn(300, 200, requires_grad=True), torch.randn(200, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = OURS[name](params, lr=LR[name], **kw)
    opt.step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(3):
            opt.step()
    largest = max((event.cpu_memory_usage for event in prof.events()), default=0)
    assert largest < 200 * 4, f"a step allocated {largest} bytes"


@pytest.mark.parametrize("options", [{}, {"weight_decay": 100.0, "decoupled_weight_decay": True}])
def test_a_coefficient_beyond_the_weights_dtype_leaves_them_non_finite(options: dict) -> None:
    """float32 Adam at lr 1e38: lr / (1 - beta1) (and 1 - lr * weight_decay) do not fit float32; torch.optim
    refuses the conversion (a RuntimeError mid-run), ours apply it as inf: a diverging run's result."""
    from optimlab.optim import Adam

    weights = torch.nn.Parameter(torch.ones(3))
    weights.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="without overflow"):
        torch.optim.Adam([weights], lr=1e38, **options).step()
    Adam([weights], lr=1e38, **options).step()
    assert not torch.isfinite(weights).any()
