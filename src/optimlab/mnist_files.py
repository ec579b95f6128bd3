"""The MNIST files, and what is known of the data before any tensor is made: where the files are
(``data.root``, ``$MNIST_ROOT``), their IDX headers checked, and how many batches an epoch of
N items makes under Lightning's limits. No torch import (torchvision only to download): the record
and ``optimlab-report`` count a run's passes over its data without importing it."""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import to_absolute_path

from optimlab.checks import is_integer
from optimlab.files import read_error

# (file name, IDX magic number, number of dimensions after the count)
MNIST_FILES = {
    "train-images-idx3-ubyte": (2051, 2),
    "train-labels-idx1-ubyte": (2049, 0),
    "t10k-images-idx3-ubyte": (2051, 2),
    "t10k-labels-idx1-ubyte": (2049, 0),
}


class DataError(Exception):
    """The data cannot be had as configured (files missing or malformed, or a split or a batch limit
    that leaves nothing); the message says which and what to do."""


def resolve_root(root: str | None) -> Path:
    """``data.root`` if given, else ``$MNIST_ROOT``, else ``data/``; a relative one from the folder the
    command started in (also where a Hydra job works in its own, ``hydra.job.chdir=true``)."""
    return Path(to_absolute_path(str(Path(root or os.environ.get("MNIST_ROOT") or "data").expanduser())))


def raw_dir(root: Path) -> Path:
    return root / "MNIST" / "raw"


def check_idx(path: Path, magic: int, item_dims: int) -> int:
    """Check an IDX file's header and size against each other; return its item count."""
    size = path.stat().st_size
    header = 4 * (2 + item_dims)
    with path.open("rb") as f:
        head = f.read(header)
    if len(head) < header:
        raise DataError(f"data.root: {path}: truncated IDX file ({size} bytes, shorter than its {header}-byte header)")
    found_magic, count, *dims = struct.unpack(f">{2 + item_dims}I", head)
    if found_magic != magic:
        raise DataError(f"data.root: {path}: not an MNIST IDX file (magic number {found_magic}, expected {magic})")
    if item_dims and dims != [28, 28]:
        raise DataError(f"data.root: {path}: images are {dims[0]}x{dims[1]}, expected 28x28")
    expected = header + count * (28 * 28 if item_dims else 1)
    if size != expected:
        raise DataError(f"data.root: {path}: corrupted or truncated IDX file ({size} bytes; its header promises "
                        f"{count} items, {expected} bytes)")
    return count


def ensure_files(root: Path, download: bool) -> None:
    """Make sure the four IDX files are in ``root/MNIST/raw`` (downloading them if allowed) and
    well formed; raise :class:`DataError` naming the files and where they belong otherwise."""
    folder = raw_dir(root)
    missing = [name for name in MNIST_FILES if not (folder / name).is_file()]
    failed = ""  # why the download failed, for the message below
    if missing and download:
        new = list(itertools.takewhile(lambda p: not p.exists(), [folder, *folder.parents]))  # deepest first
        try:
            from torchvision.datasets import MNIST

            MNIST(str(root), train=True, download=True)
        except Exception as err:  # offline, blocked, a full disk: said below
            failed = f" (the download failed: {read_error(err)})"
        missing = [name for name in MNIST_FILES if not (folder / name).is_file()]
        for made in new if missing else []:  # a failed download leaves no empty folders behind
            try:
                made.rmdir()
            except OSError:  # not empty: it and the folders above stay
                break
    if missing:
        raise DataError(f"data.root: MNIST files missing from {folder}: {', '.join(missing)}{failed}. Put the four "
                        f"uncompressed IDX files ({', '.join(MNIST_FILES)}) in that folder, or point data.root "
                        f"(or $MNIST_ROOT) at a folder whose MNIST/raw/ holds them")
    counts = {name: check_idx(folder / name, *spec) for name, spec in MNIST_FILES.items()}
    for split in ("train", "t10k"):
        n_img, n_lab = counts[f"{split}-images-idx3-ubyte"], counts[f"{split}-labels-idx1-ubyte"]
        if n_img != n_lab:
            raise DataError(f"data.root: {folder}: {split} has {n_img} images but {n_lab} labels")


def epoch_batches(items: int, batch_size: int, limit: int | float | None,
                  key: str = "trainer.limit_train_batches") -> int:
    """How many batches of ``batch_size`` Lightning runs in an epoch of ``items`` items under the
    limit ``key=limit`` (training's by default; validation's and test's are counted alike): all of
    them (the last may be shorter) when None, at most ``limit`` (an int), or ``int(batches * limit)``
    (a float; a positive one that keeps none is an error, as it is there)."""
    batches = -(-items // batch_size)
    if limit is None:
        return batches
    if is_integer(limit):
        return min(batches, limit)
    limited = int(batches * limit)
    if limited == 0 and limit > 0:
        raise DataError(f"{key}: {limit} leaves none of the {batches} batches of an epoch; "
                        f"expected a fraction >= {1 / batches:.4g}, an integer count or null")
    return limited


def check_batch_limits(trainer: Mapping[str, Any], sizes: tuple[int, int, int], batch_size: int,
                       eval_batch_size: int) -> int:
    """A DataError where a batch limit of ``trainer`` (``limit_{train,val,test}_batches``, or
    ``overfit_batches``, which stands for the first two) keeps no batch of its split (training,
    validation, test ``sizes``), as Lightning would find only when it reaches that split; else the
    training batches of an epoch. Under ``fast_dev_run`` Lightning runs its own few batches instead."""
    if trainer.get("fast_dev_run"):
        return epoch_batches(sizes[0], batch_size, int(trainer["fast_dev_run"]))
    overfit = trainer.get("overfit_batches") or None
    limits = [overfit or trainer.get("limit_train_batches"), overfit or trainer.get("limit_val_batches"),
              trainer.get("limit_test_batches")]
    keys = ["trainer.overfit_batches" if overfit else f"trainer.limit_{split}_batches" for split in ("train", "val")]
    split_batches = (batch_size, eval_batch_size, eval_batch_size)
    batches = [epoch_batches(size, batch, limit, key) for size, batch, limit, key in
               zip(sizes, split_batches, limits, [*keys, "trainer.limit_test_batches"])]
    return batches[0]
