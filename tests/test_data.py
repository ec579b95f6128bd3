"""The MNIST data module: real loading path on tiny IDX files, real MNIST split/noise, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from optimlab.data import EpochShuffle, MNISTDataModule, TensorBatches, load_split, split_indices
from optimlab.mnist_files import DataError


def module(root: Path, **kw) -> MNISTDataModule:
    dm = MNISTDataModule(root=str(root), download=False, **kw)
    dm.setup()
    return dm


def test_tiny_idx_files_load(tiny_mnist: Path) -> None:
    dm = module(tiny_mnist, val_size=16, batch_size=10)
    assert dm.train_x.shape == (48, 1, 28, 28) and dm.val_x.shape == (16, 1, 28, 28)
    assert dm.test_x.shape == (32, 1, 28, 28)
    assert dm.train_x.dtype == torch.float32 and 0 <= dm.train_x.min() and dm.train_x.max() <= 1
    batches = list(dm.train_dataloader())
    assert [len(y) for _, y in batches] == [10, 10, 10, 10, 8]  # the leftover batch is kept
    seen = torch.cat([x for x, _ in batches]).flatten(1)
    assert torch.allclose(seen.sum(0), dm.train_x.flatten(1).sum(0))  # every image once per epoch


def test_the_raw_files_are_read_as_torchvision_reads_them_and_its_stale_cache_is_ignored(tiny_mnist: Path) -> None:
    from torchvision.datasets import MNIST

    for train in (True, False):
        images, labels = load_split.__wrapped__(tiny_mnist, train)
        reference = MNIST(str(tiny_mnist), train=train, download=False)
        assert torch.equal(images, reference.data.unsqueeze(1).float().div(255.0))
        assert torch.equal(labels, reference.targets.long())
    # torchvision's processed/ cache: all-zero images with label 0, which torchvision would load instead
    processed = tiny_mnist / "MNIST" / "processed"
    processed.mkdir(parents=True)
    for name, n in (("training.pt", 64), ("test.pt", 32)):
        torch.save((torch.zeros(n, 28, 28, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64)), processed / name)
    dm = module(tiny_mnist, val_size=16, batch_size=10)
    assert dm.train_x.abs().sum() > 0 and dm.test_x.abs().sum() > 0 and dm.test_y.unique().numel() > 1


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    a, b = EpochShuffle(100, seed=3), EpochShuffle(100, seed=3)
    a.set_epoch(4)
    b.set_epoch(0)
    b.permutation()
    b.set_epoch(4)  # as after a resume at epoch 4
    assert torch.equal(a.permutation(), b.permutation())
    b.set_epoch(5)
    assert not torch.equal(a.permutation(), b.permutation())
    loader = TensorBatches(torch.arange(10.0), torch.arange(10), 4)
    assert [y.tolist() for _, y in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_missing_files_name_the_four_files_and_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        module(tmp_path / "nowhere")
    message = str(err.value)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte", str(tmp_path / "nowhere" / "MNIST" / "raw"), "MNIST_ROOT"):
        assert name in message


@pytest.mark.parametrize("damage", ["truncate", "header", "magic", "count"])
def test_corrupted_idx_files_give_a_clear_error(tiny_mnist: Path, damage: str) -> None:
    path = tiny_mnist / "MNIST" / "raw" / "train-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "header":
        data = data[:10]
    elif damage == "magic":
        data[3] = 0x01
    else:  # labels promise more items than the images have
        lab = tiny_mnist / "MNIST" / "raw" / "train-labels-idx1-ubyte"
        lab.write_bytes(lab.read_bytes() + b"\x01")
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"^data\.root: .*train-(images|labels)"):  # naming the key (a probe)
        module(tiny_mnist)


def test_a_label_outside_the_ten_classes_is_refused_naming_data_root(tiny_mnist: Path) -> None:
    path = tiny_mnist / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[8] = 12  # the first label (after the 8-byte header)
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"^data\.root: .*: labels outside 0\.\.9 in the train split$"):
        module(tiny_mnist)


def test_subset_larger_than_the_data_is_refused(tiny_mnist: Path) -> None:
    with pytest.raises(DataError, match="data.subset"):
        module(tiny_mnist, val_size=16, subset=49)


def test_real_mnist_split_subset_and_label_noise(mnist_root: Path) -> None:
    dm = module(mnist_root)
    assert (len(dm.train_y), len(dm.val_y), len(dm.test_y)) == (55_000, 5_000, 10_000)
    assert torch.bincount(torch.cat([dm.train_y, dm.val_y])).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    again = module(mnist_root)
    assert torch.equal(dm.val_y, again.val_y) and torch.equal(dm.train_x[:100], again.train_x[:100])
    other_seed = module(mnist_root, seed=1)
    assert not torch.equal(dm.val_y, other_seed.val_y)

    noisy = module(mnist_root, label_noise=0.5)
    moved = (noisy.train_x != dm.train_x).flatten(1).any(1)
    assert noisy.noisy_count == 27_500 and moved.sum().item() == 27_500  # every chosen image moved
    assert torch.equal(noisy.train_y, dm.train_y) and torch.equal(noisy.val_x, dm.val_x)  # val stays clean
    assert torch.equal(noisy.train_x, module(mnist_root, label_noise=0.5).train_x)  # deterministic

    small = module(mnist_root, subset=8000)
    assert len(small.train_y) == 8000 and torch.equal(small.train_y, dm.train_y[:8000])
    images, _ = load_split(Path(str(mnist_root)), train=True)
    assert images.shape == (60_000, 1, 28, 28)


def test_the_split_draws_are_pinned() -> None:
    """Every run's data rests on these draws (the single run's and each population member's): the split's
    permutation, then the label-noise cycle, from one generator seeded by the run's seed."""
    split = split_indices(60_000, 5000, 1000, 0.5, 3)
    assert split.val[:4].tolist() == [38986, 46111, 53123, 54054]
    assert split.train_labels[:4].tolist() == [39466, 19824, 52356, 34159]
    assert split.train_images[:6].tolist() == [52681, 24621, 52356, 34159, 39968, 51919]  # moved along a cycle
    assert split.noisy_count == 500 == int((split.train_images != split.train_labels).sum())
    assert sorted(split.train_images.tolist()) == sorted(split.train_labels.tolist())  # images moved, none lost


def test_a_failed_download_leaves_no_folders_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, ``data.root=<new folder>`` made that folder and its MNIST/raw/ before the download failed,
    and they stayed (a probe); folders that existed stay, as does one the download wrote a file into."""
    import torchvision.datasets

    from optimlab.mnist_files import ensure_files

    def offline(root: str, **kwargs: object) -> None:
        (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    for root in (tmp_path / "new" / "mnist", tmp_path):
        with pytest.raises(DataError, match=r"MNIST files missing from .*t10k-labels-idx1-ubyte \(the download failed: "
                                            r"RuntimeError: Error downloading train-images-idx3-ubyte.gz\)\. Put"):
            ensure_files(root, download=True)  # why it failed (a review: the error was dropped)
    assert list(tmp_path.iterdir()) == []

    def partial(root: str, **kwargs: object) -> None:
        (Path(root) / "MNIST" / "raw").mkdir(parents=True)
        (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"")
        raise RuntimeError("Error downloading train-labels-idx1-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", partial)
    with pytest.raises(DataError):
        ensure_files(tmp_path / "new", download=True)
    assert [p.name for p in (tmp_path / "new" / "MNIST" / "raw").iterdir()] == ["train-images-idx3-ubyte.gz"]
