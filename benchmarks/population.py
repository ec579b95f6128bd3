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

The three alternate ``--repeats`` times after one untimed warm-up each; the table shows each one's
median time per step of all members and the speed-up separate / population (median of the
side-by-side pairs, with its range).

    python benchmarks/population.py                      # 16 members 784-32-10, 20 steps, 5 repeats
    python benchmarks/population.py --members 64 --hidden 128 --device cuda
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import _timing

_timing.setup_env()
from optimlab.data import MNISTDataModule  # noqa: E402
from optimlab.optim import SGD  # noqa: E402
from optimlab.population import PopulationData, PopulationLoop, StackedMLP, build_member, member_optimizer  # noqa: E402

BATCH_SIZE = 128


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
    model = StackedMLP.from_configs(configs, seeds).to(device)
    loop = PopulationLoop(model, member_optimizer(SGD, model, lrs), data)
    floor_model = StackedMLP.from_configs(configs, seeds).to(device)
    floor_opt = member_optimizer(SGD, floor_model, lrs)
    batches = [data.gather(i, j) for i, j in zip(image_idx.split(BATCH_SIZE, 1), label_idx.split(BATCH_SIZE, 1))]
    return dict(data=data, singles=singles, single_opts=single_opts, image_idx=image_idx, label_idx=label_idx,
                loop=loop, floor_model=floor_model, floor_opt=floor_opt, batches=batches)


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


def floor(parts: dict) -> None:
    model, opt = parts["floor_model"], parts["floor_opt"]
    for x, y in parts["batches"]:
        logits = model(x)
        members, batch = y.shape
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(members, batch).mean(1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="steps per member per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "all"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    _timing.print_header(f"population: {args.members} members 784-{args.hidden}-10, {args.steps} steps each, "
                         f"batch {BATCH_SIZE}, SGD")
    rows = []
    for device in _timing.devices_to_measure(args.device):
        parts = build(args.members, args.hidden, args.steps, device)
        fns = {"separate": separate, "population": population, "floor": floor}
        measures = {name: (lambda fn=fn: _timing.time_block(lambda: fn(parts), device)) for name, fn in fns.items()}
        for measure in measures.values():  # warm-up
            measure()
        values = _timing.interleaved_runs(measures, args.repeats)
        ms = {name: 1e3 * statistics.median(vs) / args.steps for name, vs in values.items()}
        speedup, low, high = _timing.paired_ratio(values["separate"], values["population"])
        floor_share = statistics.median(f / p for f, p in zip(values["floor"], values["population"]))
        rows.append([device.type, ms["separate"], ms["population"], ms["floor"], speedup, f"{low:.2f}-{high:.2f}",
                     floor_share])
    print("ms per step of all members (median); speed-up = separate / population (median of pairs, range); "
          "floor share = floor / population")
    _timing.print_table(["device", "separate ms", "population ms", "floor ms", "speed-up", "range", "floor share"],
                        rows)


if __name__ == "__main__":
    main()
