"""optimlab.curvature: sharpness against the full Hessian, thresholds, preconditioners, tracking.

The eigenvalue tests build tiny float64 networks (tanh and ReLU MLPs, a conv net with max-pooling)
and compare against ``torch.linalg.eigvalsh`` of the full Hessian from
``torch.autograd.functional.hessian``. The thresholds are checked by running each optimizer on a
quadratic just below and just above them; the preconditioners against the update the optimizer
actually made. The callback runs in tiny in-memory Lightning fits.
"""

from __future__ import annotations

import importlib
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from conftest import run_script
from optimlab import optim
from optimlab.curvature import (
    GradientMoments, SharpnessCallback, SharpnessLog, SharpnessTracker, gradient_moments, initial_preconditioner, lanczos,
    moments_from_parts, preconditioner, probe_parts, sharpness, stability_threshold, top_eigenpair,
)
from optimlab.curvature.stability import threshold_formula

F64 = torch.float64
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- tiny networks


def fill(model: nn.Module, g: torch.Generator, scale: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * scale)


def mlp(activation: type[nn.Module], seed: int, scale: float = 1.0, n: int = 8) -> tuple[nn.Module, Tensor, Tensor]:
    """3 -> 4 -> 3 (31 parameters) and ``n`` random examples."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4, dtype=F64), activation(), nn.Linear(4, 3, dtype=F64))
    fill(model, g, scale)
    return model, torch.randn(n, 3, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def conv_net(seed: int) -> tuple[nn.Module, Tensor, Tensor]:
    """conv 3x3 (1 -> 2) - tanh - 2x2 max-pool (stride 1) - linear to 3 classes (77 parameters), 6 images 6x6."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, dtype=F64), nn.Tanh(), nn.MaxPool2d(2, 1), nn.Flatten(),
                          nn.Linear(2 * 3 * 3, 3, dtype=F64))
    fill(model, g, 0.5)
    return model, torch.randn(6, 1, 6, 6, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)


NETS: dict[str, Callable[[], tuple[nn.Module, Tensor, Tensor]]] = {
    "tanh-mlp": lambda: mlp(nn.Tanh, 0),
    "relu-mlp": lambda: mlp(nn.ReLU, 1),
    "conv": lambda: conv_net(2),
}


def full_hessian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The Hessian of the mean cross-entropy over the flattened parameters, formed explicitly."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss(flat: Tensor) -> Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def positive_like(model: nn.Module, seed: int) -> list[Tensor]:
    """A preconditioner spread over two orders of magnitude, as Adam's are."""
    g = torch.Generator().manual_seed(seed)
    return [10 ** (2 * torch.rand(p.shape, generator=g, dtype=F64) - 1) for p in model.parameters()]


# --------------------------------------------------------------------------- eigenvalues


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("preconditioned", [False, True], ids=["plain", "preconditioned"])
def test_sharpness_is_the_top_eigenvalue_of_the_full_hessian(name: str, preconditioned: bool) -> None:
    model, x, y = NETS[name]()
    h = full_hessian(model, x, y)
    p = positive_like(model, 7) if preconditioned else None
    if p is not None:
        s = flat(p).rsqrt()
        h = s[:, None] * h * s[None, :]
    evals = torch.linalg.eigvalsh(h)
    expected = float(evals[-1])
    assert expected > 0 and float(evals[0]) < 0  # indefinite: the sign matters
    pair = top_eigenpair(model, x, y, p, iters=h.shape[0], tol=1e-12)
    assert abs(pair.value - expected) <= 1e-6 * abs(expected)
    assert sharpness(model, x, y, p, iters=h.shape[0], tol=1e-12) == pytest.approx(expected, rel=1e-6)
    v = flat(pair.vector)
    assert float(v.norm()) == pytest.approx(1.0, rel=1e-12)
    assert float((h @ v - expected * v).norm()) <= 1e-5 * abs(expected)


def test_sharpness_is_the_algebraic_largest_not_the_largest_magnitude() -> None:
    model, x, _ = mlp(nn.Tanh, 4, scale=2.0)
    with torch.no_grad():
        y = model(x).argmin(1)  # confidently wrong: the curvature is dominated by its indefinite part
    evals = torch.linalg.eigvalsh(full_hessian(model, x, y))
    lowest, highest = float(evals[0]), float(evals[-1])
    assert -lowest > 1.5 * highest > 0  # power iteration would find the negative one
    assert sharpness(model, x, y, iters=31, tol=1e-12) == pytest.approx(highest, rel=1e-6)


@pytest.mark.parametrize("dtype, entry", [(torch.float32, 1e-20), (torch.float32, 1e-30), (F64, 1e-300),
                                          (F64, 1e300), (torch.float32, 1e30)])
def test_preconditioners_of_extreme_scale(dtype: torch.dtype, entry: float) -> None:
    """P = c I gives H / c: eigenvalues whose squares are not numbers of the dtype (a probe: NaN at 1e-20
    in float32, an early stop 0.998 low at 1e300 in float64, the vector norms squaring their entries)."""
    model, x, y = mlp(nn.Tanh, 0)
    expected = float(torch.linalg.eigvalsh(full_hessian(model, x, y))[-1]) / entry
    model = model.to(dtype)
    value = sharpness(model, x, y, [torch.full_like(p, entry, dtype=F64) for p in model.parameters()], iters=31,
                      tol=1e-10)
    assert value == pytest.approx(expected, rel=1e-5 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("dtype, top", [(torch.float32, 3e38), (F64, 1.7e308), (torch.float32, 1e-30), (F64, 1e-300)])
def test_lanczos_at_the_ends_of_the_dtypes_range(dtype: torch.dtype, top: float) -> None:
    """The scale that keeps the products' squared norms finite must stay finite itself (a review: a power
    rounded up to 2^128 made every product 0 and the value NaN at 3e38 in float32)."""
    diagonal = torch.tensor([top, top / 2, top / 4, top / 8], dtype=dtype)
    start = torch.tensor([1.0, 1e-3, 1e-3, 1e-3], dtype=dtype)  # near the top eigenvector: a first product near top
    value, _, _, _ = lanczos(lambda v: diagonal * v, start, iters=4, tol=1e-12)
    assert value == pytest.approx(float(diagonal[0]), rel=1e-5)


def test_tol_zero_runs_every_product() -> None:
    """Its error bound can underflow to 0 before ``iters`` (a probe: 64 products of 1000 on 749 parameters;
    here 58 of 83: eight examples of three classes leave the Hessian few directions)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 10, dtype=F64), nn.Tanh(), nn.Linear(10, 3, dtype=F64))
    fill(model, g, 1.0)
    x, y = torch.randn(8, 4, generator=g, dtype=F64), torch.randint(0, 3, (8,), generator=g)
    assert top_eigenpair(model, x, y, iters=83, tol=0.0).iterations == 83


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU, nn.GELU], ids=lambda a: a.__name__)
def test_sharpness_at_its_default_tolerance_is_within_it(activation: type[nn.Module]) -> None:
    # A stop on the Ritz value's change ended early where the iteration stalled (1.8% low on the
    # ReLU net of seed 31 at tol 1e-3); the residual bound does not.
    for seed in range(40):
        for n in (8, 32):
            model, x, y = mlp(activation, seed, n=n)
            expected = float(torch.linalg.eigvalsh(full_hessian(model, x, y))[-1])
            assert sharpness(model, x, y) == pytest.approx(expected, rel=1e-3), (seed, n)


def test_sharpness_warns_when_iters_end_it_before_tol() -> None:
    # A probe's net whose top two eigenvalues lie 0.5% apart: 20 products stop 0.4% low, beyond tol 1e-3.
    torch.manual_seed(127)
    model = nn.Sequential(nn.Linear(20, 15, dtype=F64), nn.GELU(), nn.Linear(15, 10, dtype=F64))
    x, y = torch.randn(8, 20, dtype=F64), torch.randint(0, 10, (8,))
    expected = float(torch.linalg.eigvalsh(full_hessian(model, x, y))[-1])
    with pytest.warns(RuntimeWarning, match=r"sharpness: 20 Hessian-vector products ended the iteration before"):
        capped = sharpness(model, x, y)
    assert not top_eigenpair(model, x, y).converged and capped < expected * (1 - 1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sharpness(model, x, y, iters=60) == pytest.approx(expected, rel=1e-3)
        sharpness(model, x, y, tol=0)  # asked for exactly 20 products: nothing to warn of
    assert top_eigenpair(model, x, y, iters=60).converged


def test_iteration_arguments_are_checked_before_the_forward_pass() -> None:
    model, x, y = mlp(nn.Tanh, 0)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    for kwargs in ({"iters": 0}, {"tol": -1.0}, {"tol": math.nan}, {"tol": 1.0}, {"tol": 1.5}):  # 1.5: 62% low
        for inputs in (x, x * math.nan):  # a NaN loss returned NaN before iters and tol were looked at
            with pytest.raises(ValueError, match="Invalid (iters|tol)"):
                sharpness(model, inputs, y, **kwargs)
    assert not calls


def test_lanczos_on_an_explicit_matrix() -> None:
    a = torch.diag(torch.tensor([-5.0, 1.0, 2.0, 3.0], dtype=F64))
    value, vector, count, converged = lanczos(lambda v: a @ v, torch.ones(4, dtype=F64), iters=50, tol=0.0)
    assert value == pytest.approx(3.0, rel=1e-12)
    assert count == 4 and converged  # capped at the dimension: the basis spans the space, the value is exact
    assert not lanczos(lambda v: a @ v, torch.ones(4, dtype=F64), iters=2, tol=1e-12)[3]
    assert torch.allclose(vector.abs(), torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=F64), atol=1e-10)
    # Started on an eigenvector the Krylov space is invariant at once: one product, exact.
    value, _, count, _ = lanczos(lambda v: a @ v, torch.tensor([0.0, 0.0, 0.0, 2.0], dtype=F64))
    assert (value, count) == (3.0, 1)
    # A non-finite product stops the iteration and is reported as such.
    assert math.isnan(lanczos(lambda v: v * math.nan, torch.ones(3))[0])
    assert lanczos(lambda v: v * math.inf, torch.ones(3))[0] == math.inf
    # A start vector that requires grad (a parameter's copy) is only a start.
    assert lanczos(lambda v: a @ v, torch.ones(4, dtype=F64, requires_grad=True))[0] == pytest.approx(3.0, rel=1e-3)


def test_warm_start_converges_in_fewer_iterations() -> None:
    model, x, y = mlp(nn.Tanh, 0)
    cold = top_eigenpair(model, x, y, iters=31, tol=1e-8)
    # The weights move by one small gradient step, as between two measurements in training.
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p.sub_(0.05 * g)
    moved_cold = top_eigenpair(model, x, y, iters=31, tol=1e-8)
    moved_warm = top_eigenpair(model, x, y, iters=31, tol=1e-8, init=cold.vector)
    assert moved_warm.value == pytest.approx(moved_cold.value, rel=1e-6)
    assert moved_warm.iterations < moved_cold.iterations
    # The tracker does the same by itself.
    tracker = SharpnessTracker(iters=31, tol=1e-8)
    model, x, y = mlp(nn.Tanh, 0)
    first = tracker(model, x, y)
    assert first == pytest.approx(cold.value, rel=1e-6) and tracker.iterations == cold.iterations
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p.sub_(0.05 * g)
    assert tracker(model, x, y) == pytest.approx(moved_cold.value, rel=1e-6)
    assert tracker.iterations == moved_warm.iterations


def test_sharpness_leaves_modes_grads_and_the_global_generator_alone() -> None:
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5, dtype=F64), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3, dtype=F64),
                          nn.BatchNorm1d(3, dtype=F64))
    fill(model, g, 1.0)
    x, y = torch.randn(8, 3, generator=g, dtype=F64), torch.randint(0, 3, (8,), generator=g)
    model.train()
    model[4].eval()  # a mixed-mode model keeps each module's own mode
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    grads = [p.grad for p in model.parameters()]
    rng = torch.get_rng_state()
    value = sharpness(model, x, y, iters=60, tol=1e-12)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == [True, True, True, True, True, False]
    assert all(p.grad is g and bool((g == 0.25).all()) for p, g in zip(model.parameters(), grads))
    assert torch.equal(model[4].running_mean, torch.zeros(3, dtype=F64))  # no batch-norm update
    model.eval()
    assert value == pytest.approx(float(torch.linalg.eigvalsh(full_hessian(model, x, y))[-1]), rel=1e-6)


def test_a_module_that_overrides_train_has_its_train_mode_restored_by_train() -> None:
    """A module whose own train() does more than set the flag (freezes a part in eval mode, say): setting
    ``training`` back left what its eval() did in place (a probe)."""
    class Switches(nn.Sequential):
        switched: list[bool] = []

        def train(self, mode: bool = True) -> Switches:
            self.switched.append(mode)
            return super().train(mode)

    model, x, y = mlp(nn.Tanh, 0)
    model = Switches(*model).train()
    model[2].eval()  # and a child in its own mode
    sharpness(model, x, y)
    assert model.switched == [True, False, True]  # train() above, eval() and the restoring train(True)
    assert [m.training for m in model.modules()] == [True, True, True, False]


def test_attention_is_measured_on_its_math_kernel() -> None:
    """The CPU's flash attention kernel has no double backward: a raw RuntimeError (a probe)."""
    g = torch.Generator().manual_seed(0)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.attend = nn.Linear(2, 4, dtype=F64), nn.MultiheadAttention(4, 1, batch_first=True,
                                                                                        dtype=F64)
            self.out = nn.Linear(4, 3, dtype=F64)

        def forward(self, x: Tensor) -> Tensor:
            h = self.embed(x)
            return self.out(self.attend(h, h, h, need_weights=False)[0].mean(1))

    model = Attention()
    fill(model, g, 1.0)
    x, y = torch.randn(5, 3, 2, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)
    value = sharpness(model, x, y, iters=200, tol=1e-12)
    with sdpa_kernel(SDPBackend.MATH):  # (the explicit Hessian too)
        expected = float(torch.linalg.eigvalsh(full_hessian(model, x, y))[-1])
    assert value == pytest.approx(expected, rel=1e-6)


def test_a_compiled_model_is_measured_eagerly() -> None:
    model, x, y = mlp(nn.Tanh, 0)
    expected = sharpness(model, x, y, iters=31, tol=1e-12)
    assert sharpness(torch.compile(model, backend="aot_eager"), x, y, iters=31, tol=1e-12) == pytest.approx(
        expected, rel=1e-10)


def test_non_finite_weights_give_nan() -> None:
    model, x, y = mlp(nn.Tanh, 0)
    tracker = SharpnessTracker()
    assert math.isfinite(tracker(model, x, y))
    kept = tracker.vector
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    assert math.isnan(tracker(model, x, y))
    assert tracker.vector is kept  # a NaN vector is not kept as the next start


def test_a_loss_of_no_example_gives_nan() -> None:
    """Every label ignored (cross-entropy's -100): the mean loss is 0/0, whose gradient autograd gives as
    zeros; the sharpness is NaN, not the 0 of that zero Hessian. Class probabilities are targets too."""
    model, x, y = mlp(nn.Tanh, 0)
    assert math.isnan(sharpness(model, x, torch.full_like(y, -100)))
    soft = F.one_hot(y, 3).to(F64)
    assert sharpness(model, x, soft, tol=1e-10, iters=100) == pytest.approx(sharpness(model, x, y, tol=1e-10, iters=100),
                                                                           rel=1e-9)


def test_argument_checks() -> None:
    model, x, y = mlp(nn.Tanh, 0)
    shapes_p = [torch.ones(p.shape, dtype=F64) for p in model.parameters()]
    with pytest.raises(ValueError, match="iters"):
        sharpness(model, x, y, iters=0)
    with pytest.raises(ValueError, match="tol"):
        sharpness(model, x, y, tol=-1.0)
    with pytest.raises(ValueError, match="preconditioner"):
        sharpness(model, x, y, preconditioner=shapes_p[:-1])
    with pytest.raises(ValueError, match="preconditioner"):
        sharpness(model, x, y, preconditioner=[t.T for t in shapes_p])
    with pytest.raises(ValueError, match="must be positive"):
        sharpness(model, x, y, preconditioner=[t * 0 for t in shapes_p])
    negative = [t.clone() for t in shapes_p]
    negative[2][1] = -0.5  # where and what (a probe: it named neither)
    with pytest.raises(ValueError, match=re.escape(f"got -0.5 in its tensor 2 (shaped {tuple(shapes_p[2].shape)})")):
        sharpness(model, x, y, preconditioner=negative)
    with pytest.raises(ValueError, match="init"):
        top_eigenpair(model, x, y, init=shapes_p[:2])
    with pytest.raises(ValueError, match="same nonzero number"):
        sharpness(model, x, y[:3])
    with pytest.raises(ValueError, match="must be real"):
        sharpness(model, x, y, preconditioner=[t.to(torch.complex128) for t in shapes_p])
    # A probe's cases: torch's own errors (AttributeError, IndexError, RuntimeError) came out of the forward pass.
    with pytest.raises(ValueError, match="x and y must be tensors, got Tensor and list"):
        sharpness(model, x, y.tolist())
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 3\).*got 3"):
        sharpness(model, x, torch.full_like(y, 3))
    with pytest.raises(ValueError, match="class probabilities shaped like the logits"):
        sharpness(model, x, y.to(F64))
    with pytest.raises(ValueError, match=r"class indices for logits \(8, 3\) are shaped \(8,\), got \(8, 1\)"):
        sharpness(model, x, y[:, None])
    with pytest.raises(ValueError, match="no trainable parameters"):
        sharpness(model.requires_grad_(False), x, y)
    model.requires_grad_(True)
    # Types a conversion would silently turn into other classes or drop a part of: refused (a probe).
    for labels in (y.bool(), y.to(torch.complex128)):
        with pytest.raises(ValueError, match=f"Invalid y: .* got {labels.dtype}"):
            sharpness(model, x, labels)
    with pytest.raises(ValueError, match="Invalid x: must be real"):
        sharpness(model, x.to(torch.complex128), y)
    with pytest.raises(ValueError, match=r"Invalid preconditioner: must be real numbers, got \['torch.bool'\]"):
        sharpness(model, x, y, [torch.ones_like(p, dtype=torch.bool) for p in model.parameters()])
    with pytest.raises(ValueError, match="the model's output must be logits shaped .*, got tuple"):
        sharpness(Returns(model), x, y)
    with pytest.raises(ValueError, match="Invalid model: must be a torch.nn.Module, got function"):
        sharpness(lambda t: model(t), x, y)
    with pytest.raises(ValueError, match=r"as small as 1e-50 lie below the smallest normal float32 \(1.18e-38\)"):
        sharpness(model.float(), x, y, [torch.full_like(t, 1e-50) for t in shapes_p])  # positive in float64
    # Subnormal in the parameters' dtype (normal in the given float64, so flush-denormal mode cannot zero it
    # first): P^-1/2 H P^-1/2 overflowed, and the iteration returned NaN (a probe).
    with pytest.raises(ValueError, match=r"entries as small as 1e-40 lie below the smallest normal float32"):
        sharpness(model.float(), x, y, [torch.full_like(t, 1e-40) for t in shapes_p])
    model.double()[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="a list over all the parameters must be shaped like them"):
        sharpness(model, x, y, [*shapes_p[:1], torch.ones(5, dtype=F64), *shapes_p[2:]])  # the frozen bias's entry


class Returns(nn.Module):
    """``model``'s logits in a tuple, or (``constant``) the first columns of its input, which no parameter reaches."""

    def __init__(self, model: nn.Module, constant: bool = False) -> None:
        super().__init__()
        self.model, self.constant = model, constant

    def forward(self, x: torch.Tensor) -> object:
        return x[:, :3] * 1.0 if self.constant else (self.model(x),)


def test_a_loss_no_trainable_parameter_reaches_has_zero_sharpness() -> None:
    model, x, y = mlp(nn.Tanh, 0)  # its logits have 3 classes, x at least 3 columns
    pair = top_eigenpair(Returns(model, constant=True), x, y)
    assert pair.value == 0.0 and pair.iterations == 0
    assert sum(float(v.square().sum()) for v in pair.vector) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="nonzero"):
        lanczos(lambda v: v, torch.zeros(3))
    with pytest.raises(ValueError, match="Invalid v0: must be finite"):
        lanczos(lambda v: v, torch.tensor([1.0, math.inf]))
    with pytest.raises(ValueError, match="iters"):
        SharpnessTracker(iters=0)


def test_tracking_needs_two_products_a_measurement() -> None:
    # One product is the Rayleigh quotient of the start vector, which Lanczos returns unchanged:
    # a one-product tracker would measure its random first start forever.
    value, vector, count, _ = lanczos(lambda v: v * torch.arange(1.0, 4.0), torch.ones(3), iters=1)
    assert count == 1 and torch.equal(vector, torch.ones(3) / 3 ** 0.5) and value == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"Invalid iters: 1 \(must be >= 2 when tracking"):
        SharpnessTracker(iters=1)


def test_a_trackers_cold_start_takes_more_products_than_its_iters() -> None:
    # At iters 2 a random start's value is far off: the first call runs as a cold measurement needs.
    from optimlab.curvature.tracking import COLD_START_ITERS

    model, x, y = mlp(nn.Tanh, 0)
    tracker = SharpnessTracker(iters=2, tol=1e-12)
    assert tracker(model, x, y) == sharpness(model, x, y, iters=COLD_START_ITERS, tol=1e-12)
    assert tracker.iterations > 2
    tracker(model, x, y)
    assert tracker.iterations == 2  # warm


def test_a_start_at_another_eigenvector_still_finds_the_top() -> None:
    # The residual after one product is ~0 at any eigenvector: the test waits for the second.
    model, x, y = mlp(nn.Tanh, 0)
    evals, evecs = torch.linalg.eigh(full_hessian(model, x, y))
    shapes, sizes = [p.shape for p in model.parameters()], [p.numel() for p in model.parameters()]
    for k in (0, 15):
        init = [piece.view(shape) for piece, shape in zip(evecs[:, k].split(sizes), shapes)]
        pair = top_eigenpair(model, x, y, iters=60, tol=1e-12, init=init)
        assert pair.value == pytest.approx(float(evals[-1]), rel=1e-9) and pair.iterations > 1, k


def test_inputs_as_users_hand_them_over() -> None:
    model, x, y = mlp(nn.Tanh, 0)
    expected = sharpness(model, x, y, iters=31, tol=1e-12)
    assert sharpness(model, x, y.int(), iters=31, tol=1e-12) == expected  # int32 labels
    assert sharpness(model, x, y, iters=np.int64(31), tol=np.float64(1e-12)) == expected  # NumPy numbers
    with torch.inference_mode():
        assert sharpness(model, x.clone(), y.clone(), iters=31, tol=1e-12) == expected
        made_here = gradient_moments(model, x.clone(), y.int(), 4)
    moments = gradient_moments(model, x, y, 4)  # the adaptive optimizers' step-0 preconditioner reads these
    for got in (gradient_moments(model, x, y.int(), 4), made_here):
        assert all(torch.equal(a, b) for a, b in zip(got.square + got.variance, moments.square + moments.variance))
    # Targets and batches as sharpness checks them (a probe: torch's IndexError or RuntimeError from inside the loss).
    for bad_y, words in ((y + 10, "Invalid y: class indices must lie in [0, "), (y.double(), "Invalid y: floating-point"),
                         (y[:, None], "Invalid y: class indices for logits")):
        with pytest.raises(ValueError, match=re.escape(words)):
            gradient_moments(model, x, bad_y, 4)
    with pytest.raises(ValueError, match="x and y must be tensors, got list and Tensor"):
        gradient_moments(model, x.tolist(), y, 4)
    # A preconditioner that requires grad (computed from the parameters) is used as numbers.
    p = [q.detach().abs() + 0.5 for q in model.parameters()]
    with_grad = [q.abs() + 0.5 for q in model.parameters()]
    assert sharpness(model, x, y, with_grad, iters=31, tol=1e-12) == sharpness(model, x, y, p, iters=31, tol=1e-12)
    # With a frozen parameter, a preconditioner over every parameter or over the trainable ones.
    model[0].bias.requires_grad_(False)
    trainable = [q for q, param in zip(p, model.parameters()) if param.requires_grad]
    assert sharpness(model, x, y, p, iters=31, tol=1e-12) == sharpness(model, x, y, trainable, iters=31, tol=1e-12)
    for bad, why in (({"w": p[0]}, "got dict"), (p[0], "got Tensor"), ([1.0, 2.0], "list of tensors, got")):
        with pytest.raises(ValueError, match=f"Invalid preconditioner: must be a .*{why}"):
            sharpness(model, x, y, bad)


def test_lanczos_reserves_only_the_basis_it_uses() -> None:
    # iters = n here would reserve n^2 floats (160 GB); the basis grows as the iteration goes on.
    n = 200_000
    diagonal = torch.ones(n)
    diagonal[:3] = torch.tensor([4.0, 3.0, 2.0])
    value, vector, count, _ = lanczos(lambda v: diagonal * v, torch.ones(n), iters=n, tol=1e-4)
    assert value == pytest.approx(4.0, rel=1e-4) and count <= 6 and vector.shape == (n,)


def test_lanczos_grows_its_basis_past_the_rows_it_starts_with(monkeypatch: pytest.MonkeyPatch) -> None:
    # 2^21 float64 entries a row: on the CPU the basis starts with 2 rows (16 MiB) and doubles to hold the vectors
    lanczos_module = importlib.import_module("optimlab.curvature.lanczos")
    sizes: list[int] = []
    grow = lanczos_module.grown
    monkeypatch.setattr(lanczos_module, "grown", lambda basis, limit: sizes.append(basis.shape[1]) or grow(basis, limit))
    n = 2**21
    diagonal = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=F64)
    diagonal[7] = 1.5
    value, vector, count, converged = lanczos(lambda v: diagonal * v, torch.ones(n, dtype=F64), iters=40, tol=1e-7)
    assert converged and count > 4 and sizes[:2] == [2, 4]
    assert value == pytest.approx(1.5, rel=1e-6) and abs(float(vector[7])) == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------- thresholds


def one_param(value: float = 1.0) -> nn.Parameter:
    return nn.Parameter(torch.tensor([value], dtype=F64))


THRESHOLDS: list[tuple[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer], float]] = [
    ("sgd", lambda p: optim.SGD(p, lr=0.1), 20.0),
    ("sgd-momentum", lambda p: optim.SGD(p, lr=0.1, momentum=0.9), 38.0),
    ("sgd-dampening", lambda p: optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5), 76.0),
    ("sgd-nesterov", lambda p: optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 3.8 / 0.28),
    ("adam", lambda p: optim.Adam(p, lr=1e-2, eps=1.0), 3800.0),
    ("adam-beta1-0", lambda p: optim.Adam(p, lr=1e-2, betas=(0.0, 0.999), eps=1.0), 200.0),
    ("adamw", lambda p: optim.Adam(p, lr=1e-2, eps=1.0, decoupled_weight_decay=True), 3800.0),
    ("rmsprop", lambda p: optim.RMSprop(p, lr=1e-2, eps=1.0), 200.0),
    ("rmsprop-momentum", lambda p: optim.RMSprop(p, lr=1e-2, eps=1.0, momentum=0.5), 300.0),
    ("rmsprop-centered", lambda p: optim.RMSprop(p, lr=1e-2, eps=1.0, centered=True), 200.0),
    ("adagrad", lambda p: optim.Adagrad(p, lr=0.1, eps=1.0), 20.0),
    ("torch-sgd-momentum", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 38.0),
    ("torch-adam", lambda p: torch.optim.Adam(p, lr=1e-2, eps=1.0), 3800.0),
    ("torch-adamw", lambda p: torch.optim.AdamW(p, lr=1e-2, eps=1.0, weight_decay=0.0), 3800.0),
    ("torch-rmsprop", lambda p: torch.optim.RMSprop(p, lr=1e-2, eps=1.0), 200.0),
    ("torch-adagrad", lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1.0), 20.0),
]


@pytest.mark.parametrize("name,make,expected", THRESHOLDS, ids=[t[0] for t in THRESHOLDS])
def test_threshold_values(name: str, make: Callable[..., torch.optim.Optimizer], expected: float) -> None:
    assert stability_threshold(make([one_param()])) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name,make,expected", THRESHOLDS, ids=[t[0] for t in THRESHOLDS])
def test_threshold_is_the_edge_of_stability_on_a_quadratic(name: str, make: Callable[..., torch.optim.Optimizer],
                                                           expected: float) -> None:
    """L = lam/2 theta^2: from theta = 1e-12, |theta| stays below 10x that and decays at 0.9x the
    threshold, and grows past 1e6x at 1.1x. First 200 steps at theta = 0 (zero gradients) let
    Adam's bias corrections fade, as the threshold assumes. The adaptive optimizers get eps = 1,
    far above sqrt(v) at these gradients, so P ~ 1 and the preconditioned sharpness is lam until
    theta has grown ~1e8x (then P grows and the unstable run stabilises, the edge-of-stability
    mechanism of the adaptive methods)."""
    start = 1e-12
    peak, final = {}, {}
    for factor in (0.9, 1.1):
        theta = one_param(0.0)
        opt = make([theta])
        lam = factor * stability_threshold(opt)
        for _ in range(200):
            theta.grad = torch.zeros_like(theta)
            opt.step()
        with torch.no_grad():
            theta.fill_(start)
        peak[factor] = 0.0
        for _ in range(600):
            theta.grad = lam * theta.detach().clone()
            opt.step()
            peak[factor] = max(peak[factor], abs(float(theta.detach())))
        final[factor] = abs(float(theta.detach()))
    assert peak[0.9] < 10 * start and final[0.9] < 1e-3 * start
    assert peak[1.1] > 1e6 * start


def test_threshold_follows_the_current_learning_rate() -> None:
    opt = torch.optim.SGD([one_param()], lr=torch.tensor(0.1))  # torch.optim accepts a tensor lr
    assert stability_threshold(opt) == pytest.approx(20.0)
    opt.param_groups[0]["lr"] = 0.0
    assert stability_threshold(opt) == math.inf
    # Adagrad's next step size is lr / (1 + t * lr_decay) after t steps.
    theta = one_param()
    opt = optim.Adagrad([theta], lr=0.1, lr_decay=0.5)
    for _ in range(2):
        theta.grad = torch.ones_like(theta)
        opt.step()
    assert stability_threshold(opt) == pytest.approx(2 / (0.1 / (1 + 2 * 0.5)))
    # its formula names the decayed lr, which the group's lr (0.1 throughout) is not (a probe: "2/lr = 800" at lr 0.005)
    assert threshold_formula(opt, 0.1) == "2/lr_t (lr_t = lr/(1+t*lr_decay))"
    assert threshold_formula(optim.Adagrad([theta], lr=0.1), 0.1) == threshold_formula(optim.SGD([theta], lr=0.1), 0.1) == "2/lr"
    assert threshold_formula(torch.optim.Adagrad([theta], lr=0.1, lr_decay=0.5), 0.1) == threshold_formula(opt, 0.1)
    # Per param group.
    opt = optim.SGD([{"params": [one_param()]}, {"params": [one_param()], "lr": 0.5}], lr=0.1)
    assert (stability_threshold(opt), stability_threshold(opt, group=1)) == pytest.approx((20.0, 4.0))


def test_threshold_argument_checks() -> None:
    with pytest.raises(TypeError, match="NAdam"):
        stability_threshold(torch.optim.NAdam([one_param()]))
    with pytest.raises(ValueError, match="group"):
        stability_threshold(optim.SGD([one_param()], lr=0.1), group=1)
    with pytest.raises(ValueError, match="momentum"):
        stability_threshold(optim.SGD([one_param()], lr=0.1, momentum=1.0))
    for ascent in (optim.SGD([one_param()], lr=0.1, maximize=True), torch.optim.Adam([one_param()], maximize=True)):
        with pytest.raises(ValueError, match=r"^no stability threshold for maximize=True"):  # a descent's, not ascent's
            stability_threshold(ascent)
    # A group or lr of another type (a probe: Python's TypeError, and lr '0.1' or True taken as numbers).
    sgd = optim.SGD([one_param()], lr=0.1)
    for group in (0.5, "0", True):
        with pytest.raises(ValueError, match=r"^Invalid group: "):
            stability_threshold(sgd, group=group)  # type: ignore[arg-type]
    for lr in ("0.1", True):
        with pytest.raises(ValueError, match=r"^Invalid lr: .* \(must be a number, or None"):
            stability_threshold(sgd, lr=lr)  # type: ignore[arg-type]
    assert stability_threshold(sgd, lr=torch.tensor(0.5)) == stability_threshold(sgd, lr=0.5) == 4.0
    assert stability_threshold(sgd, group=np.int64(0), lr=np.float32(0.5)) == 4.0  # NumPy's numbers are numbers
    # A model where its parameters belong (a probe: an AttributeError from inside).
    model = nn.Linear(3, 2)
    adam = optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    adam.step()
    for params, words in ((model, "Invalid params: a Linear; expected an iterable of parameters"),
                          ([model], "Invalid params: item 0 is a Linear, not a tensor")):
        with pytest.raises(ValueError, match=re.escape(words)):
            preconditioner(adam, params)  # type: ignore[arg-type]
    held = nn.ParameterList(model.parameters())  # a module whose items are its parameters
    assert all(torch.equal(a, b) for a, b in zip(preconditioner(adam, held), preconditioner(adam)))


# --------------------------------------------------------------------------- preconditioners


def run_steps(opt: torch.optim.Optimizer, params: list[Tensor], steps: int, seed: int) -> None:
    """``steps`` updates with random gradients that shrink, so amsgrad's max differs from v."""
    g = torch.Generator().manual_seed(seed)
    for k in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=F64) / (1 + 3 * k)
        opt.step()


PRECONDITIONED: dict[str, Callable[[type, list[Tensor]], torch.optim.Optimizer]] = {
    "Adam": lambda cls, p: cls(p, lr=0.01, eps=1e-3),
    "Adam-amsgrad": lambda cls, p: cls(p, lr=0.01, eps=1e-3, amsgrad=True),
    "RMSprop": lambda cls, p: cls(p, lr=0.01, eps=1e-3),
    "RMSprop-centered": lambda cls, p: cls(p, lr=0.01, eps=1e-3, centered=True),
    "RMSprop-momentum": lambda cls, p: cls(p, lr=0.01, eps=1e-3, momentum=0.5),
    "Adagrad": lambda cls, p: cls(p, lr=0.1, eps=1e-3),
}


@pytest.mark.parametrize("library", ["optimlab", "torch"])
@pytest.mark.parametrize("config", PRECONDITIONED)
def test_preconditioner_is_what_the_update_divides_by(library: str, config: str) -> None:
    name = config.split("-")[0]
    cls = getattr(optim if library == "optimlab" else torch.optim, name)
    params = [nn.Parameter(torch.randn(4, 3, dtype=F64)), nn.Parameter(torch.randn(5, dtype=F64))]
    opt = PRECONDITIONED[config](cls, params)
    run_steps(opt, params, 3, seed=0)
    before = [p.detach().clone() for p in params]
    bufs = [opt.state[p].get("momentum_buffer", torch.zeros(())).clone() for p in params]
    run_steps(opt, params, 1, seed=1)
    grads = [p.grad for p in params]
    group = opt.param_groups[0]
    for p, old, buf, g, pc in zip(params, before, bufs, grads, preconditioner(opt)):
        state, delta = opt.state[p], p.detach() - old
        if name == "Adam":  # theta -= lr * m_hat / P
            expected = -group["lr"] / (1 - group["betas"][0] ** 4) * state["exp_avg"] / pc
        elif group.get("momentum", 0):  # b = m b + g / P; theta -= lr b
            expected = -group["lr"] * (group["momentum"] * buf + g / pc)
        else:  # theta -= lr * g / P
            expected = -group["lr"] * g / pc
        torch.testing.assert_close(delta, expected, rtol=1e-10, atol=1e-14)
    if config == "Adam-amsgrad":
        assert not torch.equal(opt.state[params[0]]["max_exp_avg_sq"], opt.state[params[0]]["exp_avg_sq"])


def test_preconditioner_per_parameter_and_before_the_first_step() -> None:
    a, b = nn.Parameter(torch.ones(2, dtype=F64)), nn.Parameter(torch.ones(3, dtype=F64))
    assert preconditioner(optim.SGD([a, b], lr=0.1, momentum=0.9)) is None
    opt = optim.Adam([a, b], lr=0.1)
    with pytest.raises(ValueError, match="no state for parameter 0"):
        preconditioner(opt)
    a.grad, b.grad = torch.full_like(a, 2.0), torch.full_like(b, 3.0)
    opt.step()
    pb, pa = preconditioner(opt, [b, a])  # in the order asked for
    # After one step v_hat = g^2, so P = |g| + eps.
    assert torch.allclose(pa, torch.full_like(a, 2.0 + 1e-8)) and torch.allclose(pb, torch.full_like(b, 3.0 + 1e-8))
    with pytest.raises(ValueError, match="not optimized"):
        preconditioner(opt, [nn.Parameter(torch.ones(1))])
    # Adagrad's state exists from construction: sqrt(initial_accumulator_value) + eps.
    (p0,) = preconditioner(optim.Adagrad([a], initial_accumulator_value=0.25, eps=0.0))
    assert torch.equal(p0, torch.full_like(a, 0.5))


def test_probe_parts_one_per_minibatch_and_at_least_two() -> None:
    assert [probe_parts(n, b) for n, b in ((1024, 128), (1000, 128), (100, 64), (3, 4), (1, 4), (4, 1))] == [
        8, 8, 2, 2, 1, 4]
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            probe_parts(8, bad)


def test_gradient_moments_scale_the_parts_spread_to_the_minibatch() -> None:
    """11 examples, minibatches of 4: three parts (4, 4 and 3 examples); per coordinate, the parts'
    mean m and unbiased variance s^2 give Var[g_B] = s^2 (11/3) / 4 and E[g_B^2] = max(m^2 - s^2/3, 0) + Var."""
    model, (x, y) = tiny_model(dropout=0.3), (Data().train_x[:11], Data().train_y[:11])
    square, variance, batch_size = gradient_moments(model, x, y, batch_size=4)
    assert batch_size == 4
    grads = []
    model.eval()  # dropout off, as the moments are taken
    for b in (slice(0, 4), slice(4, 8), slice(8, 11)):
        model.zero_grad()
        F.cross_entropy(model(x[b]), y[b]).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model.train()
    for i, (sq, var) in enumerate(zip(square, variance)):
        parts = torch.stack([g[i] for g in grads])
        m, s2 = parts.mean(0), parts.var(0)  # torch's var: unbiased
        torch.testing.assert_close(var, s2 * (11 / 3) / 4, rtol=1e-10, atol=1e-18)
        torch.testing.assert_close(sq, (m ** 2 - s2 / 3).clamp(min=0) + s2 * (11 / 3) / 4, rtol=1e-10, atol=1e-18)
    assert all(bool((v > 0).any()) for v in variance)
    # Of the same parts, a minibatch half as large has twice the variance, and its mean square grows by as much.
    half = moments_from_parts(grads, 11, 2)
    for sq, var, sq2, var2 in zip(square, variance, half.square, half.variance):
        torch.testing.assert_close(var2, 2 * var, rtol=1e-10, atol=1e-18)
        torch.testing.assert_close(sq2, sq + var, rtol=1e-10, atol=1e-18)


def test_gradient_moments_of_one_example_have_no_variance() -> None:
    square, variance, _ = moments_from_parts([[torch.tensor([3.0])]], 1, 4)
    assert square[0].item() == 9.0 and math.isnan(variance[0].item())
    with pytest.raises(ValueError, match="at least one part"):
        moments_from_parts([], 1, 4)


@pytest.mark.parametrize("config", ["Adam", "Adam-amsgrad", "RMSprop-alpha0", "Adagrad"])
def test_initial_preconditioner_is_the_state_after_a_step_whose_gradient_it_is_given(config: str) -> None:
    """Given E[g^2] = g^2 (and no variance) of one gradient g, the P of the state after one step on g
    (RMSprop with alpha 0, whose average is then the last g^2; Adagrad from its initial accumulator)."""
    model, (x, y) = tiny_model(), (Data().train_x[:8], Data().train_y[:8])
    make = {"Adam": lambda p: optim.Adam(p, lr=0.0, eps=1e-3),
            "Adam-amsgrad": lambda p: optim.Adam(p, lr=0.0, eps=1e-3, amsgrad=True),
            "RMSprop-alpha0": lambda p: optim.RMSprop(p, lr=0.0, alpha=0.0, eps=1e-3),
            "Adagrad": lambda p: optim.Adagrad(p, lr=0.0, eps=1e-3, initial_accumulator_value=0.5)}[config]
    opt = make(model.parameters())
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = initial_preconditioner(opt, GradientMoments([g * g for g in grads], [torch.zeros_like(g) for g in grads], 8))
    opt.step()
    for got, want in zip(preconditioner(opt), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    assert initial_preconditioner(optim.SGD(model.parameters(), lr=0.1), gradient_moments(model, x, y, 8)) is None


def test_initial_preconditioner_formulas() -> None:
    a = nn.Parameter(torch.zeros(3, dtype=F64))
    moments = GradientMoments([torch.tensor([4.0, 5.0, 0.0], dtype=F64)], [torch.tensor([3.0, 1.0, 0.0], dtype=F64)], 8)
    eps = 0.25
    cases = {  # P = sqrt(v) + eps with v: E[g^2]; centered: Var[g]; Adagrad: a + E[g^2]
        "adam": (optim.Adam([a], eps=eps), [2.0, 5 ** 0.5, 0.0]),
        "rmsprop": (optim.RMSprop([a], eps=eps), [2.0, 5 ** 0.5, 0.0]),
        "centered": (optim.RMSprop([a], eps=eps, centered=True), [3 ** 0.5, 1.0, 0.0]),
        "adagrad": (optim.Adagrad([a], eps=eps, initial_accumulator_value=0.44), [4.44 ** 0.5, 5.44 ** 0.5, 0.44 ** 0.5]),
    }
    for name, (opt, roots) in cases.items():
        (got,) = initial_preconditioner(opt, moments)
        torch.testing.assert_close(got, torch.tensor(roots, dtype=F64) + eps, rtol=1e-12, atol=0, msg=name)
    with pytest.raises(ValueError, match="one tensor per parameter"):
        initial_preconditioner(optim.Adam([a]), moments._replace(square=[]))
    with pytest.raises(ValueError, match="shaped"):
        initial_preconditioner(optim.Adam([a]), GradientMoments([torch.zeros(2)], [torch.zeros(2)], 1))
    with pytest.raises(TypeError, match="NAdam"):
        initial_preconditioner(torch.optim.NAdam([a]), moments)


# --------------------------------------------------------------------------- the log


def test_sharpness_log_records_epochs_and_crossings() -> None:
    log = SharpnessLog()
    log.start_epoch(0)
    assert log.epoch_record() == {"epoch": 0, "measurements": 0, "sharpness_max": None, "sharpness_last": None,
                                  "threshold_last": None, "first_crossing_step": None, "crossing_sharpness": None,
                                  "crossing_threshold": None}
    assert not log.add(10, 1.0, 2.0)
    assert not log.add(20, math.nan, 2.0)  # NaN is recorded, never a crossing
    record = log.epoch_record()
    assert math.isnan(record.pop("sharpness_last"))
    assert record == {"epoch": 0, "measurements": 2, "sharpness_max": 1.0, "threshold_last": 2.0,
                      "first_crossing_step": None, "crossing_sharpness": None, "crossing_threshold": None}
    log.end_epoch()
    log.start_epoch(1)
    assert log.add(30, 3.0, 2.0)
    assert log.add(40, math.inf, 2.5)
    assert not log.add(50, 1.5, 2.5)
    assert log.epoch_record() == {"epoch": 1, "measurements": 3, "sharpness_max": math.inf, "sharpness_last": 1.5,
                                  "threshold_last": 2.5, "first_crossing_step": 30, "crossing_sharpness": 3.0,
                                  "crossing_threshold": 2.0}
    saved = log.state_dict()
    log.start_epoch(1)  # the current epoch again (a mid-epoch resume): kept
    assert log.epoch_record()["measurements"] == 3
    log.start_epoch(2)  # epoch 1 was not ended (checkpoint saved before end_epoch): ended now
    assert [r["epoch"] for r in log.history] == [0, 1]
    log.start_epoch(3)
    assert log.add(70, 5.0, 1.0)
    assert log.epoch_record()["first_crossing_step"] == 70
    assert log.epoch_record()["crossing_sharpness"] == 5.0
    run = log.run_record()
    series = run.pop("series")
    assert run == {"measurements": 6, "sharpness_max": math.inf, "first_crossing_step": 30,
                   "crossing_sharpness": 3.0, "crossing_threshold": 2.0, "initial_step": 10,
                   "initial_sharpness": 1.0, "initial_threshold": 2.0}
    assert [row[0] for row in series] == [10, 20, 30, 40, 50, 70] and math.isnan(series[1][1])
    assert series[4] == [50, 1.5, 2.5] and series[5] == [70, 5.0, 1.0]
    restored = SharpnessLog()
    restored.load_state_dict(saved)
    assert restored.state_dict().keys() == saved.keys() and restored.first_crossing_step == 30
    assert restored.series[:1] == saved["series"][:1] and len(restored.series) == 5
    all_nan = SharpnessLog()
    all_nan.start_epoch(0)
    all_nan.add(1, math.nan, 1.0)
    assert math.isnan(all_nan.epoch_record()["sharpness_max"])


# --------------------------------------------------------------------------- the callback


class Recorder(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def curvature(self) -> list[tuple[int, float, float]]:
        return [(s, m["curvature/sharpness"], m["curvature/threshold"]) for s, m in self.rows
                if "curvature/sharpness" in m]


class Classifier(L.LightningModule):
    """The minimum the callback needs: the classifier as ``.model`` and one optimizer."""

    def __init__(self, model: nn.Module, make_optimizer: Callable[..., torch.optim.Optimizer],
                 nan_at_batch: int | None = None) -> None:
        super().__init__()
        self.model, self.make_optimizer, self.nan_at_batch = model, make_optimizer, nan_at_batch

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.nan_at_batch:
            with torch.no_grad():
                self.model[0].weight[0, 0] = math.nan

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters())


class Data(L.LightningDataModule):
    """32 random examples in 4 unshuffled batches, with ``train_x`` / ``train_y`` as MNISTDataModule has."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.train_x = torch.randn(32, 3, generator=g, dtype=F64)
        self.train_y = torch.randint(0, 3, (32,), generator=g)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.train_x, self.train_y), batch_size=8)


def tiny_model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(3, 6), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(6, 3)]
    return nn.Sequential(*layers).double()


def fit(module: L.LightningModule, callbacks: list[L.Callback], epochs: int = 2, logger: Logger | None = None,
        ckpt_path: str | None = None, root: Path | None = None) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger or False,
                        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root)
    trainer.fit(module, datamodule=Data(), ckpt_path=ckpt_path)
    return trainer


def test_callback_logs_and_records_every_n_steps() -> None:
    probe = Data().train_x[:16], Data().train_y[:16]
    cb = SharpnessCallback(every_n_steps=2, log_spaced_start=False, probe=probe, iters=60, tol=1e-12)
    logger = Recorder()
    module = Classifier(tiny_model(), lambda p: optim.SGD(p, lr=0.5))
    fit(module, [cb], logger=logger)
    logged = logger.curvature()
    assert [s for s, _, _ in logged] == [2, 4, 6, 8]
    assert all(t == pytest.approx(4.0) for _, _, t in logged)
    values = [v for _, v, _ in logged]
    assert [r["epoch"] for r in cb.history] == [0, 1]
    for record, (a, b) in zip(cb.history, [values[:2], values[2:]]):
        assert record["measurements"] == 2 and record["sharpness_max"] == max(a, b) and record["sharpness_last"] == b
    assert cb.epoch_record() == cb.history[-1]
    assert cb.run_record()["first_crossing_step"] is None and max(values) < 4.0
    # The last measurement is the sharpness of the final weights on the probe.
    assert values[-1] == pytest.approx(sharpness(module.model, *probe, iters=60, tol=1e-12), rel=1e-9)


def test_callback_records_the_first_crossing() -> None:
    probe = Data().train_x, Data().train_y
    start = sharpness(tiny_model(), *probe, iters=60, tol=1e-12)
    lr = 2 / (0.5 * start)  # the threshold starts at half the sharpness
    cb = SharpnessCallback(every_n_steps=1, log_spaced_start=False, probe=probe, iters=60, tol=1e-12)
    logger = Recorder()
    fit(Classifier(tiny_model(), lambda p: optim.SGD(p, lr=lr)), [cb], logger=logger)
    logged = logger.curvature()
    crossings = [s for s, v, t in logged if v > t]
    assert crossings and cb.run_record()["first_crossing_step"] == crossings[0]
    for record in cb.history:
        steps = [s for s in crossings if 4 * record["epoch"] < s <= 4 * record["epoch"] + 4]
        assert record["first_crossing_step"] == (steps[0] if steps else None)


def test_callback_does_not_change_the_trajectory() -> None:
    def run(callbacks: list[L.Callback]) -> list[Tensor]:
        module = Classifier(tiny_model(dropout=0.3), lambda p: optim.Adam(p, lr=0.05))
        torch.manual_seed(1)  # dropout draws from the global generator
        fit(module, callbacks)
        return [p.detach().clone() for p in module.parameters()]

    cb = SharpnessCallback(every_n_steps=1, log_spaced_start=False, probe_size=16)
    with_tracking = run([cb])
    assert cb.run_record()["measurements"] == 8 and all(math.isfinite(r["sharpness_max"]) for r in cb.history)
    assert cb.run_record()["probe_images"] == 16
    assert all(torch.equal(a, b) for a, b in zip(run([]), with_tracking))


def test_a_probe_larger_than_the_training_set_is_the_training_set_and_recorded_so() -> None:
    cb = SharpnessCallback(every_n_steps=4, log_spaced_start=False, probe_size=1000)
    fit(Classifier(tiny_model(), lambda p: optim.SGD(p, lr=0.1)), [cb], epochs=1)
    assert cb.run_record()["probe_images"] == 32  # Data's 32 examples


def test_callback_survives_non_finite_weights() -> None:
    cb = SharpnessCallback(every_n_steps=1, log_spaced_start=False, probe_size=16)
    logger = Recorder()
    fit(Classifier(tiny_model(), lambda p: optim.Adam(p, lr=0.01), nan_at_batch=2), [cb], epochs=1, logger=logger)
    values = [v for _, v, _ in logger.curvature()]
    assert len(values) == 4 and all(math.isfinite(v) for v in values[:2]) and all(math.isnan(v) for v in values[2:])
    record = cb.epoch_record()
    assert math.isnan(record["sharpness_last"]) and record["sharpness_max"] == max(values[:2])


def test_callback_resumes_from_a_checkpoint(tmp_path: Path) -> None:
    def make() -> Classifier:
        return Classifier(tiny_model(), lambda p: optim.Adam(p, lr=0.05))

    straight = SharpnessCallback(every_n_steps=3, log_spaced_start=False, probe_size=16)
    fit(make(), [straight], epochs=3)
    first = SharpnessCallback(every_n_steps=3, log_spaced_start=False, probe_size=16)
    trainer = fit(make(), [first], epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = SharpnessCallback(every_n_steps=3, log_spaced_start=False, probe_size=16)
    fit(make(), [resumed], epochs=3, ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert resumed.history == straight.history and resumed.run_record() == straight.run_record()
    assert [r["measurements"] for r in straight.history] == [1, 1, 2]  # steps 3 | 6 | 9, 12


def test_callback_draws_both_lines_on_one_tensorboard_chart(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    fit(Classifier(tiny_model(), lambda p: optim.SGD(p, lr=0.1)), [SharpnessCallback(every_n_steps=4, log_spaced_start=False, probe_size=8)],
        logger=logger, root=tmp_path)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"curvature/sharpness", "curvature/threshold"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("curvature/threshold")] == [4, 8]
    assert "custom_scalars__config__" in events.Tags()["tensors"]  # the layout with both on one chart


def test_log_spaced_start_measures_the_initialisation_and_the_first_steps() -> None:
    cb = SharpnessCallback(every_n_steps=10, probe_size=8)  # log_spaced_start by default, as in the config
    assert [s for s in range(1, 31) if cb.due(s)] == [1, 2, 4, 8, 10, 20, 30]
    off = SharpnessCallback(every_n_steps=10, log_spaced_start=False)
    assert [s for s in range(1, 31) if off.due(s)] == [10, 20, 30]
    fit(Classifier(tiny_model(), lambda p: optim.SGD(p, lr=0.1)), [cb], epochs=3)  # 12 steps
    assert cb.sharpness_log.measurements == 6 and cb.history[0]["measurements"] >= 1  # steps 0, 1, 2, 4, 8, 10
    # Adam is measured at step 0 too, preconditioned by the P its state settles to (probe minibatches of 4).
    adam = SharpnessCallback(every_n_steps=10, probe_size=8, log_spaced_start=True, batch_size=4, iters=60, tol=1e-12)
    fit(Classifier(tiny_model(), lambda p: optim.Adam(p, lr=0.01)), [adam], epochs=3)
    assert adam.sharpness_log.measurements == 6 and adam.sharpness_log.series[0][0] == 0
    start, probe = tiny_model(), adam.probe
    expected_p = initial_preconditioner(optim.Adam(start.parameters(), lr=0.01), gradient_moments(start, *probe, 4))
    expected = sharpness(start, *probe, preconditioner=expected_p, iters=60, tol=1e-12)
    assert adam.sharpness_log.series[0][1:] == [pytest.approx(expected, rel=1e-9), pytest.approx(38 / 0.01)]
    assert adam.run_record()["initial_step"] == 0


def test_callback_argument_checks() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        SharpnessCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="probe_size"):
        SharpnessCallback(every_n_steps=1, probe_size=0)
    with pytest.raises(ValueError, match="probe"):
        SharpnessCallback(every_n_steps=1, probe=(torch.zeros(2, 3), torch.zeros(3)))
    with pytest.raises(TypeError, match="NAdam"):
        fit(Classifier(tiny_model(), lambda p: torch.optim.NAdam(p)), [SharpnessCallback(every_n_steps=1)])


# --------------------------------------------------------------------------- the benchmark


@pytest.mark.slow
def test_benchmark_prints_the_overhead_table() -> None:
    result = run_script(REPO / "benchmarks" / "curvature.py", "--variants", "8@5", "--steps", "10", "--repeats", "1",
                        "--reference", "16")
    assert result.returncode == 0, result.stdout + result.stderr
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith("probe 8 every 5 "))
    assert row[7] in ("PASS", "FAIL") and float(row[5]) > 0 and 1 <= float(row[10]) <= 20 and float(row[13]) > 1
    assert "against probe 16" in result.stdout
