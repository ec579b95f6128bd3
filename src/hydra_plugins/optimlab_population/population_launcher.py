"""The ``population`` Hydra launcher: ``python train.py -m hydra/launcher=population <sweep>``.

Hydra finds this module by scanning the ``hydra_plugins`` namespace package. It stays light (Hydra
imports it at every start-up); the work is in :mod:`optimlab.population.launcher`, imported when a
sweep is launched, as Hydra's joblib launcher keeps its work in ``_core``.
"""

# No `from __future__ import annotations`: Hydra's scanner runs this module before registering it in
# sys.modules, where dataclasses would look string annotations up.
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from optimlab.checks import BOOL, INT_POSITIVE, POSITIVE, optional, refusal
from optimlab.command_line import refuse

MAX_MEMBERS = 64  # where the run config has no population node (optimlab's conf/config.yaml says 64 too)
SUBMITIT_PARAMETERS = {"timeout_min": 60}  # a submitit population job's limits unless hydra.launcher.submitit sets them


@dataclass
class PopulationLauncherConf:
    """``hydra/launcher=population``'s knobs (``hydra.launcher.<knob>=...`` on the command line). The
    plan's three, ``max_members``, ``max_memory_gib`` and ``dry_run``, read the run config's ``population``
    node when it has one (optimlab's ``conf/config.yaml``: ``population.max_members=8``, ...)."""

    _target_: str = "hydra_plugins.optimlab_population.population_launcher.PopulationLauncher"
    # a larger group of compatible jobs is split into populations of at most this many
    # (Any, not int and bool: a wrong value then gets the launcher's one-line error, not OmegaConf's traceback)
    max_members: Any = f"${{oc.select:population.max_members,{MAX_MEMBERS}}}"
    # the memory one population may use (GiB); null: a share of its device's memory
    max_memory_gib: Any = "${oc.select:population.max_memory_gib,null}"
    # print the plan (populations, members, estimated memory) and stop
    dry_run: Any = "${oc.select:population.dry_run,false}"
    # inline: the populations train one by one in this process; processes: CPU populations train in
    # processes forked from this one, max_parallel at once, one torch thread each (GPU ones, and those
    # with trainer.num_threads > 1, here); auto: processes where this process may use several CPU cores,
    # can fork and two or more populations can, else inline; submitit_local / submitit_slurm: each
    # population is one submitit job (processes on this machine / SLURM jobs), see optimlab.population.cluster
    executor: Any = "auto"
    # populations training at once (None: processes, one per usable CPU core; submitit, all: SLURM queues them)
    max_parallel: Any = None
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"  # submitit's logs and pickles (%j: job id)
    # submitit.AutoExecutor.update_parameters: timeout_min, cpus_per_task, gpus_per_node, mem_gb,
    # slurm_partition, ... (add one with +hydra.launcher.submitit.<name>=<value>)
    submitit: Dict[str, Any] = field(default_factory=lambda: dict(SUBMITIT_PARAMETERS))


ConfigStore.instance().store(group="hydra/launcher", name="population", node=PopulationLauncherConf,
                             provider="optimlab")


class PopulationLauncher(Launcher):
    """Launches a sweep's jobs as Hydra's BasicLauncher does (each job composed, with its own
    output dir, ``.hydra/`` files and JobReturn), but trains the jobs that can share a population
    together, with :mod:`optimlab.population`; the others run one by one through the task function.
    Its arguments are :class:`PopulationLauncherConf`'s knobs with its defaults, but for ``submitit_folder``,
    which the config puts in the sweep's folder and which, built here without Hydra, is relative to the working one."""

    def __init__(self, max_members: int = MAX_MEMBERS, max_memory_gib: Optional[float] = None, dry_run: bool = False,
                 executor: str = "auto",
                 max_parallel: Optional[int] = None, submitit_folder: str = ".submitit/%j",
                 submitit: Optional[Dict[str, Any]] = None) -> None:
        for key, value, (test, allowed) in (
                ("population.max_members (hydra.launcher.max_members)", max_members, INT_POSITIVE),
                ("population.max_memory_gib (hydra.launcher.max_memory_gib)", max_memory_gib, optional(POSITIVE)),
                ("population.dry_run (hydra.launcher.dry_run)", dry_run, BOOL),
                ("hydra.launcher.max_parallel", max_parallel, optional(INT_POSITIVE))):
            if not test(value):
                raise ValueError(refusal(key, value, allowed))
        self.max_members, self.max_memory_gib, self.dry_run = max_members, max_memory_gib, dry_run
        self.max_parallel = max_parallel
        self.executor = None
        self.auto = executor == "auto"
        if self.auto:
            from optimlab.population.cluster import default_executor

            executor = default_executor()
        if executor != "inline":  # checked (and any other name refused) here, before Hydra writes anything
            from optimlab.population.cluster import make_executor

            parameters = SUBMITIT_PARAMETERS if submitit is None else submitit
            self.executor = make_executor(executor, submitit_folder, parameters)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from optimlab.population.compose import ShapeCachingLoader

        # The jobs are composed once per shape, not once each. The sweeper that set this launcher up
        # holds the same context, so its check of each batch before the launch is sped up too.
        if not isinstance(hydra_context.config_loader, ShapeCachingLoader):
            hydra_context.config_loader = ShapeCachingLoader(hydra_context.config_loader)
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from optimlab.population.launcher import launch  # torch and Lightning: only when a sweep runs

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        options: dict[str, Any] = {"max_members": self.max_members, "max_memory_gib": self.max_memory_gib,
                                   "dry_run": self.dry_run,
                                   "executor": self.executor, "max_parallel": self.max_parallel, "auto": self.auto}
        return launch(self.hydra_context, self.task_function, self.config, job_overrides, initial_job_idx, **options)


class CheckPopulationOptions(Callback):
    """A sweep with ``hydra/launcher=population`` whose knobs the launcher refuses (a ValueError of
    its own, as :class:`PopulationLauncher` raises it), or ``population.dry_run=true`` with another
    launcher or in a single run (which would train): one line and exit 2, before anything is written. (Hydra
    builds the launcher later and would wrap the same error in its multi-line instantiation message.)
    Registered in ``conf/config.yaml``'s ``hydra.callbacks``."""

    @staticmethod
    def _refuse_dry_run(config: DictConfig, add: str) -> None:
        if OmegaConf.select(config, "population.dry_run") is True:
            refuse(f"population.dry_run: true plans a sweep of hydra/launcher=population only; add {add}, "
                   "or leave dry_run out")

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._refuse_dry_run(config, "-m hydra/launcher=population")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        options = OmegaConf.to_container(config.hydra.launcher, resolve=True)
        assert isinstance(options, dict)
        if options.pop("_target_", None) != PopulationLauncherConf._target_:
            self._refuse_dry_run(config, "hydra/launcher=population")  # another launcher would train every job
            return
        # a value swept per job would be ignored: the plan is one for the whole sweep (plan.check_plan_is_the_sweeps)
        parser = OverridesParser.create()
        for line in OmegaConf.to_container(config.hydra.overrides.task, resolve=False):  # ${hydra:job.num}: unset
            override = parser.parse_override(line)
            if override.key_or_group.startswith("population.") and override.is_sweep_override():
                refuse(f"{line}: the population launcher's plan is one for the whole sweep; give population.* a "
                       f"single value, not a sweep")
        knobs = [knob.name for knob in fields(PopulationLauncherConf) if knob.name != "_target_"]
        unknown = sorted(set(options) - set(knobs))
        if unknown:
            known = ", ".join(knobs)
            refuse(f"hydra.launcher.{unknown[0]}: not a knob of hydra/launcher=population; expected one of {known}")
        try:
            PopulationLauncher(**options)
        except ValueError as err:
            refuse(str(err))
        from optimlab.search import is_search

        if options.get("dry_run") is True and is_search(config.hydra.sweeper):  # (else Optuna's traceback)
            refuse("population.dry_run: a search draws each batch of trials from the earlier ones' results, so "
                   "there is no plan of it to print before it runs; leave dry_run out")
