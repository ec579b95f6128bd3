"""The ``population`` Hydra launcher: ``python train.py -m hydra/launcher=population <sweep>``.

Hydra finds this module by scanning the ``hydra_plugins`` namespace package. It stays light (Hydra
imports it at every start-up); the work is in :mod:`optimlab.population.launcher`, imported when a
sweep is launched, as Hydra's joblib launcher keeps its work in ``_core``.
"""

# No `from __future__ import annotations`: Hydra's scanner runs this module before registering it in
# sys.modules, where dataclasses would look string annotations up.
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class PopulationLauncherConf:
    """``hydra/launcher=population``'s knobs (``hydra.launcher.<knob>=...`` on the command line)."""

    _target_: str = "hydra_plugins.optimlab_population.population_launcher.PopulationLauncher"
    max_members: int = 64    # a larger group of compatible jobs is split into populations of at most this many
    dry_run: bool = False    # print the plan (populations, members, estimated memory) and stop


ConfigStore.instance().store(group="hydra/launcher", name="population", node=PopulationLauncherConf,
                             provider="optimlab")


class PopulationLauncher(Launcher):
    """Launches a sweep's jobs as Hydra's BasicLauncher does (each job composed, with its own
    output dir, ``.hydra/`` files and JobReturn), but trains the jobs that can share a population
    together, with :mod:`optimlab.population`; the others run one by one through the task function."""

    def __init__(self, max_members: int = 64, dry_run: bool = False) -> None:
        if not isinstance(max_members, int) or isinstance(max_members, bool) or max_members < 1:
            raise ValueError(f"hydra.launcher.max_members: {max_members!r} is not allowed; expected an integer >= 1")
        self.max_members, self.dry_run = max_members, bool(dry_run)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from optimlab.population.launcher import launch  # torch and Lightning: only when a sweep runs

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        options: dict[str, Any] = {"max_members": self.max_members, "dry_run": self.dry_run}
        return launch(self.hydra_context, self.task_function, self.config, job_overrides, initial_job_idx, **options)
