"""Step time of a saturated (diverging) tanh MLP with and without flushing denormals to zero.

A diverging run drives tanh units into saturation, where gradients shrink into the denormal range
(below ~1.2e-38 in float32); x86 CPUs handle those in slow microcode. ``trainer.flush_denormal``
(default true) calls ``torch.set_flush_denormal(True)``. This script drives the default MLP into
the `diverging` regime (SGD lr 2.0), then times the same training steps with flushing off and on,
interleaved, and prints the medians and the slowdown factor.

    python benchmarks/denormals.py [--warm-steps 300] [--steps 30] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import _timing

_timing.setup_env()
from optimlab.data import MNISTDataModule  # noqa: E402
from optimlab.models import MLP  # noqa: E402
from optimlab.optim import SGD  # noqa: E402


def subnormal_fraction(tensors: list[torch.Tensor]) -> float:
    tiny = torch.finfo(torch.float32).tiny
    total = sum(t.numel() for t in tensors)
    return sum(((t != 0) & (t.abs() < tiny)).sum().item() for t in tensors) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-steps", type=_timing.count_or_zero, default=300, help="steps at lr 2.0 before timing")
    parser.add_argument("--steps", type=_timing.count, default=30, help="steps per timed block")
    parser.add_argument("--repeats", type=_timing.count, default=5)
    parser.add_argument("--lr", type=_timing.positive, default=2.0)
    args = parser.parse_args()
    _timing.print_header("denormals: saturated tanh MLP, flush-to-zero off vs on (CPU)")

    dm = MNISTDataModule(batch_size=128, download=False)
    dm.setup()
    if 128 * args.steps > len(dm.train_y):  # later batches would be empty
        parser.error(f"--steps {args.steps}: at most {len(dm.train_y) // 128} batches of 128 training images")
    torch.manual_seed(0)
    model = MLP()
    opt = SGD(model.parameters(), lr=args.lr)
    batches = [(dm.train_x[i:i + 128], dm.train_y[i:i + 128]) for i in range(0, 128 * args.steps, 128)]

    def step(x: torch.Tensor, y: torch.Tensor, m: torch.nn.Module, o: torch.optim.Optimizer) -> None:
        o.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        o.step()

    torch.set_flush_denormal(False)
    for i in range(args.warm_steps):
        step(*batches[i % len(batches)], model, opt)
    # Huge logits make softmax probabilities underflow: the loss gradient w.r.t. the logits, the
    # start of the backward pass, fills with denormals.
    logits = model(batches[0][0]).detach().requires_grad_(True)
    F.cross_entropy(logits, batches[0][1]).backward()
    print(f"after {args.warm_steps} steps at lr {args.lr}: {subnormal_fraction([logits.grad]):.2%} of the "
          f"gradient w.r.t. the logits is denormal")

    def block(flush: bool) -> float:
        m = copy.deepcopy(model)
        o = SGD(m.parameters(), lr=args.lr)
        torch.set_flush_denormal(flush)
        seconds = _timing.time_block(lambda: [step(x, y, m, o) for x, y in batches], torch.device("cpu"))
        torch.set_flush_denormal(False)
        return seconds / len(batches) * 1e3

    if not torch.set_flush_denormal(True):
        print("this CPU cannot flush denormals (no SSE3 DAZ/FTZ); nothing to compare")
        return
    medians = _timing.interleaved({"off": lambda: block(False), "on": lambda: block(True)}, args.repeats)
    _timing.print_table(["flush_denormal", "ms / step"], [["false", medians["off"]], ["true", medians["on"]]])
    print(f"\nslowdown without flushing: {medians['off'] / medians['on']:.2f}x")


if __name__ == "__main__":
    main()
