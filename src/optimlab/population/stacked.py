"""Stacked models: P members of one architecture as one module with parameters stacked along dim 0.

Member m of a :class:`StackedMLP` or :class:`StackedCNN` is the single :class:`~optimlab.models.MLP`
or :class:`~optimlab.models.CNN` it was stacked from: the same layers, activations and pooling,
with its weights in slice m of every parameter. Linear layers hold ``weight [P, out, in]`` and
``bias [P, out]`` (``nn.Linear``'s layout) and run as one batched product whose every member's
slice is the arithmetic of its own ``nn.Linear`` (:class:`MemberLinear`); convolutions hold
``weight [P, out, in, k, k]`` and run member by member on the CPU (each the call its single model
makes) and as one grouped convolution (``groups=P``) on a GPU, so every operation stays inside its
member: nothing, not even a NaN, crosses from one member to another.
Every parameter has shape ``[P, ...]``, as a member-wise optimizer group (``members: P``, see
:class:`~optimlab.optim.Optimizer`) expects.

Layouts inside the forward pass: images ``[P, B, C, H, W]`` (the input; or one batch per run of
members that share their data, see :meth:`StackedModel.forward`), convolution maps
``[P*B, C, H, W]`` (member m's maps at rows ``m*B .. m*B+B-1``, so pooling and activations see
ordinary 4-d batches) and features ``[P, B, F]``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn

from optimlab.models import CNN, MLP
from optimlab.models.activations import ACTIVATIONS
from optimlab.summary import config_key

# Layers that act elementwise or per channel: the same module serves every member's slice.
SHARED_LAYERS: tuple[type[nn.Module], ...] = (*ACTIVATIONS.values(), nn.MaxPool2d)


def build_member(config: Mapping[str, Any], seed: int) -> nn.Module:
    """The single model ``config`` describes (a Hydra node with ``_target_``, as ``conf/model/``'s),
    built as a run seeded ``seed`` builds it: ``optimlab.train.run`` seeds torch's global generator
    (``seed_everything``) and instantiates the model first, so its init draws come first from
    ``torch.manual_seed(seed)``. The caller's generator state is left as it was."""
    return built_member(config, seed)[0]


def built_member(config: Mapping[str, Any], seed: int) -> tuple[nn.Module, Tensor]:
    """:func:`build_member`'s model and the state of torch's global generator after it was built:
    the state the run's training starts from (nothing else it builds draws), which its dropout
    masks and gradient noise then draw from."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return instantiate(config), torch.get_rng_state()


def member_losses(logits: Tensor, y: Tensor) -> Tensor:
    """Each member's mean cross-entropy ``[P]`` of its logits ``[P, B, C]`` against its labels ``y [P, B]``:
    the loss its own run computes on its batch."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)


class MemberLinear(torch.autograd.Function):
    """``y[m] = x[m] @ weight[m]^T + bias[m]`` for features ``x [P, B, in]``, ``weight [P, out, in]``,
    computed per member as ``nn.Linear`` computes it, forward and backward: the product with the
    weight as a transposed operand (``addmm(b, x, W.t())``), and the gradients ``g @ W``, ``g^T @ x``
    (the weight's in its own layout, as autograd's ``addmm`` backward gives it) and ``g.sum(0)``.
    Autograd's own ``bmm`` backward computes the weight gradient as ``(x^T @ g)^T``, which rounds
    differently where a layer has few outputs; with this one an MLP population on one CPU thread
    trains bitwise as its members' single runs, in float32 and float64 (tested). Its backward is
    built from differentiable operations, so Hessian-vector products go through it."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad
        return (torch.bmm(grad, weight) if needs_x else None,
                torch.bmm(grad.transpose(1, 2), x) if needs_weight else None,
                grad.sum(1) if needs_bias else None)


class StackedLinear(nn.Module):
    """P linear layers as one :class:`MemberLinear` over features ``x [P, B, in]``."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))  # [P, out, in]
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]))

    def forward(self, x: Tensor, groups: Sequence[int] | None = None) -> Tensor:
        """``x [P, B, in]``; or, with ``groups``, ``x [G, B, in]`` whose row g is the input of the next
        ``groups[g]`` members, which read it as an expanded view (no copies)."""
        if groups is None:
            return MemberLinear.apply(x, self.weight, self.bias)
        if len(groups) == 1:  # without split and cat, which would copy the output and the weight's gradient
            return MemberLinear.apply(x[0].expand(groups[0], *x.shape[1:]), self.weight, self.bias)
        # split, not indexing: its backward is one cat, where slices would each build a zero-filled gradient
        return torch.cat([MemberLinear.apply(row.expand(n, *row.shape), weight, bias) for row, weight, bias, n in
                          zip(x.unbind(0), self.weight.split(list(groups)), self.bias.split(list(groups)), groups)])

    def member_state(self, m: int) -> dict[str, Tensor]:
        return {"weight": self.weight[m], "bias": self.bias[m]}


def member_maps(x: Tensor, members: int) -> Tensor:
    """Maps ``[P*B, C, H, W]`` as ``[P, B, C, H, W]`` (a view); images ``[P, B, C, H, W]`` as they are."""
    return x.view(members, -1, *x.shape[1:]) if x.dim() == 4 else x


def member_rows(x: Tensor, groups: Sequence[int]) -> list[Tensor]:
    """Each member's input from ``x``'s rows, row g serving the next ``groups[g]`` members (views)."""
    return [row for row, n in zip(x.unbind(0), groups) for _ in range(n)]


def member_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor, *options: Any, groups: Sequence[int] | None = None
) -> Tensor:
    """Member m's maps ``F.conv2d(x[m], weight[m], bias[m], *options)``, one call per member, as
    ``[P*B, out, H', W']`` (with ``groups``: images ``[G, B, C, H, W]``, see :func:`member_rows`).
    (``unbind`` and ``cat``: their backward passes are one ``stack`` and views, where indexing would
    build P zero-filled copies of the input's gradient.)"""
    inputs = member_rows(x, groups) if groups is not None else member_maps(x, weight.shape[0]).unbind(0)
    return torch.cat([F.conv2d(xm, wm, bm, *options) for xm, wm, bm in zip(inputs, weight.unbind(0),
                                                                          bias.unbind(0))])


def grouped_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor, *options: Any, groups: Sequence[int] | None = None
) -> Tensor:
    """The same maps as :func:`member_conv2d` from one grouped convolution (``groups=P``) over the
    members' channels side by side, ``[B, P*C, H, W]``; the maps move between the layouts as copies."""
    members = weight.shape[0]
    if groups is not None:  # a run's batch for each of its members (one run: a view; the transpose copies)
        rows = [row.expand(n, *row.shape) for row, n in zip(x.unbind(0), groups)]
        x = rows[0] if len(rows) == 1 else torch.cat(rows)
    x = member_maps(x, members)
    batch = x.shape[1]
    out = F.conv2d(x.transpose(0, 1).flatten(1, 2), weight.flatten(0, 1), bias.flatten(), *options, groups=members)
    return out.view(batch, members, -1, *out.shape[2:]).transpose(0, 1).flatten(0, 1)


class StackedConv2d(nn.Module):
    """P convolutions over member-major maps ``[P*B, C, H, W]`` (or the images ``[P, B, C, H, W]``).

    On the CPU each member's convolution is its own ``F.conv2d`` call on its contiguous slice, the
    call its single model makes (so it computes the same bits), and 2-3x faster there than one
    grouped convolution, whose CPU kernels handle ``groups`` poorly (measured: 30 members of LeNet's
    second layer, forward and backward, 0.74 s against 1.72 s on one thread). On a GPU it is one
    grouped convolution (``groups=P``) over the members' channels side by side: one kernel launch
    instead of P."""

    def __init__(self, layers: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        first = layers[0]
        if first.groups != 1 or first.padding_mode != "zeros":
            raise ValueError("only ungrouped, zero-padded convolutions can be stacked")
        self.stride, self.padding, self.dilation = first.stride, first.padding, first.dilation
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))  # [P, out, in, k, k]
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]))  # [P, out]

    def forward(self, x: Tensor, groups: Sequence[int] | None = None) -> Tensor:
        """Maps ``[P*B, C, H, W]`` or images ``[P, B, C, H, W]``; or, with ``groups``, images
        ``[G, B, C, H, W]`` whose row g is the batch of the next ``groups[g]`` members."""
        conv = member_conv2d if x.device.type == "cpu" else grouped_conv2d
        return conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, groups=groups)

    def member_state(self, m: int) -> dict[str, Tensor]:
        return {"weight": self.weight[m], "bias": self.bias[m]}


class MemberFlatten(nn.Module):
    """``nn.Flatten`` per member: images ``[P, B, C, H, W]`` or maps ``[P*B, C, H, W]`` to
    features ``[P, B, C*H*W]`` in the single model's (C, H, W) order."""

    def __init__(self, members: int) -> None:
        super().__init__()
        self.members = members

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 5:
            return x.flatten(2)
        return x.reshape(self.members, x.shape[0] // self.members, -1)


class StackedDropout(nn.Module):
    """``nn.Dropout(p)`` per member: in training mode member m's mask is drawn from ``generators[m]``
    as its run's dropout draws it from torch's global generator on the CPU (a Bernoulli(1 - p) draw
    of its features' shape, divided by 1 - p, multiplied in), so its features are bitwise its
    run's; in eval mode the identity. Features ``[P, B, F]``; CPU only (a GPU run draws its masks
    from the device's generator, which no per-member generator follows)."""

    def __init__(self, p: float, generators: Sequence[torch.Generator]) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability {p!r}: expected a number in [0, 1)")
        self.p, self.generators = p, generators

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            raise RuntimeError("a population's dropout runs on the CPU only (its masks follow each member's CPU "
                               "generator, as its run's draws on the CPU do)")
        noise = torch.empty_like(x)
        for mask, generator in zip(noise, self.generators, strict=True):
            mask.bernoulli_(1 - self.p, generator=generator)
        return x * noise.div_(1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, members={len(self.generators)}"


class StackedModel(nn.Module):
    """P single models of one architecture (``net``: an ``nn.Sequential``) as one module.

    Args:
        models: the members, in order; the same layers with the same shapes (their weights and
            init options may differ).
        rng_states: for each member, the state of torch's global generator its run trains from
            (:func:`built_member`'s); None: the global generator's current state for all. Member m's
            random draws (dropout masks, the loop's gradient noise) come from ``generators[m]``, a
            CPU generator in that state, in the order its run draws them.
    """

    single_type: type[nn.Module] = nn.Module

    def __init__(self, models: Sequence[nn.Module], rng_states: Sequence[Tensor] | None = None) -> None:
        if not models:
            raise ValueError("a population needs at least one member")
        if not all(isinstance(model, self.single_type) for model in models):
            raise TypeError(f"{type(self).__name__} stacks {self.single_type.__name__} models, got "
                            f"{sorted({type(model).__name__ for model in models})}")
        super().__init__()
        self.members = len(models)
        states = [torch.get_rng_state()] * self.members if rng_states is None else list(rng_states)
        if len(states) != self.members:
            raise ValueError(f"{len(states)} generator states for {self.members} members")
        # A plain list, not module state: the loop's state_dict saves the generators' states.
        self.generators = [torch.Generator() for _ in states]
        for generator, state in zip(self.generators, states):
            generator.set_state(state)
        nets = [model.net for model in models]
        # A layer's repr names its type and sizes (widths, kernel, stride, pooling).
        architecture = [repr(layer) for layer in nets[0]]
        for m, net in enumerate(nets[1:], 1):
            if [repr(layer) for layer in net] != architecture:
                raise ValueError(f"member {m} has another architecture than member 0; members must share layers "
                                 "and widths (only weights and init options may differ)")
        layers: list[nn.Module] = []
        for group in zip(*nets):
            layer = group[0]
            if isinstance(layer, nn.Linear):
                layers.append(StackedLinear(group))
            elif isinstance(layer, nn.Conv2d):
                layers.append(StackedConv2d(group))
            elif isinstance(layer, nn.Flatten):
                layers.append(MemberFlatten(self.members))
            elif isinstance(layer, nn.Dropout):
                layers.append(StackedDropout(layer.p, self.generators))
            elif isinstance(layer, SHARED_LAYERS):
                layers.append(copy.deepcopy(layer))
            else:
                raise ValueError(f"{type(layer).__name__} layers cannot be stacked")
        self.net = nn.Sequential(*layers)
        # The single models' structure, for member_model(); in a list so that it is no submodule
        # (its parameters stay out of parameters() and state_dict()).
        self.template = [copy.deepcopy(models[0])]

    @classmethod
    def from_configs(cls, configs: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> StackedModel:
        """Member m is the model ``configs[m]`` gives under ``seeds[m]`` (see :func:`build_member`):
        the same weights, bitwise, as the single run of that config and seed starts from, and the
        generator state its training draws from."""
        if len(configs) != len(seeds):
            raise ValueError(f"{len(configs)} model configs but {len(seeds)} seeds")
        # Members with the same config and seed (a grid's lrs) start from the same weights: built once.
        keys = [(config_key(config, ()), seed) for config, seed in zip(configs, seeds)]
        built = {key: built_member(config, key[1]) for key, config in dict(zip(keys, configs)).items()}
        return cls([built[key][0] for key in keys], [built[key][1] for key in keys])

    def forward(self, x: Tensor, groups: Sequence[int] | None = None) -> Tensor:
        """Logits ``[P, B, classes]`` of images ``x [P, B, C, H, W]`` (member m's batch in ``x[m]``).

        With ``groups`` (run lengths summing to P), ``x [G, B, C, H, W]`` holds one batch per run of
        consecutive members that share their data: row g is the batch of the next ``groups[g]``
        members. The first stacked layer reads each row for its members (linear layers and the CPU's
        convolutions as an expanded view, so the batch is gathered and read once per run instead of
        once per member; the GPU's grouped convolution from a copy); the members compute what they
        compute on copies (bitwise)."""
        rows = self.members if groups is None else len(groups)
        if x.dim() != 5 or x.shape[0] != rows or (groups is not None and sum(groups) != self.members):
            raise ValueError(f"expected images [{rows}, B, C, H, W] for {self.members} members"
                             f"{'' if groups is None else f' in runs of {list(groups)}'}, got {list(x.shape)}")
        for layer in self.net:
            if groups is not None and isinstance(layer, (StackedLinear, StackedConv2d)):
                x, groups = layer(x, groups), None
            else:
                x = layer(x)  # before the first stacked layer: per-image layers (the MLP's flatten)
        return x

    def member_state_dict(self, m: int) -> dict[str, Tensor]:
        """Member m's weights under the single model's state_dict keys (copies)."""
        state = {}
        for i, layer in enumerate(self.net):
            if isinstance(layer, (StackedLinear, StackedConv2d)):
                for name, value in layer.member_state(m).items():
                    state[f"net.{i}.{name}"] = value.detach().clone().contiguous()
        return state

    def stack_members(self, members: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        """Tensors given per member in its single model's parameter order and shapes (e.g. a
        vector over its parameters), stacked as this model's parameters are; the inverse of
        slicing as :meth:`member_state_dict` does."""
        return [torch.stack(pieces) for pieces in zip(*members)]

    def member_model(self, m: int) -> nn.Module:
        """Member m as a single model (a copy, in this module's dtype and device)."""
        model = copy.deepcopy(self.template[0]).to(self.net[-1].weight)
        model.load_state_dict(self.member_state_dict(m))
        return model


class StackedMLP(StackedModel):
    """P :class:`~optimlab.models.MLP` members: every linear layer is one :class:`MemberLinear`."""

    single_type = MLP


class StackedCNN(StackedModel):
    """P :class:`~optimlab.models.CNN` members: every convolution a :class:`StackedConv2d`."""

    single_type = CNN


# The stacked form of each model a population can train, by the single model's ``_target_``.
STACKED: dict[str, type[StackedModel]] = {"optimlab.models.MLP": StackedMLP, "optimlab.models.CNN": StackedCNN}
