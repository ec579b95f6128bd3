"""Resume exactly, survive interruption, lose nothing: runs in processes of their own, killed and resumed."""

from __future__ import annotations

import copy
import json
import shutil
import re
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import processes
from conftest import REPO, run_script
from optimlab.checkpointing import AtomicCheckpointIO
from optimlab.divergence import LOSS_OR_GRADIENT, WEIGHTS

# Adam + gradient noise: resuming must restore the optimizer state *and* the RNG stream.
RUN = ["data.subset=3000", "data.val_size=500", "epochs=4", "optimizer=adam", "lr=0.001",
       "optimizer.grad_noise_std=0.01", "trainer.progress_bar=false", "trainer.deterministic=true"]


def train(*args: str) -> subprocess.CompletedProcess:
    return run_script(REPO / "train.py", *args)


def start(*args: str, new_interpreter: bool = False) -> processes.Process | subprocess.Popen:
    """train.py in a process of its own: forked, or (``new_interpreter``) a new interpreter, as a user's
    command starts, with its own string hashes and the interpreter's exit handlers."""
    if new_interpreter:
        return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return processes.Process(str(REPO / "train.py"), *args)


def train_process(*args: str, new_interpreter: bool = False) -> subprocess.CompletedProcess:
    """train.py run to its end in a process of its own (see :func:`start`): what bitwise comparisons need
    (trainer.deterministic=true sets torch's global flags, which torch's own tests in this process have locked)."""
    proc = start(*args, new_interpreter=new_interpreter)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_for(path: Path, proc: processes.Process | subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if time.monotonic() > deadline:
            proc.kill()  # not left training after the test
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's TensorBoard folder as TensorBoard shows it (its event files read as one
    run, earlier sessions' events purged where a later one says so): tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    shown = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return {tag: points for tag, points in shown.items() if points}  # a tag all of whose points were purged


def log_stale_events(run_dir: Path, step: int) -> None:
    """An event file such as a session killed after its checkpoint leaves: scalars at ``step`` (the
    checkpoint's: the next epoch's first) and later, which the resumed session logs again (here with
    values no run has)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for tag in ("curvature/sharpness", "train/loss_step", "val/acc"):
            writer.add_scalar(tag, -1.0, step)
            writer.add_scalar(tag, -2.0, step + 7)
    time.sleep(1.1)  # event files are read in the order of their names, which start with the second they were made


@pytest.mark.slow
def test_killed_run_resumed_equals_uninterrupted_run(tmp_path: Path) -> None:
    """Also with a CSV logger, the lr monitor and the sharpness tracked: a resumed run's CSVLogger deletes the
    metrics.csv it finds, and the rows from before the kill come back from the checkpoint's record."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run = [*RUN, "logger=many", "callbacks=lr_monitor", "curvature.every_n_steps=20", "curvature.probe_size=64",
           "data.test_every_epoch=false"]  # the test set once, at the end: about 2 s less a run
    assert train_process(*run, f"hydra.run.dir={whole}").returncode == 0
    proc = start(*run, f"hydra.run.dir={killed}")
    wait_for(killed / "checkpoints" / "last.ckpt", proc)  # epoch 1 is on disk
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    assert summary(killed)["status"] == "running"  # the record written after epoch 1 survived
    # What the killed session logged after its checkpoint depends on when the kill landed: add such events.
    log_stale_events(killed, torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"])
    later = time.time() + 60  # the checkpoint copied or touched: its file's time is not when it was saved
    os.utime(killed / "checkpoints" / "last.ckpt", (later, later))
    # The rerun in a new interpreter, as a user's is (its own string hashes, the interpreter's exit).
    resumed = train_process(f"resume={killed}", f"hydra.run.dir={tmp_path / 'resume_cmd'}", new_interpreter=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    a, b = weights(whole), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise on CPU
    sa, sb = summary(whole), summary(killed)
    assert sb["status"] == "complete" and len(sb["epochs"]) == 4
    for ra, rb in zip(sa["epochs"], sb["epochs"]):
        assert {k: v for k, v in ra.items() if k != "train_time_s"} == {k: v for k, v in rb.items() if k != "train_time_s"}
    assert sa["test_acc"] == sb["test_acc"] and sa["regime"] == sb["regime"]
    assert sa["train_steps"] == sb["train_steps"] and [r["step"] for r in sb["train_steps"]] == [0, 50]
    for name in ("metrics.csv", "hparams.yaml"):
        assert (killed / "csv" / name).read_text() == (whole / "csv" / name).read_text(), name
    metrics = (whole / "csv" / "metrics.csv").read_text()
    assert metrics.count("\n") == 1 + 2 + 4 + 4 + 1 + len(sa["curvature"]["series"]), metrics  # header, steps,
    # epochs, lrs, result, sharpness
    assert tensorboard_scalars(killed) == tensorboard_scalars(whole)  # no point twice, none stale
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    layouts = EventAccumulator(str(killed / "tensorboard")).Reload().Tensors("custom_scalars__config__")
    assert [e.step for e in layouts] == [0]  # the sharpness chart's layout, once (the resume wrote it again)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_leaves_checkpoint_events_and_interrupted_summary(tmp_path: Path, sig: signal.Signals) -> None:
    # SIGTERM to a new interpreter: a stopped run's exit through the interpreter's own (its exit handlers).
    proc = start(*RUN, "epochs=50", "data.test_every_epoch=false", f"hydra.run.dir={tmp_path}",
                 new_interpreter=sig == signal.SIGTERM)
    wait_for(tmp_path / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig]  # 128 + the signal's number
    assert "Traceback" not in err and "interrupted" in err
    s = summary(tmp_path)
    assert s["interrupted"] is True and s["status"] == "interrupted" and 1 <= len(s["epochs"]) < 50
    notice = f"interrupted after {len(s['epochs'])} finished epoch(s); {tmp_path} holds the last checkpoint"
    assert notice in err and notice in (tmp_path / "train.log").read_text()  # the console's lines (a probe)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == len(s["epochs"]) - 1  # the last finished epoch, as the summary records it
    assert last["callbacks"]["RunRecord"]["history"] == s["epochs"]


@pytest.mark.slow
def test_sweep_resume_runs_only_unfinished_jobs(tmp_path: Path) -> None:
    sweep = ["-m", "lr=0.001,0.01,0.1", "data.subset=500", "data.val_size=500", "epochs=2",
             "trainer.progress_bar=false", f"hydra.sweep.dir={tmp_path}"]
    assert train(*sweep).returncode == 0
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(jobs) == 3
    done_mtime = (jobs[0] / "summary.json").stat().st_mtime_ns
    # job 1 was interrupted after its last epoch's checkpoint; job 2 was killed before starting
    s1 = summary(jobs[1])
    s1["status"], s1["interrupted"] = "interrupted", True
    (jobs[1] / "summary.json").write_text(json.dumps(s1))
    for path in sorted(jobs[2].rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    again = train(*sweep, "resume=auto")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("already complete, skipped") == 1
    assert (jobs[0] / "summary.json").stat().st_mtime_ns == done_mtime
    assert summary(jobs[1])["status"] == "complete" and summary(jobs[2])["status"] == "complete"
    assert f"resuming {jobs[1]}" in again.stdout


@pytest.mark.slow
def test_rerunning_a_sweep_without_resume_refuses_to_overwrite(tmp_path: Path) -> None:
    args = ["data.subset=500", "data.val_size=500", "epochs=1", "trainer.progress_bar=false", f"hydra.run.dir={tmp_path}"]
    assert train(*args).returncode == 0
    before = files_of(tmp_path)
    assert "- epochs=1" in before[".hydra/overrides.yaml"].decode()
    again = train(*args[:-1], "lr=0.5", args[-1])
    assert again.returncode == 2 and "already holds a run" in again.stderr and "resume=auto" in again.stderr
    after = files_of(tmp_path)
    after.pop("train.log", None), before.pop("train.log", None)  # Hydra's log of the refused job
    assert after == before  # .hydra/ still records the run that is there, not the refused lr


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    with pytest.raises(Exception):
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(3), "bad": lambda: None}, path)  # dies mid-write
    assert torch.load(path, weights_only=False)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no half-written temp file left


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_sweep(tmp_path: Path) -> None:
    result = train("-m", "data.label_noise=2.0,0.0", "data.subset=500", "data.val_size=500", "epochs=1",
                   "trainer.progress_bar=false", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode != 0  # the sweep reports its failed job ...
    assert "error: data.label_noise: 2.0 is not allowed" in result.stderr
    # ... at its end in one line (Hydra's "Error executing job with overrides: ..." before it), not a traceback
    assert "Traceback" not in result.stderr
    assert "\ndata.label_noise: 2.0 is not allowed; expected a number in [0, 1]\n" in result.stderr
    good = tmp_path / "1_data.label_noise=0.0,data.subset=500,data.val_size=500,epochs=1"
    assert summary(good)["status"] == "complete"  # ... after running the others


@pytest.mark.slow
def test_last_checkpoint_follows_every_epoch_even_when_validation_gets_worse(tmp_path: Path) -> None:
    # Adam memorising a small noisy subset: validation loss rises after the first epochs
    args = ["model.hidden=[256]", "model.init=default", "optimizer=adam", "lr=0.003", "data.subset=500",
            "data.label_noise=0.5", "data.val_size=500", "epochs=5", "trainer.progress_bar=false",
            "data.test_every_epoch=false", f"hydra.run.dir={tmp_path}"]
    assert train(*args).returncode == 0
    val_loss = [row["val_loss"] for row in summary(tmp_path)["epochs"]]
    assert min(val_loss) < val_loss[-1]  # the last epoch was not the best ...
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=False)
    assert last["epoch"] == 4 and len(last["callbacks"]["RunRecord"]["history"]) == 5  # ... and "last" still has it
    assert best["epoch"] == val_loss.index(min(val_loss))


def test_a_signal_lost_in_a_finalizer_still_stops_the_run_at_the_next_batch() -> None:
    from optimlab.signals import StopOnSignal

    stopper = StopOnSignal()
    stopper._raise_if_requested()  # nothing requested: no-op
    with pytest.raises(KeyboardInterrupt):
        stopper.handle(signal.SIGTERM, None)  # the handler's own raise may be swallowed ...
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        stopper.on_train_batch_start(None, None, None, 0)  # ... the next batch raises it again


# ---- what a bad resume, a re-run, a kill mid-write or a signal at start-up must not destroy --------

TINY = ["data.subset=500", "data.val_size=500", "epochs=1", "trainer.progress_bar=false",
        "data.test_every_epoch=false"]  # the test set once, at the end (10,000 images through the default MLP)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import compose_config
    from optimlab.train import run

    run_dir = tmp_path_factory.mktemp("finished")
    run(compose_config(*TINY), run_dir)
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.mark.parametrize("damage", ["truncated", "empty", "summary_as_target", "another_model", "not_a_checkpoint"])
def test_a_failed_resume_leaves_every_file_as_it_was(finished_run: Path, tmp_path: Path, damage: str) -> None:
    from conftest import compose_config
    from optimlab.train import run
    from optimlab.validate import ConfigError

    run_dir = copy_of(finished_run, tmp_path)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    target = run_dir
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "summary_as_target":
        target = run_dir / "summary.json"
    elif damage == "another_model":
        torch.save({"state_dict": {"model.net.0.weight": torch.zeros(3, 3)}, "epoch": 0}, ckpt)
    else:
        torch.save([1, 2, 3], ckpt)
    before = files_of(run_dir)
    with pytest.raises(ConfigError, match=r"^resume: .*nothing was changed") as err:
        run(compose_config(f"resume={target}", "epochs=2"), tmp_path / "cmd", [f"resume={target}", "epochs=2"])
    assert "\n" not in str(err.value)
    assert files_of(run_dir) == before


def test_a_run_recorded_before_the_trainer_came_from_config_still_resumes(finished_run: Path, tmp_path: Path) -> None:
    run_dir = copy_of(finished_run, tmp_path)
    saved = summary(run_dir)
    config = saved["config"]
    for key in ("callbacks", "logger", "optimized_metric", "curvature", "population"):  # (also keys added later)
        del config[key]
    for key in ("_target_", "max_epochs", "gradient_clip_val", "gradient_clip_algorithm", "limit_val_batches",
                "limit_test_batches", "overfit_batches", "profiler", "detect_anomaly", "enable_model_summary"):
        del config["trainer"][key]
    config["early_stopping"] = {"enabled": False, "monitor": "val/acc", "mode": "max", "patience": 3, "min_delta": 0.0}
    (run_dir / "summary.json").write_text(json.dumps(saved))
    ckpt = run_dir / "checkpoints" / "last.ckpt"  # and its checkpoint, which held no config then
    state = torch.load(ckpt, weights_only=False)
    del state["callbacks"]["RunRecord"]["config"]
    torch.save(state, ckpt)
    result = train(f"resume={run_dir}", "epochs=2")  # the old record, one epoch longer
    assert result.returncode == 0, result.stderr[-2000:]
    log = (run_dir / "train.log").read_text()  # the session's lines, not only in its own Hydra folder
    assert f"resuming {run_dir} from" in log and "epoch   2/2 |" in log
    resumed = summary(run_dir)
    assert resumed["status"] == "complete" and len(resumed["epochs"]) == 2
    assert resumed["config"]["trainer"]["max_epochs"] == 2
    assert resumed["config"]["callbacks"]["model_checkpoint"]["monitor"] == "val/acc"  # best.ckpt as it was chosen


def test_a_new_run_under_resume_auto_never_replaces_another_runs_files_outside_its_folder(tmp_path: Path) -> None:
    """resume=auto over a folder with no run is a new run: a CSV save_dir shared with a finished run is refused
    before anything is written (a review: it had replaced the other run's metrics.csv)."""
    from conftest import compose_config
    from optimlab.train import run
    from optimlab.validate import ConfigError

    shared = ["logger=csv", f"+logger.csv.save_dir={tmp_path / 'logs'}"]
    run(compose_config(*TINY, *shared), tmp_path / "first")
    before = files_of(tmp_path / "logs")
    with pytest.raises(ConfigError, match=r"^logger.csv.save_dir: '.*logs' holds another run's .*metrics.csv"):
        run(compose_config(*TINY, *shared, "resume=auto"), tmp_path / "second")
    assert files_of(tmp_path / "logs") == before and not (tmp_path / "second").exists()
    # its own run, stopped in its first epoch (no checkpoint; a review: it could no longer be continued)
    from omegaconf import OmegaConf

    from optimlab.summary import RunSummary, write_summary

    cfg = compose_config(*TINY, *shared, "resume=auto")
    write_summary(tmp_path / "first", RunSummary("interrupted", OmegaConf.to_container(cfg, resolve=True)))
    (tmp_path / "first" / "checkpoints" / "last.ckpt").unlink()
    assert run(cfg, tmp_path / "first").status == "complete"


def test_a_run_stopped_before_its_first_checkpoint_says_it_has_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Stopped inside its first epoch, the run's notice had said its folder held "the last checkpoint" (a probe)."""
    from conftest import compose_config
    from optimlab.module import ClassifierModule
    from optimlab.signals import Interrupted
    from optimlab.train import run

    def stop(self, batch, batch_idx):  # a Ctrl-C at the second batch
        if batch_idx == 1:
            raise KeyboardInterrupt("SIGINT")
        return step(self, batch, batch_idx)

    step = ClassifierModule.training_step
    monkeypatch.setattr(ClassifierModule, "training_step", stop)
    with pytest.raises(Interrupted):
        run(compose_config(*TINY), tmp_path)
    assert f"interrupted after 0 finished epoch(s); {tmp_path} holds its summary (no checkpoint yet); continue with " \
        in capsys.readouterr().err
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_a_resume_given_a_key_only_its_runs_model_has_is_refused_as_ignored(finished_run: Path) -> None:
    """The command line is checked against the default config (an MLP) before the run's own is read: a CNN
    run's model.channels was called an unknown key (a probe); the resume's refusal says what happens to it."""
    from optimlab.command_line import composition_error

    conf = Path(__file__).resolve().parents[1] / "conf"
    assert composition_error([f"resume={finished_run}", "model.channels=[4,8]", "epochs=3"], conf) == (
        "resume: a resumed run keeps its own config, so model.channels=[4,8] would be ignored; only epochs, "
        "trainer.max_epochs, trainer.progress_bar, trainer.num_threads, data.root may be given with resume=")
    assert composition_error(["resume=auto", "model.channels=[4,8]"], conf) == \
        "model.channels: unknown config key (nothing reads it); check the spelling, or see conf/"
    assert composition_error([f"resume={finished_run}", "epochs=3"], conf) is None
    # Hydra's own settings are not the run's config (a review: they were listed as ignored); ++resume= resumes too
    assert composition_error([f"++resume={finished_run}", "model.channels=[4,8]", "hydra.job.chdir=false"], conf) == (
        "resume: a resumed run keeps its own config, so model.channels=[4,8] would be ignored; only epochs, "
        "trainer.max_epochs, trainer.progress_bar, trainer.num_threads, data.root may be given with resume=")


def test_a_resume_refuses_overrides_it_would_ignore_and_a_diverged_run(finished_run: Path, tmp_path: Path) -> None:
    from conftest import compose_config
    from optimlab.train import run
    from optimlab.validate import ConfigError

    overrides = [f"resume={finished_run}", "lr=5", "model=cnn", "epochs=3"]
    with pytest.raises(ConfigError, match=r"lr=5, model=cnn would be ignored"):
        run(compose_config(*overrides), tmp_path / "cmd", overrides)
    # A path that is no run is said first: the overrides were refused before it (a probe).
    overrides = [f"resume={tmp_path / 'no_such_run'}", "lr=5"]
    with pytest.raises(ConfigError, match="^resume: .*no_such_run"):
        run(compose_config(*overrides), tmp_path / "cmd", overrides)
    diverged = copy_of(finished_run, tmp_path)
    summary = json.loads((diverged / "summary.json").read_text())
    summary.update(status="diverged", diverged=True, diverged_at_step=7)
    (diverged / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ConfigError, match="diverged at step 7"):
        run(compose_config(f"resume={diverged}"), tmp_path / "cmd", [f"resume={diverged}"])


def test_a_run_stopped_after_its_last_epoch_resumes_to_its_test_with_its_record(finished_run: Path,
                                                                                 tmp_path: Path) -> None:
    """Killed during the test after its last epoch, a run resumed has no epoch left to train: Lightning
    skips training, and the summary must still hold every epoch (it once came back empty); TensorBoard shows
    each point once (the last epoch's val/acc and train/loss, which HPARAMS reads, were logged a second time at
    the last step: a kill probe)."""
    from conftest import compose_config
    from optimlab.train import run

    run_dir = copy_of(finished_run, tmp_path)
    before = summary(run_dir)
    (run_dir / "summary.json").write_text(json.dumps({**before, "status": "interrupted", "test_acc": None}))
    after = run(compose_config(f"resume={run_dir}"), tmp_path / "cmd", [f"resume={run_dir}"])
    assert after.status == "complete" and after.epochs == before["epochs"] and after.regime == before["regime"]
    assert after.test_acc == pytest.approx(before["test_acc"], rel=1e-6)
    assert summary(run_dir)["epochs"] == before["epochs"]
    assert tensorboard_scalars(run_dir) == tensorboard_scalars(finished_run)


def test_a_run_held_by_another_process_is_refused_and_left_as_it_is(finished_run: Path, tmp_path: Path) -> None:
    """A kill probe resumed one run twice at once: both trained into its folder, the last to write won. A run
    holds its folder while it runs (a lock the system drops when it ends, also killed), a population sweep its
    sweep folder: another run there is refused in one line, nothing written; once free, the same resume runs."""
    from conftest import compose_config
    from optimlab.files import hold
    from optimlab.train import run
    from optimlab.validate import FolderInUse

    run_dir = copy_of(finished_run, tmp_path)
    before = summary(run_dir)
    (run_dir / "summary.json").write_text(json.dumps({**before, "status": "interrupted", "test_acc": None}))
    files = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    for folder, says in ((run_dir, "another process is running in this folder now"),
                         (tmp_path, f"a population sweep (or another run) is running in {tmp_path} now")):
        descriptor = hold(folder)  # as another process holds it (a lock of another open file)
        try:
            with pytest.raises(FolderInUse, match=f"^{re.escape(str(run_dir))}: {re.escape(says)}"):
                run(compose_config(f"resume={run_dir}"), tmp_path / "cmd", [f"resume={run_dir}"])
        finally:
            os.close(descriptor)
        assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == files
    assert run(compose_config(f"resume={run_dir}"), tmp_path / "cmd", [f"resume={run_dir}"]).status == "complete"


def test_probing_a_folder_does_not_take_it_from_another_probe(tmp_path: Path) -> None:
    """A review: the probe whether another process holds a folder took an exclusive lock for a moment, so two runs
    starting at once under one parent folder could each see the other's probe as a population sweep there. A probe
    (a shared lock) sees a holder, not another probe."""
    import fcntl

    from optimlab.files import hold, held_elsewhere

    probe = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # another process's probe, at this moment
        assert not held_elsewhere(tmp_path)
    finally:
        os.close(probe)
    holder = hold(tmp_path)
    try:
        assert held_elsewhere(tmp_path)
    finally:
        os.close(holder)
    assert not held_elsewhere(tmp_path) and not held_elsewhere(tmp_path / "missing")


def test_a_hold_waits_out_a_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe's shared lock goes at once: a run or a sweep taking its folder at that moment tries again, a
    few times 10 ms apart, before it counts the folder as another process's."""
    import fcntl

    import optimlab.files
    from optimlab.files import PROBE_WAITS, hold

    flock, tries = fcntl.flock, []

    def busy_twice(descriptor: int, operation: int) -> None:
        tries.append(operation)
        if len(tries) <= 2:
            raise BlockingIOError
        flock(descriptor, operation)

    monkeypatch.setattr(optimlab.files.fcntl, "flock", busy_twice)
    descriptor = hold(tmp_path)
    assert descriptor is not None and len(tries) == 3
    os.close(descriptor)
    tries.clear()

    def always_busy(descriptor: int, operation: int) -> None:
        tries.append(operation)
        raise BlockingIOError

    monkeypatch.setattr(optimlab.files.fcntl, "flock", always_busy)
    assert hold(tmp_path) is None and len(tries) == PROBE_WAITS + 1


def test_a_run_whose_folder_gets_a_record_while_it_starts_leaves_it_alone(finished_run: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A review's race: a run planned on an empty folder, then another process finished a run there before this
    one held the folder; this one trained over it. Now the record it finds once it holds the folder must be the one
    it planned from."""
    from conftest import compose_config
    import optimlab.train
    from optimlab.validate import ConfigError

    run_dir = tmp_path / "run"
    build = optimlab.train.build_parts

    def build_while_another_finishes(cfg):  # the other process's run ends while this one builds its parts
        parts = build(cfg)
        shutil.copy(finished_run / "summary.json", run_dir / "summary.json")
        return parts

    monkeypatch.setattr(optimlab.train, "build_parts", build_while_another_finishes)
    run_dir.mkdir()
    with pytest.raises(ConfigError, match="another process wrote this run's record while this run was starting"):
        optimlab.train.run(compose_config(), run_dir)
    assert (run_dir / "summary.json").read_bytes() == (finished_run / "summary.json").read_bytes()
    assert sorted(p.name for p in run_dir.iterdir()) == ["summary.json"]


@pytest.mark.parametrize("epochs", [1])
def test_a_finished_run_resumed_without_more_epochs_is_refused(finished_run: Path, tmp_path: Path, epochs: int) -> None:
    from conftest import compose_config
    from optimlab.train import run
    from optimlab.validate import ConfigError

    run_dir = copy_of(finished_run, tmp_path)
    before = files_of(run_dir)
    overrides = [f"resume={run_dir}", f"epochs={epochs}"]
    with pytest.raises(ConfigError, match=r"^resume: .* has finished 1 epoch\(s\), so epochs=\d leaves nothing to train; "
                                          r"give epochs=2 or more"):
        run(compose_config(*overrides), tmp_path / "cmd", overrides)
    assert files_of(run_dir) == before


def test_an_interrupted_run_resumed_with_epochs_at_those_it_finished_ends_there(finished_run: Path,
                                                                                 tmp_path: Path) -> None:
    """epochs=N down to the epochs an interrupted run finished ends it there: tested, recorded complete at N
    (the guide says so; a probe found it undocumented)."""
    from conftest import compose_config
    from optimlab.train import run

    run_dir = copy_of(finished_run, tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["epochs"]) == 1
    summary["config"]["epochs"] = summary["config"]["trainer"]["max_epochs"] = 3
    summary.update(status="interrupted", test_acc=None, test_loss=None)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    overrides = [f"resume={run_dir}", "epochs=1"]
    run(compose_config(*overrides), tmp_path / "cmd", overrides)
    ended = json.loads((run_dir / "summary.json").read_text())
    assert (ended["status"], len(ended["epochs"]), ended["config"]["epochs"]) == ("complete", 1, 1)
    assert ended["epochs"] == summary["epochs"] and ended["test_acc"] == json.loads((finished_run / "summary.json").read_text())["test_acc"]


@pytest.mark.parametrize("member", [False, True])
def test_a_run_without_its_checkpoint_is_not_resumed_from_scratch_over_its_record(finished_run: Path, tmp_path: Path,
                                                                                    member: bool) -> None:
    """Its checkpoint deleted, or a population's member (which keeps none): starting it over in place
    would drop its finished epochs' record if stopped, so the resume is refused before any work."""
    import shutil

    from conftest import compose_config
    from optimlab.train import run
    from optimlab.validate import ConfigError

    run_dir = copy_of(finished_run, tmp_path)
    shutil.rmtree(run_dir / "checkpoints")
    if member:
        saved = summary(run_dir)
        (run_dir / "summary.json").write_text(json.dumps({**saved, "population": {"name": "population 3", "member": 0}}))
    before = files_of(run_dir)
    overrides = [f"resume={run_dir}", "epochs=2"]
    why = ("a member of a population keeps none, and population 3's was removed when it finished" if member
           else "checkpoints holds no last.ckpt")
    with pytest.raises(ConfigError, match=rf"^resume: .* has 1 finished epoch\(s\) but no checkpoint .*{why}.*nothing was changed$"):
        run(compose_config(*overrides), tmp_path / "cmd", overrides)
    assert files_of(run_dir) == before


def test_a_run_started_over_shows_only_its_own_events_in_tensorboard(finished_run: Path, tmp_path: Path) -> None:
    """resume=auto on a run killed before its first epoch finished (no checkpoint) starts it over in its
    folder: TensorBoard shows the new session's events, not the killed one's as well."""
    import shutil

    from conftest import compose_config
    from optimlab.train import run

    run_dir = copy_of(finished_run, tmp_path)
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "summary.json").write_text(json.dumps({**summary(run_dir), "status": "running", "epochs": []}))
    log_stale_events(run_dir, 0)
    after = run(compose_config(*TINY, "resume=auto"), run_dir)
    assert after.status == "complete" and len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 3
    assert tensorboard_scalars(run_dir) == tensorboard_scalars(finished_run)


def test_a_tensorboard_folder_shared_by_runs_keeps_the_other_runs_events(tmp_path: Path) -> None:
    from conftest import compose_config
    from optimlab.train import run

    shared = tmp_path / "shared_tb"
    shared.mkdir()
    (tmp_path / "other").mkdir()
    log_stale_events(tmp_path / "other", 0)  # another run's events in <other>/tensorboard
    (tmp_path / "other" / "tensorboard").rename(shared / "tensorboard")
    before = tensorboard_scalars(shared)
    run(compose_config(*TINY, f"+logger.tensorboard.save_dir={shared / 'tensorboard'}"), tmp_path / "run")
    after = tensorboard_scalars(shared)
    assert "val/acc" in before and len(after["val/acc"]) > len(before["val/acc"])  # this run's too
    assert all(after[tag][:len(points)] == points for tag, points in before.items())


def test_resume_auto_refuses_a_run_of_another_config_or_without_its_checkpoint(finished_run: Path,
                                                                              tmp_path: Path) -> None:
    """resume=auto continues an unfinished run only with the config it recorded (else the run would mix
    two: the optimizer's saved lr with the new one recorded), and only from a checkpoint."""
    import shutil

    from conftest import compose_config
    from optimlab.train import run
    from optimlab.validate import ConfigError

    run_dir = copy_of(finished_run, tmp_path)
    saved = summary(run_dir)
    (run_dir / "summary.json").write_text(json.dumps({**saved, "status": "interrupted"}))
    before = files_of(run_dir)
    lr = saved["config"]["optimizer"]["lr"]
    with pytest.raises(ConfigError, match=rf"^resume=auto: .* holds a run of another config \(optimizer.lr: {lr} there, "
                                          r"0.5 here\); continuing it would mix the two"):
        run(compose_config(*TINY, "resume=auto", "optimizer.lr=0.5"), run_dir)
    assert files_of(run_dir) == before
    shutil.rmtree(run_dir / "checkpoints")
    before = files_of(run_dir)
    with pytest.raises(ConfigError, match=r"^resume: .* has 1 finished epoch\(s\) but no checkpoint"):
        run(compose_config(*TINY, "resume=auto"), run_dir)
    assert files_of(run_dir) == before


def test_resume_auto_skips_a_finished_run_only_of_its_own_config(finished_run: Path, tmp_path: Path) -> None:
    """A sweep edited and rerun into its folder with resume=auto numbers its jobs anew: a finished run of
    another config in a job's folder is refused in one line, every file kept (skipping it, the sweep would
    report that run as the job's); of its own config (a key a resume may change aside) it is skipped."""
    from conftest import compose_config
    from optimlab.train import run
    from optimlab.validate import ConfigError

    run_dir = copy_of(finished_run, tmp_path)
    before = files_of(run_dir)
    lr = summary(run_dir)["config"]["optimizer"]["lr"]
    with pytest.raises(ConfigError, match=rf"^resume=auto: .* holds a finished run of another config \(optimizer.lr: "
                                          rf"{lr} there, 0.5 here\); skipping it would report that run as this job's"):
        run(compose_config(*TINY, "resume=auto", "optimizer.lr=0.5"), run_dir)
    assert files_of(run_dir) == before
    skipped = run(compose_config(*TINY, "resume=auto", "trainer.num_threads=1"), run_dir)
    assert skipped.status == "complete" and files_of(run_dir) == before
    # Other diagnosis thresholds change its label only (optimlab-report --rediagnose), not its record: skipped.
    assert run(compose_config(*TINY, "resume=auto", "regimes.fit_acc=0.5"), run_dir).status == "complete"
    assert files_of(run_dir) == before


def test_a_checkpoint_saved_by_another_run_is_refused(finished_run: Path, tmp_path: Path) -> None:
    """Another run's checkpoint of the same network in a run's folder (a probe copied one in): resuming
    from it would continue that run under this one's record. Refused in one line, every file kept: a
    checkpoint of another config (resume=<dir>; resume=auto with no summary), and one with more finished
    epochs than the run is to train (Lightning had stopped with a traceback after the summary was rewritten)."""
    import shutil

    from conftest import compose_config
    from optimlab.train import run
    from optimlab.validate import ConfigError

    other = tmp_path / "other"
    run(compose_config(*TINY, "epochs=2", "optimizer.lr=0.3"), other)
    run_dir = copy_of(finished_run, tmp_path)
    shutil.copy(other / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.ckpt")
    before = files_of(run_dir)
    overrides = [f"resume={run_dir}", "epochs=3"]
    with pytest.raises(ConfigError, match=r"^resume: .*last.ckpt' was saved by a run of another config \(optimizer.lr: "
                                          r"0.3 there, 0.1 here\); continuing from it would mix the two; nothing was "
                                          r"changed$"):
        run(compose_config(*overrides), tmp_path / "cmd", overrides)
    assert files_of(run_dir) == before
    (run_dir / "summary.json").unlink()
    before = files_of(run_dir)
    with pytest.raises(ConfigError, match=r"saved by a run of another config \(optimizer.lr: 0.3 there, 0.1 here\)"):
        run(compose_config(*TINY, "resume=auto"), run_dir)
    assert files_of(run_dir) == before
    with pytest.raises(ConfigError, match=r"^resume: .*last.ckpt' holds 2 finished epochs, more than epochs=1; give "
                                          r"epochs=2 or more; nothing was changed$"):
        run(compose_config(*TINY, "resume=auto", "optimizer.lr=0.3"), run_dir)
    assert files_of(run_dir) == before
    # its own run continues from it
    resumed = run(compose_config(*TINY, "resume=auto", "optimizer.lr=0.3", "epochs=3"), run_dir)
    assert resumed.status == "complete" and len(resumed.epochs) == 3


def test_a_run_resumed_with_more_epochs_keeps_the_lrs_its_csv_logged(tmp_path: Path) -> None:
    """resume=auto epochs=3 of a 2-epoch cosine run (T_max: ${epochs}) killed during its test: the CSV logger's rows
    of its first two epochs come back as it logged them (T_max 2), not as the resumed config would schedule them
    (T_max 3), and the summary records the T_max its scheduler, restored from the checkpoint, ran with."""
    import csv

    from conftest import compose_config
    from optimlab.train import run

    def logged_lrs() -> list[tuple[str, str]]:
        rows = csv.DictReader((tmp_path / "csv" / "metrics.csv").open(newline=""))
        return [(row["step"], row["lr-SGD"]) for row in rows if row["lr-SGD"]]

    base = [*TINY, "scheduler=cosine", "callbacks=lr_monitor", "logger=csv"]
    run(compose_config(*base, "epochs=2"), tmp_path)
    first = logged_lrs()
    assert len(first) == 2 and first[1][1] == "0.05"  # the cosine's midpoint at T_max 2
    (tmp_path / "summary.json").write_text(json.dumps({**summary(tmp_path), "status": "interrupted"}))
    resumed = run(compose_config(*base, "resume=auto", "epochs=3"), tmp_path, ["resume=auto", "epochs=3"])
    assert logged_lrs()[:2] == first and len(logged_lrs()) == 3
    logged_lrs_before = logged_lrs()
    # its record says what it ran with: 3 epochs, the scheduler (from the checkpoint) with T_max 2
    assert (resumed.config["epochs"], resumed.config["scheduler"]["T_max"]) == (3, 2)
    assert summary(tmp_path)["config"]["scheduler"]["T_max"] == 2
    # and it can be continued again: T_max 2 recorded beside epochs 3 is not a changed config
    (tmp_path / "summary.json").write_text(json.dumps({**summary(tmp_path), "status": "interrupted"}))
    again = run(compose_config(*base, "resume=auto", "epochs=4"), tmp_path, ["resume=auto", "epochs=4"])
    assert (again.status, len(again.epochs), again.config["scheduler"]["T_max"]) == ("complete", 4, 2)
    assert logged_lrs()[:3] == logged_lrs_before and len(logged_lrs()) == 4


def test_a_run_resumed_by_its_folder_leaves_no_folder_for_the_command(tmp_path: Path) -> None:
    """``python train.py resume=<run dir>``: the session's lines go to the run's own train.log, and the
    folder Hydra made for the command (which held only a copy of them) is removed."""
    assert train(*TINY, f"hydra.run.dir={tmp_path / 'run'}").returncode == 0
    resumed = train(f"resume={tmp_path / 'run'}", "epochs=2", f"hydra.run.dir={tmp_path / 'command' / 'run'}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (tmp_path / "command").exists()
    logged = (tmp_path / "run" / "train.log").read_text()
    assert "epoch   1/1 |" in logged and "epoch   2/2 |" in logged and f"resuming {tmp_path / 'run'}" in logged


def test_a_resumed_run_stopped_before_it_trains_keeps_its_csv_rows(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after the resumed record came back but before training started (here: while Lightning loads the
    training batches): the CSV logger, which deleted metrics.csv when the fit started, gets its rows back."""
    import csv

    from conftest import compose_config
    from optimlab.data import MNISTDataModule
    from optimlab.signals import Interrupted
    from optimlab.train import run

    def logged() -> list[dict[str, str]]:
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader((tmp_path / "csv" / "metrics.csv").open())]

    run(compose_config(*TINY, "logger=csv", "data.test_every_epoch=true"), tmp_path)  # each epoch's test rows too
    finished = logged()

    def interrupted(self: MNISTDataModule) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(MNISTDataModule, "train_dataloader", interrupted)
    with pytest.raises(Interrupted):
        run(compose_config(f"resume={tmp_path}", "epochs=2"), tmp_path / "cmd", [f"resume={tmp_path}", "epochs=2"])
    # the fit's rows; the last row was the finished run's result (test/acc, val/acc_best), logged after its fit
    assert logged() == finished[:-1] and "val/acc_best" in finished[-1]


def test_a_resumed_overfit_batches_run_keeps_its_csv_rows(tmp_path: Path) -> None:
    """trainer.overfit_batches=2 (Lightning's epoch: 2 batches, whatever limit_train_batches says): a run continued
    with resume=auto gets back the CSV rows of its first epochs at their steps (2, 4)."""
    import csv

    from conftest import compose_config
    from optimlab.train import run

    def logged() -> list[dict[str, str]]:
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader((tmp_path / "csv" / "metrics.csv").open())]

    base = [*TINY, "logger=csv", "trainer.overfit_batches=2", "trainer.log_every_n_steps=1"]
    run(compose_config(*base, "epochs=2"), tmp_path)
    first = logged()
    assert [row["step"] for row in first if "train/acc" in row] == ["2", "4"]
    (tmp_path / "summary.json").write_text(json.dumps({**summary(tmp_path), "status": "interrupted"}))
    run(compose_config(*base, "resume=auto", "epochs=3"), tmp_path, ["resume=auto", "epochs=3"])
    assert logged()[:len(first) - 1] == first[:-1]  # the first run's rows but its result, logged after its fit


def test_resume_auto_compares_configs_only_where_there_is_something_to_continue(tmp_path: Path) -> None:
    """Not refused: a job with no finished epoch (refused before any work, its config since fixed) and a
    key derived from one a resume may change (the cosine schedule's length from ``epochs``)."""
    from omegaconf import OmegaConf

    from conftest import compose_config
    from optimlab.summary import RunSummary
    from optimlab.resume import refuse_changed_config
    from optimlab.validate import ConfigError

    def recorded(*overrides: str, epochs: int = 0) -> RunSummary:
        config = OmegaConf.to_container(compose_config(*TINY, *overrides), resolve=True)
        return RunSummary(status="interrupted", config=config, epochs=[{"epoch": e + 1} for e in range(epochs)])

    refuse_changed_config(tmp_path, recorded("optimizer=sgd", "optimizer.momentum=0.5"),
                          compose_config(*TINY, "optimizer=sgd", "optimizer.momentum=0.9"))
    refuse_changed_config(tmp_path, recorded("scheduler=cosine", epochs=1),
                          compose_config(*TINY, "scheduler=cosine", "epochs=3"))
    with pytest.raises(ConfigError, match=r"optimizer.momentum: 0.5 there, 0.9 here"):
        refuse_changed_config(tmp_path, recorded("optimizer=sgd", "optimizer.momentum=0.5"),
                              compose_config(*TINY, "optimizer=sgd", "optimizer.momentum=0.9"), checkpointed=True)


def test_a_refused_jobs_folder_records_its_latest_refusal_and_then_its_run(tmp_path: Path) -> None:
    """A sweep job refused, then rerun with resume=auto and refused again (its value fixed, another one wrong),
    lists the latest error; run at last, its .hydra/ record is that run's config, not the refused one's (a
    review: both stayed stale). Without resume=auto (a new sweep into the folder, refused for it) and over a
    folder with trained epochs the record stays."""
    import yaml
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig, open_dict

    from conftest import CONF
    from optimlab.hydra_job import hydra_config_of
    from optimlab.record import record_refusal
    from optimlab.train import run

    def in_job(task: Callable[[DictConfig], Any], *overrides: str) -> Any:  # as Hydra runs a job: its record written
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[*TINY, *overrides], return_hydra_config=True)
        with hydra_config_of(cfg):
            task_cfg = copy.deepcopy(cfg)
            with open_dict(task_cfg):
                del task_cfg["hydra"]
            return task(task_cfg)

    def recorded_config() -> dict:
        return yaml.safe_load((tmp_path / ".hydra" / "config.yaml").read_text())

    in_job(lambda cfg: record_refusal(tmp_path, cfg, "ConfigError: lr: -1 is not allowed"), "lr=-1")
    before = files_of(tmp_path)
    in_job(lambda cfg: record_refusal(tmp_path, cfg, "ConfigError: .. already holds a run"), "lr=0.5")
    assert files_of(tmp_path) == before
    in_job(lambda cfg: record_refusal(tmp_path, cfg, "ConfigError: batch_size: 0 is not allowed"), "batch_size=0",
           "resume=auto")
    assert summary(tmp_path)["error"] == "ConfigError: batch_size: 0 is not allowed"
    assert recorded_config()["batch_size"] == 0
    after = in_job(lambda cfg: run(cfg, tmp_path), "resume=auto", "optimizer.lr=0.05")
    assert after.status == "complete"
    assert (recorded_config()["optimizer"]["lr"], recorded_config()["batch_size"]) == (0.05, 128)
    before = files_of(tmp_path)
    in_job(lambda cfg: record_refusal(tmp_path, cfg, "ConfigError: lr: -1 is not allowed"), "lr=-1", "resume=auto")
    assert files_of(tmp_path) == before


def test_a_resume_with_a_bad_epochs_value_is_one_line(finished_run: Path, tmp_path: Path) -> None:
    from conftest import compose_config
    from optimlab.train import run
    from optimlab.validate import ConfigError

    overrides = [f"resume={finished_run}", "epochs=ten"]
    with pytest.raises(ConfigError, match=r"epochs: 'ten' is not allowed") as refused:
        run(compose_config(*overrides), tmp_path / "cmd", overrides)
    assert "recorded config" not in str(refused.value)  # the command's value, not the run's


def test_a_resume_refused_for_a_recorded_value_says_the_run_holds_it(finished_run: Path, tmp_path: Path) -> None:
    """A run recorded with a value refused since (momentum 1: a probe had trained one before the rule): the
    refusal named a key the command did not give."""
    from conftest import compose_config
    from optimlab.train import run
    from optimlab.validate import ConfigError

    run_dir = copy_of(finished_run, tmp_path)
    saved = summary(run_dir)
    saved["config"]["optimizer"]["momentum"] = 1.0
    (run_dir / "summary.json").write_text(json.dumps(saved))
    before = files_of(run_dir)
    overrides = [f"resume={run_dir}", "epochs=2"]
    with pytest.raises(ConfigError) as refused:
        run(compose_config(*overrides), tmp_path / "cmd", overrides)
    assert str(refused.value) == (f"optimizer.momentum: 1.0 is not allowed; expected a number below 1 (from 1 up the "
                                  f"momentum buffer never decays); the run's recorded config ({run_dir}/summary.json) "
                                  "holds it, so this version cannot continue the run")
    assert files_of(run_dir) == before


def test_a_run_stopped_early_is_not_trained_on_by_a_bare_resume(finished_run: Path, tmp_path: Path) -> None:
    """Complete before its configured epochs (early stopping): resume=<dir> without epochs=N would train
    on and replace its result, so it is refused; with epochs=N it continues."""
    from conftest import compose_config
    from optimlab.train import run
    from optimlab.validate import ConfigError

    run_dir = copy_of(finished_run, tmp_path)
    saved = summary(run_dir)
    saved["config"]["epochs"] = saved["config"]["trainer"]["max_epochs"] = 3  # as if it stopped after 1 of 3
    (run_dir / "summary.json").write_text(json.dumps(saved))
    before = files_of(run_dir)
    with pytest.raises(ConfigError, match=r"^resume: .* is complete after 1 epoch\(s\) of 3; give epochs=N"):
        run(compose_config(f"resume={run_dir}"), tmp_path / "cmd", [f"resume={run_dir}"])
    assert files_of(run_dir) == before
    after = run(compose_config(f"resume={run_dir}", "epochs=2"), tmp_path / "cmd", [f"resume={run_dir}", "epochs=2"])
    assert after.status == "complete" and [e["epoch"] for e in after.epochs] == [1, 2]


def test_a_relative_resume_path_is_the_run_folder_itself(finished_run: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint callback compares its folder with the saved one as text and forgets the best
    epoch when they differ; a relative resume=run must name the same folder as the absolute path."""
    from optimlab.checkpointing import resolve_resume

    run_dir = copy_of(finished_run, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert resolve_resume("run") == (run_dir, run_dir / "checkpoints" / "last.ckpt")
    # From the folder the command starts in, also where the job then works in a folder of its own.
    result = run_script(REPO / "train.py", "resume=run", "epochs=2", "hydra.job.chdir=true",
                        f"hydra.run.dir={tmp_path / 'session'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [row["epoch"] for row in summary(run_dir)["epochs"]] == [1, 2]


def test_an_unreadable_summary_still_keeps_a_new_run_out(finished_run: Path, tmp_path: Path) -> None:
    from conftest import compose_config
    from optimlab.train import run
    from optimlab.validate import ConfigError

    run_dir = copy_of(finished_run, tmp_path)
    (run_dir / "summary.json").write_text("{ not json")
    before = files_of(run_dir)
    with pytest.raises(ConfigError, match="already holds a run"):
        run(compose_config(*TINY), run_dir)
    assert files_of(run_dir) == before
    # nor resume=auto where there is no checkpoint to continue from (a review: it trained anew over it)
    import shutil

    shutil.rmtree(run_dir / "checkpoints")
    before = files_of(run_dir)
    with pytest.raises(ConfigError, match=r"^resume=auto: .*summary.json cannot be read as a run's summary, and there "
                                          r"is no checkpoint to continue from; .*nothing was changed$"):
        run(compose_config(*TINY, "resume=auto"), run_dir)
    assert files_of(run_dir) == before


def test_temporaries_left_by_a_kill_mid_write_are_cleared_when_the_run_continues(finished_run: Path,
                                                                                  tmp_path: Path) -> None:
    from conftest import compose_config
    from optimlab.train import run

    run_dir = copy_of(finished_run, tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))  # killed after epoch 1
    child = subprocess.Popen(["true"])
    child.wait()  # its id is now no process's
    gone = child.pid
    (run_dir / f".summary.json.tmp{gone}").write_text("{")
    (run_dir / "checkpoints" / f".last.ckpt.tmp{gone}").write_bytes(b"half")
    (run_dir / "checkpoints" / "keep.tmp1").write_bytes(b"not ours")
    # A live process's temporary file (here the test runner's parent) may be being written: it stays.
    (run_dir / "checkpoints" / f".best.ckpt.tmp{os.getppid()}").write_bytes(b"being written")
    run(compose_config(*TINY, "epochs=2", "resume=auto"), run_dir)
    assert [p.name for p in run_dir.rglob(".*.tmp*")] == [f".best.ckpt.tmp{os.getppid()}"]
    assert (run_dir / "checkpoints" / "keep.tmp1").exists()
    assert json.loads((run_dir / "summary.json").read_text())["epochs_completed"] == 2


def test_a_checkpoint_never_holds_non_finite_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import compose_config
    from optimlab.train import run

    # the gradient noise is added inside the optimizer's step, after the finite check of the gradient
    summary = run(compose_config(*TINY, "epochs=2", "optimizer.grad_noise_std=1e38"), tmp_path)
    assert summary.status == "diverged" and summary.divergence_reason in (LOSS_OR_GRADIENT, WEIGHTS)
    for ckpt in (tmp_path / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=False)["state_dict"]
        assert all(torch.isfinite(w).all() for w in state.values() if w.is_floating_point())
    io = AtomicCheckpointIO()
    nan = {"state_dict": {"w": torch.tensor([1.0, float("nan")])}}
    io.save_checkpoint(nan, tmp_path / "first.ckpt")
    assert not (tmp_path / "first.ckpt").exists()
    assert capsys.readouterr().err.endswith("not written, the weights are not finite (there is no earlier one)\n")
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "a.ckpt")
    io.save_checkpoint(nan, tmp_path / "a.ckpt")
    assert torch.equal(torch.load(tmp_path / "a.ckpt")["state_dict"]["w"], torch.ones(2))  # the previous one kept
    assert capsys.readouterr().err.endswith("(the previous checkpoint is kept)\n")


def importing_torch(pid: int) -> bool:
    """Whether process ``pid`` has mapped torch's libraries (Linux: /proc/<pid>/maps), i.e. got past
    train.py's first lines, which install its SIGINT handler before any heavy import."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_signals_deferred_notes_a_signal_and_restores_the_handlers() -> None:
    from optimlab.signals import signals_deferred

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with signals_deferred() as received:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # Python runs the handlers between bytecodes
    assert received == ["SIGTERM", "SIGINT"]
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_during_start_up_exits_with_one_line(tmp_path: Path, sig: signal.Signals) -> None:
    # A new interpreter: its start-up (the imports) is what is interrupted. (A probe: SIGTERM then killed the
    # process without its line.)
    proc = start(*TINY, f"hydra.run.dir={tmp_path / 'run'}", new_interpreter=True)
    # Not a fixed sleep: on a loaded machine Python may not yet have reached the handler, and its own
    # KeyboardInterrupt would answer. Loading torch's libraries comes after it and seconds before training.
    deadline = time.monotonic() + 60
    while not importing_torch(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and "Traceback" not in err
    assert err.strip() == f"interrupted ({sig.name}) while no run was training"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path: Path, key: str) -> None:
    (tmp_path / "file").write_text("")
    args = (["-m", "lr=0.1,0.2"] if "sweep" in key else []) + [*TINY, f"{key}={tmp_path / 'file' / 'run'}"]
    result = train(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {key}: '{tmp_path / 'file' / 'run'}' cannot be written "
                                     f"({tmp_path / 'file'} is a file, not a folder); choose another folder")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_final_test_ends_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         sig: signal.Signals) -> None:
    import os

    from conftest import compose_config
    from optimlab import train as train_module

    class SignalInTest(train_module.StopOnSignal):
        def on_test_start(self, *args: object) -> None:
            os.kill(os.getpid(), sig)  # as a user's Ctrl-C or a scheduler's SIGTERM would arrive

    monkeypatch.setattr(train_module, "StopOnSignal", SignalInTest)
    with pytest.raises(train_module.Interrupted, match=sig.name):
        train_module.run(compose_config(*TINY), tmp_path)
    saved = summary(tmp_path)
    assert saved["status"] == "interrupted" and saved["test_acc"] is None and len(saved["epochs"]) == 1


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB file system: room for the run's small files, not for a checkpoint."""
    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_one_line_and_the_record_says_why(full_disk: Path) -> None:
    result = train(*TINY, "optimizer=adam", "lr=0.001", f"hydra.run.dir={full_disk / 'run'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    # the file the run could not write, not the temporary file a library wrote first
    assert result.stderr.strip() == (f"error: cannot write {full_disk / 'run' / 'checkpoints' / 'best.ckpt'}: "
                                     f"No space left on device")
    saved = summary(full_disk / "run")
    assert saved["status"] == "crashed" and "No space left on device" in saved["error"]
    assert not list((full_disk / "run" / "checkpoints").iterdir())  # no half-written checkpoint left behind


def test_a_logger_failing_at_the_end_leaves_a_crashed_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import compose_config
    from optimlab import train as train_module

    def failing_log_result(*args: object) -> None:
        raise OSError("event file gone")

    monkeypatch.setattr(train_module, "log_result", failing_log_result)
    with pytest.raises(OSError, match="event file gone"):
        train_module.run(compose_config(*TINY), tmp_path)
    saved = summary(tmp_path)  # trained and tested, but not every record written: not "running", not "complete"
    assert saved["status"] == "crashed" and saved["error"] == "OSError: event file gone" and len(saved["epochs"]) == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_as_an_epoch_is_recorded_waits_for_its_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   sig: signal.Signals) -> None:
    """The signal lands right after the epoch's row is recorded, before its checkpoint is saved: the
    run stops at the next batch with the checkpoint of that epoch, so the resume continues from it
    (before: an interrupted summary of one epoch and no last.ckpt, which no resume could continue)."""
    import os

    from conftest import compose_config
    from optimlab import train as train_module
    from optimlab.record import RunRecord

    recorded = RunRecord.on_train_epoch_end

    def recorded_then_signal(self: RunRecord, *args: object) -> None:
        recorded(self, *args)
        if len(self.history) == 1:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(RunRecord, "on_train_epoch_end", recorded_then_signal)
    with pytest.raises(train_module.Interrupted, match=sig.name):
        train_module.run(compose_config(*TINY, "epochs=2"), tmp_path)
    saved = summary(tmp_path)
    assert saved["status"] == "interrupted" and len(saved["epochs"]) == 1
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["epoch"] == 0  # Lightning's count of the epoch it saved (0-based)
    monkeypatch.setattr(RunRecord, "on_train_epoch_end", recorded)
    resumed = train_module.run(compose_config(f"resume={tmp_path}"), tmp_path / "cmd", [f"resume={tmp_path}"])
    assert resumed.status == "complete" and [row["epoch"] for row in resumed.epochs] == [1, 2]


def test_an_epochs_summary_is_written_after_its_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill between the two leaves the summary no further than last.ckpt, which a resume continues
    from (a summary ahead of it, with no last.ckpt yet, could not be continued)."""
    from conftest import compose_config
    from optimlab.train import run

    epochs_at_save: list[int] = []
    save = AtomicCheckpointIO.save_checkpoint

    def noting_save(self: AtomicCheckpointIO, checkpoint: dict, path: str, **options: object) -> None:
        if Path(path).name == "last.ckpt":
            epochs_at_save.append(len(summary(tmp_path)["epochs"]))
        save(self, checkpoint, path, **options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", noting_save)
    run(compose_config(*TINY, "epochs=2"), tmp_path)
    assert epochs_at_save == [0, 1] and len(summary(tmp_path)["epochs"]) == 2


def test_a_relative_data_root_is_taken_from_the_launching_folder(tmp_path: Path) -> None:
    """Under hydra.job.chdir=true a job works in its own folder; a relative data.root still names the
    folder the command started in (the population launcher did so; the basic one looked in the job's)."""
    import os

    root = Path(os.environ["MNIST_ROOT"]).resolve()
    relative = os.path.relpath(root, tmp_path)
    result = run_script(REPO / "train.py", "-m", "lr=0.1", f"data.root={relative}", "hydra.job.chdir=true", *TINY,
                        f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert summary(next((tmp_path / "sweep").glob("0_*")))["status"] == "complete"


@pytest.mark.parametrize("override, line", [
    ("model._target_=no_such_module.Net", "model._target_: cannot import 'no_such_module.Net' (expected a class or function)"),
    ("+callbacks.mine._target_=os.getcwd",
     "callbacks.mine._target_: 'os.getcwd' is not allowed; expected a lightning Callback class (see conf/callbacks/)"),
    ("name=a/b", "name: 'a/b' is not allowed; expected at most 228 bytes without '/' (it ends the run folder's name)"),
    ("name=" + "x" * 229, f"name: '{'x' * 229}' is not allowed; expected at most 228 bytes without '/' (it ends the run "
                          f"folder's name)"),  # 229 bytes after the date and time: over 255
])
def test_a_bad_target_or_name_is_one_line_and_leaves_no_folder(tmp_path: Path, override: str, line: str) -> None:
    """Hydra's get_class logged lines of its own (into the run folder's train.log, left behind); a name
    with '/' made nested folders."""
    folder = [f"hydra.run.dir={tmp_path}/" + "${now:%Y-%m-%d_%H-%M-%S-%f}_${name}"]  # the default's name
    result = train(*TINY, override, *(folder if override.startswith("name") else [f"hydra.run.dir={tmp_path / 'run'}"]))
    assert result.returncode == 2 and result.stderr.strip() == f"error: {line}", result.stderr[-2000:]
    assert not (tmp_path / "run").exists() and not list(tmp_path.iterdir())


def test_a_target_whose_module_fails_to_import_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module that is there but fails to import (its own missing dependency, an error) is named with its
    error's first line; a module that is not there is just not importable (a review: both said only the latter)."""
    from optimlab.validate import ConfigError, import_target

    (tmp_path / "needs_more.py").write_text("import no_such_dependency_xyz\nclass Net: pass\n")
    (tmp_path / "breaks.py").write_text("raise RuntimeError('bad config\\nsecond line')\nclass Net: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^model._target_: cannot import 'needs_more.Net' \(expected a class or "
                                          r"function\); importing needs_more failed: ModuleNotFoundError: No module "
                                          r"named 'no_such_dependency_xyz'$"):
        import_target("model", "needs_more.Net")
    with pytest.raises(ConfigError, match=r"importing breaks failed: RuntimeError: bad config$"):
        import_target("model", "breaks.Net")
    with pytest.raises(ConfigError, match=r"^model._target_: cannot import 'no_such_pkg.sub.Net' \(expected a class "
                                          r"or function\)$"):
        import_target("model", "no_such_pkg.sub.Net")


def test_resume_auto_in_a_folder_without_a_run_says_it_starts_a_new_one(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A single run's default folder is new (timestamped): resume=auto has nothing there to continue."""
    from conftest import compose_config
    from optimlab.train import run

    with caplog.at_level(logging.INFO, logger="optimlab.train"):
        summary = run(compose_config(*TINY, "resume=auto"), tmp_path / "new", ["resume=auto"])
    assert summary.status == "complete"
    assert f"resume=auto: {tmp_path / 'new'} holds no run to continue; starting a new one" in caplog.text
    # Killed between its checkpoint and its summary: the checkpoint is continued, and not said to be missing.
    (tmp_path / "new" / "summary.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="optimlab.train"):
        run(compose_config(*TINY, "resume=auto", "epochs=2"), tmp_path / "new", ["resume=auto", "epochs=2"])
    assert "resuming" in caplog.text and "holds no run" not in caplog.text
