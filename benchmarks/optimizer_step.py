"""Time ``opt.step()`` of optimlab's optimizers against torch.optim's for-loop and foreach paths.

For each device (CPU, plus CUDA when available), model (default MLP 784-1024-128-10, CNN) and
optimizer (SGD momentum 0.9, Adagrad, Adam, RMSprop), three optimizers of the same class and
hyperparameters each get their own copy of the model's parameters with the same fixed random
gradients in ``p.grad``: ours, ``torch.optim.<Name>(foreach=False)`` and ``(foreach=True)``.
After a warm-up, blocks of ``--steps`` steps run round-robin (ours, loop, foreach, ours, ...),
``--repeats`` times; the table shows the median microseconds per step and the ratio of ours to
the fastest torch path, against the target ``--target`` (1.10).

The ``members`` row set (in ``--models`` by default) is population training: ``--members`` (64)
MLPs (784-``--member-hidden``-10) stacked into parameters of shape ``[64, ...]``, stepped by one
of our optimizers with a member-wise param group (one lr per member, a float64 tensor), against
64 separate optimizers, one per member with its lr (ours, torch.optim's for-loop and foreach). Its
table shows microseconds per step of the whole population and the gain: the fastest separate
path over the member-wise step.

    python benchmarks/optimizer_step.py                      # defaults: 7 repeats x 200 steps
    python benchmarks/optimizer_step.py --repeats 3 --steps 20 --optimizers SGD,Adam --models mlp
    python benchmarks/optimizer_step.py --models members --members 64 --member-hidden 128  # bigger members
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch
from torch import Tensor

import _timing

_timing.setup_env()
import optimlab.optim  # noqa: E402  (after setup_env puts src/ on the path)
from optimlab.models import CNN, MLP  # noqa: E402

# Default-ish hyperparameters; the same kwargs go to our class and to torch.optim's.
HYPERPARAMS: dict[str, dict[str, float]] = {
    "SGD": {"lr": 0.1, "momentum": 0.9},
    "Adagrad": {"lr": 0.01},
    "Adam": {"lr": 1e-3},
    "RMSprop": {"lr": 0.01},
}
MODELS: dict[str, Callable[[], torch.nn.Module]] = {"mlp": MLP, "cnn": CNN}
MEMBERS = "members"  # the population row set, see the module docstring
GRAD_SCALE = 1e-2  # small fixed gradients keep thousands of steps far from overflow


def parameters_with_grads(model: str | Callable[[], torch.nn.Module], device: torch.device,
                          seed: int = 0) -> list[Tensor]:
    """A fresh copy of ``model``'s parameters (a name from MODELS, or a constructor) on ``device``
    with fixed random gradients (the same values for every call with the same seed)."""
    torch.manual_seed(seed)
    make = MODELS[model] if isinstance(model, str) else model
    params = [p.detach().to(device).requires_grad_() for p in make().parameters()]
    g = torch.Generator().manual_seed(seed + 1)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * GRAD_SCALE).to(device)
    return params


def build_optimizers(name: str, model: str, device: torch.device) -> dict[str, torch.optim.Optimizer]:
    """Our optimizer and torch.optim's two paths, each over its own copy of the parameters."""
    ours, theirs, kwargs = getattr(optimlab.optim, name), getattr(torch.optim, name), HYPERPARAMS[name]
    return {
        "ours": ours(parameters_with_grads(model, device), **kwargs),
        "torch-loop": theirs(parameters_with_grads(model, device), foreach=False, **kwargs),
        "torch-foreach": theirs(parameters_with_grads(model, device), foreach=True, **kwargs),
    }


def member_lrs(name: str, members: int) -> Tensor:
    """One lr per member, spread from half to twice the optimizer's lr (float64, on the CPU)."""
    return HYPERPARAMS[name]["lr"] * torch.logspace(-1, 1, members, base=2, dtype=torch.float64)


def build_member_optimizers(name: str, members: int, hidden: int, device: torch.device
                            ) -> dict[str, list[torch.optim.Optimizer]]:
    """The population, ``members`` MLPs with their own seeds and gradients: one member-wise
    optimizer over the stacked parameters, and three sets of one optimizer per member."""
    ours, theirs = getattr(optimlab.optim, name), getattr(torch.optim, name)
    kwargs = {k: v for k, v in HYPERPARAMS[name].items() if k != "lr"}
    lrs = member_lrs(name, members)

    def model() -> torch.nn.Module:
        return MLP(hidden=(hidden,))

    def separate(cls: type[torch.optim.Optimizer], **extra: object) -> list[torch.optim.Optimizer]:
        return [cls(parameters_with_grads(model, device, seed=2 * m), lr=lrs[m].item(), **kwargs, **extra)
                for m in range(members)]

    per_member = [parameters_with_grads(model, device, seed=2 * m) for m in range(members)]
    stacked = []
    for tensors in zip(*per_member):
        p = torch.stack([t.detach() for t in tensors]).requires_grad_()
        p.grad = torch.stack([t.grad for t in tensors])
        stacked.append(p)
    return {
        "member-wise": [ours([{"params": stacked, "members": members, "lr": lrs}], **kwargs)],
        "ours": separate(ours),
        "torch-loop": separate(theirs, foreach=False),
        "torch-foreach": separate(theirs, foreach=True),
    }


def stepper(opts: torch.optim.Optimizer | list[torch.optim.Optimizer], steps: int) -> Callable[[], None]:
    """``steps`` steps of the optimizer (of each optimizer of a list, in turn)."""
    opts = opts if isinstance(opts, list) else [opts]

    def block() -> None:
        for _ in range(steps):
            for opt in opts:
                opt.step()
    return block


def timed_steps(optimizers: dict[str, torch.optim.Optimizer | list[torch.optim.Optimizer]], device: torch.device,
                steps: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median microseconds per step of each implementation, blocks interleaved."""
    for opt in optimizers.values():  # warm-up: state creation, allocator, caches; not timed
        _timing.time_block(stepper(opt, warmup), device)
    blocks = {k: functools.partial(_timing.time_block, stepper(opt, steps), device) for k, opt in optimizers.items()}
    return {k: 1e6 * s / steps for k, s in _timing.interleaved(blocks, repeats).items()}


def measure(name: str, model: str, device: torch.device, steps: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median microseconds per ``step()`` of each implementation."""
    return timed_steps(build_optimizers(name, model, device), device, steps, repeats, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=_timing.count, default=7, help="timed blocks per implementation (median taken)")
    parser.add_argument("--steps", type=_timing.count, default=200, help="optimizer steps per timed block")
    parser.add_argument("--warmup", type=_timing.count_or_zero, default=20, help="untimed steps per implementation first")
    parser.add_argument("--optimizers", default=",".join(HYPERPARAMS), help="comma-separated subset of %(default)s")
    parser.add_argument("--models", default=",".join([*MODELS, MEMBERS]), help="comma-separated subset of %(default)s")
    parser.add_argument("--members", type=_timing.count, default=64, help="population size of the members rows")
    parser.add_argument("--member-hidden", type=_timing.count, default=32, help="hidden width of each member's MLP")
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all",
                        help="all: the CPU plus CUDA when available")
    parser.add_argument("--target", type=_timing.positive, default=1.10, help="target for ours / fastest torch path")
    parser.add_argument("--threads", type=_timing.count, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names, models = args.optimizers.split(","), args.models.split(",")
    for item, known in [*((n, list(HYPERPARAMS)) for n in names), *((m, [*MODELS, MEMBERS]) for m in models)]:
        if item not in known:
            parser.error(f"unknown {item!r}; choose from {', '.join(known)}")
    if args.members < 1 or args.member_hidden < 1:
        parser.error("--members and --member-hidden must be positive")

    devices = _timing.devices_to_measure(args.device)
    _timing.print_header("optimizer step: optimlab.optim vs torch.optim (foreach=False / True)")
    print(f"median us per step over {args.repeats} interleaved blocks of {args.steps} steps "
          f"(after {args.warmup} warm-up steps); hyperparameters: "
          + "; ".join(f"{n} {HYPERPARAMS[n]}" for n in names) + "\n")
    rows: list[list[object]] = []
    for device in devices:
        for model in (m for m in models if m != MEMBERS):
            for name in names:
                us = measure(name, model, device, args.steps, args.repeats, args.warmup)
                fastest = min(("torch-loop", "torch-foreach"), key=us.__getitem__)
                ratio = us["ours"] / us[fastest]
                rows.append([device.type, model, name, us["ours"], us["torch-loop"], us["torch-foreach"],
                             fastest.removeprefix("torch-"), ratio, _timing.verdict(ratio, args.target)])
    _timing.print_table(["device", "model", "optimizer", "ours us", "torch loop us", "torch foreach us",
                         "fastest torch", "ours/fastest", f"<= {args.target:.2f}"], rows)
    if MEMBERS in models:
        print_member_rows(names, devices, args)
    if not torch.cuda.is_available():
        print(f"\ncuda: {_timing.NO_GPU}")
    failed = sum(r[-1] == "FAIL" for r in rows)
    print(f"\n{len(rows) - failed} PASS, {failed} FAIL (target: ours <= {args.target:.2f} x fastest torch path)")


def print_member_rows(names: list[str], devices: list[torch.device], args: argparse.Namespace) -> None:
    """The population table: one member-wise step against one step of each separate optimizer."""
    p = args.members
    print(f"\n{p} members (MLP 784-{args.member_hidden}-10 each, lr from 0.5x to 2x per member): one member-wise "
          f"optimizer over [{p}, ...] parameters vs {p} separate optimizers; us per step of the whole population\n")
    rows: list[list[object]] = []
    for device in devices:
        for name in names:
            optimizers = build_member_optimizers(name, p, args.member_hidden, device)
            us = timed_steps(optimizers, device, args.steps, args.repeats, args.warmup)
            fastest = min(("ours", "torch-loop", "torch-foreach"), key=us.__getitem__)
            rows.append([device.type, p, name, us["member-wise"], us["ours"], us["torch-loop"], us["torch-foreach"],
                         fastest, us[fastest] / us["member-wise"]])
    _timing.print_table(["device", "members", "optimizer", "member-wise us", f"{p} x ours us", f"{p} x torch loop us",
                         f"{p} x torch foreach us", "fastest separate", "gain"], rows)


if __name__ == "__main__":
    main()
