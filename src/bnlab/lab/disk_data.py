"""Loaders for full datasets already on disk: MNIST as IDX files, CIFAR-10/100 as python pickles.

Accepted layouts (``DIR`` is the ``--data-dir`` argument):

- MNIST: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``), in ``DIR``, ``DIR/raw`` or
  ``DIR/MNIST/raw`` (torchvision's layout).
- CIFAR-10: ``data_batch_1`` … ``data_batch_5`` and ``test_batch`` in ``DIR/cifar-10-batches-py``
  or in ``DIR`` itself.
- CIFAR-100: ``train`` and ``test`` in ``DIR/cifar-100-python`` or in ``DIR`` itself (fine labels).

Pickle keys may be bytes (the original files, written by Python 2) or str. Pickles are read
with an unpickler that accepts only NumPy arrays and plain containers, so a file that is not a
CIFAR batch cannot run code.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from pathlib import Path

import numpy as np

__all__ = ["load_mnist_idx", "read_idx", "load_cifar", "MNIST_FILES"]

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _find(candidates: list[Path], what: str, data_dir: Path) -> Path:
    for path in candidates:
        if path.is_file():
            return path
    listed = "\n  ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"data_dir: no {what} under {data_dir}; expected one of:\n  {listed}")


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped if its name ends in .gz) into an array of its stored shape.

    Raises ValueError naming the file when the header is not IDX or the size does not match.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:  # a truncated or damaged download
        raise ValueError(f"{path}: expected a complete gzip file, got one that cannot be read ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: expected an IDX file (magic 0x0000TTNN), got header bytes {raw[:4].hex()}")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(
            f"{path}: expected {expected} data bytes for shape {shape} and dtype {dtype}, got {len(raw) - offset}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))  # a writable native copy


def load_mnist_idx(data_dir: str | Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """MNIST from its four IDX files under ``data_dir`` (see the module docstring for the layouts).

    Returns:
        ((train_images, train_labels), (test_images, test_labels)); images uint8 (N, 28, 28),
        labels uint8 (N,).
    """
    data_dir = Path(data_dir)
    bases = [data_dir, data_dir / "raw", data_dir / "MNIST" / "raw"]
    arrays = {}
    for key, name in MNIST_FILES.items():
        candidates = [base / f"{name}{ext}" for base in bases for ext in ("", ".gz")]
        arrays[key] = read_idx(_find(candidates, f"MNIST file {name}", data_dir))
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"data_dir: MNIST {part} files disagree: images of shape {images.shape}, labels of shape {labels.shape}"
            )
        # checked here, not by the first training step, which would fail after the run folder exists
        if images.shape[1:] != (28, 28):
            raise ValueError(f"data_dir: expected MNIST {part} images of 28x28 pixels, got {images.shape[1:]}")
        _check_labels(labels, 10, f"MNIST {part} labels")
    return (arrays["train_images"], arrays["train_labels"]), (arrays["test_images"], arrays["test_labels"])


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays and plain containers only (what a CIFAR batch holds), nothing callable."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
    """Class labels in 0..num_classes-1 (a label out of range fails only inside the loss, mid-run)."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"data_dir: expected {what} in 0..{num_classes - 1}, got values from {labels.min()} "
                         f"to {labels.max()}")


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        # truncated, not a pickle, or holding other objects than a CIFAR batch's
        raise ValueError(f"{path}: expected a CIFAR python batch (a pickled dict of arrays), got a file that "
                         f"cannot be read as one ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict with 'data' and '{label_key}', got {type(batch).__name__}")
    batch = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: expected keys 'data' and '{label_key}', got {sorted(batch)}")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{path}: expected data (N, 3072) and N labels, got data {data.shape} and {labels.shape} labels")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(data_dir: str | Path, num_classes: int = 10) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """CIFAR-10 or CIFAR-100 from the python pickle batches under ``data_dir``.

    Args:
        data_dir: the folder holding ``cifar-10-batches-py``/``cifar-100-python``, or that folder itself.
        num_classes: 10 or 100.

    Returns:
        ((train_images, train_labels), (test_images, test_labels)); images uint8 (N, 3, 32, 32),
        labels int64 (N,).
    """
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes: expected 10 (CIFAR-10) or 100 (CIFAR-100), got {num_classes!r}")
    data_dir = Path(data_dir)
    if num_classes == 10:
        sub, train_names, test_name, label_key = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels"
    else:
        sub, train_names, test_name, label_key = "cifar-100-python", ["train"], "test", "fine_labels"
    bases = [data_dir / sub, data_dir]

    def path_of(name: str) -> Path:
        return _find([base / name for base in bases], f"CIFAR-{num_classes} file {name}", data_dir)

    parts = [_read_batch(path_of(name), label_key) for name in train_names]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = _read_batch(path_of(test_name), label_key)
    for part, labels in (("train", train[1]), ("test", test[1])):
        _check_labels(labels, num_classes, f"CIFAR-{num_classes} {part} labels")
    return train, test
