"""Per-member data: each member sees exactly the batches its own run would see.

A single run's :class:`~optimlab.data.MNISTDataModule` copies its split out of the 60k training
images (seeded split, subset, label noise) and shuffles it per epoch with
:class:`~optimlab.data.EpochShuffle`. Here the split is kept as *indices* into one shared copy of
the images on the device (:func:`~optimlab.data.split_indices`, the split the run makes), and each
step gathers every member's batch with one ``index_select``: images ``[P, B, 1, 28, 28]`` and
labels ``[P, B]``; members that share their data and sit side by side (the launcher orders them so)
get one batch per run of them, images ``[G, B, 1, 28, 28]`` (see ``input_groups``). The per-epoch
orders are drawn on the CPU, as the single run draws them, and moved to the device once per epoch:
no host transfer per step.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from optimlab.checks import limit, refusal
from optimlab.data import EpochShuffle, MNISTDataModule, load_split, split_indices
from optimlab.mnist_files import ensure_files, epoch_batches


class PopulationData:
    """The members' data: one copy of MNIST on ``device``, each member's split as index tensors.

    Args:
        datamodules: one (not set up) :class:`~optimlab.data.MNISTDataModule` per member, as each
            member's config instantiates it (members with one data config may share one); only its
            settings are read. Members must share ``root``, ``val_size``, ``batch_size`` and
            ``eval_batch_size``, and have training sets of one size (the same ``subset``): every step
            then has one batch size for all.
        device: where the images and the index tensors live.
        limit_train_batches: ``trainer.limit_train_batches``: the first that many batches of each
            epoch's order (an int), or that fraction of them (a float), as Lightning limits a run's.
        limit_val_batches, limit_test_batches: ``trainer.limit_val_batches`` (the validation set's
            chunks, and the test set's in an epoch's test, which a run runs as its second validation
            loader) and ``trainer.limit_test_batches`` (the final test's), likewise.
    """

    def __init__(self, datamodules: Sequence[MNISTDataModule], device: torch.device | str = "cpu",
                 limit_train_batches: int | float | None = None, limit_val_batches: int | float | None = None,
                 limit_test_batches: int | float | None = None) -> None:
        if not datamodules:
            raise ValueError("a population needs at least one member")
        limits = {"limit_train_batches": limit_train_batches, "limit_val_batches": limit_val_batches,
                  "limit_test_batches": limit_test_batches}
        allowed, words = limit(1)  # the trainer's rule (Lightning's 0, no batches, leaves a population nothing to do)
        for name, value in limits.items():
            if value is not None and not allowed(value):
                raise ValueError(refusal(name, value, f"{words}, or None"))
        first = datamodules[0]
        for key in ("root", "val_size", "batch_size", "eval_batch_size"):
            values = {getattr(dm, key) for dm in datamodules}
            if len(values) > 1:
                raise ValueError(f"data.{key} differs between members ({sorted(map(str, values))}); "
                                 "a population shares it")
        self.device = torch.device(device)
        self.batch_size, self.eval_batch_size = first.batch_size, first.eval_batch_size
        self.seeds = [dm.seed for dm in datamodules]
        # Members that differ only in what they learn with (lr, weight decay, init) see the same
        # batches. Each run of such members side by side gets one gathered batch, which the model's
        # first layer reads for each of them (StackedModel.forward's groups): G batches instead of P
        # copies. On a GPU only a single run (one product, as before); several would cost a product
        # per run and layer, G kernel launches where copies cost one gather (not measured).
        # None: every member its own batch.
        keys = [(dm.seed, dm.subset, dm.label_noise) for dm in datamodules]
        runs = [len(list(run)) for _, run in itertools.groupby(keys)]
        groupable = len(runs) < len(keys) and (self.device.type == "cpu" or len(runs) == 1)
        self.input_groups: list[int] | None = runs if groupable else None
        ensure_files(first.root, first.download)
        images, labels = load_split(first.root, train=True)
        # each distinct split drawn once (a permutation of all 60k images: 2.7 ms), shared by its members
        drawn = {key: split_indices(len(labels), first.val_size, *key[1:], key[0]) for key in dict.fromkeys(keys)}
        splits = [drawn[key] for key in keys]
        sizes = {len(s.train_labels) for s in splits}
        if len(sizes) > 1:
            raise ValueError(f"members' training sets differ in size ({sorted(sizes)}); "
                             "a population shares data.subset")
        self.train_size = sizes.pop()
        self.steps_per_epoch = epoch_batches(self.train_size, self.batch_size, limit_train_batches)
        self.noisy_counts = [s.noisy_count for s in splits]
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.train_images = torch.stack([s.train_images for s in splits]).to(self.device)  # [P, N]
        self.train_labels = torch.stack([s.train_labels for s in splits]).to(self.device)  # [P, N]
        self.val = torch.stack([s.val for s in splits]).to(self.device)  # [P, V]
        if self.input_groups is not None:
            starts = [0, *itertools.accumulate(self.input_groups)][:-1]
            self.first_members = torch.tensor(starts, device=self.device)  # each run's first member
            rows = torch.repeat_interleave(torch.arange(len(starts)), torch.tensor(self.input_groups))
            self.row_of_member = rows.to(self.device)
        test_images, test_labels = load_split(first.root, train=False)
        self.test_images, self.test_labels = test_images.to(self.device), test_labels.to(self.device)
        val, test, chunk = self.val.shape[1], len(test_labels), self.eval_batch_size
        self.val_chunks = epoch_batches(val, chunk, limit_val_batches, "trainer.limit_val_batches")
        self.test_chunks = epoch_batches(test, chunk, limit_test_batches, "trainer.limit_test_batches")
        self.epoch_test_chunks = epoch_batches(test, chunk, limit_val_batches, "trainer.limit_val_batches")

    @property
    def members(self) -> int:
        return len(self.seeds)

    def epoch_indices(self, epoch: int) -> tuple[Tensor, Tensor]:
        """(image indices, label indices), each ``[P, N]`` on the device: every member's training
        items in the order its own run visits them in ``epoch`` (0-based, as Lightning counts)."""
        orders: dict[int, Tensor] = {}  # the order depends on the seed alone: one draw per seed
        for seed in self.seeds:
            if seed not in orders:
                shuffle = EpochShuffle(self.train_size, seed)
                shuffle.set_epoch(epoch)
                orders[seed] = shuffle.permutation()
        order = torch.stack([orders[seed] for seed in self.seeds]).to(self.device)
        return self.train_images.gather(1, order), self.train_labels.gather(1, order)

    def train_batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Every member's batches of ``epoch``: images ``[P, B, 1, 28, 28]`` (or one per run of members
        that share their data, see :meth:`gather`) and labels ``[P, B]``; batch b of member m is batch
        b of member m's own run (the last one may be shorter)."""
        image_idx, label_idx = self.epoch_indices(epoch)
        batches = zip(image_idx.split(self.batch_size, 1), label_idx.split(self.batch_size, 1))
        for _, (images, labels) in zip(range(self.steps_per_epoch), batches):
            yield self.gather(images, labels)

    def val_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Every member's validation set in ``eval_batch_size`` chunks, in its own run's order (the
        first ``limit_val_batches`` of them)."""
        for idx in self.val.split(self.eval_batch_size, 1)[:self.val_chunks]:
            yield self.gather(idx, idx)

    def test_batches(self, every_epoch: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """The shared test set in ``eval_batch_size`` chunks: images ``[B, 1, 28, 28]``, labels ``[B]``;
        the first ``limit_test_batches`` of them, or ``limit_val_batches`` for an epoch's test."""
        chunks = self.epoch_test_chunks if every_epoch else self.test_chunks
        for start in range(0, chunks * self.eval_batch_size, self.eval_batch_size):
            end = start + self.eval_batch_size
            yield self.test_images[start:end], self.test_labels[start:end]

    def gather(self, image_idx: Tensor, label_idx: Tensor) -> tuple[Tensor, Tensor]:
        """Images and labels at index tensors ``[P, B]`` that follow the members' data: labels
        ``[P, B]``; images ``[P, B, ...]``, or, with ``input_groups``, ``[G, B, ...]``, one batch per
        run of members that share their data (pass ``input_groups`` to the model with them). A run's
        labels are its first member's (with one run, expanded: a read-only view)."""
        if self.input_groups is None:
            return self.gather_rows(image_idx, label_idx)
        images, labels = self.gather_rows(image_idx.index_select(0, self.first_members),
                                          label_idx.index_select(0, self.first_members))
        return images, self.per_member(labels)

    def per_member(self, rows: Tensor) -> Tensor:
        """Rows as :meth:`gather` gathers them (one per run with ``input_groups``) as ``[P, ...]``, one
        per member (an expanded view for one run, else copies)."""
        if self.input_groups is None:
            return rows
        if len(self.input_groups) == 1:
            return rows.expand(self.members, *rows.shape[1:])
        return rows.index_select(0, self.row_of_member)

    def gather_rows(self, image_idx: Tensor, label_idx: Tensor) -> tuple[Tensor, Tensor]:
        """Images and labels at index tensors ``[P, B]``, each row its own (one gather each)."""
        images = self.images.index_select(0, image_idx.reshape(-1))
        labels = self.labels.index_select(0, label_idx.reshape(-1))
        return images.view(*image_idx.shape, *self.images.shape[1:]), labels.view(label_idx.shape)
