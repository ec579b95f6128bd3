"""Steps/s of optimlab's Lightning training against a plain PyTorch loop on the same work.

Ours: ``optimlab.train.run(cfg, run_dir)`` with a config composed from ``conf/`` (``epochs=1``,
``trainer.limit_train_batches=<batches>``, no progress bar, no per-epoch test pass); its summary's
``steps_per_s`` is steps / training time (validation excluded). Plain: the loop below over the
same number of batches of the same data (MNIST train split, on the device), the same model and
``optimlab.optim.SGD`` lr 0.1 at batch 128: permutation, ``x.index_select(0, idx)`` (as the data
module batches), forward, cross-entropy, zero_grad, backward, step; only the batches are timed.
After one untimed run of each (as long as a timed one unless ``--warmup`` says otherwise), the two
alternate ``--repeats`` times; the table shows the median steps/s of each and the overhead factor
plain / ours as the median of the side-by-side pairs (the machine's speed drifts between runs; a
pair shares its moment). The defaults, a whole epoch and 11 pairs, make that median steadier from
one invocation to the next on a noisy machine than shorter or fewer runs would.

    python benchmarks/train_loop.py                          # MLP, one 430-batch epoch, 11 repeats
    python benchmarks/train_loop.py --model cnn --device cpu --batches 50 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

import _timing

_timing.setup_env()
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from optimlab.data import MNISTDataModule  # noqa: E402
from optimlab.optim import SGD  # noqa: E402
from optimlab.train import run  # noqa: E402

BATCH_SIZE = 128
LR = 0.1
EPOCH_BATCHES = 430  # ceil(55,000 training images / 128)
OVERHEAD_TARGET = {"cpu": 1.20, "cuda": 1.5}


def compose_config(model: str, device: torch.device, batches: int, threads: int | None) -> DictConfig:
    """The config ``python train.py`` would run for one short epoch of ``batches`` batches."""
    overrides = [f"model={model}", "optimizer=sgd", f"lr={LR}", f"batch_size={BATCH_SIZE}", "epochs=1",
                 "trainer.progress_bar=false", f"trainer.limit_train_batches={batches}",
                 "data.test_every_epoch=false", f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}"]
    if threads:
        overrides.append(f"trainer.num_threads={threads}")
    with initialize_config_dir(config_dir=str(_timing.CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def ours_steps_per_s(cfg: DictConfig) -> float:
    """One ``run()`` in a fresh temporary run directory; its printed lines are swallowed."""
    output = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="optimlab-bench-") as run_dir:
        try:
            with contextlib.redirect_stdout(output):
                summary = run(cfg, Path(run_dir))
        except BaseException:
            print(output.getvalue())
            raise
    return summary.steps_per_s


def plain_steps_per_s(cfg: DictConfig, x: torch.Tensor, y: torch.Tensor, batches: int) -> float:
    """The plain loop: a fresh model and optimizer, ``batches`` SGD steps; steps per second."""
    device = x.device
    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.model).to(device)
    opt = SGD(model.parameters(), lr=LR)
    batch_indices = torch.randperm(len(y), device=device).split(BATCH_SIZE)[:batches]
    _timing.sync(device)
    start = time.perf_counter()
    for idx in batch_indices:
        loss = F.cross_entropy(model(x.index_select(0, idx)), y.index_select(0, idx))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _timing.sync(device)
    return len(batch_indices) / (time.perf_counter() - start)


class BareModule(L.LightningModule):
    """The plain loop's step inside Lightning's manual optimization, and nothing else."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model = model

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return SGD(self.model.parameters(), lr=LR)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        optimizer = self.optimizers()
        loss = F.cross_entropy(self.model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


class StepTimer(L.Callback):
    """Steps/s from the first batch's start to the last batch's end."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object,
                             batch_idx: int) -> None:
        if batch_idx == 0:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        _timing.sync(pl_module.device)
        self.steps_per_s = batch_idx / (time.perf_counter() - self.start)  # the first step left out, as ours does


def bare_lightning_steps_per_s(cfg: DictConfig, data: MNISTDataModule, batches: int) -> float:
    """The plain loop's work run by a Lightning Trainer with no callbacks, logger or checks, on the
    data module's training batches: the cost of Lightning's own loop, which ours cannot go below."""
    torch.manual_seed(cfg.seed)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="gpu" if data.train_x.device.type == "cuda" else "cpu", devices=1,
                        max_epochs=1, limit_train_batches=batches, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(BareModule(instantiate(cfg.model)), train_dataloaders=data.train_dataloader())
    return timer.steps_per_s


def measure(model: str, device: torch.device, batches: int, repeats: int, warmup: int,
            threads: int | None, floor: bool = False) -> dict[str, list[float]]:
    """Steps/s of the plain loop and of ours (and with ``floor``, of the bare Lightning loop) on
    ``device``: ``repeats`` alternating runs of each, after one untimed ``warmup``-batch run of each."""
    cfg = compose_config(model, device, batches, threads)
    data: MNISTDataModule = instantiate(cfg.data)
    data.setup()
    data.to(device)
    torch.set_flush_denormal(cfg.trainer.flush_denormal)  # as run() does, so both loops see the same
    plain_steps_per_s(cfg, data.train_x, data.train_y, warmup)
    ours_steps_per_s(compose_config(model, device, warmup, threads))
    runs = {"plain": lambda: plain_steps_per_s(cfg, data.train_x, data.train_y, batches),
            "ours": lambda: ours_steps_per_s(cfg)}
    if floor:
        bare_lightning_steps_per_s(cfg, data, warmup)
        runs["lightning"] = lambda: bare_lightning_steps_per_s(cfg, data, batches)
    return _timing.interleaved_runs(runs, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=_timing.count, default=EPOCH_BATCHES, help=f"timed batches per run (2..{EPOCH_BATCHES})")
    parser.add_argument("--repeats", type=_timing.count, default=11, help="alternating runs of each (medians taken)")
    parser.add_argument("--warmup", type=_timing.count, default=None,
                        help="batches of the untimed first run of each (default: --batches; a shorter first run "
                             "of ours leaves its first timed run about 15%% slow)")
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when available, else the CPU")
    parser.add_argument("--threads", type=_timing.count, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--floor", action="store_true",
                        help="also time the plain loop's step inside a bare Lightning Trainer (no callbacks, logger "
                             "or checks): Lightning's own share of the overhead")
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = args.batches
    if not 2 <= args.batches <= EPOCH_BATCHES or not 2 <= args.warmup <= EPOCH_BATCHES:
        parser.error(f"--batches and --warmup must be in 2..{EPOCH_BATCHES} (one epoch; a run's steps/s is timed "
                     f"from its second step)")
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = _timing.devices_to_measure(args.device)
    _timing.print_header("training loop: optimlab (Lightning) vs a plain PyTorch loop")
    print(f"model {args.model}, batch {BATCH_SIZE}, optimlab.optim.SGD lr {LR}; {args.repeats} alternating runs "
          f"of {args.batches} batches each (after one {args.warmup}-batch warm-up run of each); steps/s: medians; "
          f"plain/ours: median (min-max) of the {args.repeats} side-by-side pairs\n")
    results = {device.type: measure(args.model, device, args.batches, args.repeats, args.warmup, args.threads,
                                    args.floor) for device in devices}
    rows: list[list[object]] = []
    medians: dict[str, dict[str, float]] = {}
    for dev, runs in results.items():
        sps = medians[dev] = {name: statistics.median(values) for name, values in runs.items()}
        (overhead, low, high), target = _timing.paired_ratio(runs["plain"], runs["ours"]), OVERHEAD_TARGET[dev]
        rows.append([dev, args.model, sps["plain"], sps["ours"], overhead, f"{low:.3f}-{high:.3f}",
                     f"{_timing.verdict(overhead, target)} (<= {target})",
                     EPOCH_BATCHES / sps["plain"], EPOCH_BATCHES / sps["ours"]])
    _timing.print_table(["device", "model", "plain steps/s", "ours steps/s", "plain/ours", "range", "target",
                         f"plain s/epoch ({EPOCH_BATCHES})", f"ours s/epoch ({EPOCH_BATCHES})"], rows)
    if args.floor:
        print("\nLightning's own loop (the plain step in a bare Trainer): plain / bare Lightning, median (min-max) "
              "of the side-by-side runs")
        for dev, runs in results.items():
            ratio, low, high = _timing.paired_ratio(runs["plain"], runs["lightning"])
            print(f"  {dev}: {statistics.median(runs['lightning']):.1f} steps/s, {ratio:.3f} ({low:.3f}-{high:.3f})")
    if "cuda" not in results:
        print(f"\ncuda: {'not requested (--device cpu)' if torch.cuda.is_available() else _timing.NO_GPU}")
    if args.model == "mlp":
        print("\nabsolute targets for the default MLP (ours; each meaningful only on the machine named):")
        if "cuda" in results:
            sps = medians["cuda"]["ours"]
            print(f"  cuda: {sps:.0f} steps/s; target >= 1500 on an H100: {'PASS' if sps >= 1500 else 'FAIL'}")
        if "cpu" in results:
            epoch = EPOCH_BATCHES / medians["cpu"]["ours"]
            print(f"  cpu:  {epoch:.2f} s per {EPOCH_BATCHES}-batch epoch; target < 5 s on the 2-core CPU: "
                  f"{'PASS' if epoch < 5 else 'FAIL'}")

if __name__ == "__main__":
    main()
