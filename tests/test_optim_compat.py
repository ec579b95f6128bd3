"""Drop-in details of optimlab.optim against torch.optim beyond the option grids of test_optim:
sparse gradients, a tensor lr put into a param group later, Adam's tensor betas, torch's
implementation switches, older state_dicts and copies of an optimizer. float64 and float32 CPU
tensors; torch.optim's default CPU path is the reference, matched bitwise."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import torch

from optimlab.optim import SGD, Adagrad, Adam, RMSprop
from test_optim import (LR, OURS, RICH_CASES, TORCH, assert_state_close, assert_traj_close, clone_params, make_grads,
                        make_params, run)

EXACT = dict(rtol=0.0, atol=0.0)


# --------------------------------------------------------------------------- sparse gradients


def sparse_grads(n_steps: int = 40, seed: int = 2) -> list[list[torch.Tensor]]:
    """Uncoalesced sparse gradients of a [6] and a [5, 3] parameter: each step touches a few rows,
    some twice (the values of a repeated index add up)."""
    g = torch.Generator().manual_seed(seed)
    seq = []
    for _ in range(n_steps):
        step = []
        for shape in ((6,), (5, 3)):
            rows = torch.randint(0, shape[0], (4,), generator=g)
            values = torch.randn((4, *shape[1:]), generator=g, dtype=torch.float64)
            step.append(torch.sparse_coo_tensor(rows.unsqueeze(0), values, shape))
        seq.append(step)
    return seq


SPARSE_CASES = [
    ("SGD", {}), ("SGD", dict(momentum=0.9, dampening=0.2)), ("SGD", dict(momentum=0.9, nesterov=True)),
    ("SGD", dict(maximize=True)), ("Adagrad", {}), ("Adagrad", dict(lr_decay=0.05, initial_accumulator_value=0.1)),
    ("Adagrad", dict(maximize=True, eps=1e-3)),
]


@pytest.mark.parametrize("name,kw", SPARSE_CASES)
def test_sparse_gradients_match_torch(name: str, kw: dict[str, Any]) -> None:
    grads = sparse_grads()
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(6, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)]
    results = []
    for cls in (OURS[name], TORCH[name]):
        ps = clone_params(init)
        opt = cls(ps, lr=LR[name], **kw)
        results.append((run(opt, ps, grads), opt, ps))
    (traj, opt, ps), (traj_ref, opt_ref, ps_ref) = results
    assert_traj_close(traj, traj_ref, EXACT)
    assert_state_close(opt, opt_ref, ps, ps_ref, EXACT)
    for p, g in zip(ps, grads[-1]):  # the last gradients, as set, untouched by the step
        assert p.grad.is_sparse and torch.equal(p.grad.to_dense(), g.to_dense())
    # SGD's update is linear in the gradient: given dense, the same gradients reach the same place
    # (to rounding: repeated indices are summed in another order). Adagrad's dense rule differs.
    if name == "SGD":
        ps_dense = clone_params(init)
        traj_dense = run(OURS[name](ps_dense, lr=LR[name], **kw), ps_dense, [[x.to_dense() for x in s] for s in grads])
        assert_traj_close(traj, traj_dense, dict(rtol=1e-12, atol=1e-12))


def refused_sparse_step(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> str:
    """The message of ``opt``'s refusal of a sparse gradient of ``params[1]`` beside dense ones, after
    checking that the refused step changed no parameter (ours updated the dense ones first; a probe)."""
    before = [p.detach().clone() for p in params]
    for i, p in enumerate(params):
        p.grad = torch.eye(4)[0].to_sparse() if i == 1 else torch.ones(4)
    with pytest.raises(RuntimeError) as refused:
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    return str(refused.value)


@pytest.mark.parametrize("cls", [Adam, RMSprop])
def test_sparse_gradients_refused_like_torch(cls: type) -> None:
    messages = []
    for make in (cls, TORCH[cls.__name__]):
        params = [torch.zeros(4, requires_grad=True) for _ in range(3)]
        messages.append(refused_sparse_step(make(params), params))
    assert messages[0] == messages[1]  # Adam's: ", please consider SparseAdam instead"
    assert messages[0].startswith(f"{cls.__name__} does not support sparse gradients")


@pytest.mark.parametrize("cls", [SGD, Adagrad])
def test_sparse_gradients_with_weight_decay_refused(cls: type) -> None:
    params = [torch.zeros(4, requires_grad=True) for _ in range(3)]
    assert refused_sparse_step(cls(params, weight_decay=0.1), params) == \
        "weight_decay option is not compatible with sparse gradients"


@pytest.mark.parametrize("name,kw", [("Adagrad", {}), ("SGD", dict(maximize=True)), ("SGD", dict(weight_decay=0.1))])
def test_a_step_under_inference_mode_leaves_later_steps_working(name: str, kw: dict[str, Any]) -> None:
    """Temporaries made in a step under ``torch.inference_mode`` were inference tensors, which the next
    step outside it could not write ("Inplace update to inference tensor"; a probe); torch.optim goes on."""
    trajectories = []
    for cls in (OURS[name], TORCH[name]):
        p = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 5))
        opt = cls([p], lr=0.1, **kw)
        for step in range(3):
            p.grad = torch.linspace(0.5, -0.5, 5) * (step + 1)
            with torch.inference_mode(step == 0):
                opt.step()
        trajectories.append(p.detach().clone())
    assert torch.equal(trajectories[0], trajectories[1])


def test_adagrad_shares_its_accumulators_as_torchs_does() -> None:
    opt = Adagrad([torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)])
    opt.share_memory()  # torch.optim.Adagrad's method, for Hogwild training
    assert all(state["sum"].is_shared() for state in opt.state.values())


# --------------------------------------------------------------------------- tensor hyperparameters


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name,kw", RICH_CASES)
def test_tensor_lr_put_into_a_group_later(name: str, kw: dict[str, Any], dtype: torch.dtype) -> None:
    """A float lr at construction, a 1-element float32 tensor from step 10 on, then a [1]-shaped
    one from step 20 on (torch squeezes it): ours uses them as torch.optim does, bitwise."""
    grads, init = make_grads(30, dtype=dtype), make_params(dtype)
    results = []
    for cls in (OURS[name], TORCH[name]):
        ps = clone_params(init)
        opt = cls(ps, lr=LR[name], **kw)

        def switch(t: int, opt: torch.optim.Optimizer = opt) -> None:
            if t == 9:
                opt.param_groups[0]["lr"] = torch.tensor(LR[name] / 3)
            if t == 19:
                opt.param_groups[0]["lr"] = torch.tensor([LR[name] * 1.7])

        results.append((run(opt, ps, grads, after_step=switch), opt, ps))
    (traj, opt, ps), (traj_ref, opt_ref, ps_ref) = results
    assert_traj_close(traj, traj_ref, EXACT)
    assert_state_close(opt, opt_ref, ps, ps_ref, EXACT)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.3, 0.8)], ids=["betas=0.9/0.999", "betas=0.3/0.8"])
@pytest.mark.parametrize("kw", [{}, dict(amsgrad=True, weight_decay=0.1, decoupled_weight_decay=True)],
                         ids=["default", "amsgrad-adamw"])
def test_adam_tensor_betas_and_lr(kw: dict[str, Any], betas: tuple[float, float], dtype: torch.dtype) -> None:
    """float32 tensor betas and lr, as torch.optim uses them (its arithmetic in float32; 1 - beta1
    in the parameters' dtype): bitwise equal also where 1 - beta1 is not exact in float32."""
    grads, init = make_grads(30, dtype=dtype), make_params(dtype)
    results = []
    for cls in (Adam, torch.optim.Adam):
        ps = clone_params(init)
        opt = cls(ps, lr=torch.tensor(0.01), betas=(torch.tensor(betas[0]), torch.tensor([betas[1]])), **kw)
        results.append((run(opt, ps, grads), opt, ps))
    (traj, opt, ps), (traj_ref, opt_ref, ps_ref) = results
    assert opt.defaults["betas"][1].shape == torch.Size([])
    assert_traj_close(traj, traj_ref, EXACT)
    assert_state_close(opt, opt_ref, ps, ps_ref, EXACT)


@pytest.mark.parametrize("kw, message", [
    (dict(betas=(0.9, torch.tensor(0.99))), "^betas must be either both floats or both Tensors"),
    (dict(betas=(torch.tensor([0.9, 0.8]), torch.tensor(0.99))), r"^Tensor betas\[0\] must be 1-element"),
    (dict(betas=(torch.tensor(1.0), torch.tensor(0.99))), "^Invalid beta parameter at index 0: 1.0 "),
    (dict(lr=torch.tensor(-0.5)), "^Invalid learning rate: -0.5 "),
])
def test_adam_tensor_hyperparameter_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Adam(make_params(), **kw)


# --------------------------------------------------------------------------- implementation switches


SWITCHES = {"SGD": ("foreach", "differentiable", "fused"), "Adagrad": ("foreach", "differentiable", "fused"),
            "Adam": ("foreach", "capturable", "differentiable", "fused"),
            "RMSprop": ("capturable", "foreach", "differentiable")}


@pytest.mark.parametrize("name", list(OURS))
def test_implementation_switches_accepted(name: str) -> None:
    """torch.optim's switches: stored as torch stores them; foreach and fused select nothing (ours is
    one multi-tensor implementation, torch's for-loop numbers), nor does differentiable (on tensors that
    need no grad); capturable only off, else a clear error."""
    grads, init = make_grads(10), make_params()
    on = [{}, {flag: False for flag in SWITCHES[name]}, {"foreach": True}, {"differentiable": True}]
    on += [{"fused": True}] if "fused" in SWITCHES[name] else []
    trajectories = []
    for switches in on:
        ps = [p.detach() for p in clone_params(init)]  # differentiable=True steps leaf tensors needing no grad
        opt = OURS[name](ps, lr=LR[name], **switches)
        for flag in SWITCHES[name]:
            assert opt.param_groups[0][flag] == switches.get(flag, TORCH[name]([torch.zeros(1)]).defaults[flag])
        trajectories.append(run(opt, ps, grads))
    for other in trajectories[1:]:
        assert_traj_close(trajectories[0], other, EXACT)
    if "capturable" in SWITCHES[name]:
        with pytest.raises(ValueError, match="^capturable=True is not supported"):
            OURS[name](make_params(), capturable=True)
        with pytest.raises(ValueError, match="^capturable=True is not supported"):
            OURS[name]([{"params": make_params(), "capturable": True}])


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "Adam"])
def test_fused_refuses_what_torch_refuses(name: str) -> None:
    """fused=True: torch's errors, in its words, for what its fused kernels do not take (parameters on the
    meta device: refused at the step; then moved to the CPU, the optimizer steps, as in torch's own test)."""
    for cls in (OURS[name], TORCH[name]):
        with pytest.raises(RuntimeError, match="^`fused` does not support `differentiable`$"):
            cls(make_params(), fused=True, differentiable=True)
        with pytest.raises(RuntimeError, match="^`fused` and `foreach` cannot be `True` together.$"):
            cls(make_params(), fused=True, foreach=True)
    messages = []
    for cls in (OURS[name], TORCH[name]):
        with torch.device("meta"):
            model = torch.nn.Linear(3, 2)
        opt = cls(model.parameters(), fused=True)
        with torch.device("meta"):
            for p in model.parameters():
                p.grad = torch.rand_like(p)
        with pytest.raises(RuntimeError) as refused:
            opt.step()
        messages.append(str(refused.value))
        opt.zero_grad(set_to_none=True)
        model.to_empty(device="cpu")
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    assert messages[0] == messages[1]
    if name in ("SGD", "Adagrad"):  # which take sparse gradients, but not fused (a review)
        sparse = []
        for cls in (OURS[name], TORCH[name]):
            embedding = torch.nn.Embedding(5, 3, sparse=True)
            opt = cls(embedding.parameters(), lr=0.1, fused=True)
            embedding(torch.tensor([1, 2])).sum().backward()
            with pytest.raises(RuntimeError) as refused:
                opt.step()
            sparse.append(str(refused.value))
        assert sparse[0] == sparse[1]
    ints = [torch.zeros(3, dtype=torch.int64)]
    ints[0].grad = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="^`fused=True` requires all the params to be floating point Tensors"):
        OURS[name](ints, fused=True).step()


def adam_state() -> dict[str, torch.Tensor]:
    return {"step": torch.tensor(10.0, dtype=torch.float64), "exp_avg": rand_grad(), "exp_avg_sq": rand_grad(),
            "max_exp_avg_sq": rand_grad()}


def rand_grad() -> torch.Tensor:
    return torch.rand(6, dtype=torch.float64, requires_grad=True)


# The state, then the options of TestDifferentiableOptimizer's cases (PyTorch's test/optim/test_optim.py),
# and more of each optimizer's options.
DIFFERENTIABLE_CASES = [
    ("SGD", lambda: {"momentum_buffer": rand_grad()}, {"lr": 0.9}),
    ("SGD", lambda: {"momentum_buffer": rand_grad()},
     {"lr": 0.9, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "maximize": True}),
    ("SGD", lambda: {"momentum_buffer": rand_grad()}, {"lr": 0.5, "momentum": 0.8, "dampening": 0.3}),
    ("Adam", adam_state, {"lr": 0.9, "amsgrad": True}),
    ("Adam", adam_state, {"lr": 0.9, "weight_decay": 0.1, "maximize": True}),
    ("Adam", adam_state, {"lr": 0.9, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("RMSprop", lambda: {"step": torch.zeros((), dtype=torch.float64), "square_avg": rand_grad(),
                         "momentum_buffer": rand_grad(), "grad_avg": (1e-2 * rand_grad()).detach().requires_grad_()},
     {"lr": 0.9, "maximize": True, "momentum": 0.9, "centered": True, "weight_decay": 0.1}),
    ("RMSprop", lambda: {"step": torch.zeros((), dtype=torch.float64), "square_avg": rand_grad()}, {"lr": 0.9}),
    ("Adagrad", lambda: {"step": torch.tensor(10.0, dtype=torch.float64), "sum": rand_grad()},
     {"lr": 0.9, "weight_decay": 0.1}),
    ("Adagrad", lambda: {"step": torch.tensor(10.0, dtype=torch.float64), "sum": rand_grad()},
     {"lr": 0.9, "lr_decay": 0.1, "maximize": True}),
]


def differentiable_step(cls: type, kwargs: dict[str, Any], p: torch.Tensor, grad: torch.Tensor,
                        state: dict[str, torch.Tensor], *state_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One differentiable step of a copy of ``p`` from copies of ``state``: the new parameter and the
    new state tensors that carry gradients (PyTorch's TestDifferentiableOptimizer function)."""
    p = p.clone()
    p.grad = grad
    opt = cls([p], differentiable=True, **kwargs)
    opt.state[p].update({k: v.clone() for k, v in state.items()})
    opt.step()
    return (p, *(v for v in opt.state[p].values() if v.requires_grad))


@pytest.mark.parametrize("name,make_state,kwargs", DIFFERENTIABLE_CASES)
def test_differentiable_step(name: str, make_state: Any, kwargs: dict[str, Any]) -> None:
    """differentiable=True: autograd's gradients of the step (parameter, gradient and state in, parameter
    and state out) pass gradcheck against finite differences, and equal torch.optim's to 1e-12."""
    torch.manual_seed(0)
    p, grad, state = rand_grad(), rand_grad(), make_state()
    inputs = (p, grad, *state.values())
    assert torch.autograd.gradcheck(lambda *args: differentiable_step(OURS[name], kwargs, args[0], args[1],
                                                                      dict(zip(state, args[2:]))), inputs)
    gradients = []
    for cls in (OURS[name], TORCH[name]):
        outputs = differentiable_step(cls, kwargs, p, grad, state)
        weights = [torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out) for out in outputs]
        loss = sum((w * out).sum() for w, out in zip(weights, outputs))
        gradients.append(torch.autograd.grad(loss, [x for x in inputs if x.requires_grad], allow_unused=True))
    for ours, theirs in zip(*gradients):
        if theirs is None:
            assert ours is None or not bool(ours.any())
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


# Hyperparameters as tensors that require grad (PyTorch's TestDifferentiableOptimizer cases for SGD and Adam,
# and more), and whether torch.optim's gradients are right there too: its first momentum buffer is detached
# (its gradients miss that path), its AMSGrad's backward meets a tensor changed in place, and its RMSprop and
# Adagrad refuse such a tensor (a TypeError).
HYPERPARAMETER_CASES = [
    ("SGD", {"lr": 0.001}, {}, True), ("SGD", {"weight_decay": 0.9}, {}, True),
    ("SGD", {"weight_decay": 0.9, "lr": 0.001}, {}, True),
    ("SGD", {"lr": 0.01, "weight_decay": 0.1}, {"momentum": 0.9, "nesterov": True}, False),
    ("SGD", {"lr": 0.01}, {"momentum": 0.9, "dampening": 0.2, "maximize": True}, False),
    ("Adam", {"lr": 0.001}, {}, True), ("Adam", {"weight_decay": 0.999}, {}, True),
    ("Adam", {"lr": 0.001, "beta1": 0.9, "beta2": 0.999}, {}, True),
    ("Adam", {"lr": 0.001, "weight_decay": 0.999, "beta1": 0.9, "beta2": 0.999}, {}, True),
    ("Adam", {"lr": 0.001, "weight_decay": 0.999, "beta1": 0.9, "beta2": 0.999}, {"decoupled_weight_decay": True},
     True),
    ("Adam", {"lr": 0.01, "beta1": 0.8, "beta2": 0.99}, {"amsgrad": True, "maximize": True}, False),
    ("RMSprop", {"lr": 0.01, "weight_decay": 0.1}, {"momentum": 0.9, "centered": True}, False),
    ("Adagrad", {"lr": 0.01, "weight_decay": 0.1}, {"lr_decay": 0.01}, False),
]


def unrolled(cls: type, options: dict[str, Any], hypers: dict[str, torch.Tensor], p: torch.Tensor,
             grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Two differentiable steps on a quadratic loss (PyTorch's multi-step hyperparameter test), from fresh
    state; the loss and its gradients with respect to the hyperparameters (their graphs kept)."""
    p = p.clone()
    p.grad = grad
    kwargs = {**options, **{k: v.clone() for k, v in hypers.items() if not k.startswith("beta")}}
    if "beta1" in hypers:
        kwargs["betas"] = (hypers["beta1"].clone(), hypers["beta2"].clone())
    opt = cls([p], differentiable=True, **kwargs)
    x, y = torch.tensor([1.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    for _ in range(2):
        loss = torch.nn.functional.mse_loss(x * p.sum(), y)
        loss.backward(inputs=(p,), create_graph=True)
        opt.step()
        opt.zero_grad()
    return (loss, *torch.autograd.grad(loss, list(hypers.values()), create_graph=True))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("name,hypers,options,torch_right", HYPERPARAMETER_CASES)
def test_differentiable_with_respect_to_hyperparameters(name: str, hypers: dict[str, float], options: dict[str, Any],
                                                        torch_right: bool) -> None:
    """A hyperparameter given as a tensor that requires grad gets its gradient through the steps: gradcheck
    passes, and the loss and gradients equal torch.optim's where torch's are right: to 1e-12, or 1e-4 where
    torch's Adam forms its bias corrections in float32 (Python-number betas against its float32 step count:
    1 - 0.999 is 1.3e-5 off in float32)."""
    torch.manual_seed(0)
    p, grad = rand_grad(), rand_grad()
    values = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in hypers.items()}
    assert torch.autograd.gradcheck(
        lambda p, grad, *hs: unrolled(OURS[name], options, dict(zip(values, hs)), p, grad), (p, grad, *values.values()))
    if torch_right:
        tol = 1e-4 if name == "Adam" and "beta1" not in hypers else 1e-12
        for ours, theirs in zip(*(unrolled(cls, options, values, p, grad) for cls in (OURS[name], TORCH[name]))):
            torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)


def test_adam_refuses_tensor_lr_and_betas_with_foreach_like_torch() -> None:
    tensor = torch.tensor(0.01)
    for cls in (Adam, torch.optim.Adam):
        with pytest.raises(ValueError, match="^lr as a Tensor is not supported for capturable=False and foreach=True$"):
            cls(make_params(), lr=tensor, foreach=True)
        with pytest.raises(ValueError, match=r"^betas\[0\] as a Tensor is not supported for capturable=False"):
            cls(make_params(), betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True)
    Adam(make_params(), lr=tensor, foreach=False)  # without foreach=True, as torch


@pytest.mark.parametrize("name", list(OURS))
def test_positional_arguments_follow_torch(name: str) -> None:
    """The same positional order as torch.optim's constructors (Adagrad's foreach and RMSprop's
    switches are positional there)."""
    args = {"SGD": (0.1, 0.9, 0.0, 0.01, True), "Adagrad": (0.1, 0.01, 0.01, 0.1, 1e-8, True),
            "Adam": (0.01, (0.8, 0.9), 1e-6, 0.01, True),
            "RMSprop": (0.01, 0.9, 1e-6, 0.01, 0.5, True, False, True, True)}[name]
    ours, theirs = OURS[name](make_params(), *args), TORCH[name](make_params(), *args)
    for key, value in theirs.param_groups[0].items():
        if key != "params":
            assert ours.param_groups[0][key] == value, key


# --------------------------------------------------------------------------- older state_dicts, copies


@pytest.mark.parametrize("name,kw", RICH_CASES)
def test_state_dict_without_newer_keys_means_options_off(name: str, kw: dict[str, Any]) -> None:
    """A state_dict saved before an option existed lacks its key: loading it turns the option off
    (the constructor's default), whatever this optimizer was built with, as torch.optim does."""
    grads, init = make_grads(6), make_params()
    ps = clone_params(init)
    opt = OURS[name](ps, lr=LR[name], **{**kw, "maximize": True}, grad_noise_std=0.5)
    run(opt, ps, grads[:3])
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        for key in ("maximize", "foreach", "differentiable", "grad_noise_std", "decoupled_weight_decay"):
            group.pop(key, None)
    opt.load_state_dict(sd)
    group = opt.param_groups[0]
    assert group["maximize"] is False and group["differentiable"] is False and group["grad_noise_std"] == 0.0
    assert group["foreach"] is None and group.get("decoupled_weight_decay", False) is False
    assert set(group) == set(OURS[name](make_params()).param_groups[0])
    run(opt, ps, grads[3:])


@pytest.mark.parametrize("name,kw", RICH_CASES)
def test_copies_continue_like_the_original(name: str, kw: dict[str, Any]) -> None:
    """deepcopy and pickle carry the state (and no scratch buffers, which are not state)."""
    grads, init = make_grads(20), make_params()
    ps = clone_params(init)
    opt = OURS[name](ps, lr=LR[name], **kw)
    run(opt, ps, grads[:10])
    clones = [copy.deepcopy((opt, ps)), pickle.loads(pickle.dumps((opt, ps)))]
    traj = run(opt, ps, grads[10:])
    for opt_c, ps_c in clones:
        assert "_scratch_buffers" not in opt_c.__dict__
        public = [{k for k in o.__dict__ if not k.startswith("_")} for o in (opt, opt_c)]
        assert public[0] == public[1]
        assert_traj_close(run(opt_c, ps_c, grads[10:]), traj, EXACT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,kw", RICH_CASES)
def test_a_state_dict_loaded_onto_the_gpu_keeps_its_step_counts_on_the_cpu(name: str, kw: dict[str, Any]) -> None:
    """``torch.load(..., map_location="cuda")`` puts the ``step`` counts on the GPU; loaded, they go
    back to the CPU (where the update reads them without waiting for the device), and the run
    continues as it would have."""
    grads = [[g.cuda() for g in step] for step in make_grads(10)]
    ps = [p.detach().cuda().requires_grad_() for p in make_params()]
    opt = OURS[name](ps, lr=LR[name], **kw)
    run(opt, ps, grads[:5])
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        if "step" in state:
            state["step"] = state["step"].cuda()
    ps_c = clone_params(ps)
    opt_c = OURS[name](ps_c, lr=LR[name], **kw)
    opt_c.load_state_dict(saved)
    assert all(s["step"].device.type == "cpu" for s in opt_c.state.values() if "step" in s)
    assert_traj_close(run(opt_c, ps_c, grads[5:]), run(opt, ps, grads[5:]), EXACT)


@pytest.mark.parametrize("name", list(OURS))
def test_numpy_scalars_are_taken_as_torch_takes_them(name: str) -> None:
    """A learning rate from np.logspace (np.float32), np.int64 or a bool: accepted, the same steps as
    torch.optim's with the same values; a string or None: a TypeError, as torch's comparison raises."""
    import numpy as np

    grads, init = make_grads(5), make_params()
    for lr in (np.float32(LR[name]), np.int64(1), True):
        trajectories = []
        for cls in (OURS[name], TORCH[name]):
            ps = clone_params(init)
            trajectories.append(run(cls(ps, lr=lr, weight_decay=np.float32(0.01)), ps, grads))
        assert_traj_close(trajectories[0], trajectories[1], EXACT)
    for bad in ("0.1", None):
        with pytest.raises(TypeError, match="^Invalid learning rate"):
            OURS[name](make_params(), lr=bad)


@pytest.mark.parametrize("name, arg, value", [
    ("Adam", "eps", 1e-3), ("RMSprop", "eps", 1e-3), ("Adagrad", "eps", 1e-3), ("RMSprop", "alpha", 0.9),
    ("RMSprop", "momentum", 0.5), ("Adagrad", "lr_decay", 0.01), ("Adagrad", "initial_accumulator_value", 0.1),
    ("SGD", "dampening", 0.3)])
@pytest.mark.parametrize("foreach", [False, True])
def test_a_one_element_tensor_hyperparameter_is_taken_as_torch_takes_it(name: str, arg: str, value: float,
                                                                        foreach: bool) -> None:
    """torch.optim takes a 1-element tensor wherever it compares a number; ours had refused one at construction (a
    probe), though it stepped with one set in a group afterwards. Three steps, bitwise."""
    import optimlab.optim

    trajectories = []
    for cls in (getattr(optimlab.optim, name), getattr(torch.optim, name)):
        torch.manual_seed(0)
        p = torch.randn(5, requires_grad=True)
        extra = {"momentum": 0.9} if arg == "dampening" else {}
        opt = cls([p], lr=0.1, foreach=foreach, **{arg: torch.tensor(value, dtype=torch.float64)}, **extra)
        for i in range(3):
            p.grad = torch.sin(p.detach() * (i + 1))
            opt.step()
        trajectories.append(p.detach())
    assert torch.equal(*trajectories)
    with pytest.raises(ValueError, match=f"^Tensor {arg} must be 1-element"):
        getattr(optimlab.optim, name)([torch.zeros(1, requires_grad=True)], **{arg: torch.tensor([value, value])})
