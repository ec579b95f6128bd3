"""MNIST as tensors on the training device: seeded split, subset and label noise.

The whole data set (60k x 784 floats, 188 MB, read from the IDX files :mod:`optimlab.mnist_files`
checked) lives on the device, and batches are drawn by indexing with a seeded permutation: no
DataLoader workers, no per-sample transforms.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from optimlab.mnist_files import DataError, ensure_files, raw_dir, resolve_root


def read_idx(path: Path, item_dims: int) -> Tensor:
    """An IDX file's items as a uint8 tensor ((N, 28, 28) images or (N,) labels); the file has
    passed :func:`~optimlab.mnist_files.check_idx`."""
    data = path.read_bytes()
    header = 4 * (2 + item_dims)
    count = struct.unpack(">I", data[4:8])[0]
    items = torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8)
    return items.view(count, 28, 28) if item_dims else items


@functools.lru_cache(maxsize=4)
def load_split(root: Path, train: bool) -> tuple[Tensor, Tensor]:
    """One MNIST split as (images float32 (N, 1, 28, 28) in [0, 1], labels int64 (N,)), read from
    the checked IDX files themselves: never from torchvision's ``MNIST/processed`` cache, which it
    prefers when present and which nothing checks. Cached: a sweep in one process reads the files once."""
    prefix = "train" if train else "t10k"
    folder = raw_dir(root)
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte", 2).unsqueeze(1).float().div_(255.0)
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte", 0).long()
    if labels.numel() and labels.max() > 9:
        raise DataError(f"data.root: {folder}: labels outside 0..9 in the {'train' if train else 'test'} split")
    return images, labels


@dataclass(frozen=True)
class Split:
    """A run's training and validation sets as indices into the 60k MNIST training images.

    ``train_images[i]`` is the image and ``train_labels[i]`` the label of training item i (they
    differ where label noise moved an image); ``val`` holds the validation items (clean)."""

    train_images: Tensor
    train_labels: Tensor
    val: Tensor
    noisy_count: int


def split_indices(n: int, val_size: int, subset: int | None, label_noise: float, seed: int) -> Split:
    """A run's split of ``n`` training images, as indices: drawn from ``torch.Generator().manual_seed(seed)``,
    the split's permutation (validation first, then training, cut to ``subset``), then the label-noise one;
    ``round(label_noise * N)`` images move along a random cycle, so each chosen image is paired with another
    image's label (the notebook's outliers, without fixed points; none when fewer than 2)."""
    if not 0 < val_size < n:
        raise DataError(f"data.val_size: {val_size} must be in [1, {n})")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    val, train = order[:val_size], order[val_size:]
    if subset is not None:
        if not 0 < subset <= len(train):
            raise DataError(f"data.subset: {subset} must be in [1, {len(train)}] "
                            f"(training images left after the {val_size}-image validation split)")
        train = train[:subset]
    images = train.clone()
    k = round(label_noise * len(train))
    if k >= 2:
        chosen = torch.randperm(len(train), generator=g)[:k]
        images[chosen] = train[chosen.roll(1)]
    return Split(images, train, val, k if k >= 2 else 0)


class EpochShuffle:
    """A seeded permutation per epoch: the order of epoch ``e`` depends only on (seed, e), so a run
    resumed at epoch ``e`` sees the same batches as an uninterrupted one. Lightning calls
    ``set_epoch`` before each epoch, as it does for a DataLoader's sampler."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def permutation(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g)


class TensorBatches:
    """Batches ``(x[idx], y[idx])`` of in-memory tensors; shuffled per epoch when a sampler is given.
    ``sampler`` and ``batch_sampler`` mirror a DataLoader's attributes, which Lightning inspects."""

    batch_sampler = None

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, sampler: EpochShuffle | None = None) -> None:
        self.x, self.y, self.batch_size, self.sampler = x, y, batch_size, sampler

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.sampler is None:
            for start in range(0, len(self.y), self.batch_size):
                yield self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]
            return
        order = self.sampler.permutation().to(self.y.device)
        for idx in order.split(self.batch_size):
            # index_select: the same rows as x[idx]; on the CPU it takes a third of the time
            yield self.x.index_select(0, idx), self.y.index_select(0, idx)


class MNISTDataModule(L.LightningDataModule):
    """MNIST split into train / validation (seeded), plus the 10k test set.

    Args:
        root: folder holding ``MNIST/raw/`` (None: ``$MNIST_ROOT`` or ``data/``).
        val_size: images held out of the 60k training set for validation (clean labels).
        subset: use only this many training images (None: all that remain after the split).
        label_noise: fraction of training images shuffled among themselves (each moved image gets
            another image's label pairing, as the overfit notebook's 30k "outliers").
        batch_size, eval_batch_size: training and evaluation batch sizes.
        seed: seeds the split, subset, noise and the per-epoch shuffling.
        download: let torchvision fetch missing files (needs internet).
        test_every_epoch: also evaluate on the test set after each epoch (for curves).
    """

    def __init__(self, root: str | None = None, val_size: int = 5000, subset: int | None = None,
                 label_noise: float = 0.0, batch_size: int = 128, eval_batch_size: int = 1000, seed: int = 0,
                 download: bool = True, test_every_epoch: bool = True) -> None:
        super().__init__()
        self.root = resolve_root(root)
        self.val_size, self.subset, self.label_noise = val_size, subset, label_noise
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.download, self.test_every_epoch = download, test_every_epoch
        self.noisy_count = 0
        self._ready = False

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        ensure_files(self.root, self.download)
        images, labels = load_split(self.root, train=True)
        split = split_indices(len(labels), self.val_size, self.subset, self.label_noise, self.seed)
        self.train_x, self.train_y = images[split.train_images], labels[split.train_labels]
        self.val_x, self.val_y = images[split.val], labels[split.val]
        self.test_x, self.test_y = load_split(self.root, train=False)
        self.noisy_count = split.noisy_count
        self._ready = True

    def to(self, device: torch.device | str) -> MNISTDataModule:
        """Move every split onto ``device`` once, so batches are gathered there."""
        for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def train_dataloader(self) -> TensorBatches:
        return TensorBatches(self.train_x, self.train_y, self.batch_size, EpochShuffle(len(self.train_y), self.seed))

    def val_dataloader(self) -> list[TensorBatches]:
        loaders = [TensorBatches(self.val_x, self.val_y, self.eval_batch_size)]
        if self.test_every_epoch:
            loaders.append(self.test_dataloader())
        return loaders

    def test_dataloader(self) -> TensorBatches:
        return TensorBatches(self.test_x, self.test_y, self.eval_batch_size)
