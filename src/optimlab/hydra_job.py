"""A run's dealings with Hydra's job folder: its name in a sweep (the overrides, shortened to what a
file system takes), checking it can be written before Hydra creates it (a folder under a file, on a
read-only disk, without permission: one line and exit status 2, not the traceback of Hydra's own
``mkdir``), writing Hydra's record of the job once the run is accepted, and running a job whose
config a launcher composed for it alone."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, env_override
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from optimlab.command_line import refuse
from optimlab.files import atomic_write, unwritable


class JobFailed(CompactHydraException):
    """A sweep job's one-line failure (a value not allowed, missing data, a folder it cannot write),
    which the job has printed already. Hydra's sweeper raises the first failed job's error once every
    job has run; a compact exception, it ends the sweep as this line, not as a traceback."""


# A sweep job's folder is ``<job number>_<overrides>``; most file systems take names of at most 255
# bytes, and a sweep with many overrides exceeds that (Hydra's mkdir then fails with a traceback).
DIRNAME_BYTES = 200
FOLDER_NAME_BYTES = 255


def job_dirname(overrides: str) -> str:
    """``overrides`` (Hydra's ``hydra.job.override_dirname``) as one folder name: a ``/`` in them
    (``callbacks.model_checkpoint.monitor=val/acc``) written ``%2F`` (else the job's folder is two, one
    inside the other); as it is when at most :data:`DIRNAME_BYTES` bytes in UTF-8, else cut to fit and ended
    by ``~`` and 8 hex digits of its SHA-1, so that jobs whose overrides differ only past the cut still get
    different, and stable, names."""
    overrides = overrides.replace("/", "%2F")
    encoded = overrides.encode()
    if len(encoded) <= DIRNAME_BYTES:
        return overrides
    digest = hashlib.sha1(encoded).hexdigest()[:8]
    head = encoded[:DIRNAME_BYTES - len(digest) - 1].decode(errors="ignore")  # a cut inside a character drops it
    return f"{head}~{digest}"


# conf/config.yaml: hydra.sweep.subdir: ${hydra.job.num}_${optimlab.dirname:${hydra.job.override_dirname}}
OmegaConf.register_new_resolver("optimlab.dirname", job_dirname, replace=True)


# A run (or sweep) folder that did not exist when Hydra started the run -> it and its parents that did not
# either (Hydra makes them all before the run can refuse, or a dry run end).
NEW_RUN_FOLDERS: dict[Path, list[Path]] = {}
# A sweep folder -> its multirun.yaml when Hydra started the sweep (None: it had none). Hydra's sweeper writes
# its own before the launcher runs, and a dry run, which writes nothing, puts the earlier one back.
EARLIER_SWEEP_RECORDS: dict[Path, bytes | None] = {}


def remove_if_new_and_empty(folder: Path) -> None:
    """Remove ``folder`` and the parents made with it if Hydra made them for this run
    (:data:`NEW_RUN_FOLDERS`) and they are still empty: a refused run leaves nothing behind."""
    for made in NEW_RUN_FOLDERS.get(Path(os.path.abspath(folder)), []):
        try:
            made.rmdir()
        except OSError:  # not empty (or gone): it and the folders above stay as they are
            return


class CheckOutputFolder(Callback):
    """Refuse a run or sweep whose ``hydra.run.dir`` / ``hydra.sweep.dir`` cannot be written; note a
    run or sweep folder that does not exist yet (:data:`NEW_RUN_FOLDERS`)."""

    @staticmethod
    def _check(key: str, folder: Any) -> None:
        if str(folder) == "":  # Path("") is the working folder: the run's files would land among others
            refuse(f"{key}: {str(folder)!r} is not allowed; expected a folder")
        reason = unwritable(Path(str(folder)).absolute())
        if reason:
            refuse(f"{key}: {str(folder)!r} cannot be written ({reason}); choose another folder")

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        name, folder = config.get("name"), str(config.hydra.run.dir)
        if isinstance(name, str) and name and folder.endswith(name):  # the default run folder's name ends with it
            room = FOLDER_NAME_BYTES - len(folder[:-len(name)].rsplit("/", 1)[-1].encode())
            if "/" in name or len(name.encode()) > room:
                refuse(f"name: {name!r} is not allowed; expected at most {room} bytes without '/' (it ends the run "
                       f"folder's name)")
        self._check("hydra.run.dir", config.hydra.run.dir)
        note_new_folder(Path(str(config.hydra.run.dir)))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check("hydra.sweep.dir", config.hydra.sweep.dir)
        folder = Path(str(config.hydra.sweep.dir))
        note_new_folder(folder)
        record = Path(os.path.abspath(folder)) / "multirun.yaml"
        with contextlib.suppress(OSError):  # one that cannot be read is not put back
            EARLIER_SWEEP_RECORDS[record.parent] = record.read_bytes() if record.is_file() else None


def note_new_folder(folder: Path) -> None:
    """Note ``folder`` in :data:`NEW_RUN_FOLDERS` with its parents that do not exist yet, if it does not."""
    folder = Path(os.path.abspath(folder))  # as Hydra makes runtime.output_dir
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    if missing:
        NEW_RUN_FOLDERS[folder] = missing


def remove_dry_sweep_folder(sweep_dir: Path) -> None:
    """A dry run writes nothing: Hydra's ``multirun.yaml`` is put back as the sweep folder held it
    (:data:`EARLIER_SWEEP_RECORDS`: a sweep there before keeps its record), or removed where it held none,
    and a sweep folder this command made, then empty, is removed with the parents made with it."""
    folder = Path(os.path.abspath(sweep_dir))
    if folder not in EARLIER_SWEEP_RECORDS:
        return
    earlier, record = EARLIER_SWEEP_RECORDS[folder], folder / "multirun.yaml"
    if earlier is None:
        record.unlink(missing_ok=True)
    else:
        atomic_write(record, lambda tmp: tmp.write_bytes(earlier))
    remove_if_new_and_empty(folder)


def save_job_record(run_dir: Path, cfg: DictConfig) -> None:
    """Hydra's record of the job (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``) in
    ``run_dir``. Hydra's ``run_job`` writes it before the task runs unless ``hydra.output_subdir`` is
    null, as in this project's config: then a run writes it once it owns its folder, so that a refused
    run cannot overwrite another run's record. A no-op outside a Hydra job or when Hydra wrote it."""
    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is not None:
        return
    write_job_record(run_dir / ".hydra", cfg, HydraConfig.get())


def recorded_overrides(run_dir: Path) -> list[str] | None:
    """The job's overrides in Hydra's record of it in ``run_dir`` (:func:`save_job_record`), or None where the
    folder holds no such record that can be read."""
    try:
        recorded = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return recorded if isinstance(recorded, list) and all(isinstance(o, str) for o in recorded) else None


def write_job_record(folder: Path, cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """The three files of Hydra's record of a job in ``folder``: the task's config, the ``hydra``
    node and the job's overrides, as ``OmegaConf.save`` writes them (see :func:`config_yaml`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config_yaml(cfg), encoding="utf-8")
    (folder / "hydra.yaml").write_text(config_yaml(hydra_cfg, under="hydra"), encoding="utf-8")
    (folder / "overrides.yaml").write_text(config_yaml(hydra_cfg.overrides.task), encoding="utf-8")


# YAML 1.1's words for true and false: a string spelled so is quoted, or it would be read back as a bool.
YAML_BOOLS = frozenset(f(word) for word in ("y", "yes", "n", "no", "true", "false", "on", "off")
                       for f in (str.lower, str.capitalize, str.upper))


def looks_typed(text: str) -> bool:
    """Whether OmegaConf would read ``text``, written unquoted, back as a bool, int or float."""
    if text in YAML_BOOLS:
        return True
    for number in (int, float):
        with contextlib.suppress(ValueError):
            number(text)
            return True
    return False


class RecordDumper(getattr(yaml, "CDumper", yaml.Dumper)):  # type: ignore[misc]
    """PyYAML's full dumper, in C where PyYAML was built with libyaml, quoting strings as
    ``OmegaConf.to_yaml`` does; its pure-Python emitter took ~11 ms of a sweep job (2026-12-05, AMD EPYC)."""


RecordDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="'" if looks_typed(text) else None))


def config_yaml(cfg: DictConfig | ListConfig, under: str | None = None) -> str:
    """``OmegaConf.to_yaml(cfg)`` (interpolations kept), or of ``{under: cfg}``, without copying ``cfg``
    into a new config first, at about a quarter of the cost (:func:`values_yaml`)."""
    container = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    return values_yaml(container if under is None else {under: container})


def values_yaml(values: dict[str, Any] | list[Any]) -> str:
    """What ``OmegaConf.to_yaml`` writes for plain ``values`` (dicts, lists, strings, numbers, bools,
    None): the same text for this project's and Hydra's configs and awkward strings (tested); libyaml
    escapes characters beyond U+FFFF and may fold long multi-line strings otherwise, which read back as
    the same values."""
    return yaml.dump(values, Dumper=RecordDumper, default_flow_style=False, allow_unicode=True, sort_keys=False)


@contextlib.contextmanager
def hydra_config_of(sweep_config: DictConfig) -> Iterator[None]:
    """``HydraConfig`` set to this job's (``${hydra:...}`` interpolations resolve), then restored.
    Assigned, not ``set_config``: that copies the ``hydra`` node, which costs more than what is read."""
    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg
    hydra_config.cfg = sweep_config
    try:
        yield
    finally:
        hydra_config.cfg = previous


def set_output_dir(sweep_config: DictConfig, output_dir: Path) -> None:
    """``hydra.runtime.output_dir``, which ``run_job`` sets when the job starts (``.hydra/hydra.yaml`` records it)."""
    with read_write(sweep_config.hydra.runtime), open_dict(sweep_config.hydra.runtime):
        sweep_config.hydra.runtime.output_dir = str(output_dir)


def run_composed_job(hydra_context: HydraContext, task_function: TaskFunction, sweep_config: DictConfig,
                     task_config: DictConfig, output_dir: Path) -> JobReturn:
    """Run ``task_function`` as Hydra's ``run_job`` runs a sweep job (``HydraConfig`` set to the
    job's, ``hydra.runtime.output_dir``, the folder made, the working directory under
    ``hydra.job.chdir``, job logging, the ``.hydra/`` record where ``hydra.output_subdir`` is set,
    ``hydra.job.env_set``, the callbacks, a JobReturn), for a job whose configs (``sweep_config``
    with its ``hydra`` node, ``task_config`` without) the caller composed for this job alone: so
    without ``run_job``'s four copies of the whole config, which cost 25 ms a job on a 2-core CPU,
    9 s of a 360-job population sweep."""
    hydra = sweep_config.hydra
    set_output_dir(sweep_config, output_dir)
    ret = JobReturn(overrides=OmegaConf.to_container(hydra.overrides.task, resolve=False), cfg=task_config,
                    hydra_cfg=sweep_config, task_name=str(hydra.job.name))
    previous_cwd = os.getcwd()
    with hydra_config_of(sweep_config):
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            if hydra.job.chdir:
                os.chdir(output_dir)
            ret.working_dir = os.getcwd()
            configure_log(hydra.job_logging, hydra.verbose)
            if hydra.output_subdir is not None:
                write_job_record(output_dir / str(hydra.output_subdir), task_config, hydra)
            with env_override(hydra.job.env_set):
                hydra_context.callbacks.on_job_start(config=sweep_config, task_function=task_function)
                try:
                    ret.return_value = task_function(task_config)
                    ret.status = JobStatus.COMPLETED
                except Exception as err:  # the job failed: its JobReturn says so, as run_job's does
                    ret.return_value = err
                    ret.status = JobStatus.FAILED
            for handler in logging.getLogger().handlers:
                handler.flush()
            hydra_context.callbacks.on_job_end(config=sweep_config, job_return=ret)
            return ret
        finally:
            os.chdir(previous_cwd)
