"""The command line checked before Hydra runs it: an override that names no option of a config group,
sweeps no value, or that Hydra cannot compose (an unknown key, a ``+`` for a key that is there, a sweep
without ``-m``, ...) ends the command as one line and exit status 2 before any work, where Hydra's own
error is several lines, a traceback, or comes after a sweep has begun; and a ``key=value`` written back
as an override a user can paste."""

from __future__ import annotations

import contextlib
import itertools
import re
import shlex
import sys
from pathlib import Path
from typing import NoReturn

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, QuotedString, ValueType
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf


def command_line_override(key: str, value: str) -> str:
    """``key=value`` as a shell takes it and Hydra reads ``value`` back: quoted for Hydra where its
    grammar reads the value otherwise (a sweep job's folder name holds ``=`` and ``,``), then for the shell."""
    text = f"{key}={value}"
    try:
        plain = OverridesParser.create().parse_override(text).value() == value
    except HydraException:  # the value breaks the grammar (an = or a , in it)
        plain = False
    if not plain:
        text = f'{key}="{value}"' if '"' not in value else f"{key}='{value}'"
    return shlex.quote(text)


def refuse(error: str) -> NoReturn:
    """End the command before any work: ``error`` as one line on stderr, exit status 2 (a bad value's)."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


# Hydra's command-line flags: long ones (argparse takes any unambiguous start of one: --multi) and short ones.
HYDRA_FLAGS = ("--help", "--hydra-help", "--version", "--cfg", "--resolve", "--package", "--run", "--multirun",
               "--shell-completion", "--config-path", "--config-name", "--config-dir", "--experimental-rerun", "--info")
SHORT_FLAGS = {"-h": "--help", "-hh": "--hydra-help", "-c": "--cfg", "-p": "--package", "-r": "--run",
               "-m": "--multirun", "-sc": "--shell-completion", "-cp": "--config-path", "-cn": "--config-name",
               "-cd": "--config-dir", "-i": "--info"}
# Flags that point Hydra at other config folders or files, where conf/'s groups are not all there is.
CONFIG_FLAGS = ("--config-dir", "--config-path", "--config-name")


def hydra_flag(arg: str) -> str | None:
    """The long Hydra flag ``arg`` gives (``-m``, ``--multi`` and ``--multirun=...`` give ``--multirun``), or None."""
    name = arg.split("=", 1)[0]
    if name in SHORT_FLAGS:
        return SHORT_FLAGS[name]
    starting = [flag for flag in HYDRA_FLAGS if flag.startswith(name)] if name.startswith("--") else []
    return name if name in HYDRA_FLAGS else starting[0] if len(starting) == 1 else None


# Flags of commands that compose no run's config from the overrides: help, shell completion, --info plugins, a
# rerun of a pickled config (which ignores the rest).
NO_RUN_FLAGS = ("--help", "--hydra-help", "--version", "--shell-completion", "--info", "--experimental-rerun")


def adds_configs(args: list[str]) -> bool:
    """Whether the command points Hydra at config folders or files besides conf/ (a flag, ``hydra.searchpath``)."""
    return any(hydra_flag(arg) in CONFIG_FLAGS or arg.lstrip("+").startswith("hydra.searchpath") for arg in args)


def runs_nothing(args: list[str]) -> bool:
    """Whether the command gives one of :data:`NO_RUN_FLAGS`."""
    return any(hydra_flag(arg) in NO_RUN_FLAGS for arg in args)


def command_line_error(args: list[str], conf_dir: Path) -> str | None:
    """The one-line refusal of the first command-line override that sweeps no value (``lr=range(0,0)``:
    Hydra launched no job and exited 0) or chooses an option a config group of ``conf_dir`` does not have
    (``model=resnet``, or one of a sweep's ``optimizer=sgd,nope``), or None. Hydra's own error for the
    latter is several lines ending in a pointer to HYDRA_FULL_ERROR, and in a sweep it comes before any
    job. Hydra's own groups (``hydra/...``), overrides it cannot read and the options of commands that add
    config folders (:func:`adds_configs`) are left to Hydra, and commands that run nothing (:func:`runs_nothing`)."""
    if runs_nothing(args):
        return None
    other_configs = adds_configs(args)
    parser = OverridesParser.create()
    for arg in args:
        try:
            override = parser.parse_override(arg)
        except HydraException:  # a flag, or a value of one (--cfg job)
            continue
        group = override.key_or_group
        # (an empty choice() Hydra refuses itself; a range is not listed: range(0, 10**9) is a valid sweep)
        if override.value_type == ValueType.RANGE_SWEEP:
            try:
                empty = next(iter(override.sweep_iterator()), None) is None
            except ValueError as err:  # range(0, 1, 0): a traceback
                return f"{group}: {override.input_line.split('=', 1)[1]} cannot be swept ({err})"
            if empty:
                return (f"{group}: {override.input_line.split('=', 1)[1]} sweeps no value; a sweep needs at least one "
                        "(range(start, stop[, step]) stops before stop)")
        folder = conf_dir / group
        if other_configs or override.is_delete() or group.startswith("hydra") or not folder.is_dir():
            continue
        sweep = override.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP)
        for value in override.sweep_iterator() if sweep else [override.value()]:
            for option in value if isinstance(value, list) else [value]:  # callbacks=[early_stopping,lr_monitor]
                option = option.text if isinstance(option, QuotedString) else option  # model='cnn','mlp'
                options = ", ".join(sorted(path.stem for path in folder.glob("*.yaml")))
                if option is None:  # Hydra: a ValueError traceback
                    return f"{group}: null is not an option; expected one of {options} (conf/{group}/), or leave " \
                           f"{group} out for its default"
                files = (option, f"{option}.yaml") if isinstance(option, str) else ()  # model=cnn.yaml loads too
                if files and "${" not in option and not any((folder / name).is_file() for name in files):
                    return f"{group}: {option!r} is not an option; expected one of {options} (conf/{group}/)"
    return None


SWEEP_PARAMS = "hydra.sweeper.params"
MODES = ("--run", "--multirun", "--cfg", "--info", "--shell-completion")  # Hydra takes one at a time


def composition_error(args: list[str], conf_dir: Path) -> str | None:
    """The one-line refusal of a command line Hydra cannot compose from ``conf_dir``'s config (a key that
    is not there given without ``+``, a ``+`` for one that is, a value of the wrong type for one of Hydra's
    own settings, an override its grammar cannot read, a sweep without ``-m``, two of Hydra's modes), or
    None. Hydra's own error is several lines ending in a pointer to HYDRA_FULL_ERROR (or a traceback), in
    a sweep mid-way. A sweep is composed at its first values and at each option of a swept config group
    (``model=mlp,cnn model.hidden=[8]``: the CNN has no hidden widths), also those its sweeper's parameters
    list (``hydra.sweeper.params``), a search's ranges at their starts (a trial Hydra cannot compose ends the
    search in its error), one composition each (~0.1 s). The
    commands of :func:`runs_nothing` or :func:`adds_configs` and a ``glob`` of options are left to Hydra."""
    flags = {hydra_flag(arg) for arg in args}
    modes = sorted(flags & set(MODES))
    if len(modes) > 1:
        return f"{' and '.join(modes)}: Hydra takes one of {', '.join(MODES)} at a time"
    if runs_nothing(args) or adds_configs(args):
        return None
    parser = OverridesParser.create()
    # not a flag or a flag's value (--cfg job): a key=value, or a deletion (~key)
    overrides = [arg for arg in args if not arg.startswith("-") and ("=" in arg or arg.startswith("~"))]
    keys: set[str] = set()  # the keys (or groups) the command gives
    swept: dict[int, list[str]] = {}  # an override's place -> the values it is composed at, the first first
    searched: dict[int, str] = {}  # a search range's place (interval) -> the override at its start
    for place, arg in enumerate(overrides):
        try:
            override = parser.parse_override(arg)
        except HydraException as err:
            return f"{arg}: cannot be read ({str(err).strip()}); see Hydra's override grammar, " \
                   "https://hydra.cc/docs/advanced/override_grammar/basic/"
        key = override.key_or_group
        if not key:
            return f"{arg}: no key before the '='"
        name = key.removeprefix("hydra.sweeper.params.")
        if "." in name and name != key and not override.is_delete():  # Hydra: "Cannot convert 'dict' to string"
            return f"{arg.split('=', 1)[0]}: on the command line Hydra reads the dots of {name} as nesting, which a " \
                   f"sweeper's parameters cannot hold; give it as an override of its own ({name}=...: a search " \
                   "takes a range there too) or under hydra.sweeper.params in a config file"
        keys.add(key)
        group = (conf_dir / key).is_dir() or key.startswith("hydra/")
        if not override.is_sweep_override():
            if key.startswith("hydra/") and not override.is_delete() and override.value() is None:  # (conf/'s groups:
                return f"{key}: null is not an option; choose one of its options"  # command_line_error)
            continue
        if name != key:  # a sweeper's parameter given as a sweep: Hydra reads it as a sweep of its own config
            return f"{arg}: Hydra reads this as a sweep of its own config, which it cannot run; sweep {name} itself " \
                   f"({name}={arg.split('=', 1)[1]})"
        if key.startswith(("hydra.", "hydra/")):
            return f"{arg}: a sweep of Hydra's own config ({key}) is not supported; to give a value as text, quote " \
                   f"it ({key}='...')"
        if not override.is_discrete_sweep():
            searched[place] = f"{arg.split('=', 1)[0]}={override.value().start}"
            continue
        try:
            values = sweep_values(parser, override, arg.split("=", 1)[0], conf_dir if group else None)
        except HydraException:  # a glob: only Hydra's config loader lists the options it matches
            return None
        except ValueError as err:  # range(0, 1, 0)
            return f"{arg}: cannot be swept ({err})"
        if not values or None in values:
            return None
        swept[place] = values
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
        error = compose_each(parser, conf_dir, overrides, keys, swept, searched, modes[0] if modes else None)
    if error and resumes_a_run(parser, overrides) and not modes:  # composed here: the default config, not the run's
        task = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
        return resume_ignores(task) or error  # a key of the run's model (model.channels of a CNN run)
    return error


# What a resumed run takes from the command line; everything else comes from its own saved config.
RESUME_OVERRIDES = ("resume", "epochs", "trainer.max_epochs", "trainer.progress_bar", "trainer.num_threads",
                    "data.root")


def override_keys(overrides: list[str]) -> list[str]:
    """The keys command-line ``overrides`` set (``+a.b=1`` and ``~a.b`` too)."""
    return [o.lstrip("+~").split("=", 1)[0] for o in overrides]


def resume_ignores(overrides: list[str]) -> str | None:
    """The refusal of the command-line ``overrides`` that a run resumed from its folder or checkpoint would
    ignore (all but :data:`RESUME_OVERRIDES`), or None."""
    ignored = [o for o, key in zip(overrides, override_keys(overrides)) if key not in RESUME_OVERRIDES]
    return (f"resume: a resumed run keeps its own config, so {', '.join(ignored)} would be ignored; only "
            f"{', '.join(RESUME_OVERRIDES[1:])} may be given with resume=") if ignored else None


def resumes_a_run(parser: OverridesParser, overrides: list[str]) -> bool:
    """Whether ``overrides`` resume a run from its folder or checkpoint (``resume=<path>``; not ``auto``)."""
    parsed = (parser.parse_override(o) for o in overrides)
    values = [o.value() for o in parsed if o.key_or_group == "resume" and not o.is_delete()]
    return bool(values) and isinstance(values[-1], str) and values[-1] not in ("", "auto")


def compose_each(parser: OverridesParser, conf_dir: Path, overrides: list[str], given: set[str],
                 swept: dict[int, list[str]], searched: dict[int, str], mode: str | None) -> str | None:
    """:func:`composition_error`'s compositions, inside Hydra's initialisation: the sweep's own config (its
    overrides less the sweeps, as Hydra composes it: its mode and sweeper), the first values (a search range at
    its start), then each other value of a swept group, with the sweeper's own parameters of keys the command
    does not give (``given``); ``mode``: the one flag of :data:`MODES` the command gives, or None. An error that is
    not Hydra's (or a ValueError) is left to Hydra, which meets it too."""
    from optimlab.search import is_search, search_space_error  # (which imports this module)

    firsts = {place: values[0] for place, values in swept.items()}

    def composed(choice: dict[int, str] | None, label: str = "") -> tuple[DictConfig | None, str | None]:
        """The config of the jobs of ``choice`` (a value for each sweep; None: the sweep's own config)."""
        if choice is None:
            command = [arg for place, arg in enumerate(overrides) if place not in swept and place not in searched]
        else:
            command = [searched.get(place, choice.get(place, arg)) for place, arg in enumerate(overrides)]
        try:
            return compose("config", overrides=command, return_hydra_config=True), None
        except (HydraException, ValueError) as err:
            changed = ", ".join(choice[p] for p in choice if choice[p] != firsts[p]) if choice else ""
            return None, composition_message(err, label or changed)
        except Exception:  # not Hydra's error: Hydra's own traceback (see sweeper_params_error)
            return None, None

    sweep, error = composed(None)
    if sweep is None:
        return error or sweeper_params_error(parser, overrides)
    verbose = sweep.hydra.verbose  # Hydra asserts this as it sets up its logging: a bare AssertionError traceback
    if not (isinstance(verbose, (bool, str)) or OmegaConf.is_list(verbose)):
        return f"hydra.verbose: {verbose!r} is not allowed; expected true, false, a logger's name or a list of names"
    search = is_search(sweep.hydra.sweeper)  # whose trials each draw one value of every parameter
    # a config's mode (a sweep= or search config's MULTIRUN) where no flag chose one: --cfg and --info show a run's
    multirun = mode == "--multirun" or (mode is None and sweep.hydra.mode == RunMode.MULTIRUN)
    if (swept or searched) and not multirun:
        arg = overrides[min([*swept, *searched])]
        return f"{arg}: a sweep of several values, which needs -m (--multirun); a list is written [a,b], a text " \
               "with a comma quoted ('a,b')"
    if searched and not search:
        return f"{overrides[min(searched)]}: a search range, which needs a search sweeper (hparams_search=optuna); " \
               "Hydra's basic sweeper takes a list of values (a,b,c)"
    if swept or searched:  # the command's sweeps at their first values
        cfg, error = composed(firsts)
        if cfg is None:
            return error
    if search and multirun:
        if error := search_space_error(sweep.hydra.sweeper, conf_dir, overrides):  # its words first: which draw, why
            return error
    added = False
    for key, value in (sweep.hydra.sweeper.get("params") or {}).items() if multirun else ():
        # the sweep's or search's own parameters, as its sweeper adds them to a job's overrides
        try:
            override = parser.parse_override(f"{key}={value}")
        except HydraException:  # (the search's check refuses it, naming it)
            continue
        if key in given or not (search or override.is_sweep_override()):
            continue
        if override.is_discrete_sweep():
            values = sweep_values(parser, override, key, conf_dir if (conf_dir / key).is_dir() else None)
            if values and None not in values:
                swept[len(overrides)], firsts[len(overrides)] = values, values[0]
                overrides = [*overrides, f"{key}={value}"]
                added = True
        else:  # a search's range (interval) at its start, or its fixed value
            overrides = [*overrides, f"{key}={override.value().start if override.is_sweep_override() else value}"]
            added = True
    if added:  # with the sweep's parameters, at their first values
        cfg, error = composed(firsts, SWEEP_PARAMS)
        if cfg is None:
            return error
    for place, values in swept.items():
        for value in values[1:]:
            cfg, error = composed({**firsts, place: value})
            if cfg is None:
                return error
    return None


def sweeper_params_error(parser: OverridesParser, overrides: list[str]) -> str | None:
    """Why an override of ``hydra.sweeper.params`` (or of one of its keys) cannot be composed: the sweeper has
    no parameters (Hydra's basic sweeper's are null unless a sweep config sets them) and OmegaConf cannot add a
    key to a null (Hydra's traceback); or None where that is not why composing failed."""
    given = {arg: parser.parse_override(arg).key_or_group for arg in overrides}
    params = [arg for arg, key in given.items() if key == SWEEP_PARAMS or key.startswith(f"{SWEEP_PARAMS}.")]
    if not params:
        return None
    try:
        sweep = compose("config", overrides=[arg for arg in overrides if arg not in params], return_hydra_config=True)
    except Exception:  # another reason, which Hydra meets too
        return None
    if sweep.hydra.sweeper.get("params") is not None:
        return None
    key = given[params[0]]
    name = key.removeprefix(f"{SWEEP_PARAMS}.")
    example = f"{name}={parser.parse_override(params[0]).value()}" if name != key else "lr=0.01,0.1"
    return f"{key}: no config here sets {SWEEP_PARAMS} (a sweep= or hparams_search= config does), and Hydra cannot " \
           f"add one from the command line; give each parameter as a sweep of its own ({example}: the same jobs)"


def sweep_values(parser: OverridesParser, override: Override, head: str, conf_dir: Path | None) -> list[str | None]:
    """The overrides a sweep is composed at (:func:`one_value` each): its first value, or each option where it
    sweeps a config group of ``conf_dir``, at most one more than the group has (a range of them lists
    itself forever; the extra one is refused as no option)."""
    listed = override.sweep_string_iterator()
    options = len(list((conf_dir / override.key_or_group).glob("*.yaml"))) + 1 if conf_dir else 1
    return [one_value(parser, head, value) for value in itertools.islice(listed, options)]


def one_value(parser: OverridesParser, head: str, value: str) -> str | None:
    """The override ``head=value`` for one value of a sweep, quoted where it would read as a sweep again
    (``'a,b'``); None where no quoting keeps it one value."""
    for line in (f"{head}={value}", f"{head}='{value}'", f'{head}="{value}"'):
        with contextlib.suppress(HydraException):
            if not parser.parse_override(line).is_sweep_override():
                return line
    return None


def composition_message(err: Exception, choice: str = "") -> str:
    """Hydra's composition error (in the jobs of ``choice``, a swept group's option; "": any job) as one
    line naming the key: a key that is not in the config as optimlab's refusal of an unknown key says it
    (one of Hydra's, with its hint to add it); a value Hydra could not merge with what caused it; Hydra's
    lines joined otherwise (a missing option's without the config search path)."""
    text = str(err).strip()
    quoted = text.split("'")[1] if text.count("'") >= 2 else ""
    cause = str(err.__cause__ or "").strip().splitlines()
    jobs = f" with {choice}" if choice else ""
    if text.startswith("Could not override '") and "To append to your config use" in text:
        if quoted.startswith("hydra."):  # Hydra's hint: "To append to your config use +<override>"
            hint = text.splitlines()[-1].strip()
            return f"{quoted}: not in Hydra's config{jobs}; {hint[:1].lower()}{hint[1:]}"
        if choice == SWEEP_PARAMS:
            return f"{quoted}: unknown config key here, swept by {SWEEP_PARAMS}; choose options that read it"
        if choice:  # a group's other option: only some jobs lack it
            return f"{quoted}: unknown config key{jobs} (nothing reads it there); sweep the options that read it " \
                   f"apart, or give it as ++{quoted}=... so those jobs fail alone"
        return f"{quoted}: unknown config key (nothing reads it); check the spelling, or see conf/"
    if text.startswith("Could not append to config. An item is already at '"):
        return f"+{quoted}: {quoted} is already in the config{jobs}; set it without the + (or with ++)"
    if text.startswith("Could not delete from config. '"):
        return f"~{quoted}: not in the config{jobs}, so there is nothing to delete"
    if text.startswith("Multiple values for "):
        group = text.removeprefix("Multiple values for ").split(".")[0]
        return f"+{group}: {group} is in the defaults list already; choose its option without the + ({group}=...)"
    missing = re.search(r"Could not find '(.+)/([^/']+)'", text)
    if missing and "Available options in" in text:
        options = [line.strip() for line in text.split("Config search path:")[0].split("Available options in")[1]
                   .splitlines()[1:] if line.strip()]
        return f"{missing[1]}: {missing[2]!r} is not an option; expected one of {', '.join(options)}"
    if text.startswith("Error merging override ") and cause:
        override = text.removeprefix("Error merging override ")
        return f"{override.split('=', 1)[0]}: {override.split('=', 1)[-1]!r} cannot be merged ({cause[0]}){jobs}"
    lines = [line.strip() for line in text.split("Config search path:")[0].splitlines() if line.strip()]
    return "; ".join(lines) + (f" ({jobs.strip()})" if jobs else "")
