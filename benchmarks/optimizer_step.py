"""Time ``opt.step()`` of optimlab's optimizers against torch.optim's for-loop and foreach paths.

For each device (CPU, plus CUDA when available), model (default MLP 784-1024-128-10, CNN) and
optimizer (SGD momentum 0.9, Adagrad, Adam, RMSprop), three optimizers of the same class and
hyperparameters each get their own copy of the model's parameters with the same fixed random
gradients in ``p.grad``: ours, ``torch.optim.<Name>(foreach=False)`` and ``(foreach=True)``.
After a warm-up, blocks of ``--steps`` steps run round-robin (ours, loop, foreach, ours, ...),
``--repeats`` times; the table shows the median microseconds per step and the ratio of ours to
the fastest torch path, against the target ``--target`` (1.10).

    python benchmarks/optimizer_step.py                      # defaults: 7 repeats x 200 steps
    python benchmarks/optimizer_step.py --repeats 3 --steps 20 --optimizers SGD,Adam --models mlp
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
IMPLS = ("ours", "torch-loop", "torch-foreach")
GRAD_SCALE = 1e-2  # small fixed gradients keep thousands of steps far from overflow


def parameters_with_grads(model: str, device: torch.device, seed: int = 0) -> list[Tensor]:
    """A fresh copy of ``model``'s parameters on ``device`` with fixed random gradients (the same
    values for every call with the same seed)."""
    torch.manual_seed(seed)
    params = [p.detach().to(device).requires_grad_() for p in MODELS[model]().parameters()]
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


def stepper(opt: torch.optim.Optimizer, steps: int) -> Callable[[], None]:
    def block() -> None:
        for _ in range(steps):
            opt.step()
    return block


def measure(name: str, model: str, device: torch.device, steps: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median microseconds per ``step()`` of each implementation."""
    optimizers = build_optimizers(name, model, device)
    for opt in optimizers.values():  # warm-up: state creation, allocator, caches; not timed
        _timing.time_block(stepper(opt, warmup), device)
    blocks = {k: functools.partial(_timing.time_block, stepper(opt, steps), device) for k, opt in optimizers.items()}
    return {k: 1e6 * s / steps for k, s in _timing.interleaved(blocks, repeats).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per implementation (median taken)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per timed block")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per implementation first")
    parser.add_argument("--optimizers", default=",".join(HYPERPARAMS), help="comma-separated subset of %(default)s")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of %(default)s")
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all",
                        help="all: the CPU plus CUDA when available")
    parser.add_argument("--target", type=float, default=1.10, help="target for ours / fastest torch path")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names, models = args.optimizers.split(","), args.models.split(",")
    for item, known in [*((n, HYPERPARAMS) for n in names), *((m, MODELS) for m in models)]:
        if item not in known:
            parser.error(f"unknown {item!r}; choose from {', '.join(known)}")

    devices = _timing.devices_to_measure(args.device)
    _timing.print_header("optimizer step: optimlab.optim vs torch.optim (foreach=False / True)")
    print(f"median us per step over {args.repeats} interleaved blocks of {args.steps} steps "
          f"(after {args.warmup} warm-up steps); hyperparameters: "
          + "; ".join(f"{n} {HYPERPARAMS[n]}" for n in names) + "\n")
    rows: list[list[object]] = []
    for device in devices:
        for model in models:
            for name in names:
                us = measure(name, model, device, args.steps, args.repeats, args.warmup)
                fastest = min(("torch-loop", "torch-foreach"), key=us.__getitem__)
                ratio = us["ours"] / us[fastest]
                rows.append([device.type, model, name, us["ours"], us["torch-loop"], us["torch-foreach"],
                             fastest.removeprefix("torch-"), ratio, _timing.verdict(ratio, args.target)])
    _timing.print_table(["device", "model", "optimizer", "ours us", "torch loop us", "torch foreach us",
                         "fastest torch", "ours/fastest", f"<= {args.target:.2f}"], rows)
    if not torch.cuda.is_available():
        print(f"\ncuda: {_timing.NO_GPU}")
    failed = sum(r[-1] == "FAIL" for r in rows)
    print(f"\n{len(rows) - failed} PASS, {failed} FAIL (target: ours <= {args.target:.2f} x fastest torch path)")


if __name__ == "__main__":
    main()
