"""Member-wise parameter groups: one optimizer stepping P stacked members, each with its own lr.

A group with ``members: P`` holds parameters of shape ``[P, ...]`` whose slice m belongs to member
m, and its ``lr`` and ``weight_decay`` may be 1-D tensors of length P. One step must equal P
independent optimizers (torch.optim's, each with member m's scalar hyperparameters, stepping
member m's slices), for every option combination of the four optimizers, with per-member state
and state_dict round trips; a member frozen with lr 0 and a zero gradient must not move, nor let
its NaN reach the others. Small float64 CPU tensors: a few seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from test_optim import ALL_CASES, LR, OURS, RICH_CASES, TORCH, _roundtrip

P = 3
SHAPES = [(P, 4, 3), (P, 5), (P,)]  # a weight, a bias and one number per member
N_STEPS = 25
# One step equals the P separate optimizers to float64 rounding (bitwise on the development CPU).
F64 = dict(rtol=1e-12, atol=1e-12)
LR_FACTORS = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
DECAY_FACTORS = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)  # member 1 without decay


def stacked_params(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


def stacked_grads(n_steps: int = N_STEPS, dtype: torch.dtype = torch.float64,
                  seed: int = 1) -> list[list[torch.Tensor]]:
    """Gaussian gradients of varying scale with ~20% exact zeros, as in test_optim."""
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(s, generator=g, dtype=torch.float64) * (0.1 + t % 5) *
              (torch.rand(s, generator=g, dtype=torch.float64) > 0.2)).to(dtype) for s in SHAPES]
            for t in range(n_steps)]


def member_hyperparameters(name: str, kw: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """The grid's options without weight_decay, and per-member lr and weight_decay tensors."""
    options = {k: v for k, v in kw.items() if k != "weight_decay"}
    return options, LR[name] * LR_FACTORS, kw.get("weight_decay", 0.0) * DECAY_FACTORS


def member_optimizer(name: str, params: Sequence[torch.Tensor], options: dict[str, Any], lrs: torch.Tensor,
                     decays: torch.Tensor) -> torch.optim.Optimizer:
    return OURS[name]([{"params": list(params), "members": P, "lr": lrs.clone(), "weight_decay": decays.clone()}],
                      **options)


class Separate:
    """P torch.optim optimizers, member m's over copies of slice m with member m's hyperparameters."""

    def __init__(self, name: str, init: Sequence[torch.Tensor], options: dict[str, Any], lrs: torch.Tensor,
                 decays: torch.Tensor) -> None:
        self.params = [[p[m].detach().clone().requires_grad_() for p in init] for m in range(P)]
        self.optimizers = [TORCH[name](ps, lr=lrs[m].item(), weight_decay=decays[m].item(), **options)
                           for m, ps in enumerate(self.params)]

    def step(self, grads: Sequence[torch.Tensor], members: Sequence[int] = range(P)) -> None:
        for m in members:
            for p, g in zip(self.params[m], grads):
                p.grad = g[m].clone()
            self.optimizers[m].step()

    def assert_member_equal(self, m: int, params: Sequence[torch.Tensor], opt: torch.optim.Optimizer,
                            what: str) -> None:
        """Member m's slices of ``params`` and of their state equal the separate optimizer's."""
        ref_opt = self.optimizers[m]
        for i, (p, ref) in enumerate(zip(params, self.params[m])):
            torch.testing.assert_close(p[m], ref, **F64, msg=lambda s, i=i: f"{what}: member {m} param {i}: {s}")
            state, ref_state = opt.state.get(p, {}), ref_opt.state.get(ref, {})
            assert set(state) == set(ref_state), f"{what}: param {i} state keys"
            for key, ref_value in ref_state.items():
                value = state[key] if key == "step" else state[key][m]
                torch.testing.assert_close(value, ref_value, **F64,
                                           msg=lambda s, i=i, key=key: f"{what}: member {m} param {i} {key}: {s}")


def step_members(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


# --------------------------------------------------------------------------- one step = P optimizers


@pytest.mark.parametrize("name,kw", ALL_CASES)
def test_one_step_equals_separate_optimizers(name: str, kw: dict[str, Any]) -> None:
    options, lrs, decays = member_hyperparameters(name, kw)
    init = stacked_params()
    params = [p.detach().clone().requires_grad_() for p in init]
    opt = member_optimizer(name, params, options, lrs, decays)
    separate = Separate(name, init, options, lrs, decays)
    for t, grads in enumerate(stacked_grads()):
        step_members(opt, params, grads)
        separate.step(grads)
        for m in range(P):
            separate.assert_member_equal(m, params, opt, f"step {t}")
    # The members really differ: member 2 (twice member 0's lr) ends elsewhere than with member 0's lr.
    assert not torch.allclose(params[0][2], init[0][2])
    assert opt.param_groups[0]["members"] == P and torch.equal(opt.param_groups[0]["lr"], lrs)


@pytest.mark.parametrize("dtype", [torch.complex128, torch.float32], ids=["complex128", "float32"])
@pytest.mark.parametrize("name,kw", RICH_CASES)
def test_members_in_other_dtypes(name: str, kw: dict[str, Any], dtype: torch.dtype) -> None:
    """Complex members are stepped as pairs of reals; float32 members round each per-member
    coefficient to float32 as a float32 scalar would be (the arithmetic before that in float64)."""
    options, lrs, decays = member_hyperparameters(name, kw)
    init = stacked_params(dtype)
    params = [p.detach().clone().requires_grad_() for p in init]
    opt = member_optimizer(name, params, options, lrs, decays)
    separate = Separate(name, init, options, lrs, decays)
    tol = F64 if dtype == torch.complex128 else dict(rtol=1e-6, atol=1e-7)
    for grads in stacked_grads(dtype=dtype):
        step_members(opt, params, grads)
        separate.step(grads)
    for m in range(P):
        for p, ref in zip(params, separate.params[m]):
            assert p.dtype == dtype
            torch.testing.assert_close(p[m], ref, **tol)


@pytest.mark.parametrize("name,kw", RICH_CASES)
def test_member_group_with_one_lr_is_a_plain_group(name: str, kw: dict[str, Any]) -> None:
    """A number (or a 1-element tensor) for lr in a member-wise group applies to every member:
    bitwise the same as the group without the members key."""
    init, grads = stacked_params(), stacked_grads()
    results = []
    for extra in ({}, {"members": P}, {"members": P, "lr": torch.tensor([LR[name]], dtype=torch.float64)}):
        params = [p.detach().clone().requires_grad_() for p in init]
        opt = OURS[name]([{"params": params, **extra}], lr=LR[name], **kw)
        for g in grads:
            step_members(opt, params, g)
        results.append(params)
    for params in results[1:]:
        for p, ref in zip(params, results[0]):
            assert torch.equal(p, ref)


@pytest.mark.parametrize("name,kw", RICH_CASES)
def test_a_population_of_one_keeps_its_lr_per_member(name: str, kw: dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``members: 1`` with lr ``[1]``: the lr stays a per-member tensor, never read on the host (as a 0-d one
    its value was taken each step, a GPU sync; a review), and the steps equal torch.optim's on the slices."""
    init, grads = stacked_params(), stacked_grads()
    options, lrs, decays = member_hyperparameters(name, kw)
    params = [p[:1].detach().clone().requires_grad_() for p in init]
    opt = OURS[name]([{"params": params, "members": 1, "lr": lrs[:1].clone(), "weight_decay": decays[:1].clone()}],
                     **options)
    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(t) or item(t))
    reference = [p[0].detach().clone().requires_grad_() for p in init]
    torch_opt = TORCH[name](reference, lr=float(lrs[0]), weight_decay=float(decays[0]), **options)
    for g in grads:
        for p, grad in zip(params, g):
            p.grad = grad[:1].clone()
        for p, grad in zip(reference, g):
            p.grad = grad[0].clone()
        opt.step()
        assert not reads
        torch_opt.step()
        reads.clear()  # torch.optim's own reads
    for p, ref in zip(params, reference):
        torch.testing.assert_close(p[0], ref, **F64)


# --------------------------------------------------------------------------- state_dict round trip


@pytest.mark.parametrize("name,kw", RICH_CASES)
def test_state_dict_round_trip(name: str, kw: dict[str, Any]) -> None:
    options, lrs, decays = member_hyperparameters(name, kw)
    init, grads = stacked_params(), stacked_grads(20)
    params = [p.detach().clone().requires_grad_() for p in init]
    opt = member_optimizer(name, params, options, lrs, decays)
    for g in grads[:10]:
        step_members(opt, params, g)
    sd = _roundtrip(opt.state_dict())
    assert sd["param_groups"][0]["members"] == P and torch.equal(sd["param_groups"][0]["lr"], lrs)

    # Load into a fresh optimizer built with other per-member values: the saved ones take over.
    copies = [p.detach().clone().requires_grad_() for p in params]
    loaded = member_optimizer(name, copies, options, lrs * 7, decays * 7)
    loaded.load_state_dict(sd)
    assert torch.equal(loaded.param_groups[0]["lr"], lrs)
    assert set(loaded.param_groups[0]) == set(opt.param_groups[0])
    for g in grads[10:]:
        step_members(opt, params, g)
        step_members(loaded, copies, g)
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
    # ... and both still equal the separate optimizers that ran all 20 steps.
    separate = Separate(name, init, options, lrs, decays)
    for g in grads:
        separate.step(g)
    for m in range(P):
        separate.assert_member_equal(m, copies, loaded, "loaded")


# --------------------------------------------------------------------------- freezing members


@pytest.mark.parametrize("name,kw", RICH_CASES)
def test_frozen_member_stays_and_its_nan_stays_in_it(name: str, kw: dict[str, Any]) -> None:
    """Member 1 diverges at step 8 (an infinite gradient: its parameters and state become inf or
    NaN); member 2 is frozen while finite. Both are frozen from step 9 on by the caller (lr 0, a
    zero gradient). Member 0 must go on exactly as its separate optimizer; member 2 must not move."""
    options, lrs, decays = member_hyperparameters(name, kw)
    init, grads = stacked_params(), stacked_grads()
    params = [p.detach().clone().requires_grad_() for p in init]
    opt = member_optimizer(name, params, options, lrs, decays)
    separate = Separate(name, init, options, lrs, decays)
    for t, g in enumerate(grads):
        g = [x.clone() for x in g]
        if t == 8:
            for x in g:
                x[1] = float("inf")
        if t > 8:
            opt.param_groups[0]["lr"][1:] = 0.0
            for x in g:
                x[1:] = 0.0
            if t == 9:
                member2 = [p[2].detach().clone() for p in params]
        step_members(opt, params, g)
        separate.step(g, members=[0] if t > 8 else range(P))
    assert not all(torch.isfinite(p[1]).all() for p in params), "member 1 did not diverge"
    separate.assert_member_equal(0, params, opt, "member 0")
    for p, before in zip(params, member2):
        assert torch.equal(p[2], before), "a frozen member moved"
    for p in params:
        assert torch.isfinite(p[0]).all() and torch.isfinite(p[2]).all()
        for value in opt.state[p].values():
            if value.dim():
                assert torch.isfinite(value[0]).all() and torch.isfinite(value[2]).all()


# --------------------------------------------------------------------------- errors


def test_without_members_a_multi_element_lr_is_torchs_error() -> None:
    params = stacked_params()
    lrs = torch.tensor([0.1, 0.2, 0.3])
    for name in OURS:
        with pytest.raises(ValueError, match="^Tensor lr must be 1-element"):
            OURS[name](params, lr=lrs)  # the constructor's lr is never per member
        with pytest.raises(ValueError, match="^Tensor lr must be 1-element"):
            OURS[name]([{"params": params, "lr": lrs}])
        with pytest.raises(ValueError, match="^Tensor weight_decay must be 1-element"):
            OURS[name]([{"params": params, "weight_decay": lrs}])
        opt = OURS[name](params)
        opt.param_groups[0]["lr"] = lrs  # set later: refused at the step
        for p in params:
            p.grad = torch.ones_like(p)
        with pytest.raises(ValueError, match="^Tensor lr must be 1-element"):
            opt.step()


@pytest.mark.parametrize("name", list(OURS))
def test_member_groups_are_checked(name: str) -> None:
    params = stacked_params()
    cls = OURS[name]
    for members in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="Invalid members value"):
            cls([{"params": params, "members": members}])
    with pytest.raises(ValueError, match=r"shape \[4, \.\.\.\], got \[3, 4, 3\]"):
        cls([{"params": params, "members": 4}])
    with pytest.raises(ValueError, match=r"one value per member: shape \[3\] for members=3, got \[2\]"):
        cls([{"params": params, "members": P, "lr": torch.tensor([0.1, 0.2])}])
    with pytest.raises(ValueError, match="^Invalid learning rate"):
        cls([{"params": params, "members": P, "lr": torch.tensor([0.1, -0.2, 0.3])}])
    with pytest.raises(ValueError, match="^Invalid weight_decay value"):
        cls([{"params": params, "members": P, "weight_decay": torch.tensor([0.1, float("nan"), 0.3])}])
    opt = cls([{"params": params, "members": P, "lr": torch.tensor([0.1, 0.2, 0.3])}])
    opt.param_groups[0]["lr"] = torch.tensor([0.1, 0.2])  # set later: refused at the step
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="one value per member"):
        opt.step()


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_member_groups_refuse_sparse_gradients(name: str) -> None:
    p = torch.zeros(P, 4, dtype=torch.float64, requires_grad=True)
    opt = OURS[name]([{"params": [p], "members": P, "lr": torch.tensor([0.1, 0.2, 0.3])}])
    p.grad = torch.eye(P, 4, dtype=torch.float64).to_sparse()
    with pytest.raises(RuntimeError, match="member-wise group"):
        opt.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,kw", RICH_CASES)
def test_members_on_cuda_with_lr_on_the_cpu(name: str, kw: dict[str, Any]) -> None:
    """The per-member tensors may stay on the CPU while the parameters live on the GPU."""
    options, lrs, decays = member_hyperparameters(name, kw)
    init, grads = stacked_params(), stacked_grads(10)
    results = []
    for device in ("cpu", "cuda"):
        # A copy: .to("cpu") of a CPU tensor is the tensor itself, and the CPU run updates it in place.
        params = [p.detach().clone().to(device).requires_grad_() for p in init]
        opt = member_optimizer(name, params, options, lrs, decays)
        for g in grads:
            step_members(opt, params, [x.to(device) for x in g])
        results.append([p.detach().cpu() for p in params])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
