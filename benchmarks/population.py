"""P separate small runs' step loops against one population step loop, plus the bare batched floor.

Three ways to take ``--steps`` training steps of every one of ``--members`` MLP members (784-H-10,
tanh, batch 128, optimlab SGD, each member its own seed, lr and data order; MNIST on the device):

- separate: P single models, each with its own SGD, stepped one after another; each step gathers
  its batch with ``index_select`` (as the data module does), forward, cross-entropy, zero_grad,
  backward, step (the plain loop of ``train_loop.py``, without Lightning and without the
  divergence check);
- population: :class:`optimlab.population.PopulationLoop` steps (gather of every member's batch,
  one stacked forward/backward, one member-wise SGD step, the per-member finite checks and the
  ``torch.where`` that freezes non-finite members);
- floor: the same stacked forward, loss, backward and member-wise step on batches gathered
  beforehand, without the checks: the batched math alone.

All three run with the malloc setting a CPU population gets from the launcher (``keep_freed_memory``).

The three alternate ``--repeats`` times after one untimed warm-up each; the table shows each one's
median time per step of all members and the speed-up separate / population (median of the
side-by-side pairs, with its range).

    python benchmarks/population.py                      # 16 members 784-32-10, 20 steps, 5 repeats
    python benchmarks/population.py --members 64 --hidden 128 --device cuda

``--sweep GRID`` measures a whole sweep end to end instead (:func:`sweep_benchmark`): the same grid
(``tiny``, ``narrow`` or ``reduced``, see :data:`GRIDS`) run by ``python train.py -m`` with Hydra's
basic launcher (sequential jobs) and with ``hydra/launcher=population`` (``--executor``: its
``hydra.launcher.executor``, default ``auto``: forked processes on a multi-core CPU), each as one subprocess (wall
time from start to exit, runs per minute), and the floor: the bare batched math of the same grid (per
population, its steps of stacked forward, loss, backward and member-wise step on batches gathered
beforehand; no Hydra, evaluation, checks or files). Then, from CPU ``torch.profiler`` runs, the aten
operators (dispatcher calls, each at least one kernel launch on a GPU) per training step of a single
run (``optimlab.train.run``; two runs that differ only in their number of steps, so set-up and
evaluation cancel) and of a population step (:meth:`PopulationLoop.step` with its batch gather).

    python benchmarks/population.py --sweep narrow --threads 1     # 360 runs; minutes sequentially
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import _timing

_timing.setup_env()
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from optimlab.data import MNISTDataModule  # noqa: E402
from optimlab.optim import SGD  # noqa: E402
from optimlab.population import PopulationData, PopulationLoop, StackedMLP, build_member, member_optimizer  # noqa: E402
from optimlab.population.launcher import keep_freed_memory, population_optimizer  # noqa: E402
from optimlab.population.plan import data_order  # noqa: E402
from optimlab.population.stacked import member_losses  # noqa: E402
from optimlab.summary import describe_run  # noqa: E402
from optimlab.train import run  # noqa: E402

BATCH_SIZE = 128
POPULATION_FLOOR_TARGET = 1.3  # the "every population within 1.3x of its bare math"


def build(members: int, hidden: int, steps: int, device: torch.device) -> dict:
    """The members' models, optimizers and data, as separate runs and as one population."""
    configs = [{"_target_": "optimlab.models.MLP", "hidden": [hidden], "activation": "tanh"}] * members
    seeds = list(range(members))
    lrs = [0.05 + 0.01 * m for m in range(members)]
    subset = steps * BATCH_SIZE
    dms = [MNISTDataModule(val_size=1000, subset=subset, batch_size=BATCH_SIZE, seed=s, download=False) for s in seeds]
    data = PopulationData(dms, device)
    # Separate runs: member m's model and batches (its first-epoch order), on the device.
    singles = [build_member(c, s).to(device) for c, s in zip(configs, seeds)]
    single_opts = [SGD(model.parameters(), lr=lr) for model, lr in zip(singles, lrs)]
    image_idx, label_idx = data.epoch_indices(0)

    def stacked() -> tuple[StackedMLP, torch.optim.Optimizer]:
        """A fresh stacked model of the members and its member-wise SGD."""
        model = StackedMLP.from_configs(configs, seeds).to(device)
        return model, member_optimizer(SGD, model, lrs)

    loop = PopulationLoop(*stacked(), data)
    floor_model, floor_opt = stacked()
    batches = [data.gather(i, j) for i, j in zip(image_idx.split(BATCH_SIZE, 1), label_idx.split(BATCH_SIZE, 1))]
    graph = capture_math(*stacked(), *batches[0]) if device.type == "cuda" else None
    return dict(data=data, singles=singles, single_opts=single_opts, image_idx=image_idx, label_idx=label_idx,
                loop=loop, floor_model=floor_model, floor_opt=floor_opt, batches=batches, graph=graph)


def separate(parts: dict) -> None:
    data = parts["data"]
    for m, (model, opt) in enumerate(zip(parts["singles"], parts["single_opts"])):
        for img, lab in zip(parts["image_idx"][m].split(BATCH_SIZE), parts["label_idx"][m].split(BATCH_SIZE)):
            x, y = data.images.index_select(0, img), data.labels.index_select(0, lab)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def population(parts: dict) -> None:
    for x, y in parts["data"].train_batches(0):
        parts["loop"].step(x, y)


def math_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              groups: list[int] | None = None) -> None:
    """The stacked forward, loss, backward and member-wise step: the batched math alone (``groups``:
    ``x`` holds one batch per run of members that share their data, as the population gathers them)."""
    opt.zero_grad(set_to_none=True)
    member_losses(model(x, groups), y).sum().backward()
    opt.step()


def floor(parts: dict) -> None:
    model, opt = parts["floor_model"], parts["floor_opt"]
    for x, y in parts["batches"]:
        math_step(model, opt, x, y, parts["data"].input_groups)


def capture_math(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor) -> torch.cuda.CUDAGraph:
    """CUDA only: one :func:`math_step` of ``model`` and ``opt`` (a pair of its own: the replays train it)
    on the batch ``(x, y)`` captured as a CUDA graph, so that a replay runs the step's kernels without
    launching them one by one from Python: what the math costs on the GPU. (Warm-up on a side stream
    first, as capture requires; inside the capture ``zero_grad(set_to_none=True)`` only drops the
    warm-up's gradients, so the captured backward creates them in the graph's memory, and each replay
    rewrites them.)"""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            math_step(model, opt, x, y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        math_step(model, opt, x, y)
    return graph


def graphed(parts: dict) -> None:
    for _ in parts["batches"]:
        parts["graph"].replay()


# ---- the end-to-end sweep comparison ------------------------------------------------------------

LRS_NARROW = "0.0001,0.0003,0.001,0.003,0.01,0.03,0.1,0.3,1.0,3.0"
BUDGET = ["data.subset=5000", "data.val_size=1000", "data.test_every_epoch=false", "epochs=4"]
GRIDS = {  # name -> (swept keys and values, the budget); every job one hidden layer, tanh, batch 128
    "tiny": ({"optimizer": "sgd,adam", "lr": "0.01,0.1", "model.hidden": "[8]", "seed": "0,1"},
             ["data.subset=512", "data.val_size=500", "data.test_every_epoch=false", "epochs=2"]),
    "narrow": ({"optimizer": "sgd,adagrad,adam,rmsprop", "lr": LRS_NARROW, "model.hidden": "[2],[8],[32]",
                "seed": "0,1,2"}, BUDGET),
    "reduced": ({"optimizer": "sgd,adagrad,adam,rmsprop", "lr": "0.0001,0.001,0.01,0.1,1.0,4.0",
                 "model.hidden": "[2],[8],[32],[128],[512],[2048]", "seed": "0"}, BUDGET),
}


def grid_jobs(grid: str) -> list[list[str]]:
    """Every job's overrides (the budget included), as ``-m`` expands the grid."""
    axes, budget = GRIDS[grid]
    jobs: list[list[str]] = [[]]
    for key, values in axes.items():
        choices = values.split(",") if key != "model.hidden" else [f"[{v}]" for v in values.strip("[]").split("],[")]
        jobs = [job + [f"{key}={value}"] for job in jobs for value in choices]
    return [job + budget for job in jobs]


def compose_job(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(_timing.CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def run_sweep(grid: str, device: torch.device, threads: int, out: Path, executor: str | None) -> dict:
    """``python train.py -m <grid>`` (the population launcher with ``hydra.launcher.executor=executor``,
    or, None, the basic one) into ``out``: wall time and how many jobs finished (complete or diverged)."""
    axes, budget = GRIDS[grid]
    command = [sys.executable, str(_timing.REPO / "train.py"), "-m", *[f"{k}={v}" for k, v in axes.items()],
               *budget, "trainer.progress_bar=false", f"trainer.num_threads={threads}",
               f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", f"hydra.sweep.dir={out}"]
    if executor is not None:
        command += ["hydra/launcher=population", f"hydra.launcher.executor={executor}"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=_timing.REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (out / "benchmark.log").write_text(" ".join(command) + "\n" + result.stdout + result.stderr)
    statuses = [json.loads(p.read_text())["status"] for p in out.glob("*/summary.json")]
    if result.returncode:
        print(f"warning: {' '.join(command[2:6])}... exited {result.returncode}; see {out / 'benchmark.log'}")
    return {"wall": wall, "finished": sum(s in ("complete", "diverged") for s in statuses), "jobs": len(statuses)}


def population_parts(jobs: list[list[str]],
                     device: torch.device) -> tuple[DictConfig, StackedMLP, torch.optim.Optimizer, PopulationData]:
    """A population of ``jobs`` (one optimizer and width) as the launcher builds it: the first job's config,
    model, optimizer, data."""
    configs = sorted((compose_job(job) for job in jobs), key=data_order)  # members sharing data side by side
    first = configs[0]
    model = StackedMLP.from_configs([c.model for c in configs], [c.seed for c in configs]).to(device)
    data = PopulationData([instantiate(c.data) for c in configs], device)
    # the grids draw no gradient noise
    optimizer, _ = population_optimizer(model, [OmegaConf.to_container(c.optimizer, resolve=True) for c in configs])
    return first, model, optimizer, data


def populations_of(grid: str) -> list[list[list[str]]]:
    """The grid's jobs grouped as the launcher groups them: one population per optimizer and width."""
    groups: dict[tuple[str, str], list[list[str]]] = {}
    for job in grid_jobs(grid):
        groups.setdefault((job[0], job[2]), []).append(job)
    return list(groups.values())


def floor_seconds(grid: str, device: torch.device) -> dict[tuple[str, str], tuple[float, int]]:
    """The bare batched math of each population of the grid, keyed by (optimizer, widths) as the
    runs' summaries describe them: (seconds, steps) of its steps (epochs x steps per epoch) of stacked
    forward, loss, backward and member-wise step, cycling over a few batches gathered beforehand (the
    math does not depend on which batch); set-up excluded."""
    floors = {}
    for jobs in populations_of(grid):
        cfg, model, optimizer, data = population_parts(jobs, device)
        batches = [batch for batch, _ in zip(data.train_batches(0), range(4))]
        steps = cfg.epochs * data.steps_per_epoch

        def train() -> None:
            for step in range(steps):
                math_step(model, optimizer, *batches[step % len(batches)], data.input_groups)

        described = describe_run(OmegaConf.to_container(cfg, resolve=True))
        key = (described.optimizer, described.widths)
        floors[key] = (_timing.time_block(train, device), steps)
    return floors


def population_training(sweep_dir: Path) -> dict[tuple[str, str], tuple[float, int]]:
    """Each population's training in a population sweep's folder, keyed as :func:`floor_seconds`:
    (seconds, steps) of its epochs (``train_time_s``: the steps, with their checks and records, without
    the evaluation), read from the member that trained longest (a frozen member's record stops)."""
    trained: dict[tuple[str, str], tuple[float, int]] = {}
    for path in sweep_dir.glob("*/summary.json"):
        summary = json.loads(path.read_text())
        if not summary.get("population"):
            continue  # a job that ran alone
        run = summary["description"]
        epochs = summary["epochs"]
        seen = (sum(row.get("train_time_s", 0.0) for row in epochs), len(epochs) * summary["population"]["steps_per_epoch"])
        key = (run["optimizer"], run["widths"])
        trained[key] = max(trained.get(key, seen), seen)
    return trained


def training_against_floor(sweep_dir: Path, floors: dict[tuple[str, str], tuple[float, int]]) -> list[list]:
    """Rows (optimizer, widths, training s, floor s, training / floor) of every population of a
    population sweep, its floor scaled to the steps the population trained."""
    rows = []
    for key, (seconds, steps) in sorted(population_training(sweep_dir).items()):
        floor, floor_steps = floors[key]
        floor *= steps / floor_steps
        rows.append([*key, seconds, floor, seconds / floor])
    return rows


def count_aten(fn: Callable[[], object]) -> int:
    """aten operators (dispatcher calls, nested ones included) that ``fn()`` runs, by the CPU profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.name.startswith("aten::") for event in prof.events())


def ops_per_step(grid: str) -> tuple[float, float, int]:
    """(aten ops per training step of one single run, per population step, members of that population),
    for the grid's first job and its population, on the CPU."""
    jobs = populations_of(grid)[0]
    single = [o for o in jobs[0] if not o.startswith(("data.subset", "epochs"))] + \
        ["trainer.accelerator=cpu", "trainer.progress_bar=false", "epochs=1"]
    counts = {}
    for steps in (4, 12):  # two runs that differ only in their steps: set-up and validation cancel
        cfg = compose_job(single + [f"data.subset={steps * 128}"])
        with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stdout(io.StringIO()):
            counts[steps] = count_aten(lambda: run(cfg, Path(run_dir)))
    _, model, optimizer, data = population_parts(jobs, torch.device("cpu"))
    loop = PopulationLoop(model, optimizer, data)
    batches = (batch for epoch in itertools.count() for batch in data.train_batches(epoch))
    loop.step(*next(batches))  # warm-up: the optimizer's state is created on its first step

    def five_steps() -> None:
        for _ in range(5):
            loop.step(*next(batches))

    return (counts[12] - counts[4]) / 8, count_aten(five_steps) / 5, len(jobs)


def sweep_benchmark(grid: str, device_choice: str, threads: int, keep: Path | None, executor: str) -> None:
    """The end-to-end table (see the module docstring)."""
    jobs = len(grid_jobs(grid))
    axes, budget = GRIDS[grid]
    torch.set_num_threads(threads)
    _timing.print_header(f"population sweep: grid {grid} ({jobs} runs: "
                         f"{'; '.join(f'{k} {v}' for k, v in axes.items())}; {' '.join(budget)}), "
                         f"trainer.num_threads={threads}, population hydra.launcher.executor={executor}")
    print(f"load average at start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    rows, per_population = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = keep or Path(tmp)
        for device in _timing.devices_to_measure(device_choice):
            name = device.type
            seq = run_sweep(grid, device, threads, root / f"{name}_sequential", executor=None)
            pop = run_sweep(grid, device, threads, root / f"{name}_population", executor=executor)
            floors = floor_seconds(grid, device)
            floor = sum(seconds for seconds, _ in floors.values())
            rows.append([name, seq["wall"], pop["wall"], floor, 60 * jobs / seq["wall"], 60 * jobs / pop["wall"],
                         seq["wall"] / pop["wall"], f"{seq['finished']}/{pop['finished']} of {jobs}"])
            per_population[name] = training_against_floor(root / f"{name}_population", floors)
    if not torch.cuda.is_available():
        rows.append(["cuda", _timing.NO_GPU, "", "", "", "", "", ""])
    print(f"load average at end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print("wall s of the whole `python train.py -m` (start-up included); floor s: the batched math alone; "
          "speed-up = sequential / population")
    _timing.print_table(["device", "sequential s", "population s", "floor s", "seq runs/min", "pop runs/min",
                         "speed-up", "finished seq/pop"], rows)
    for name, population_rows in per_population.items():
        ratios = [row[-1] for row in population_rows]
        together = sum(row[2] for row in population_rows) / sum(row[3] for row in population_rows)
        print(f"\n{name}: each population's training (its epochs' train_time_s: steps, checks and records, no "
              f"evaluation) against its bare math; largest ratio {max(ratios):.2f}, median "
              f"{statistics.median(ratios):.2f}, all populations together {together:.2f} (target: every population "
              f"<= {POPULATION_FLOOR_TARGET}; one run of each, so single ratios are noisy)")
        _timing.print_table(["optimizer", "widths", "training s", "floor s", "training / floor"], population_rows)
    single, population, members = ops_per_step(grid)
    print(f"\naten ops per training step (CPU profiler): single run {single:.0f}; population of {members} "
          f"{population:.0f} ({population / members:.1f} per member-step)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=_timing.count, default=16)
    parser.add_argument("--hidden", type=_timing.count, default=32)
    parser.add_argument("--steps", type=_timing.count, default=20, help="steps per member per measurement")
    parser.add_argument("--repeats", type=_timing.count, default=5)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "all"])
    parser.add_argument("--threads", type=_timing.count, default=None, help="torch CPU threads (default: torch's; "
                        "--sweep: 1, given to both sweeps as trainer.num_threads)")
    parser.add_argument("--sweep", choices=sorted(GRIDS), help="measure this grid end to end instead")
    parser.add_argument("--keep", type=lambda text: Path(text).resolve(),  # the sweeps run from the repository
                        help="--sweep: write the sweeps here (default: a temporary folder)")
    parser.add_argument("--executor", default="auto", choices=["auto", "inline", "processes"],
                        help="--sweep: where the population launcher trains (hydra.launcher.executor)")
    args = parser.parse_args()
    # The malloc setting a population on the CPU runs with (the launcher's), for the floor and for every
    # contender of the step comparison: it is process-wide (the separate runs gain nothing from it, measured).
    keep_freed_memory()
    if args.sweep:
        sweep_benchmark(args.sweep, args.device, args.threads or 1, args.keep, args.executor)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    _timing.print_header(f"population: {args.members} members 784-{args.hidden}-10, {args.steps} steps each, "
                         f"batch {BATCH_SIZE}, SGD")
    rows = []
    for device in _timing.devices_to_measure(args.device):
        parts = build(args.members, args.hidden, args.steps, device)
        fns = {"separate": separate, "population": population, "floor": floor}
        if parts["graph"] is not None:
            fns["graphed"] = graphed
        measures = {name: (lambda fn=fn: _timing.time_block(lambda: fn(parts), device)) for name, fn in fns.items()}
        for measure in measures.values():  # warm-up
            measure()
        values = _timing.interleaved_runs(measures, args.repeats)
        ms = {name: 1e3 * statistics.median(vs) / args.steps for name, vs in values.items()}
        speedup, low, high = _timing.paired_ratio(values["separate"], values["population"])
        floor_share = statistics.median(f / p for f, p in zip(values["floor"], values["population"]))
        rows.append([device.type, ms["separate"], ms["population"], ms["floor"], ms.get("graphed", "n/a"), speedup,
                     f"{low:.2f}-{high:.2f}", floor_share])
    print("ms per step of all members (median); speed-up = separate / population (median of pairs, range); "
          "floor share = floor / population; graphed floor: the floor's step replayed as one CUDA graph")
    _timing.print_table(["device", "separate ms", "population ms", "floor ms", "graphed floor ms", "speed-up", "range",
                         "floor share"], rows)


if __name__ == "__main__":
    main()
