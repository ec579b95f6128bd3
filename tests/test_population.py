"""Population training: stacked models equal their single members (init bitwise, forward to 1e-12
in float64), each member's batches equal its own data module's, and the batched loop isolates a
diverging member and reproduces the members' single runs. Small nets and subsets: seconds each,
except the end-to-end comparison with train.run (slow)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import REPO, compose_config, run_script
from optimlab.data import MNISTDataModule
from optimlab.mnist_files import DataError, epoch_batches
from optimlab.divergence import LOSS_OR_GRADIENT, WEIGHTS
from optimlab.optim import SGD, Adagrad, Adam, RMSprop
from optimlab.population import StackedCNN, StackedMLP, build_member
from optimlab.population.best import MODEL_CHECKPOINT, MemberBest
from optimlab.population.best import followed as best_followed
from optimlab.data import split_indices
from optimlab.population.data import PopulationData
from optimlab.population.loop import (MemberRecord, PopulationLoop, StepMetrics, add_member_noise,
                                      clip_member_gradients, member_optimizer, train_population)
from optimlab.population import module as population_module
from optimlab.population.module import PopulationModule
from optimlab.population.schedule import MemberSchedules
from optimlab.population.stopping import MemberEarlyStopping, StopRule
from optimlab.population.stacked import (MemberLinear, StackedConv2d, StackedDropout, built_member, grouped_conv2d,
                                         member_conv2d, member_losses)
from optimlab.train import run

INITS = ["default", "normal", "glorot", "stax"]
SEEDS = [0, 1, 7, 123]
F64 = dict(rtol=1e-12, atol=1e-12)


def mlp_config(**kw: Any) -> dict[str, Any]:
    return {"_target_": "optimlab.models.MLP", "hidden": [16, 8], **kw}


def cnn_config(**kw: Any) -> dict[str, Any]:
    return {"_target_": "optimlab.models.CNN", "channels": [2, 3], "fc": [8], **kw}


def images(members: int, batch: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(members, batch, 1, 28, 28, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- stacked models


def test_members_with_one_config_and_seed_are_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A grid's members that differ only in what they learn with share their start: built once each
    (an interpolated config compared by its values), and each member is still its single run's model."""
    from omegaconf import OmegaConf

    from optimlab.population import stacked

    built: list[int] = []
    build = stacked.built_member
    monkeypatch.setattr(stacked, "built_member", lambda config, seed: built.append(seed) or build(config, seed))
    tree = OmegaConf.create({"std": 0.1, "a": mlp_config(init="normal", init_std="${std}"),
                             "b": mlp_config(init="normal", init_std=0.1), "c": mlp_config(init="normal", init_std=0.2)})
    configs, seeds = [tree.a, tree.b, tree.a, tree.c, tree.b], [0, 0, 1, 0, 0]
    model = StackedMLP.from_configs(configs, seeds)
    assert sorted(built) == [0, 0, 1]  # (0.1, 0), (0.1, 1), (0.2, 0)
    for m, (cfg, seed) in enumerate(zip(configs, seeds)):
        single, rng_state = build(cfg, seed)
        assert torch.equal(model.generators[m].get_state(), rng_state)
        for key, value in single.state_dict().items():
            assert torch.equal(model.member_state_dict(m)[key], value), f"member {m} {key}"
    assert not torch.equal(model.member_state_dict(0)["net.1.weight"], model.member_state_dict(3)["net.1.weight"])


@pytest.mark.parametrize("stacked,config", [(StackedMLP, mlp_config), (StackedCNN, cnn_config)], ids=["mlp", "cnn"])
@pytest.mark.parametrize("init", INITS)
def test_member_starts_from_its_single_runs_weights(stacked: type, config: Any, init: str) -> None:
    """Member m's weights are bitwise the single model's built under m's seed as train.run builds it
    (seed_everything, then the model first); the caller's generator state is untouched."""
    configs = [config(init=init, init_std=0.05 * (m + 1)) for m in range(len(SEEDS))]
    before = torch.get_rng_state()
    model = stacked.from_configs(configs, SEEDS)
    assert torch.equal(torch.get_rng_state(), before)
    for m, (cfg, seed) in enumerate(zip(configs, SEEDS)):
        with torch.random.fork_rng(devices=[]):
            L.seed_everything(seed, verbose=False)  # train.run's seeding, then build_parts' instantiate
            single = instantiate(cfg)
        state = model.member_state_dict(m)
        assert state.keys() == single.state_dict().keys()
        for key, value in single.state_dict().items():
            assert torch.equal(state[key], value), f"member {m} {key}"
    assert all(p.shape[0] == len(SEEDS) for p in model.parameters())


@pytest.mark.parametrize("stacked,config", [(StackedMLP, mlp_config), (StackedCNN, cnn_config)], ids=["mlp", "cnn"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
def test_member_forward_equals_single_forward(stacked: type, config: Any, activation: str) -> None:
    configs = [config(activation=activation, init=init) for init in INITS]
    model = stacked.from_configs(configs, SEEDS).double()
    x = images(len(SEEDS))
    logits = model(x)
    assert logits.shape == (len(SEEDS), 5, 10)
    for m, (cfg, seed) in enumerate(zip(configs, SEEDS)):
        single = build_member(cfg, seed).double()
        torch.testing.assert_close(logits[m], single(x[m]), **F64)
        assert torch.equal(model.member_model(m)(x[m]), single(x[m]))


@pytest.mark.parametrize("stacked,config,batch", [
    (StackedMLP, mlp_config(hidden=[2]), 32), (StackedMLP, mlp_config(hidden=[8]), 128),
    (StackedMLP, mlp_config(hidden=[16, 8]), 100), (StackedMLP, mlp_config(hidden=[64]), 33),
    (StackedCNN, cnn_config(), 32), (StackedCNN, cnn_config(channels=[4], fc=[], pool_stride=2, kernel_size=3), 17),
], ids=["mlp-2", "mlp-8", "mlp-16-8", "mlp-64", "cnn", "cnn-lenet-pooling"])
@pytest.mark.parametrize("shared", [False, True], ids=["own-batches", "one-expanded-batch"])
@pytest.mark.parametrize("optimizer,lrs", [(SGD, [0.05, 0.5, 2.0]), (Adam, [1e-3, 1e-2, 0.1]),
                                           (Adagrad, [1e-2, 0.1, 1.0]), (RMSprop, [1e-3, 1e-2, 0.1])])
def test_a_float32_population_trains_bitwise_as_its_members_single_runs(
        stacked: type, config: dict[str, Any], batch: int, shared: bool, optimizer: type, lrs: list[float]) -> None:
    """Each linear layer computes every member's slice as nn.Linear computes it (MemberLinear), and
    on the CPU each member's convolution is its single model's call, so in float32 every member's
    weights after each of 30 steps equal, bit for bit, its single model's trained on the same
    batches by the same optimizer with its own lr (one CPU thread, as the test workers run)."""
    configs = [{**config, "activation": "tanh", "init": init} for init in INITS[:3]]
    seeds = SEEDS[:3]
    model = stacked.from_configs(configs, seeds)
    opt = member_optimizer(optimizer, model, lrs)
    singles = [build_member(cfg, seed) for cfg, seed in zip(configs, seeds)]
    single_opts = [optimizer(single.parameters(), lr=lr) for single, lr in zip(singles, lrs)]
    g = torch.Generator().manual_seed(0)
    for step in range(30):
        x = torch.rand(1 if shared else 3, batch, 1, 28, 28, generator=g).expand(3, -1, -1, -1, -1)
        y = torch.randint(0, 10, (1 if shared else 3, batch), generator=g).expand(3, -1)
        opt.zero_grad()
        member_losses(model(x), y).sum().backward()
        opt.step()
        for m, (single, single_opt) in enumerate(zip(singles, single_opts)):
            single_opt.zero_grad()
            F.cross_entropy(single(x[m]), y[m]).backward()
            single_opt.step()
            for key, value in single.state_dict().items():
                assert torch.equal(model.member_state_dict(m)[key], value), f"member {m} {key} at step {step}"


@pytest.mark.parametrize("stacked,config,optimizer,options", [
    (StackedMLP, mlp_config(hidden=[33, 17], dropout=0.3), SGD, dict(momentum=0.9, grad_noise_std=0.05)),
    (StackedCNN, cnn_config(dropout=0.4), Adam, dict(grad_noise_std=0.1, maximize=True)),
], ids=["mlp-sgd", "cnn-adam-maximize"])
def test_float32_members_draw_their_runs_dropout_masks_and_gradient_noise_bitwise(
        stacked: type, config: dict[str, Any], optimizer: type, options: dict[str, Any]) -> None:
    """Each member's dropout masks (its model's forward) and gradient noise (add_member_noise) come from its
    own generator as its run's come from torch's global one: in float32 every member's weights after each
    of 20 steps equal, bit for bit, its single model's trained with our optimizer and the same batches,
    from the generator state its run's training starts from (one CPU thread, as the test workers run)."""
    seeds, lrs = [0, 3, 0], [0.05, 0.02, 0.01]
    options = dict(options)  # (the parameters' dict is shared by reruns)
    noise = options.pop("grad_noise_std")
    model = stacked.from_configs([config] * 3, seeds)
    opt = member_optimizer(optimizer, model, lrs, **options)
    built = [built_member(config, seed) for seed in seeds]
    singles = [optimizer(single.parameters(), lr=lr, grad_noise_std=noise, **options)
               for (single, _), lr in zip(built, lrs)]
    states = [state for _, state in built]
    g = torch.Generator().manual_seed(0)
    for step in range(20):
        x, y = torch.rand(3, 8, 1, 28, 28, generator=g), torch.randint(0, 10, (3, 8), generator=g)
        opt.zero_grad()
        member_losses(model(x), y).sum().backward()
        add_member_noise([p.grad for p in model.parameters()], model.generators, noise, options.get("maximize", False))
        opt.step()
        for m, ((single, _), single_opt) in enumerate(zip(built, singles)):
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(states[m])
                single_opt.zero_grad()
                F.cross_entropy(single(x[m]), y[m]).backward()
                single_opt.step()
                states[m] = torch.get_rng_state()
            for key, value in single.state_dict().items():
                assert torch.equal(model.member_state_dict(m)[key], value), f"member {m} {key} at step {step}"


@pytest.mark.parametrize("kernel,in_channels", [(5, 1), (3, 4)])
def test_member_convolutions_equal_one_grouped_convolution(kernel: int, in_channels: int) -> None:
    """The CPU's member-by-member convolutions and the GPU's grouped one compute the same maps and
    gradients (float64, on the CPU; images [P, B, C, H, W] and maps [P*B, C, H, W] alike)."""
    g = torch.Generator().manual_seed(0)
    layers = [torch.nn.Conv2d(in_channels, 3, kernel).double() for _ in range(4)]
    conv = StackedConv2d(layers)
    x = torch.randn(4, 5, in_channels, 12, 12, generator=g, dtype=torch.float64, requires_grad=True)
    params = [x, conv.weight, conv.bias]
    for inputs in (x, x.flatten(0, 1)):
        members = conv(inputs)
        grouped = grouped_conv2d(inputs, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
        assert members.shape == grouped.shape == (20, 3, 13 - kernel, 13 - kernel)
        torch.testing.assert_close(members, grouped, **F64)
        for m, layer in enumerate(layers):
            assert torch.equal(members[5 * m:5 * m + 5], layer(x[m]))
        cotangent = torch.randn(members.shape, generator=g, dtype=torch.float64)
        for ours, theirs in zip(torch.autograd.grad(members, params, cotangent),
                                torch.autograd.grad(grouped, params, cotangent)):
            torch.testing.assert_close(ours, theirs, **F64)
    # One batch per run of members that share it: rows 0 and 1 serve members 0 and 1-3.
    rows = torch.randn(2, 5, in_channels, 12, 12, generator=g, dtype=torch.float64)
    copies = rows[[0, 1, 1, 1]]
    expected = conv(copies)
    for form in (member_conv2d, grouped_conv2d):
        maps = form(rows, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, groups=[1, 3])
        torch.testing.assert_close(maps, expected, **F64)
        assert torch.equal(conv(rows, [1, 3]), expected)  # the CPU's form computes what copies compute, bitwise


def test_member_linear_gradients_and_their_gradients_are_exact() -> None:
    """MemberLinear's backward (and, for Hessian-vector products, the backward of its backward)
    against finite differences, in float64, with members of different weights and inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(MemberLinear.apply, (x, weight, bias))
    assert torch.autograd.gradgradcheck(MemberLinear.apply, (x, weight, bias))
    expected = torch.stack([F.linear(x[m], weight[m], bias[m]) for m in range(3)])
    torch.testing.assert_close(MemberLinear.apply(x, weight, bias), expected, **F64)
    frozen, = torch.autograd.grad(MemberLinear.apply(x, weight.detach(), bias.detach()).sum(), x)
    torch.testing.assert_close(frozen, torch.autograd.grad(expected.sum(), x)[0], **F64)


def test_cnn_with_pool_stride_2_and_no_hidden_fc() -> None:
    configs = [cnn_config(pool_stride=2, fc=[], kernel_size=3)] * 2
    model = StackedCNN.from_configs(configs, [3, 4]).double()
    x = images(2)
    for m, seed in enumerate([3, 4]):
        torch.testing.assert_close(model(x)[m], build_member(configs[m], seed).double()(x[m]), **F64)


def test_members_must_share_an_architecture() -> None:
    with pytest.raises(ValueError, match="member 1 has another architecture"):
        StackedMLP.from_configs([mlp_config(), mlp_config(hidden=[16, 9])], [0, 0])
    with pytest.raises(ValueError, match="member 1 has another architecture"):
        StackedMLP.from_configs([mlp_config(), mlp_config(activation="relu")], [0, 0])
    with pytest.raises(ValueError, match="member 1 has another architecture"):
        StackedMLP.from_configs([mlp_config(dropout=0.5), mlp_config(dropout=0.2)], [0, 0])
    normalised = build_member(mlp_config(), 0)
    normalised.net.insert(1, torch.nn.LayerNorm(16))
    with pytest.raises(ValueError, match="LayerNorm layers cannot be stacked"):
        StackedMLP([normalised])
    with pytest.raises(ValueError, match=r"dropout probability 1.0: expected a number in \[0, 1\)"):
        StackedDropout(1.0, [])
    with pytest.raises(TypeError, match="stacks MLP"):
        StackedMLP.from_configs([cnn_config()], [0])


# --------------------------------------------------------------------------- per-member data


def datamodule(root: Path, **kw: Any) -> MNISTDataModule:
    return MNISTDataModule(root=str(root), download=False, **kw)


def assert_batches_equal(pop: PopulationData, dms: list[MNISTDataModule], epochs: tuple[int, ...]) -> None:
    """Member m's training batches (per epoch) and validation chunks are its data module's, bitwise."""
    for m, dm in enumerate(dms):
        dm.setup()
        for epoch in epochs:
            loader = dm.train_dataloader()
            loader.sampler.set_epoch(epoch)
            batches = list(pop.train_batches(epoch))
            assert len(batches) == len(loader) == pop.steps_per_epoch
            for (x, y), (px, py) in zip(loader, batches):
                assert torch.equal(px[m], x) and torch.equal(py[m], y), f"member {m} epoch {epoch}"
        vals = list(pop.val_batches())
        assert len(vals) == len(dm.val_dataloader()[0])
        for (x, y), (px, py) in zip(dm.val_dataloader()[0], vals):
            assert torch.equal(px[m], x) and torch.equal(py[m], y)
        assert pop.noisy_counts[m] == dm.noisy_count
    test = list(pop.test_batches())
    for (x, y), (px, py) in zip(dms[0].test_dataloader(), test):
        assert torch.equal(px, x) and torch.equal(py, y)


def test_member_batches_on_tiny_idx_files(tiny_mnist: Path) -> None:
    dms = [datamodule(tiny_mnist, val_size=16, batch_size=10, eval_batch_size=7, seed=s, label_noise=noise)
           for s, noise in ((0, 0.0), (1, 0.25), (2, 0.5))]
    pop = PopulationData(dms)
    x, y = next(pop.train_batches(0))
    assert x.shape == (3, 10, 1, 28, 28) and y.shape == (3, 10)
    assert_batches_equal(pop, dms, epochs=(0, 1, 4))


@pytest.mark.parametrize("subset,noise", [(300, 0.0), (256, 0.3), (1000, 0.5)])
def test_member_batches_on_real_mnist(mnist_root: Path, subset: int, noise: float) -> None:
    dms = [datamodule(mnist_root, val_size=500, batch_size=64, subset=subset, label_noise=noise, seed=s)
           for s in (0, 5, 11)]
    assert_batches_equal(PopulationData(dms), dms, epochs=(0, 2))


def test_limited_epochs_train_the_first_batches_of_each_epochs_order(tiny_mnist: Path) -> None:
    """``limit_train_batches`` as Lightning reads it: a count caps the batches, a fraction keeps
    int(batches x fraction) of them, and a fraction that keeps none is an error."""
    # 60 items in batches of 8: 8 batches, the last of 4
    assert [epoch_batches(60, 8, limit) for limit in (None, 3, 20, 0.5, 1.0, 0.99)] == [8, 3, 8, 4, 8, 7]
    with pytest.raises(DataError, match=r"^trainer.limit_train_batches: 0.1 leaves none of the 8 batches of an "
                                        r"epoch; expected a fraction >= 0.125, an integer count or null$"):
        epoch_batches(60, 8, 0.1)
    assert epoch_batches(60, 8, 0) == epoch_batches(60, 8, 0.0) == 0  # Lightning's: no training
    dms = [datamodule(tiny_mnist, val_size=16, batch_size=10, seed=s) for s in (0, 1)]
    full, limited = PopulationData(dms), PopulationData(dms, limit_train_batches=2)
    assert limited.steps_per_epoch == 2 and full.steps_per_epoch == 5
    for epoch in (0, 3):
        batches = list(limited.train_batches(epoch))
        assert len(batches) == 2
        for (x, y), (fx, fy) in zip(batches, full.train_batches(epoch)):
            assert torch.equal(x, fx) and torch.equal(y, fy)
    # Validation and test chunks likewise: the first of them (an epoch's test counts as validation, as a
    # run's second validation loader). The tiny files: 16 validation images and 32 test images, in 5s.
    dms = [datamodule(tiny_mnist, val_size=16, batch_size=10, eval_batch_size=5, seed=s) for s in (0, 1)]
    full, limited = PopulationData(dms), PopulationData(dms, limit_val_batches=3, limit_test_batches=0.3)
    assert [len(list(d.val_batches())) for d in (full, limited)] == [4, 3]
    assert [len(list(limited.test_batches(every_epoch=e))) for e in (True, False)] == [3, 2]
    for (x, y), (fx, fy) in zip(limited.test_batches(), full.test_batches()):
        assert torch.equal(x, fx) and torch.equal(y, fy)
    with pytest.raises(DataError, match=r"^trainer.limit_test_batches: 0.1 leaves none of the 7 batches"):
        PopulationData(dms, limit_test_batches=0.1)


def test_split_indices_errors_and_shared_settings(tiny_mnist: Path) -> None:
    with pytest.raises(Exception, match="data.val_size"):
        split_indices(64, 64, None, 0.0, 0)
    with pytest.raises(Exception, match="data.subset"):
        split_indices(64, 16, 49, 0.0, 0)
    with pytest.raises(ValueError, match="data.batch_size differs"):
        PopulationData([datamodule(tiny_mnist, val_size=16, batch_size=b) for b in (8, 10)])
    with pytest.raises(ValueError, match="training sets differ in size"):
        PopulationData([datamodule(tiny_mnist, val_size=16, subset=s) for s in (20, 30)])


# --------------------------------------------------------------------------- the training loop


def population(root: Path, lrs: list[float], seeds: list[int], optimizer: type = SGD,
               dtype: torch.dtype = torch.float32, stacked: type = StackedMLP, config: Any = None,
               weight_decay: Any = 0.0, every: int | list[int] = 50, scheduler: dict[str, Any] | None = None,
               clip: tuple[float, str] | None = None, stopping: MemberEarlyStopping | None = None,
               grad_noise_std: float = 0.0, best: MemberBest | None = None,
               **options: Any) -> tuple[PopulationLoop, list[MNISTDataModule]]:
    """A population on the tiny IDX files (48 training images, batches of 8: 6 steps an epoch);
    ``scheduler``: every member's scheduler config; ``clip``: (gradient_clip_val, algorithm)."""
    config = config or mlp_config(activation="relu")
    dms = [datamodule(root, val_size=16, batch_size=8, eval_batch_size=5, seed=s, label_noise=0.25) for s in seeds]
    model = stacked.from_configs([config] * len(seeds), seeds).to(dtype)
    opt = member_optimizer(optimizer, model, lrs, weight_decay, **options)
    decays = weight_decay if isinstance(weight_decay, list) else [weight_decay] * len(lrs)
    schedules = MemberSchedules([OmegaConf.create({
        "optimizer": {"_target_": f"{optimizer.__module__}.{optimizer.__name__}", "lr": lr, "weight_decay": decay, **options},
        "scheduler": scheduler}) for lr, decay in zip(lrs, decays)]) if scheduler else None
    return PopulationLoop(model, opt, PopulationData(dms), weights_every=every, schedules=schedules, clip=clip,
                          stopping=stopping, grad_noise_std=grad_noise_std, best=best), dms


@pytest.mark.parametrize("every", [0, True, 2.0, [1, 2, 3], [1, 0]])
def test_a_bad_weight_check_cadence_is_refused(tiny_mnist: Path, every: Any) -> None:
    """An integer >= 1, or one per member (two here); a bool is no count (it was taken as 1)."""
    with pytest.raises(ValueError, match="weights_every"):
        population(tiny_mnist, [0.1, 0.2], [0, 1], every=every)


def trajectory(loop: PopulationLoop, epochs: int = 2) -> list[list[torch.Tensor]]:
    """The members' weights after every step of ``epochs`` epochs."""
    steps = []
    for epoch in range(epochs):
        for x, y in loop.data.train_batches(epoch):
            loop.step(x, y)
            steps.append([p.detach().clone() for p in loop.params])
    return steps


@pytest.mark.parametrize("stacked,config", [(StackedMLP, mlp_config), (StackedCNN, cnn_config)], ids=["mlp", "cnn"])
@pytest.mark.parametrize("seeds,groups", [([3, 3, 3], [3]), ([3, 3, 5, 5, 5], [2, 3]), ([5, 3, 3, 3, 4], [1, 3, 1]),
                                          ([3, 3, 4, 3, 3], [2, 1, 2])])
def test_members_that_share_their_data_train_on_one_batch_per_run_as_on_copies(
        tiny_mnist: Path, stacked: type, config: Any, seeds: list[int], groups: list[int]) -> None:
    """Side-by-side members with one seed and data options get one gathered batch per run of them,
    which the first layer reads for each (an expanded view, no copies); the trajectories and
    evaluations are bitwise those of the copied batches."""
    config = config()
    lrs = [0.05, 0.1, 0.5, 0.2, 1.0][:len(seeds)]
    shared, _ = population(tiny_mnist, lrs, seeds, stacked=stacked, config=config)
    copied, _ = population(tiny_mnist, lrs, seeds, stacked=stacked, config=config)
    copied.data.input_groups = None
    assert shared.data.input_groups == groups
    x, y = next(shared.data.train_batches(0))
    assert x.shape[0] == len(groups) and y.shape[0] == len(seeds)
    assert (y.stride(0) == 0) == (len(groups) == 1)
    copies, labels = next(copied.data.train_batches(0))
    assert copies.shape[0] == len(seeds) and torch.equal(labels, y)
    assert torch.equal(shared.data.per_member(x), copies)
    for a, b in zip(trajectory(shared), trajectory(copied), strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert torch.equal(shared.evaluate(shared.data.val_batches()), copied.evaluate(copied.data.val_batches()))


def test_members_without_a_neighbour_that_shares_their_data_get_a_batch_each(tiny_mnist: Path) -> None:
    for seeds in ([3, 4], [3, 4, 3]):
        loop, _ = population(tiny_mnist, [0.1] * len(seeds), seeds)
        assert loop.data.input_groups is None
        assert next(loop.data.train_batches(0))[0].shape[0] == len(seeds)


def test_one_batch_per_run_must_match_the_model_runs() -> None:
    model = StackedMLP.from_configs([mlp_config()] * 3, [0, 1, 2])
    with pytest.raises(ValueError, match=r"expected images \[2, B, C, H, W\] for 3 members in runs of \[1, 1\]"):
        model(torch.zeros(2, 4, 1, 28, 28), [1, 1])
    assert model(torch.zeros(2, 4, 1, 28, 28), [1, 2]).shape == (3, 4, 10)


@pytest.mark.parametrize("on_host", [True, False], ids=["cpu-path", "gpu-path"])
def test_finite_weights_is_element_wise_even_where_a_members_sum_overflows(tiny_mnist: Path, on_host: bool) -> None:
    """Member 0's weights are finite but two of them sum past the float32 limit; member 1 has a NaN,
    member 2 an inf, member 3 nothing unusual. Only members 1 and 2 count as non-finite, on the CPU
    path (sums first, the element-wise check where a sum is not finite) as on the GPU path."""
    loop, _ = population(tiny_mnist, [0.1] * 4, [0, 1, 2, 3])
    loop.flags_on_host = on_host
    weight = loop.params[0].detach()
    weight[0, 0, :2] = 3e38
    weight[1, 5, 1] = math.nan
    weight[2, 7, 0] = -math.inf
    assert loop.finite_weights().tolist() == [True, False, False, True]
    weight[1, 5, 1] = weight[2, 7, 0] = 0.0
    assert loop.finite_weights().tolist() == [True] * 4


@pytest.mark.parametrize("wild_lr", [1e6, 1e20])
@pytest.mark.parametrize("stacked,config", [(StackedMLP, mlp_config(activation="relu")),
                                            (StackedCNN, cnn_config())], ids=["mlp", "cnn"])
def test_a_wild_member_changes_no_other_member(tiny_mnist: Path, stacked: type, config: Any, wild_lr: float) -> None:
    """Member 1 at a wild lr or at a healthy one: the other members' weights after every step are
    bitwise the same. At 1e6 member 1's weights blow up (to ~1e17 here) but stay finite; at 1e20
    it goes non-finite at once and is frozen at its last finite weights and recorded."""
    seeds = [0, 1, 2]
    runs = {}
    for lr in (0.05, wild_lr):
        loop, _ = population(tiny_mnist, [0.05, lr, 0.1], seeds, SGD, stacked=stacked, config=config)
        runs[lr] = (trajectory(loop), loop)
    healthy, (wild, loop) = runs[0.05][0], runs[wild_lr]
    for step, (a, b) in enumerate(zip(healthy, wild)):
        for p, q in zip(a, b):
            for m in (0, 2):
                assert torch.equal(p[m], q[m]), f"member {m} differs at step {step}"
    assert loop.alive[0] and loop.alive[2] and (loop.diverged_at[[0, 2]] == -1).all()
    if wild_lr < 1e20:
        assert loop.alive[1] and max(p[1].abs().max() for p in wild[-1]) > 1e10
        return
    diverged_at = int(loop.diverged_at[1])
    assert not loop.alive[1] and diverged_at >= 1
    frozen = wild[diverged_at - 1]  # the weights after the last applied step
    for step in wild[diverged_at:]:
        for p, q in zip(step, frozen):
            assert torch.equal(p[1], q[1]) and torch.isfinite(p[1]).all()


def test_freezing_by_copies_equals_freezing_by_where(tiny_mnist: Path) -> None:
    """The CPU's way of keeping the last finite weights (copies of runs of members) and the GPU's
    (a torch.where), on the CPU: the same weights after every step and the same records."""
    runs, kept = [], []
    for on_host in (True, False):
        loop, _ = population(tiny_mnist, [0.05, 1e20, 0.1, 1e300, 0.2], [0, 1, 2, 3, 4])
        loop.flags_on_host = on_host
        runs.append((trajectory(loop), loop.diverged_at.tolist(), loop.reason.tolist()))
        kept.append(loop.run_weights())
    (copies, *copies_record), (where, *where_record) = runs
    assert copies_record == where_record and copies_record[0][0] == -1 and copies_record[0][1] > 0
    # And the same weights kept for evaluating the members updated into non-finite ones (1e300: member 3).
    assert kept[0].keys() == kept[1].keys() == {3}
    for a, b in zip(kept[0][3], kept[1][3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    for a, b in zip(copies, where, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_a_population_trains_as_one_lightning_fit(tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's loop runs the epochs and batches (callbacks see every batch of the PopulationModule),
    each batch the loop's next STEPS_PER_BATCH steps (here 4: an epoch's 6 steps as 4 and 2, the
    epoch's last step flagged as such), and the weights end where the loop's own steps take them."""
    class Seen(L.Callback):
        def __init__(self) -> None:
            self.batches: list[tuple[int, int]] = []

        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                 batch_idx: int) -> None:
            assert isinstance(pl_module, PopulationModule) and not pl_module.automatic_optimization
            self.batches.append((trainer.current_epoch, batch_idx))
            steps.append([])

    monkeypatch.setattr(population_module, "STEPS_PER_BATCH", 4)
    fitted, _ = population(tiny_mnist, [0.1, 0.3], [0, 1])
    stepped, _ = population(tiny_mnist, [0.1, 0.3], [0, 1])
    steps: list[list[bool]] = []  # each Lightning batch's steps: whether the loop was told it was the epoch's last
    train_step = fitted.train_step
    monkeypatch.setattr(fitted, "train_step", lambda x, y, last: (steps[-1].append(last), train_step(x, y, last)))
    seen = Seen()
    records = fitted.fit(2, callbacks=[seen])
    assert fitted.data.steps_per_epoch == 6
    assert seen.batches == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert steps == [[False] * 4, [False, True]] * 2
    assert [[row["epoch"] for row in r.history] for r in records] == [[1, 2], [1, 2]] and fitted.epochs_done == 2
    trajectory(stepped, 2)
    assert all(torch.equal(p, q) for p, q in zip(fitted.params, stepped.params, strict=True))
    assert fitted.fit(2, callbacks=[seen]) is records and len(seen.batches) == 4  # nothing left to train
    assert [len(r.history) for r in records] == [2, 2]
    # Lightning holds none of the loop's tensors: at a fit's end it moves a module's parameters and its
    # optimizers' state to the CPU, and the loop's must stay on their device.
    module = PopulationModule(fitted)
    assert not list(module.parameters()) and module.configure_optimizers() is None


@pytest.mark.parametrize("on_host", [True, False], ids=["cpu-copies", "gpu-where"])
def test_non_finite_weights_after_an_update_are_undone(tiny_mnist: Path, on_host: bool) -> None:
    """An lr that overflows float32 (finite gradients, infinite weights after the update): the
    update is undone and recorded one step later, as the single run's guard records weights. Both
    ways of keeping the weights its run holds (the CPU's copies, the GPU's where into a copy)."""
    loop, _ = population(tiny_mnist, [0.1, 1e300, 0.1], [0, 1, 2])
    loop.flags_on_host = on_host
    start = [p.detach().clone() for p in loop.params]
    records = loop.fit(2)
    assert records[1].diverged_at_step == 1 and records[1].divergence_reason == WEIGHTS
    assert len(records[1].history) == 1 and len(records[0].history) == 2 and not records[0].diverged
    for p, q in zip(loop.params, start):
        assert torch.equal(p[1], q[1])
    # The weights its run keeps (and evaluates): those the update made, kept apart for evaluation.
    run_weights = loop.run_weights()
    assert list(run_weights) == [1] and not all(bool(w.isfinite().all()) for w in run_weights[1])
    saved = loop.state_dict()["run_weights"][1]  # the member's weights alone, not every member's (a review)
    assert all(w.untyped_storage().nbytes() == w.numel() * w.element_size() for w in saved)
    before = [p.detach().clone() for p in loop.params]
    with loop.weights_of_the_runs():
        for p, q, w in zip(loop.params, before, run_weights[1]):
            torch.testing.assert_close(p[1], w, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(p[[0, 2]], q[[0, 2]])  # the others hold their own
    assert all(torch.equal(p, q) for p, q in zip(loop.params, before))  # frozen again after the block


@pytest.mark.parametrize("broken_at,reason", [(1, LOSS_OR_GRADIENT), (2, WEIGHTS)])
def test_weights_are_judged_where_the_single_run_looks(tiny_mnist: Path, broken_at: int, reason: str) -> None:
    """With weights checked every 2 steps (as ``trainer.log_every_n_steps=2`` has the single run do),
    weights made infinite by the update of step 1 are met as step 2's non-finite loss; by step 2's
    update, as step 2's check of the weights. Both are recorded at the next step, and only member 1."""
    loop, _ = population(tiny_mnist, [0.1, 0.1, 0.1], [0, 1, 2])
    loop.weights_every.fill_(2)
    update = loop.optimizer.step

    def breaking_step() -> None:
        update()
        if loop.global_step == broken_at:
            loop.params[0].data[1, 0, 0] = math.inf

    loop.optimizer.step = breaking_step  # type: ignore[method-assign]
    records = loop.fit(1)
    assert (records[1].diverged_at_step, records[1].divergence_reason) == (broken_at + 1, reason)
    assert not records[0].diverged and not records[2].diverged


def test_per_step_scalars_follow_each_members_cadence(tiny_mnist: Path) -> None:
    """Each member's ``train_steps`` rows at its own ``log_every_n_steps``, for applied updates only:
    the member whose first update overflows logs that step (its weights' norm not finite, as its run
    logs them) and nothing after; each row's values are the member's own."""
    loop, _ = population(tiny_mnist, [0.1, 1e300, 0.05], [0, 1, 2], every=[1, 2, 3])
    grads = []
    step = loop.step

    def step_keeping_grads(x: torch.Tensor, y: torch.Tensor, last: bool = False) -> torch.Tensor:
        losses = step(x, y, last)
        grads.append([p.grad.double().flatten(1).norm(dim=1) for p in loop.params])
        return losses

    loop.step = step_keeping_grads  # type: ignore[method-assign]
    records = loop.fit(2)
    assert [row["step"] for row in records[0].train_steps] == list(range(12))
    assert [row["step"] for row in records[1].train_steps] == [0] and records[1].diverged_at_step == 1
    assert [row["step"] for row in records[2].train_steps] == [0, 3, 6, 9]
    overflowed = records[1].train_steps[0]
    assert not math.isfinite(overflowed["weight_norm"]) and math.isfinite(overflowed["loss"])
    assert [row["lr"] for row in records[2].train_steps] == [0.05] * 4
    for m in (0, 2):
        first = records[m].train_steps[0]
        assert first["loss"] == pytest.approx(records[m].history[0]["train_loss_initial"], rel=1e-12)
        for row in records[m].train_steps:
            expected = torch.stack([g[m] for g in grads[row["step"]]]).norm().item()
            assert row["grad_norm"] == pytest.approx(expected, rel=1e-9)
    weights = torch.stack([p[0].double().norm() for p in loop.params]).norm().item()  # after step 11, the last
    assert records[0].train_steps[-1]["weight_norm"] == pytest.approx(weights, rel=1e-9)


def single_run(dm: MNISTDataModule, config: dict[str, Any], seed: int, optimizer: type, lr: float,
               weight_decay: float, epochs: int, scheduler: dict[str, Any] | None = None,
               clip: tuple[float, str] | None = None, **options: Any) -> tuple[list[float], torch.nn.Module]:
    """The member's own run with the same parts, in float64: per-epoch mean training loss and the model
    (``scheduler``: stepped after each epoch, as ClassifierModule steps a run's; ``clip``: its gradients
    clipped before each step as Lightning clips them). Its dropout and gradient noise draw from torch's
    global generator, in the state a run's training starts from (the caller's state is restored)."""
    model, rng_state = built_member(config, seed)
    model = model.double()
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng_state)
        opt = optimizer(model.parameters(), lr=lr, weight_decay=weight_decay, **options)
        schedule = instantiate(scheduler)(opt) if scheduler else None
        dm.setup()
        loader, losses = dm.train_dataloader(), []
        for epoch in range(epochs):
            loader.sampler.set_epoch(epoch)
            total = 0.0
            for x, y in loader:
                loss = F.cross_entropy(model(x.double()), y)
                opt.zero_grad()
                loss.backward()
                if clip and clip[1] == "norm":
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip[0])
                elif clip:
                    torch.nn.utils.clip_grad_value_(model.parameters(), clip[0])
                opt.step()
                total += loss.item() * len(y)
            losses.append(total / dm.train_y.numel())
            if schedule is not None:
                schedule.step()
    return losses, model


@pytest.mark.parametrize("optimizer,options", [(SGD, dict(momentum=0.9, nesterov=True)), (Adam, dict(amsgrad=True)),
                                               (RMSprop, dict(centered=True)), (Adagrad, {})],
                         ids=["sgd", "adam", "rmsprop", "adagrad"])
def test_each_member_follows_its_own_run(tiny_mnist: Path, optimizer: type, options: dict[str, Any]) -> None:
    """Per-member lr, weight decay, seed and data order: each member's epoch losses and final
    weights equal its own run's (float64, 1e-12 relative)."""
    seeds, lrs, decays = [0, 1, 0], [0.05, 0.01, 0.02], [0.0, 1e-3, 1e-2]
    loop, dms = population(tiny_mnist, lrs, seeds, optimizer, torch.float64, weight_decay=decays, **options)
    records = loop.fit(2)
    for m, dm in enumerate(dms):
        losses, single = single_run(dm, mlp_config(activation="relu"), seeds[m], optimizer, lrs[m], decays[m], 2,
                                    **options)
        assert [row["train_loss"] for row in records[m].history] == pytest.approx(losses, rel=1e-12)
        for key, value in single.state_dict().items():
            torch.testing.assert_close(loop.model.member_state_dict(m)[key], value, **F64)


@pytest.mark.parametrize("stacked,config,optimizer,options,noise", [
    (StackedMLP, mlp_config(activation="relu", dropout=0.3), SGD, dict(momentum=0.9), 0.0),
    (StackedCNN, cnn_config(dropout=0.5), Adam, {}, 0.0),
    (StackedMLP, mlp_config(), SGD, {}, 0.05),
    (StackedMLP, mlp_config(dropout=0.2), RMSprop, dict(maximize=True), 0.02),
], ids=["mlp-dropout", "cnn-dropout", "noise", "dropout-noise-maximize"])
def test_each_member_draws_its_own_runs_dropout_masks_and_gradient_noise(
        tiny_mnist: Path, stacked: type, config: dict[str, Any], optimizer: type, options: dict[str, Any],
        noise: float) -> None:
    """Member m's dropout masks and gradient noise come from its own generator, in the state its run's
    training starts from: its losses and weights equal its run's (float64, 1e-12), members that share a
    seed and config draw alike, and members with other seeds differently."""
    seeds, lrs = [0, 1, 0], [0.05, 0.01, 0.02]
    loop, dms = population(tiny_mnist, lrs, seeds, optimizer, torch.float64, stacked=stacked, config=config,
                           grad_noise_std=noise, **options)
    records = loop.fit(2)
    runs = [single_run(dm, config, seed, optimizer, lr, 0.0, 2, grad_noise_std=noise, **options)
            for dm, seed, lr in zip(dms, seeds, lrs)]
    for m, (losses, single) in enumerate(runs):
        assert [row["train_loss"] for row in records[m].history] == pytest.approx(losses, rel=1e-12)
        for key, value in single.state_dict().items():
            torch.testing.assert_close(loop.model.member_state_dict(m)[key], value, **F64)
    # Without the draws (each member's run without dropout and noise) the losses differ: the draws mattered.
    plain = single_run(dms[0], {**config, "dropout": 0.0}, seeds[0], optimizer, lrs[0], 0.0, 2, **options)[0]
    assert plain != pytest.approx(runs[0][0], rel=1e-6)
    assert torch.equal(loop.model.generators[0].get_state(), loop.model.generators[2].get_state())
    assert not torch.equal(loop.model.generators[0].get_state(), loop.model.generators[1].get_state())


SCHEDULERS = {
    "step": {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 1, "gamma": 0.5},
    "warm-up": {"_target_": "torch.optim.lr_scheduler.LinearLR", "_partial_": True, "start_factor": 0.25,
                "total_iters": 2},  # sets the lr when it is built
    "cosine": {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True, "T_max": 3},
}


@pytest.mark.parametrize("scheduler", SCHEDULERS.values(), ids=SCHEDULERS.keys())
@pytest.mark.parametrize("optimizer,options", [(SGD, dict(momentum=0.9)), (Adam, {})], ids=["sgd", "adam"])
def test_each_member_follows_its_own_runs_schedule(tiny_mnist: Path, scheduler: dict[str, Any], optimizer: type,
                                                    options: dict[str, Any]) -> None:
    """Each member's lr follows its own run's scheduler (built on a stand-in of its optimizer, stepped
    after each epoch): epoch losses and final weights equal its run's (float64, 1e-12), its lr after the
    last epoch exactly the run's, and the lrs of its logged steps are those its run stepped with."""
    seeds, lrs, decays = [0, 1, 0], [0.05, 0.01, 0.2], [0.0, 1e-3, 0.0]
    loop, dms = population(tiny_mnist, lrs, seeds, optimizer, torch.float64, weight_decay=decays, every=6,
                           scheduler=scheduler, **options)
    records = loop.fit(3)
    for m, dm in enumerate(dms):
        losses, single = single_run(dm, mlp_config(activation="relu"), seeds[m], optimizer, lrs[m], decays[m], 3,
                                    scheduler, **options)
        assert [row["train_loss"] for row in records[m].history] == pytest.approx(losses, rel=1e-12)
        for key, value in single.state_dict().items():
            torch.testing.assert_close(loop.model.member_state_dict(m)[key], value, **F64)
        run_schedule = instantiate(scheduler)(torch.optim.SGD([torch.zeros(1)], lr=lrs[m]))
        expected = [run_schedule.get_last_lr()[0]]
        for _ in range(3):
            run_schedule.optimizer.step()
            run_schedule.step()
            expected.append(run_schedule.get_last_lr()[0])
        assert [row["lr"] for row in records[m].train_steps] == expected[:3]  # steps 0, 6, 12: one an epoch
        assert loop.optimizer.param_groups[0]["lr"][m].item() == expected[3]
    assert len({row["lr"] for row in records[0].train_steps}) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("algorithm,value", [("norm", 0.7), ("norm", 1e9), ("value", 0.01)])
def test_member_gradients_are_clipped_as_torch_clips_each_runs(algorithm: str, value: float, dtype: torch.dtype) -> None:
    """Each member's gradients clipped exactly (bitwise) as clip_grad_norm_ / clip_grad_value_ clip its
    own run's, MLP and CNN shapes; a member with a non-finite gradient leaves the others as they would be."""
    torch.manual_seed(0)
    shapes = [(16, 784), (16,), (10, 16), (10,), (12, 1, 5, 5), (12,)]
    scales = torch.logspace(-3, 2, 64, dtype=dtype)  # 64 members' gradients, 1e-3 to 1e2: every rounding case
    grads = [torch.randn(64, *shape, dtype=dtype) * scales.view(-1, *[1] * len(shape)) for shape in shapes]
    grads[0][2, 3, 4] = math.inf  # member 2 diverged
    expected = []
    for m in range(64):
        params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in shapes]
        for p, g in zip(params, grads):
            p.grad = g[m].clone()
        clip = torch.nn.utils.clip_grad_value_ if algorithm == "value" else torch.nn.utils.clip_grad_norm_
        clip(params, value)
        expected.append([p.grad for p in params])
    before = [g.clone() for g in grads]
    clip_member_gradients(grads, value, algorithm)
    for m in set(range(64)) - {2}:
        for got, want in zip(grads, expected[m]):
            assert torch.equal(got[m], want), m
    # Clipped where it should be: the largest gradients, not at a bound far above every norm (1e9).
    assert torch.equal(grads[0][-1], before[0][-1]) == (value == 1e9)


@pytest.mark.parametrize("clip", [(0.05, "norm"), (0.002, "value")], ids=["norm", "value"])
def test_each_member_is_clipped_as_its_own_run(tiny_mnist: Path, clip: tuple[float, str]) -> None:
    """Clipped gradients (after the non-finite check, before the update): each member's losses and
    weights are its own clipped run's (float64, 1e-12), and the logged gradient norms are the clipped ones."""
    seeds, lrs = [0, 1, 0], [0.05, 0.5, 0.2]
    loop, dms = population(tiny_mnist, lrs, seeds, Adam, torch.float64, every=1, clip=clip)
    records = loop.fit(2)
    for m, dm in enumerate(dms):
        losses, single = single_run(dm, mlp_config(activation="relu"), seeds[m], Adam, lrs[m], 0.0, 2, clip=clip)
        assert [row["train_loss"] for row in records[m].history] == pytest.approx(losses, rel=1e-12)
        for key, value in single.state_dict().items():
            torch.testing.assert_close(loop.model.member_state_dict(m)[key], value, **F64)
    if clip[1] == "norm":
        assert max(row["grad_norm"] for record in records for row in record.train_steps) <= clip[0]
    unclipped, _ = population(tiny_mnist, lrs, seeds, Adam, torch.float64, every=1)
    assert unclipped.fit(2)[0].history != records[0].history  # the bounds bite


class GivenValidation(L.LightningModule):
    """A run whose epoch e validates to ``values[e]`` (as val/loss in float32 and val/acc in float64, as a
    float32 run logs them); counts its epochs."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values, self.epochs = values, 0
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.weight.sum() * 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        value = self.values[self.current_epoch]
        self.log("val/loss", torch.tensor(value, dtype=torch.float32))
        self.log("val/acc", torch.tensor(value, dtype=torch.float64))

    def on_validation_epoch_end(self) -> None:
        self.epochs += 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> list[torch.Tensor]:
        return [torch.zeros(1)]

    def val_dataloader(self) -> list[torch.Tensor]:
        return [torch.zeros(1)]


@pytest.mark.parametrize("monitor,mode,patience,min_delta,values", [
    ("val/loss", "min", 0, 0.0, [1.0, 0.5, 0.5, 0.25]),            # a tie is no improvement
    ("val/loss", "min", 2, 0.0, [1.0, 1.5, 0.75, 2.0, 2.0, 0.5, 0.5]),
    ("val/loss", "min", 1, 0.25, [1.0, 0.75, 0.5, 0.375, 0.25, 0.0]),  # improvements of exactly min_delta
    ("val/acc", "max", 1, 0.25, [0.25, 0.5, 0.625, 1.0, 1.0]),
    ("val/acc", "max", 3, 0.0, [0.5, math.nan, 0.75]),              # not finite: stops at once
    ("val/acc", "max", 0, 0.0, [0.5, 0.75, 1.0, 1.0, 1.0]),
    ("val/loss", "min", 5, 0.0, [1.0, 0.5, 0.25]),                  # never stops
    # float32 rounding decides: 1.1 - 0.1 is 1.0 in float32 (no improvement on 1.0), 0.99999999 in float64
    ("val/loss", "min", 0, 0.1, [1.0, 0.9, 0.8, 0.7000000000001]),
    ("val/loss", "max", 0, 0.1, [1.0, 1.1, 1.2]),
])
def test_a_member_stops_early_where_lightnings_early_stopping_stops_its_run(
        monitor: str, mode: str, patience: int, min_delta: float, values: list[float]) -> None:
    """MemberEarlyStopping's decisions against Lightning's EarlyStopping in a fit whose validation
    values are given: the same number of epochs, also where float32 rounding decides."""
    run = GivenValidation(values)
    trainer = L.Trainer(max_epochs=len(values), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
                        callbacks=[L.pytorch.callbacks.EarlyStopping(monitor, min_delta, patience, mode=mode)])
    trainer.fit(run)
    stopping = MemberEarlyStopping([StopRule.of(monitor, mode, patience, min_delta, torch.float32)] * 2)
    rounded = [float(torch.tensor(v, dtype=torch.float32)) if monitor == "val/loss" else v for v in values]
    column = stopping.rules[1].key
    epochs = next((e + 1 for e, value in enumerate(rounded) if stopping.stops(1, {column: [math.nan, value]})),
                  len(values))
    assert epochs == run.epochs
    assert stopping.best[0] in (math.inf, -math.inf) and stopping.wait[0] == 0  # member 0 untouched


def test_members_stop_early_by_rules_of_their_own() -> None:
    """A member without early stopping never stops; one with patience 2 stops a bad epoch later than one with 1."""
    stopping = MemberEarlyStopping([StopRule.of("val/acc", "max", 1), None, StopRule.of("val/acc", "max", 2)])
    epochs = [{"val_acc": [0.5, 0.5, 0.5]}, {"val_acc": [0.4, math.nan, 0.4]}, {"val_acc": [0.3, 0.3, 0.3]}]
    stopped_at = [next((e + 1 for e, epoch in enumerate(epochs) if stopping.stops(m, epoch)), None) for m in range(3)]
    assert stopped_at == [2, None, 3]


@pytest.mark.parametrize("monitor,mode,values", [
    ("val/loss", "min", [1.0, 0.5, 0.5, 0.75, 0.25]),                # a tie is no improvement
    ("val/acc", "max", [0.5, 0.75, 0.75, 0.25]),
    ("val/acc", "max", [math.nan, 0.1, math.nan, 0.05]),             # a NaN is saved as the worst value
    ("val/loss", "min", [math.nan, math.nan, 3.0]),
    ("val/loss", "min", [2.0, math.inf, 1.0]),
    ("val/loss", "min", [1.0, 0.99999999, 1.5]),                     # float32 rounding decides: a tie there
])
def test_a_members_best_epoch_is_the_one_lightnings_model_checkpoint_keeps_for_its_run(
        tmp_path: Path, monitor: str, mode: str, values: list[float]) -> None:
    """MemberBest's choice against Lightning's ModelCheckpoint (save_top_k 1) in a fit whose validation
    values are given: the same best epoch, also where float32 rounding decides."""
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(tmp_path, "{epoch}", monitor, save_top_k=1, mode=mode,
                                                     save_on_train_epoch_end=True)
    trainer = L.Trainer(max_epochs=len(values), logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, accelerator="cpu", callbacks=[checkpoint])
    trainer.fit(GivenValidation(values))
    kept = int(Path(checkpoint.best_model_path).stem.removeprefix("epoch="))
    best = MemberBest(2, monitor, mode)
    rounded = [float(torch.tensor(v, dtype=torch.float32)) if monitor == "val/loss" else v for v in values]
    for epoch, value in enumerate(rounded):
        best.update(1, value, 1, [torch.tensor([float(epoch)])])
    assert best.weights[1][0].item() == kept
    assert 0 not in best.weights and best.saved[0] is None  # member 0 untouched


def test_a_members_best_needs_a_step_since_its_last_save_and_keeps_only_finite_weights() -> None:
    """As a run's ModelCheckpoint: nothing is saved after an epoch without a step (Lightning compares
    global steps); a save of non-finite weights counts (its value) but its file keeps the earlier
    weights (AtomicCheckpointIO writes none), and with no earlier ones the run has no best to test."""
    best = MemberBest(3, "val/loss", "min")
    best.update(0, 1.0, 0, [torch.zeros(2)])  # diverged at its first step: no step, no save
    assert best.saved[0] is None and 0 not in best.weights
    best.update(1, math.nan, 4, [torch.full((2,), math.nan)])  # updated into non-finite weights
    assert best.saved[1] == math.inf and 1 not in best.weights
    best.update(2, 2.0, 4, [torch.ones(2)])
    best.update(2, 1.0, 4, [torch.tensor([1.0, math.inf])])  # better, but not written
    best.update(2, 0.5, 0, [torch.full((2,), 4.0)])  # better, but no step since that save
    best.update(2, 1.5, 4, [torch.full((2,), 3.0)])  # worse than the value counted as saved
    assert best.saved[2] == 1.0 and torch.equal(best.weights[2][0], torch.ones(2))
    best.update(2, 0.75, 0, [torch.full((2,), 5.0)])  # better, with steps since the last save
    assert best.saved[2] == 0.75 and torch.equal(best.weights[2][0], torch.full((2,), 5.0))
    restored = MemberBest(3, "val/loss", "min")
    restored.load_state_dict(best.state_dict())
    assert restored.saved == best.saved and restored.unsaved_steps == best.unsaved_steps
    assert torch.equal(restored.weights[2][0], best.weights[2][0])


def test_which_model_checkpoint_entries_a_population_follows() -> None:
    entry = {"_target_": MODEL_CHECKPOINT, "filename": "best", "monitor": "val/acc", "mode": "max", "save_top_k": 1,
             "save_on_train_epoch_end": True, "auto_insert_metric_name": False, "enable_version_counter": False}
    assert best_followed(entry) and best_followed({**entry, "monitor": None}) and best_followed({**entry, "dirpath": None})
    for other in ({"save_top_k": 3}, {"save_top_k": -1}, {"every_n_epochs": 2}, {"every_n_train_steps": 10},
                  {"monitor": "train/loss"}, {"train_time_interval": "00:00:10:00"}, {"filename": "{epoch}"},
                  {"filename": None}, {"dirpath": "/tmp/shared"}):
        assert not best_followed({**entry, **other}), other
    assert MemberBest.from_entry({**entry, "monitor": None}, 2) is None
    with pytest.raises(ValueError, match="cannot follow"):
        MemberBest.from_entry({**entry, "save_top_k": 3}, 2)


def test_members_stop_early_one_by_one_and_the_fit_ends_with_the_last(tiny_mnist: Path) -> None:
    """Early stopping (val/loss, patience 0): each member's record ends at its first epoch without an
    improvement, it is not diverged, its weights stay those of its last epoch (the same as a member
    trained that many epochs without early stopping), and the fit ends when the last one stops."""
    lrs, seeds = [0.05, 0.5, 2.0], [0, 1, 2]
    loop, _ = population(tiny_mnist, lrs, seeds, SGD, torch.float64,
                         stopping=MemberEarlyStopping([StopRule.of("val/loss", "min", 0)] * 3))
    records = loop.fit(20)
    lengths = [len(r.history) for r in records]
    assert not any(r.diverged for r in records) and len(set(lengths)) > 1 and max(lengths) < 20
    assert loop.epochs_done == max(lengths) and not loop.alive.any()
    assert loop.global_step == max(lengths) * 6  # no epoch trained after the last member stopped
    for m, record in enumerate(records):
        losses = [row["val_loss"] for row in record.history]
        assert all(b < a for a, b in zip(losses, losses[1:-1])) and losses[-1] >= min(losses[:-1]), m
        plain, _ = population(tiny_mnist, lrs, seeds, SGD, torch.float64)
        plain.fit(lengths[m])
        for key, value in plain.model.member_state_dict(m).items():
            assert torch.equal(loop.model.member_state_dict(m)[key], value), (m, key)


def test_no_weight_decay_is_the_number_zero_and_steps_as_the_members_runs(tiny_mnist: Path) -> None:
    """Without weight decay the member-wise group holds the number 0 (no per-member tensor whose zeros
    would cost a pass over every parameter each step), and each member still follows its own run."""
    loop, _ = population(tiny_mnist, [0.05, 0.02], [0, 1], SGD, torch.float64, weight_decay=[0.0, 0.0])
    assert loop.optimizer.param_groups[0]["weight_decay"] == 0.0
    assert isinstance(loop.optimizer.param_groups[0]["weight_decay"], float)
    decayed, _ = population(tiny_mnist, [0.05, 0.02], [0, 1], SGD, torch.float64, weight_decay=[0.0, 1e-3])
    assert decayed.optimizer.param_groups[0]["weight_decay"].tolist() == [0.0, 1e-3]
    records, reference = loop.fit(2), decayed.fit(2)
    # Member 0 has no decay in both populations: the same trajectory, to the last bit.
    assert records[0].history[-1]["train_loss"] == reference[0].history[-1]["train_loss"]
    torch.testing.assert_close(loop.model.member_state_dict(0), decayed.model.member_state_dict(0), rtol=0, atol=0)


@pytest.mark.parametrize("scheduler,patience,draws", [
    (None, None, False), (SCHEDULERS["step"], None, False), (SCHEDULERS["warm-up"], None, False), (None, 1, False),
    (None, None, True)], ids=["constant-lr", "step-lr", "warm-up", "early-stopping-best", "dropout-noise"])
def test_a_loop_restored_from_its_state_continues_bitwise(tiny_mnist: Path, scheduler: dict[str, Any] | None,
                                                         patience: int | None, draws: bool) -> None:
    """Adam (state), one member diverging in epoch 1: 3 epochs straight, or 1 epoch, the state
    through torch.save/load into a fresh loop, then the rest: equal records and weights, bitwise
    (with a learning-rate schedule, its schedulers' states too; with early stopping, its counts; with
    dropout and gradient noise, the members' generators; with early stopping, the best epochs too)."""
    lrs, seeds = [0.01, 1e300, 0.003], [0, 1, 2]
    drawing = dict(config=mlp_config(activation="relu", dropout=0.3), grad_noise_std=0.01) if draws else {}

    def stopping() -> MemberEarlyStopping | None:
        return None if patience is None else MemberEarlyStopping([StopRule.of("val/acc", "max", patience)] * 3)

    def best() -> MemberBest | None:
        return None if patience is None else MemberBest(3, "val/loss")

    straight, _ = population(tiny_mnist, lrs, seeds, Adam, every=4, scheduler=scheduler, stopping=stopping(),
                             best=best(), **drawing)
    expected = straight.fit(3)
    first, _ = population(tiny_mnist, lrs, seeds, Adam, every=4, scheduler=scheduler, stopping=stopping(),
                             best=best(), **drawing)
    first.fit(1)
    # After every step the last finite weights are the weights (a frozen member's set back): not saved.
    assert all(torch.equal(p, last) for p, last in zip(first.params, first.last_finite))
    assert "last_finite" not in first.state_dict()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed, _ = population(tiny_mnist, lrs, seeds, Adam, every=4, scheduler=scheduler, stopping=stopping(),
                             best=best(), **drawing)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.epochs_done == 1 and resumed.records[1].diverged
    assert list(resumed.run_weights()) == [1]
    for a, b in zip(resumed.run_weights()[1], first.run_weights()[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    got = resumed.fit(3)

    def untimed(records: list[MemberRecord]) -> list[tuple]:
        return [([{k: v for k, v in row.items() if k != "train_time_s"} for row in r.history], r.diverged_at_step,
                 r.divergence_reason, r.train_steps) for r in records]

    # repr: exact for floats, and NaN (the overflowed member's weight norm) equals NaN
    assert repr(untimed(got)) == repr(untimed(expected))
    if patience is None:
        assert len(expected[0].history) == 3 and [row["step"] for row in got[0].train_steps] == [0, 4, 8, 12, 16]
    else:  # a member stopped after the restored epoch
        assert len(expected[0].history) == 2 and not expected[0].diverged
    for p, q in zip(resumed.params, straight.params):
        assert torch.equal(p, q)
    for a, b in zip(resumed.optimizer.state.values(), straight.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(resumed.optimizer.param_groups[0]["lr"], straight.optimizer.param_groups[0]["lr"])
    if scheduler:
        assert resumed.schedules.state_dict() == straight.schedules.state_dict()
        assert len({row["lr"] for row in expected[0].train_steps}) > 1  # the schedule moved the lr
    if patience is not None:
        assert resumed.best.state_dict()["saved"] == straight.best.state_dict()["saved"]
        for m, weights in straight.best.weights.items():
            assert all(torch.equal(a, b) for a, b in zip(resumed.best.weights[m], weights))
    if draws:
        missing = {k: v for k, v in first.state_dict().items() if k != "generators"}
        with pytest.raises(ValueError, match="no generators"):
            population(tiny_mnist, lrs, seeds, Adam, **drawing)[0].load_state_dict(missing)


def test_the_loop_refuses_what_it_cannot_reproduce(tiny_mnist: Path) -> None:
    loop, _ = population(tiny_mnist, [0.1, 0.1], [0, 1])
    with pytest.raises(ValueError, match="one member-wise group"):
        PopulationLoop(loop.model, SGD(loop.model.parameters(), lr=0.1), loop.data)
    with pytest.raises(ValueError, match="grad_noise_std must be 0 in a population"):
        PopulationLoop(loop.model, member_optimizer(SGD, loop.model, [0.1, 0.1], grad_noise_std=0.1), loop.data)
    # Arguments a library caller can get wrong, each one line naming it (a probe: a list of one lr was given to every
    # member, clip=(-1, 'norm') ascended, a NaN noise or clip recorded every member as diverged, epochs=1.5 ended
    # in Lightning's bare AssertionError, limit_train_batches=-1 in Lightning's frames).
    with pytest.raises(ValueError, match=r"^lr: 1 value\(s\) for 2 members; expected one per member"):
        member_optimizer(SGD, loop.model, [0.1])
    with pytest.raises(ValueError, match=r"^weight_decay: 3 value\(s\) for 2 members"):
        member_optimizer(SGD, loop.model, [0.1, 0.1], [0.1, 0.1, 0.1])
    one_for_all = member_optimizer(SGD, loop.model, torch.tensor(0.1, dtype=torch.float64),
                                   torch.tensor(0.01, dtype=torch.float64)).param_groups[0]
    assert one_for_all["lr"].tolist() == [0.1, 0.1] and one_for_all["weight_decay"].tolist() == [0.01, 0.01]
    assert member_optimizer(SGD, loop.model, np.array([0.1, 0.2])).param_groups[0]["lr"].tolist() == [0.1, 0.2]
    for lr in (True, "0.1"):
        with pytest.raises(ValueError, match=r"^lr: .* is not allowed; expected a number, or one per member"):
            member_optimizer(SGD, loop.model, lr)  # type: ignore[arg-type]
    opt = member_optimizer(SGD, loop.model, [0.1, 0.1])
    for clip in ((-1.0, "norm"), (math.nan, "value"), (1.0, "bogus"), (0.0, "norm"), 1.0, "norm"):
        with pytest.raises(ValueError, match=r"^clip: .* is not allowed; expected \(a finite number > 0"):
            PopulationLoop(loop.model, opt, loop.data, clip=clip)
    for std in (math.nan, -1.0, math.inf):
        with pytest.raises(ValueError, match=r"^grad_noise_std: .* is not allowed; expected a finite number >= 0"):
            PopulationLoop(loop.model, opt, loop.data, grad_noise_std=std)
    for epochs in (1.5, 0, -1, "1", True):
        with pytest.raises(ValueError, match=r"^epochs: .* is not allowed; expected an integer >= 1"):
            loop.fit(epochs)  # type: ignore[arg-type]
    dms = [datamodule(tiny_mnist, val_size=16, batch_size=8, seed=s) for s in (0, 1)]
    for limit in (-1, 0, 0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"^limit_train_batches: .* is not allowed; expected an integer >= 1"):
            PopulationData(dms, limit_train_batches=limit)
    with pytest.raises(ValueError, match=r"^limit_val_batches: nan is not allowed"):
        PopulationData(dms, limit_val_batches=math.nan)


# --------------------------------------------------------------------------- against train.run


@pytest.mark.slow
def test_population_reproduces_the_single_runs(mnist_root: Path, tmp_path: Path) -> None:
    """Five members (two lrs x two seeds, plus one diverging at lr 1e150) trained as one population
    give each member's own `train.run` record: training and validation metrics to 1e-9 relative
    (the single run evaluates in float64 too), and the same divergence step and reason."""
    common = ["model.hidden=[16]", "model.activation=relu", "trainer.precision=64-true", "trainer.accelerator=cpu",
              "data.subset=256", "data.val_size=500", "batch_size=64", "epochs=2", "data.test_every_epoch=false",
              "trainer.progress_bar=false", "data.download=false", f"data.root={mnist_root}"]
    grid = [(0.1, 0), (0.5, 0), (0.1, 1), (0.5, 1), (1e150, 1)]
    configs = [compose_config(*common, f"lr={lr}", f"seed={seed}") for lr, seed in grid]
    model = StackedMLP.from_configs([c.model for c in configs], [c.seed for c in configs]).double()
    data = PopulationData([instantiate(c.data) for c in configs])
    records = train_population(model, member_optimizer(SGD, model, [c.lr for c in configs]), data, 2)
    assert records[-1].diverged and not any(r.diverged for r in records[:-1])
    for m, (cfg, record) in enumerate(zip(configs, records)):
        single = run(cfg, tmp_path / str(m))
        assert record.diverged_at_step == single.diverged_at_step
        assert record.divergence_reason == single.divergence_reason
        assert len(record.history) == len(single.epochs)
        for row, ref in zip(record.history, single.epochs):
            assert row.keys() == ref.keys()
            for key in ("train_loss", "train_acc", "train_loss_max", "train_loss_initial"):
                if key in ref:
                    assert row[key] == pytest.approx(ref[key], rel=1e-9), f"member {m} epoch {ref['epoch']} {key}"
            assert row["val_acc"] == pytest.approx(ref["val_acc"], rel=1e-9)
            assert row["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-9, nan_ok=True)


@pytest.mark.slow
def test_benchmark_script_runs() -> None:
    """benchmarks/population.py still runs and prints its row (tiny settings; no timing asserted)."""
    result = run_script(REPO / "benchmarks" / "population.py", "--members", "2", "--steps", "2", "--repeats", "1",
                        "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith("cpu "))
    assert all(float(v) > 0 for v in row[1:4] + row[5:6]) and row[4] == "n/a"  # no CUDA graph on the CPU


@pytest.mark.slow
def test_benchmark_sweep_mode_runs_both_sweeps(tmp_path: Path) -> None:
    """``--sweep tiny --device cpu``: both sweeps of the 8-run grid finish and
    the CPU row reports them (no timing asserted)."""
    result = run_script(REPO / "benchmarks" / "population.py", "--sweep", "tiny", "--device", "cpu",
                        "--keep", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith("cpu "))
    assert row[-3:] == ["8/8", "of", "8"] and all(float(v) > 0 for v in row[1:7])
    # Each population's training against its own floor: one row per (optimizer, width) of the grid.
    per_population = [line.split() for line in result.stdout.splitlines() if line.startswith(("adam ", "sgd "))]
    assert [r[:2] for r in per_population] == [["adam", "8"], ["sgd", "8"]]
    ratios = [float(r[4]) for r in per_population]
    largest = next(line for line in result.stdout.splitlines() if "largest ratio" in line)
    assert all(r > 0 for r in ratios) and float(largest.split("largest ratio ")[1].split(",")[0]) == pytest.approx(
        max(ratios), rel=0.005, abs=0.006)  # the summary line's 2 decimals against the table's 3 digits
    for sweep in ("cpu_sequential", "cpu_population"):
        assert len(list((tmp_path / sweep).glob("*/summary.json"))) == 8, sweep


def test_step_metrics_sum_the_applied_steps_as_a_run_records_them() -> None:
    """Two members, three steps (more than the room made for none): member 1's second step refused (its NaN
    loss not counted), the last batch shorter; an epoch without steps has none."""
    metrics = StepMetrics(2, 0, torch.device("cpu"))  # no room at first (a review: it could not grow from none)
    for losses, correct, applied, size in (([0.5, 1.0], [3, 1], [True, True], 4),
                                           ([0.25, math.nan], [4, 0], [True, False], 4),
                                           ([2.0, 3.0], [1, 2], [True, True], 2)):
        metrics.add(torch.tensor(losses, dtype=torch.float32), torch.tensor(correct), torch.tensor(applied), size)
    totals = {key: value.tolist() for key, value in metrics.totals().items()}
    assert totals == {"loss_sum": [0.5 * 4 + 0.25 * 4 + 2.0 * 2, 1.0 * 4 + 3.0 * 2], "correct": [8.0, 3.0],
                      "count": [10.0, 6.0], "loss_max": [2.0, 3.0], "steps": [3.0, 2.0]}
    metrics.clear()
    assert {key: value.tolist() for key, value in metrics.totals().items()} == {
        "loss_sum": [0.0, 0.0], "correct": [0.0, 0.0], "count": [0.0, 0.0], "loss_max": [-math.inf, -math.inf],
        "steps": [0.0, 0.0]}
