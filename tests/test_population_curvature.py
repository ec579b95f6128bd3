"""Every member's sharpness with batched Hessian-vector products (optimlab.population.curvature),
against each member's single model measured alone (optimlab.curvature.sharpness) in float64."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
import torch

from optimlab.curvature import gradient_moments, lanczos, sharpness
from optimlab.curvature.lanczos import lanczos_members
from optimlab.population.curvature import (MemberSharpness, member_eigenpairs,
                                           member_gradient_moments)
from optimlab.population.stacked import StackedCNN, StackedMLP
from test_population import cnn_config, images, mlp_config

TIGHT = {"iters": 120, "tol": 1e-12}


def stacked(kind: str, seeds: list[int], **kw: Any) -> StackedMLP | StackedCNN:
    cls, config = (StackedMLP, mlp_config(**kw)) if kind == "mlp" else (StackedCNN, cnn_config(**kw))
    return cls.from_configs([config] * len(seeds), seeds).double()


def probe(members: int, batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 10, (members, batch), generator=torch.Generator().manual_seed(7))
    return images(members, batch, seed=3), y


def preconditioners(model: torch.nn.Module, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(p.shape, generator=g, dtype=p.dtype) * 4 + 0.1 for p in model.parameters()]


def member_pieces(model: StackedMLP | StackedCNN, tensors: list[torch.Tensor], m: int) -> list[torch.Tensor]:
    """Member m's slices of stacked tensors, in its single model's parameter order and shapes."""
    single = model.member_model(m)
    names = [name for name, _ in model.named_parameters()]
    stacked_of = dict(zip(names, tensors))
    return [stacked_of[name][m] for name, _ in single.named_parameters()]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("preconditioned", [False, True])
def test_every_member_gets_its_own_models_sharpness(kind: str, preconditioned: bool) -> None:
    seeds = [0, 1, 2]
    model = stacked(kind, seeds, activation="tanh")
    x, y = probe(len(seeds))
    pre = preconditioners(model, 5) if preconditioned else None
    pairs = member_eigenpairs(model, x, y, pre, **TIGHT)
    for m in range(len(seeds)):
        single_pre = member_pieces(model, pre, m) if pre else None
        expected = sharpness(model.member_model(m), x[m], y[m], single_pre, **TIGHT)
        assert pairs.values[m].item() == pytest.approx(expected, rel=1e-9), m
    assert pairs.values.dtype == torch.float64 and [v.shape for v in pairs.vectors] == [
        p.shape for p in model.parameters()]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_every_member_gets_its_own_models_gradient_moments(kind: str) -> None:
    seeds = [0, 1, 2]
    model = stacked(kind, seeds, activation="tanh")
    x, y = probe(len(seeds), batch=7)
    square, variance, _ = member_gradient_moments(model, x, y, batch_size=3)  # three parts: 3, 2 and 2 images
    for m in range(len(seeds)):
        single_square, single_variance, _ = gradient_moments(model.member_model(m), x[m], y[m], batch_size=3)
        for got, want in zip(member_pieces(model, square, m) + member_pieces(model, variance, m),
                             single_square + single_variance):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-15)


def test_members_stop_on_their_own_tolerance_and_warm_starts_help() -> None:
    model = stacked("mlp", [0, 1, 2, 3])
    x, y = probe(4)
    cold = member_eigenpairs(model, x, y, iters=50, tol=1e-6)
    warm = member_eigenpairs(model, x, y, iters=50, tol=1e-6, init=cold.vectors)
    assert (warm.iterations < cold.iterations).all() and warm.values == pytest.approx(cold.values.tolist(), rel=1e-5)
    assert len(set(cold.iterations.tolist())) > 1  # each member stopped when it converged
    for m in range(4):
        norm = torch.linalg.vector_norm(torch.cat([v[m].flatten() for v in cold.vectors]))
        assert norm.item() == pytest.approx(1.0, rel=1e-9)


def test_a_non_finite_member_gives_nan_and_changes_no_other() -> None:
    model = stacked("mlp", [0, 1, 2])
    x, y = probe(3)
    before = member_eigenpairs(model, x, y, **TIGHT).values
    with torch.no_grad():
        next(model.parameters())[1, 0, 0] = math.nan
    after = member_eigenpairs(model, x, y, **TIGHT).values
    assert math.isnan(after[1]) and torch.equal(after[[0, 2]], before[[0, 2]])


def test_a_member_whose_probe_loss_overflows_gives_nan_as_its_run_does() -> None:
    """Finite weights whose loss overflows to inf (logits of +-1e308 after an lr of 1.7e308, a probe) have no
    defined Hessian: the run's tracker records NaN; the member had got the saturated softmax's 0.0."""
    model = stacked("mlp", [0, 1, 2])
    x, y = probe(3)
    before = member_eigenpairs(model, x, y, **TIGHT)
    bias = list(model.parameters())[-1]  # the output layer's [P, 10]
    with torch.no_grad():
        bias[1] = -1e308
        bias[1, 0] = 1e308  # every label but 0 costs 2e308: inf, its gradients finite
    assert math.isnan(sharpness(model.member_model(1), x[1], y[1], **TIGHT))
    after = member_eigenpairs(model, x, y, init=before.vectors, **TIGHT)
    assert math.isnan(after.values[1]) and after.iterations[1] == 0
    assert after.values[[0, 2]].tolist() == pytest.approx(before.values[[0, 2]].tolist(), rel=1e-9)  # unchanged
    assert all(torch.equal(new[1], old[1]) for new, old in zip(after.vectors, before.vectors))  # its start vector


def test_batched_lanczos_equals_lanczos_on_each_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    mats = torch.randn(3, 30, 30, generator=g, dtype=torch.float64)
    mats = mats + mats.transpose(1, 2)
    v0 = torch.randn(3, 30, generator=g, dtype=torch.float64)
    values, vectors, counts, _ = lanczos_members(lambda v: torch.einsum("pij,pj->pi", mats, v), v0, iters=30, tol=0)
    for m in range(3):
        value, vector, count, _ = lanczos(lambda v: mats[m] @ v, v0[m], iters=30, tol=0)
        assert values[m].item() == pytest.approx(value, rel=1e-10) and abs(int(counts[m]) - count) <= 3
        assert values[m].item() == pytest.approx(torch.linalg.eigvalsh(mats[m])[-1].item(), rel=1e-10)
        assert abs(torch.dot(vectors[m], vector).item()) == pytest.approx(1.0, rel=1e-8)


def test_batched_lanczos_stops_each_member_within_its_tolerance() -> None:
    # Random symmetric matrices: top eigenvalues close together, where a stop on the Ritz value's
    # change ends early; each member stops where its own lanczos does.
    g = torch.Generator().manual_seed(1)
    mats = torch.randn(8, 60, 60, generator=g, dtype=torch.float64)
    mats = mats + mats.transpose(1, 2)
    v0 = torch.randn(8, 60, generator=g, dtype=torch.float64)
    values, _, counts, _ = lanczos_members(lambda v: torch.einsum("pij,pj->pi", mats, v), v0, iters=60, tol=1e-3)
    for m in range(8):
        value, _, count, _ = lanczos(lambda v: mats[m] @ v, v0[m], iters=60, tol=1e-3)
        assert int(counts[m]) == count < 60 and values[m].item() == pytest.approx(value, rel=1e-9)
        assert value == pytest.approx(torch.linalg.eigvalsh(mats[m])[-1].item(), rel=1e-3)


def test_batched_lanczos_takes_an_iteration_cap_per_member() -> None:
    g = torch.Generator().manual_seed(2)
    mats = torch.randn(3, 40, 40, generator=g, dtype=torch.float64)
    mats = mats + mats.transpose(1, 2)
    v0 = torch.randn(3, 40, generator=g, dtype=torch.float64)
    values, _, counts, _ = lanczos_members(lambda v: torch.einsum("pij,pj->pi", mats, v), v0, iters=[2, 40, 5], tol=0)
    assert counts.tolist() == [2, 40, 5]
    for m, cap in enumerate([2, 40, 5]):
        assert values[m].item() == pytest.approx(lanczos(lambda v: mats[m] @ v, v0[m], iters=cap, tol=0)[0], rel=1e-10)
    matvec = lambda v: torch.einsum("pij,pj->pi", mats, v)  # noqa: E731
    for caps in (np.array([2, 40, 5]), torch.tensor([2, 40, 5]), (2, 40, 5)):
        assert lanczos_members(matvec, v0, iters=caps, tol=0)[2].tolist() == [2, 40, 5]
    assert lanczos_members(matvec, v0, iters=np.int64(3), tol=0)[2].tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match=r"Invalid iters: 2 values for 3 members \(must be one, or one per member\)"):
        lanczos_members(lambda v: v, v0, iters=[2, 3])
    with pytest.raises(ValueError, match="Invalid iters: 0"):
        lanczos_members(lambda v: v, v0, iters=[2, 0, 3])
    with pytest.raises(ValueError, match="Invalid iters: '34'"):
        lanczos_members(lambda v: v, v0, iters="34")


def test_a_cold_member_measurement_takes_the_cold_start_products_as_its_run_does(mnist_root: Any) -> None:
    """At iters 2 a member's first measurement (a random start) runs as far as its run's tracker's
    first call, not 2 products (which left the value at initialisation far too low); later ones warm."""
    from optimlab.curvature import SharpnessTracker
    from optimlab.curvature.tracking import COLD_START_ITERS
    from optimlab.data import MNISTDataModule
    from optimlab.optim import SGD
    from optimlab.population import PopulationData, member_optimizer

    seeds = [0, 1]
    data = PopulationData([MNISTDataModule(val_size=500, subset=512, seed=s, download=False) for s in seeds])
    model = stacked("mlp", seeds).double()
    optimizer = member_optimizer(SGD, model, [0.1] * len(seeds))
    tracker = MemberSharpness(every_n_steps=10, seeds=seeds, probe_size=64, iters=2, tol=1e-12)
    tracker.setup(model, optimizer, data)
    tracker.start_epoch(0, [0, 1])
    tracker.measure(0, model, optimizer, [0, 1])
    tracker.measure(1, model, optimizer, [0, 1])
    x, y = tracker.probe
    for m, seed in enumerate(seeds):
        run = SharpnessTracker(iters=2, tol=1e-12, seed=seed)
        single = model.member_model(m)
        first = run(single, x[m], y[m])
        assert run.iterations == COLD_START_ITERS
        assert tracker.logs[m].series[0][1] == pytest.approx(first, rel=1e-9)
        assert first == pytest.approx(sharpness(single, x[m], y[m], iters=100, tol=1e-12), rel=1e-6)
        assert tracker.logs[m].series[1][1] == pytest.approx(run(single, x[m], y[m]), rel=1e-9) and run.iterations == 2
    resumed = MemberSharpness(every_n_steps=10, seeds=seeds, probe_size=64, iters=2, tol=1e-12)
    assert resumed.warm == [False, False]
    resumed.load_state_dict(tracker.state_dict())
    assert resumed.warm == [True, True]  # a resumed member measures warm, as its run's restored tracker


def test_labels_of_any_integer_type_and_a_growing_basis() -> None:
    model = stacked("mlp", [0, 1])
    x, y = probe(2)
    assert torch.equal(member_eigenpairs(model, x, y.int(), **TIGHT).values, member_eigenpairs(model, x, y, **TIGHT).values)
    got, want = member_gradient_moments(model, x, y.int(), 3), member_gradient_moments(model, x, y, 3)
    assert all(torch.equal(a, b) for a, b in zip(got.square + got.variance, want.square + want.variance))
    n = 100_000  # iters = n would reserve 2 n^2 floats; the basis grows as the iteration goes on
    diagonal = torch.ones(2, n)
    diagonal[:, :3] = torch.tensor([[4.0, 3.0, 2.0], [5.0, 1.5, 1.2]])
    values, _, counts, _ = lanczos_members(lambda v: diagonal * v, torch.ones(2, n), iters=n, tol=1e-4)
    assert values.tolist() == pytest.approx([4.0, 5.0], rel=1e-4) and max(counts.tolist()) <= 6


def test_argument_checks() -> None:
    model = stacked("mlp", [0, 1])
    x, y = probe(2)
    with pytest.raises(ValueError, match=r"Invalid init: must be a list of \d+ tensors .* got \[\(2, 3\)\]"):
        member_eigenpairs(model, x, y, init=[torch.ones(2, 3)])
    with pytest.raises(ValueError, match="x must be"):
        member_eigenpairs(model, x[:1], y[:1])
    with pytest.raises(ValueError, match="preconditioner"):
        member_eigenpairs(model, x, y, [torch.ones(3)])
    with pytest.raises(ValueError, match="positive"):
        member_eigenpairs(model, x, y, [torch.zeros_like(p) for p in model.parameters()])
    # a member's loss averages over all its probe images: labels a mean cross-entropy would skip or refuse are refused
    for bad, said in ((-100, "got -100"), (10, "got 10"), (None, "got floating-point targets")):
        labels = y.float() if bad is None else y.clone().index_put_((torch.tensor([1]), torch.tensor([0])),
                                                                    torch.tensor(bad))
        with pytest.raises(ValueError, match=re.escape(f"Invalid y: class indices in [0, 10) required, {said}")):
            member_eigenpairs(model, x, labels)
    with pytest.raises(ValueError, match="v0"):
        lanczos_members(lambda v: v, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="iters"):
        lanczos_members(lambda v: v, torch.ones(2, 3), iters=0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        member_eigenpairs(model.requires_grad_(False), x, y)


@pytest.mark.parametrize("kwargs,key", [({"every_n_steps": 0}, "every_n_steps"), ({"probe_size": 0}, "probe_size"),
                                        ({"iters": 0}, "iters"), ({"iters": 1}, "iters"), ({"tol": -1.0}, "tol")])
def test_tracking_argument_checks(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        MemberSharpness(**{"every_n_steps": 10, "seeds": [0, 1], **kwargs})


@pytest.mark.parametrize("seeds", [[0, 1], [4, 4]])
def test_each_member_probes_the_images_its_run_draws(mnist_root: Any, seeds: list[int]) -> None:
    """Members that share their data (``data.seed`` pinned) but not their seed each probe the
    images their own run draws by its seed; with the seed shared too, one expanded view serves all."""
    from optimlab.curvature import probe_indices
    from optimlab.data import MNISTDataModule
    from optimlab.optim import SGD
    from optimlab.population import PopulationData, member_optimizer

    data = PopulationData([MNISTDataModule(val_size=500, subset=512, seed=9, download=False) for _ in seeds])
    assert data.input_groups == [2]
    model = stacked("mlp", seeds).float()
    tracker = MemberSharpness(every_n_steps=10, seeds=seeds, probe_size=64)
    tracker.setup(model, member_optimizer(SGD, model, [0.1] * len(seeds)), data)
    assert tracker.probe is not None
    x, y = tracker.probe
    for m, seed in enumerate(seeds):
        pick = probe_indices(data.train_size, 64, seed)
        assert torch.equal(x[m], data.images[data.train_images[m, pick]])
        assert torch.equal(y[m], data.labels[data.train_labels[m, pick]])
    assert (x.stride(0) == 0) == (seeds[0] == seeds[1])
