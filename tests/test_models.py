"""Models: shapes, initialisation, and finite-difference gradient checks in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from optimlab.models import CNN, MLP


def gradcheck_params(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Central differences of the cross-entropy loss w.r.t. every parameter against autograd
    (torch.autograd.gradcheck, float64). The numpy notebook perturbed a few weights by 1e-2 and
    allowed 9*eps^2; gradcheck perturbs each entry by 1e-6 and checks every one."""
    model = model.double()
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())

    def loss(*ps: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, dict(zip(names, ps)), (x.double(),)), y)

    return torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
def test_mlp_gradients_match_finite_differences(activation: str) -> None:
    torch.manual_seed(0)
    model = MLP(hidden=[7, 5], activation=activation, in_features=12)
    assert gradcheck_params(model, torch.randn(6, 12), torch.randint(0, 10, (6,)))


def test_cnn_gradients_match_finite_differences() -> None:
    torch.manual_seed(0)
    # relu and max-pool are piecewise linear; random inputs keep every entry away from a kink.
    model = CNN(channels=[2, 3], kernel_size=3, fc=[5], image_size=12, activation="tanh")
    assert gradcheck_params(model, torch.randn(3, 1, 12, 12), torch.randint(0, 10, (3,)))


def test_default_models_match_the_notebooks() -> None:
    mlp = MLP()
    assert [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [1024, 128, 10]
    assert sum(p.numel() for p in mlp.parameters()) == 784 * 1024 + 1024 + 1024 * 128 + 128 + 128 * 10 + 10
    cnn = CNN()
    assert cnn(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert cnn.net[7].in_features == 16 * 18 * 18  # stride-1 pooling, as the notebook's stax MaxPool
    assert CNN(pool_stride=2).net[7].in_features == 16 * 4 * 4  # classic LeNet subsampling
    convs = [m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(12, (5, 5)), (16, (5, 5))]
    assert [m.out_features for m in cnn.modules() if isinstance(m, torch.nn.Linear)] == [120, 84, 10]


def test_normal_init_draws_weights_and_biases_with_the_configured_std() -> None:
    torch.manual_seed(0)
    model = MLP(hidden=[2048], init="normal", init_std=0.1)
    weight = model.net[1].weight
    bias = model.net[1].bias
    assert abs(weight.std().item() - 0.1) < 0.002 and abs(weight.mean().item()) < 0.002
    assert abs(bias.std().item() - 0.1) < 0.01
    default = MLP(hidden=[2048], init="default")
    assert default.net[1].weight.abs().max() <= 1 / 784 ** 0.5 + 1e-6  # PyTorch's uniform bound


def test_bad_model_options_raise() -> None:
    with pytest.raises(ValueError, match="activation"):
        MLP(activation="swish")
    with pytest.raises(ValueError, match="init"):
        MLP(init="xavier")
    with pytest.raises(ValueError, match="shrink"):
        CNN(channels=[4, 4, 4, 4], pool_stride=2)


def test_glorot_and_stax_inits_keep_the_glorot_variance() -> None:
    torch.manual_seed(0)
    for init in ("glorot", "stax"):
        cnn = CNN(init=init)
        conv, fc = cnn.net[0], cnn.net[7]
        for layer, fans in ((conv, (1 + 12) * 25), (fc, 16 * 18 * 18 + 120)):
            assert abs(layer.weight.std().item() / (2 / fans) ** 0.5 - 1) < 0.05
        if init == "glorot":
            assert conv.bias.abs().max() == 0 and fc.bias.abs().max() == 0
    # stax: the weights truncated at two std of the underlying normal, its small random biases
    bound = 2 * (2 / (16 * 18 * 18 + 120)) ** 0.5 / 0.87962566103423978
    assert fc.weight.abs().max() <= bound and fc.weight.abs().max() > 0.95 * bound
    assert 0 < conv.bias.abs().max() < 1e-5 and 0.005 < fc.bias.std().item() < 0.015
