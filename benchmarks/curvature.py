"""Overhead of tracking the sharpness during training, and how the probe size changes the value.

A plain PyTorch loop, not Lightning (the callback adds only the measurement itself): the model of
``conf/model/<model>.yaml`` (default MLP 784-1024-128-10) trained on the MNIST training split at
batch 128 with ``optimlab.optim.SGD`` lr 0.1 (``--optimizer adam``: ``optimlab.optim.Adam`` lr 1e-3,
whose measurements are preconditioned), denormals flushed as ``trainer.flush_denormal`` does by
default. One variant trains without tracking; each ``--variants`` entry ``N@K`` trains the same way
and after every K-th step calls ``optimlab.curvature.SharpnessTracker`` (``--iters``, ``--tol``, by
default the callback's 20 and 2e-2, warm-started) on a fixed probe of N training images with the
preconditioner read from the optimizer, as ``SharpnessCallback`` does. Every variant owns an
identical copy of the model and sees the same batches, so all follow the same trajectory. After one
untimed warm-up block each (which also holds each tracker's cold first measurement), blocks of
``--steps`` steps run round-robin ``--repeats`` times. The table shows the median ms per training
step (measurements included), the overhead tracked / untracked as the median (min-max) of the
side-by-side pairs against 1.20, the mean Hessian-vector products and median ms per measurement,
that cost in untracked training steps (median of single measurements over median of single steps,
which intermittent load on a shared machine disturbs less than whole blocks), the overhead that
implies at the variant's cadence, the cadence at which it would be 20% of the training time, and the
least any measurement on the probe costs (its gradient graph and one Hessian-vector product) with
the overhead that floor alone implies at the variant's cadence.

Then, on the final weights: each variant's last tracked value against a tight recomputation
(iters 100, tol 1e-6) on its probe, and the tight sharpness on probes of several sizes against
the one on ``--reference`` images: a small probe's Hessian has a larger top eigenvalue than the
training loss's, so its sharpness is biased upwards against 2/lr.

    python benchmarks/curvature.py                                      # about 1 min on 2 idle cores
    python benchmarks/curvature.py --variants 64@10 --repeats 3 --steps 100 --reference 1024
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

import _timing

_timing.setup_env()
from hydra.utils import instantiate  # noqa: E402

from optimlab.curvature import (  # noqa: E402
    DEFAULT_TRACKING_TOL, SharpnessTracker, preconditioner, sharpness, trainable,
)
from optimlab.data import MNISTDataModule  # noqa: E402
from optimlab.optim import SGD, Adam  # noqa: E402

BATCH_SIZE = 128
OVERHEAD_TARGET = 1.20
OPTIMIZERS = {"sgd": (SGD, 0.1), "adam": (Adam, 1e-3)}
DEFAULT_VARIANTS = "64@10,256@10,1024@10,1024@100,1024@200"
PROBE_SIZES = (64, 256, 1024)  # the bias table's rows (plus the reference)


class Variant:
    """A model, its optimizer and (when ``probe`` is given) a tracker measuring every ``every`` steps."""

    def __init__(self, model: nn.Module, optimizer: str, probe: tuple[Tensor, Tensor] | None, every: int,
                 iters: int, tol: float) -> None:
        cls, lr = OPTIMIZERS[optimizer]
        self.model, self.probe, self.every, self.step = model, probe, every, 0
        self.opt = cls(model.parameters(), lr=lr)
        self.tracker = SharpnessTracker(iters=iters, tol=tol, seed=0)
        self.iterations: list[int] = []
        self.measure_s: list[float] = []
        self.step_s: list[float] = []
        self.value = float("nan")

    def run(self, x: Tensor, y: Tensor, batches: list[Tensor]) -> float:
        """Train on ``batches`` (index tensors), measuring as configured; seconds per step. Each
        step's and each measurement's own time is kept too."""
        start = time.perf_counter()
        for idx in batches:
            t0 = time.perf_counter()
            loss = F.cross_entropy(self.model(x.index_select(0, idx)), y.index_select(0, idx))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
            t1 = time.perf_counter()
            self.step_s.append(t1 - t0)
            if self.probe is not None and self.step % self.every == 0:
                self.value = self.tracker(self.model, *self.probe, preconditioner(self.opt, trainable(self.model)))
                self.measure_s.append(time.perf_counter() - t1)
                self.iterations.append(self.tracker.iterations)
        return (time.perf_counter() - start) / len(batches)


def least_measurement_s(model: nn.Module, probe: tuple[Tensor, Tensor], repeats: int = 9) -> float:
    """Median seconds of the least any measurement of the probe's Hessian costs: the gradient graph
    and one Hessian-vector product (a tracker needs at least two)."""
    params = trainable(model)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        grads = torch.autograd.grad(F.cross_entropy(model(probe[0]), probe[1]), params, create_graph=True)
        torch.autograd.grad(grads, params, grad_outputs=[torch.ones_like(p) for p in params])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parse_variants(text: str) -> list[tuple[int, int]]:
    """``"64@10,1024@100"`` -> ``[(64, 10), (1024, 100)]`` (probe size, cadence; an argparse type)."""
    out = []
    for item in text.split(","):
        size, _, every = item.partition("@")
        try:
            out.append((_timing.count(size), _timing.count(every or "10")))
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"{item!r} is not PROBE@EVERY of two integers >= 1 ({err})") from None
    return list(dict.fromkeys(out))


def tight(model: nn.Module, opt: torch.optim.Optimizer, probe: tuple[Tensor, Tensor]) -> float:
    return sharpness(model, *probe, preconditioner(opt, trainable(model)), iters=100, tol=1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", type=parse_variants, default=DEFAULT_VARIANTS,
                        help="comma-separated PROBE@EVERY: probe images, measurement every EVERY steps")
    parser.add_argument("--steps", type=_timing.count, default=100, help="training steps per timed block")
    parser.add_argument("--repeats", type=_timing.count, default=9, help="round-robin blocks of each variant")
    parser.add_argument("--iters", type=_timing.count, default=20, help="the tracker's most products per measurement")
    parser.add_argument("--tol", type=_timing.positive, default=DEFAULT_TRACKING_TOL,
                        help="the tracker's tolerance (default: the callback's)")
    parser.add_argument("--reference", type=_timing.count, default=4096, help="probe size of the bias table's reference")
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd")
    parser.add_argument("--threads", type=_timing.count, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    specs = args.variants
    # the step count goes on through the warm-up block, then the timed ones: steps+1 .. steps*(repeats+1)
    if too_rare := [f"{size}@{every}" for size, every in specs
                    if args.steps * (args.repeats + 1) // every == args.steps // every]:
        parser.error(f"--variants {','.join(too_rare)}: never measured in --repeats {args.repeats} blocks of --steps "
                     f"{args.steps}; give more steps or repeats, or a shorter cadence")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(OmegaConf.load(_timing.CONF / "trainer" / "default.yaml").flush_denormal)

    _timing.print_header("sharpness tracking overhead (plain loop, CPU)")
    data = MNISTDataModule(seed=0)
    data.setup()
    x, y = data.train_x, data.train_y
    torch.manual_seed(0)
    base = instantiate(OmegaConf.load(_timing.CONF / "model" / f"{args.model}.yaml"))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    probe_idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))

    def probe(n: int) -> tuple[Tensor, Tensor]:
        return x[probe_idx[:n]], y[probe_idx[:n]]

    variants = {"untracked": Variant(copy.deepcopy(base), args.optimizer, None, 1, args.iters, args.tol)}
    for size, every in specs:
        variants[f"probe {size} every {every}"] = Variant(copy.deepcopy(base), args.optimizer, probe(size), every,
                                                          args.iters, args.tol)

    def batches(block: int) -> list[Tensor]:
        start = block * args.steps * BATCH_SIZE
        return list(order.roll(-(start % len(y)))[:args.steps * BATCH_SIZE].split(BATCH_SIZE))

    for v in variants.values():
        v.run(x, y, batches(0))
        v.iterations.clear()  # the timed blocks see only warm-started measurements
        v.measure_s.clear()
        v.step_s.clear()
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(1, args.repeats + 1):
        for name, v in variants.items():
            runs[name].append(v.run(x, y, batches(r)))

    opt_name = type(variants["untracked"].opt).__name__
    print(f"model {args.model}, batch {BATCH_SIZE}, {opt_name} lr {OPTIMIZERS[args.optimizer][1]}; "
          f"SharpnessTracker iters {args.iters}, tol {args.tol:g}, warm-started; {args.repeats} round-robin blocks of "
          f"{args.steps} steps after one warm-up block each; ms/step: medians; overhead: median (min-max) of the "
          f"side-by-side pairs\n")
    step_s = statistics.median(runs["untracked"])
    one_step_s = statistics.median(variants["untracked"].step_s)
    rows: list[list[object]] = []
    for name, v in variants.items():
        if v.probe is None:
            rows.append([name, step_s * 1e3, 1.0, "-", "-", None, None, None, None, None, None, None])
            continue
        ratio, low, high = _timing.paired_ratio(runs[name], runs["untracked"])
        measure_s = statistics.median(v.measure_s)
        cost = measure_s / one_step_s
        least = least_measurement_s(v.model, v.probe) / one_step_s
        rows.append([name, statistics.median(runs[name]) * 1e3, ratio, f"{low:.3f}-{high:.3f}",
                     f"{_timing.verdict(ratio, OVERHEAD_TARGET)} (<= {OVERHEAD_TARGET})",
                     statistics.mean(v.iterations), measure_s * 1e3, cost, 1 + cost / v.every,
                     math.ceil(cost / (OVERHEAD_TARGET - 1)), least, 1 + least / v.every])
    _timing.print_table(["variant", "ms/step", "overhead", "range", "target", "HVPs/measurement",
                         "ms/measurement", "in steps", "overhead est.", f"every for {OVERHEAD_TARGET}",
                         "least in steps", "least overhead"], rows)
    print(f"\nin steps: median ms of one measurement / median ms of one untracked step "
          f"({one_step_s * 1e3:.2f} ms; medians over single events shrug off the machine's slow spells that "
          f"blocks catch); overhead est.: 1 + in steps / every; every for {OVERHEAD_TARGET}: the cadence at which "
          f"one measurement costs {OVERHEAD_TARGET - 1:.0%} of the training time (derived, not timed); least in "
          f"steps: the gradient graph and one Hessian-vector product on the probe (the least any measurement "
          f"costs; median of 9, in untracked steps), least overhead: 1 + that / every, the lowest overhead any "
          f"tracker of this probe's Hessian can have at this cadence")

    model, opt = variants["untracked"].model, variants["untracked"].opt  # every copy holds the same weights
    print(f"\nfinal weights (step {variants['untracked'].step}): each variant's last tracked value vs a tight "
          f"recomputation (iters 100, tol 1e-6) on its probe")
    rows = []
    for name, v in variants.items():
        if v.probe is not None:
            exact = tight(v.model, v.opt, v.probe)
            rows.append([name, v.value, exact, abs(v.value - exact) / abs(exact)])
    _timing.print_table(["variant", "tracked", "tight", "rel. diff"], rows)

    reference = tight(model, opt, probe(args.reference))
    print(f"\nsharpness (tight) by probe size on the same weights, against probe {args.reference}: {reference:.4g}")
    sizes = sorted({size for size, _ in specs} | {s for s in PROBE_SIZES if s < args.reference})
    _timing.print_table(["probe", "sharpness", f"/ probe {args.reference}"],
                        [[size, value, value / reference] for size in sizes
                         for value in [tight(model, opt, probe(size))]])


if __name__ == "__main__":
    main()
