"""Every member's sharpness at once (one batched Hessian-vector product per Lanczos step) against
measuring the members one after another.

For each width: a population of ``--members`` one-hidden-layer MLPs (784-width-10, tanh, float32,
seeds 0..P-1) and a probe of ``--probe`` MNIST training images per member. ``batched`` is one
``optimlab.population.curvature.member_eigenpairs`` call; ``one by one`` is P calls of
``optimlab.curvature.top_eigenpair`` on the members as single models. Both run a fixed ``--iters``
products (tol 0), so they do the same arithmetic; they alternate ``--repeats`` times after one
untimed warm-up each, and the table gives the median ms of each and the median of the
side-by-side ratios (min-max). The two values agree (printed: the largest relative difference).

    python benchmarks/population_curvature.py                      # about a minute on 2 idle cores
    python benchmarks/population_curvature.py --widths 128 --members 4 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics

import torch

import _timing

_timing.setup_env()
from optimlab.curvature import top_eigenpair  # noqa: E402
from optimlab.data import MNISTDataModule  # noqa: E402
from optimlab.population.curvature import member_eigenpairs  # noqa: E402
from optimlab.population.stacked import StackedMLP  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=_timing.counts, default="8,128,512", help="hidden widths, comma-separated")
    parser.add_argument("--members", type=_timing.count, default=12)
    parser.add_argument("--probe", type=_timing.count, default=256, help="probe images per member")
    parser.add_argument("--iters", type=_timing.count, default=5, help="Hessian-vector products per measurement")
    parser.add_argument("--repeats", type=_timing.count, default=5)
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--threads", type=_timing.count, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _timing.print_header("Sharpness of a population: batched against one member at a time")
    data = MNISTDataModule(subset=args.members * args.probe, val_size=1000)
    data.setup("fit")
    x = data.train_x[:args.members * args.probe].view(args.members, args.probe, 1, 28, 28)
    y = data.train_y[:args.members * args.probe].view(args.members, args.probe)
    rows = []
    for device in _timing.devices_to_measure(args.device):
        for width in args.widths:
            config = {"_target_": "optimlab.models.MLP", "hidden": [width], "activation": "tanh"}
            model = StackedMLP.from_configs([config] * args.members, list(range(args.members))).to(device)
            singles = [model.member_model(m) for m in range(args.members)]
            xd, yd = x.to(device), y.to(device)
            # One start vector per member, the same for both (in each one's layout).
            starts = [[torch.randn(p.shape, generator=torch.Generator().manual_seed(m)).to(device)
                       for p in single.parameters()] for m, single in enumerate(singles)]
            stacked_start = model.stack_members(starts)
            results: dict[str, list[float]] = {}

            def batched() -> None:
                results["batched"] = member_eigenpairs(model, xd, yd, iters=args.iters, tol=0.0,
                                                       init=stacked_start).values.tolist()

            def one_by_one() -> None:
                results["single"] = [top_eigenpair(single, xd[m], yd[m], iters=args.iters, tol=0.0, init=starts[m]).value
                                     for m, single in enumerate(singles)]

            for fn in (batched, one_by_one):
                fn()  # warm-up
            runs = _timing.interleaved_runs({"batched": lambda: _timing.time_block(batched, device),
                                             "one by one": lambda: _timing.time_block(one_by_one, device)},
                                            args.repeats)
            ratio = _timing.paired_ratio(runs["one by one"], runs["batched"])
            agree = max(abs(a - b) / abs(b) for a, b in zip(results["batched"], results["single"]))
            med = {name: 1000 * statistics.median(vs) for name, vs in runs.items()}
            rows.append([device.type, width, args.members, args.probe, args.iters, f"{med['batched']:.1f}",
                         f"{med['one by one']:.1f}", f"{ratio[0]:.2f}", f"{ratio[1]:.2f}-{ratio[2]:.2f}", f"{agree:.1e}"])
    _timing.print_table(["device", "width", "members", "probe", "products", "batched ms", "one by one ms",
                         "speed-up", "range", "values differ"], rows)


if __name__ == "__main__":
    main()
