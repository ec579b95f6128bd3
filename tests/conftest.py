"""Shared fixtures: where real MNIST lives, tiny synthetic IDX files, and composed configs."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import runpy
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# CI and developers keep MNIST beside the repository; $MNIST_ROOT wins when set.
MNIST_ROOT = Path(os.environ.get("MNIST_ROOT") or REPO.parent / "shared" / "data")
os.environ.setdefault("MNIST_ROOT", str(MNIST_ROOT))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: the workers share the cores, so one torch thread each (and in the scripts they
    # start): two threads per worker on two cores wait for each other.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def flush_denormal_off_after() -> Iterator[None]:
    """A run turns flush-denormal mode on for its process (``trainer.flush_denormal``), which the next test in
    the worker would inherit (a preconditioner of 1e-310 read as 0); torch has no getter to restore it."""
    yield
    torch.set_flush_denormal(False)


def compose_config(*overrides: str) -> DictConfig:
    """The config `python train.py <overrides>` would run, composed in-process."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def run_script(script: Path, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """``python <script> <args>`` run in this process, as the command line would run it (argv, exit
    status, stdout, stderr), without a new interpreter's imports (about 10 s on the 2-core CPU).
    What a run changes in the process (signal handlers, logging, torch's threads and determinism,
    the working folder) is put back afterwards. Signals and kills still need a real process."""
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    handlers_of = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads()
    saved_path = sys.path[:]
    sys.argv, code = [str(script), *args], 0
    sys.path.insert(0, str(script.parent))  # as python does for a script: its folder's modules import
    GlobalHydra.instance().clear()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            err.write(exit_.code + "\n")
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        for extra in set(root.handlers) - set(handlers):
            extra.close()
        root.handlers[:], sys.argv, sys.path[:] = handlers, saved_argv, saved_path
        root.setLevel(level)
        os.chdir(saved_cwd)
        for sig, handler in handlers_of.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess([sys.executable, str(script), *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    if not (MNIST_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.fail(f"real MNIST not found under {MNIST_ROOT}/MNIST/raw; set MNIST_ROOT")
    return MNIST_ROOT


def write_idx(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """Write the four MNIST IDX files with random content under ``root/MNIST/raw``."""
    g = torch.Generator().manual_seed(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.numpy().tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.numpy().tobytes())
    return root


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    return write_idx(tmp_path / "tiny")
