"""optimlab entry point.

    python train.py optimizer=adam lr=0.01             one run (outputs/runs/...)
    python train.py experiment=overfit                  a regime from the reference notebooks
    python train.py -m lr=0.01,0.1 optimizer=sgd,adam   a sweep (outputs/multirun/...)
"""

import signal
import sys

# Ctrl-C before training starts (imports, composing the config) ends as quietly as during it;
# the run installs its own handlers while it trains.
signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

from pathlib import Path  # noqa: E402 (after the handler: the imports below take seconds)

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from optimlab.data import DataError
from optimlab.files import written_file
from optimlab.train import Interrupted, run
from optimlab.validate import ConfigError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    try:
        summary = run(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # one job's bad value fails that job; Hydra runs the others and reports it at the end
        sys.exit(2)
    except OSError as err:  # a full disk or a folder that became unwritable mid-run: one line, not a traceback
        print(f"error: cannot write {written_file(err)}: {err.strerror or err}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise
        sys.exit(1)
    except Interrupted as stop:
        sys.exit(143 if str(stop) == "SIGTERM" else 130)
    except KeyboardInterrupt:
        sys.exit(130)
    return summary.best_val_acc  # what a sweeper (Optuna, ...) optimises: the validation set, never the test set


if __name__ == "__main__":
    main()
