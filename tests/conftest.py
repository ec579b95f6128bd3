"""Shared fixtures: where real MNIST lives, tiny synthetic IDX files, and composed configs."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# CI and developers keep MNIST beside the repository; $MNIST_ROOT wins when set.
MNIST_ROOT = Path(os.environ.get("MNIST_ROOT") or REPO.parent / "shared" / "data")
os.environ.setdefault("MNIST_ROOT", str(MNIST_ROOT))


def compose_config(*overrides: str) -> DictConfig:
    """The config `python train.py <overrides>` would run, composed in-process."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


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
