"""optimlab entry point.

    python train.py optimizer=adam lr=0.01             one run (outputs/runs/...)
    python train.py experiment=overfit                  a regime from the reference notebooks
    python train.py -m lr=0.01,0.1 optimizer=sgd,adam   a sweep (outputs/multirun/...)
"""

import atexit
import contextlib
import gc
import os
import signal
import sys

# Ctrl-C (or SIGTERM) before training starts (imports, composing the config) ends with one line and exit 130
# (143), no traceback; the run installs its own handlers while it trains. The request is also remembered: an import
# that catches every exception would swallow the exit, and main() then exits before any work.
interrupted_at_start_up: list[int] = []


def _stop_at_start_up(signum: int, frame: object) -> None:
    if not interrupted_at_start_up:  # os.write: print() inside a write to stderr would raise a reentrant call
        os.write(2, f"interrupted ({signal.Signals(signum).name}) while no run was training\n".encode())
    interrupted_at_start_up.append(signum)
    sys.exit(128 + interrupted_at_start_up[0])


signal.signal(signal.SIGINT, _stop_at_start_up)
signal.signal(signal.SIGTERM, _stop_at_start_up)
# The interpreter's last garbage collection, over torch's and Lightning's objects, took 0.9 s of every
# command (2026-12-05, AMD EPYC); objects frozen after the other exit handlers (files, loggers,
# writers: closed) skip it.
atexit.register(gc.freeze)
# The collector's youngest objects collected every 10,000 allocations, not 700 (its older generations
# rarer with them): the population launcher keeps every job's config alive (thousands of objects
# each), and each collection of the older generations walked them all. The narrow benchmark grid's
# dry run took 8.7-9.5 s against 10.4-11.1 s (2026-12-06, AMD EPYC); 8 full-size runs of a sequential
# sweep in one process peaked at 1.41 GB against 1.63 GB (no garbage piling up) in 9.3 s against 11.2 s.
gc.set_threshold(10_000, 10, 10)

from pathlib import Path  # noqa: E402 (after the handler: the imports below take seconds)

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from optimlab.files import written_file
from optimlab.command_line import command_line_error, composition_error, refuse
from optimlab.hydra_job import JobFailed, remove_if_new_and_empty
from optimlab.mnist_files import DataError
from optimlab.record import record_refusal
from optimlab.search import search_error, searching
from optimlab.summary import returned_value
from optimlab.signals import Interrupted, exit_code
from optimlab.train import run
from optimlab.validate import ConfigError, FolderInUse


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One run; returns its ``optimized_metric`` (a validation metric, never the test set) to a sweeper."""
    if interrupted_at_start_up:
        sys.exit(128 + interrupted_at_start_up[0])
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    trial = searching()  # then a failure scores the metric's worst value
    if trial and (error := search_error(cfg, hydra_cfg.sweeper)):  # also a trial's own optimized_metric
        refuse(error)  # the search's own settings: end it in one line, every trial would be wrong
    summary = None
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        # the override lines as typed: read through the config, lr=${nope} would be an interpolation resolved here
        summary = run(cfg, run_dir, OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False))
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        if not isinstance(err, FolderInUse):
            with contextlib.suppress(OSError):  # e.g. the refusal was that its folder cannot be written
                record_refusal(run_dir, cfg, f"{type(err).__name__}: {err}")  # the job's failure, for the report
        if not trial:  # one job's bad value fails that job; Hydra runs the others and reports it at the end
            raise JobFailed(str(err)) from err
    except OSError as err:  # a full disk or a folder that became unwritable mid-run: one line, not a traceback
        message = f"cannot write {written_file(err)}: {err.strerror or err}"
        print(f"error: {message}", file=sys.stderr)
        if not multirun:
            sys.exit(1)
        if not trial:
            raise JobFailed(message) from err
    except (Interrupted, KeyboardInterrupt) as stop:  # a KeyboardInterrupt names its signal (signals.StopOnSignal)
        sys.exit(exit_code(stop))
    except Exception as err:
        if not trial:
            raise
        print(f"error: the trial crashed ({type(err).__name__}: {err}); it scores the worst value", file=sys.stderr)
    finally:
        if not multirun:  # the folder Hydra made for a refused run, or for one resumed in its own folder: empty
            remove_if_new_and_empty(run_dir)
    return returned_value(summary, cfg)


if __name__ == "__main__":
    conf = Path(__file__).parent / "conf"
    if error := command_line_error(sys.argv[1:], conf) or composition_error(sys.argv[1:], conf):
        refuse(error)
    main()
