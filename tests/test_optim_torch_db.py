"""PyTorch's own optimizer configurations, run against ours.

``torch.testing._internal.common_optimizers.optim_db`` (shipped in the torch wheel) lists, for each
torch.optim optimizer, the constructor configurations its test suite runs (``optim_inputs_func``)
and the inputs that must raise (``optim_error_inputs_func``). For SGD, Adagrad, Adam and RMSprop,
on the CPU, every configuration that does not set one of torch's implementation switches
(``foreach``, ``fused``, ``capturable``, ``differentiable``) must give ours the trajectory and
state of torch.optim's class (float64 to 1e-12 relative, float32 bitwise; torch's default CPU
path, with a step LR scheduler on the way), and state_dicts must interchange both ways (also one
whose ``step`` was saved as a number, as older state_dicts store it); every error input must
raise the same exception type (or warning) with torch's message as the start of ours.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch
from test_optim import (OURS, TORCH, _roundtrip, assert_state_close, assert_traj_close, clone_params, make_grads,
                        make_params, run)

co = pytest.importorskip("torch.testing._internal.common_optimizers",
                         reason="torch's optimizer test configs need the expecttest package (a dev dependency)")

SWITCHES = ("foreach", "fused", "capturable", "differentiable")
INFOS = {info.optim_cls.__name__: info for info in co.optim_db if info.optim_cls in TORCH.values()}
EXACT = dict(rtol=0.0, atol=0.0)
F64_DB = dict(rtol=1e-12, atol=1e-12)


def configs(name: str, dtype: torch.dtype = torch.float64) -> list[Any]:
    """torch's configurations for ``name`` on the CPU, fresh (a tensor lr is a new tensor each call)."""
    return INFOS[name].optim_inputs_func(device="cpu", dtype=dtype)


def error_inputs(name: str) -> list[Any]:
    return INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)


def sets_a_switch(kwargs: dict[str, Any]) -> bool:
    return any(flag in kwargs for flag in SWITCHES)


CONFIG_CASES = [pytest.param(name, i, id=f"{name}-{c.desc}") for name in OURS
                for i, c in enumerate(configs(name)) if not sets_a_switch(c.kwargs)]
ERROR_CASES = [pytest.param(name, i, id=f"{name}-{e.optimizer_error_input.desc}") for name in OURS
               for i, e in enumerate(error_inputs(name))]


def test_coverage_of_torchs_configs() -> None:
    """The counts docs/optimizers.md reports: every CPU configuration is covered (torch's db adds
    its capturable ones only for GPUs), and every error input."""
    assert {name: sum(1 for p in CONFIG_CASES if p.values[0] == name) for name in OURS} == \
        {"SGD": 9, "Adagrad": 7, "Adam": 5, "RMSprop": 8}
    assert all(len(configs(name)) == len(configs(name, torch.float32)) for name in OURS)
    assert len(ERROR_CASES) == 33


def with_scheduler(opt: torch.optim.Optimizer) -> Any:
    """A step LR schedule halving lr every 10 steps (a tensor lr is written in place, as torch does)."""
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    return lambda t: sched.step()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name,index", CONFIG_CASES)
def test_config_trajectory_matches_torch(name: str, index: int, dtype: torch.dtype) -> None:
    grads, init = make_grads(30, dtype=dtype), make_params(dtype)
    trajectories, optimizers, params = [], [], []
    for cls in (OURS[name], TORCH[name]):
        ps = clone_params(init)
        opt = cls(ps, **configs(name, dtype)[index].kwargs)
        trajectories.append(run(opt, ps, grads, after_step=with_scheduler(opt), check_grad_untouched=True))
        optimizers.append(opt)
        params.append(ps)
    tol = F64_DB if dtype == torch.float64 else EXACT
    assert not torch.equal(trajectories[0][-1][0], init[0]), "the parameters did not move"
    assert_traj_close(trajectories[0], trajectories[1], tol)
    assert_state_close(optimizers[0], optimizers[1], params[0], params[1], tol)


def groups_without_params(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


@pytest.mark.parametrize("step_as_number", [False, True], ids=["tensor-step", "number-step"])
@pytest.mark.parametrize("direction", ["ours->torch", "torch->ours"])
@pytest.mark.parametrize("name,index", CONFIG_CASES)
def test_config_state_dict_interchange(name: str, index: int, direction: str, step_as_number: bool) -> None:
    src_cls, dst_cls = (OURS[name], TORCH[name]) if direction == "ours->torch" else (TORCH[name], OURS[name])
    grads, init = make_grads(20), make_params()

    p_full = clone_params(init)
    traj_full = run(TORCH[name](p_full, **configs(name)[index].kwargs), p_full, grads)

    p_src = clone_params(init)
    src = src_cls(p_src, **configs(name)[index].kwargs)
    traj_first = run(src, p_src, grads[:10])
    sd = _roundtrip(src.state_dict())
    if step_as_number:
        for state in sd["state"].values():
            if "step" in state:
                state["step"] = state["step"].item()

    p_dst = [p.detach().clone().requires_grad_() for p in p_src]
    dst = dst_cls(p_dst, **configs(name)[index].kwargs)
    fresh_groups = groups_without_params(dst)
    dst.load_state_dict(sd)
    if dst_cls is OURS[name]:
        # Loading keeps the saved groups as they are (torch's have no grad_noise_std: filled, off)
        # and gives the keys a fresh optimizer has; a number step becomes torch's tensor.
        assert [set(g) for g in groups_without_params(dst)] == [set(g) for g in fresh_groups]
        saved = [{k: v for k, v in g.items() if k not in ("params", "grad_noise_std")} for g in sd["param_groups"]]
        torch.testing.assert_close([{k: g[k] for k in s} for g, s in zip(groups_without_params(dst), saved)], saved,
                                   **EXACT)
        assert all(g["grad_noise_std"] == 0.0 for g in dst.param_groups)
        for p in p_dst:
            if "step" in dst.state[p]:
                assert torch.is_tensor(dst.state[p]["step"])
    traj_dst = run(dst, p_dst, grads[10:])
    assert_traj_close(traj_first + traj_dst, traj_full, F64_DB, f"{direction} loaded")


def raised(make: Any) -> BaseException | list[warnings.WarningMessage]:
    """The exception ``make()`` raises, or the warnings it gives when it raises none."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            make()
        except Exception as err:  # noqa: BLE001 (what is raised is what is compared)
            return err
    return caught


@pytest.mark.parametrize("name,index", ERROR_CASES)
def test_error_input_raises_like_torch(name: str, index: int) -> None:
    def attempt(cls: type, error: Any) -> BaseException | list[warnings.WarningMessage]:
        oi = error.optimizer_error_input
        if error.error_on == co.OptimizerErrorEnum.CONSTRUCTION_ERROR:
            return raised(lambda: cls(oi.params, **oi.kwargs))
        opt = cls(oi.params, **oi.kwargs)
        return raised(opt.step)

    ours, theirs = attempt(OURS[name], error_inputs(name)[index]), attempt(TORCH[name], error_inputs(name)[index])
    error = error_inputs(name)[index]
    if issubclass(error.error_type, Warning):
        assert isinstance(ours, list) and isinstance(theirs, list)
        ours_msgs = [(w.category, str(w.message)) for w in ours if issubclass(w.category, error.error_type)]
        theirs_msgs = [(w.category, str(w.message)) for w in theirs if issubclass(w.category, error.error_type)]
        assert ours_msgs == theirs_msgs and any(re.search(error.error_regex, m) for _, m in ours_msgs)
        return
    assert isinstance(theirs, error.error_type), f"torch itself: {theirs!r}"
    assert type(ours) is type(theirs), f"ours raised {ours!r}, torch {theirs!r}"
    assert str(ours).startswith(str(theirs)), f"ours: {ours}\ntorch: {theirs}"
    assert re.search(error.error_regex, str(ours))
