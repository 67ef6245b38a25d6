"""The bundled MNIST subset and the loaders for datasets on disk (files written here in their formats)."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from bnlab.lab import data, disk_data


def test_bundled_subset_is_real_balanced_mnist():
    images, labels = data.load_bundled_mnist()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and np.bincount(labels).tolist() == [500] * 10
    # MNIST digits: dark background, about 19 % of pixels lit, mean intensity near 33/255.
    assert 25 < images.mean() < 40 and 0.1 < (images > 128).mean() < 0.3


def test_bundled_split_is_shuffled_fixed_and_disjoint():
    train, test = data.load()
    again, _ = data.load()
    assert train.x.shape == (4000, 1, 28, 28) and test.x.shape == (1000, 1, 28, 28)
    assert train.x.dtype == torch.float32 and 0.0 <= float(train.x.min()) and float(train.x.max()) <= 1.0
    assert torch.equal(train.x, again.x) and torch.equal(train.y, again.y)
    # The file is sorted by class: after the shuffle the first 1,000 training images hold every class.
    counts = torch.bincount(train.y[:1000], minlength=10)
    assert int(counts.min()) > 60, counts.tolist()
    # No image is in both parts (the subset holds no duplicate images).
    flat_train = {bytes(row) for row in (train.x.flatten(1) * 255).round().to(torch.uint8).numpy()}
    assert not any(bytes(row) in flat_train for row in (test.x.flatten(1) * 255).round().to(torch.uint8).numpy())


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(folder, n_train=6, n_test=4, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28)), "train_labels": rng.integers(0, 10, n_train),
              "test_images": rng.integers(0, 256, (n_test, 28, 28)), "test_labels": rng.integers(0, 10, n_test)}
    for key, name in disk_data.MNIST_FILES.items():
        raw = _idx_bytes(arrays[key])
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("layout,gz", [("", False), ("", True), ("MNIST/raw", True), ("MNIST/raw", False)])
def test_mnist_idx_layouts(tmp_path, layout, gz):
    arrays = _write_mnist(tmp_path / layout if layout else tmp_path, gz=gz)
    train, test = data.load("mnist", tmp_path)
    assert train.x.shape == (6, 1, 28, 28) and test.x.shape == (4, 1, 28, 28)
    np.testing.assert_array_equal((train.x[:, 0] * 255).round().numpy(), arrays["train_images"])
    np.testing.assert_array_equal(test.y.numpy(), arrays["test_labels"])


def test_missing_mnist_file_lists_expected_paths(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as err:
        data.load("mnist", tmp_path)
    message = str(err.value)
    for expected in (tmp_path / "t10k-labels-idx1-ubyte", tmp_path / "t10k-labels-idx1-ubyte.gz",
                     tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"):
        assert str(expected) in message


def test_idx_rejects_a_file_that_is_not_idx(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"\x89PNG not idx")
    with pytest.raises(ValueError, match="expected an IDX file"):
        disk_data.read_idx(path)
    path.write_bytes(_idx_bytes(np.zeros((3, 2), np.uint8))[:-1])
    with pytest.raises(ValueError, match="data bytes"):
        disk_data.read_idx(path)


def _cifar_batch(n, label_key, bytes_keys, seed):
    rng = np.random.default_rng(seed)
    batch = {"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), label_key: rng.integers(0, 10, n).tolist()}
    if bytes_keys:
        batch = {k.encode(): v for k, v in batch.items()}
    return batch


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar10_pickles(tmp_path, bytes_keys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = _cifar_batch(3, "labels", bytes_keys, i)
        (folder / name).write_bytes(pickle.dumps(batches[name], protocol=2))
    train, test = data.load("cifar10", tmp_path)
    assert train.x.shape == (15, 3, 32, 32) and test.x.shape == (3, 3, 32, 32) and train.num_classes == 10
    key = b"data" if bytes_keys else "data"
    first = batches["data_batch_1"][key][0].reshape(3, 32, 32)  # channel-major rows, as CIFAR stores them
    np.testing.assert_array_equal((train.x[0] * 255).round().numpy(), first)


def test_cifar100_fine_labels_and_missing_files(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(pickle.dumps(_cifar_batch(4, "fine_labels", True, 0)))
    with pytest.raises(FileNotFoundError, match="cifar-100-python/test"):
        data.load("cifar100", tmp_path)
    (folder / "test").write_bytes(pickle.dumps(_cifar_batch(2, "fine_labels", False, 1)))
    train, test = data.load("cifar100", tmp_path)
    assert train.num_classes == 100 and len(train) == 4 and len(test) == 2


def test_cifar_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(pickle.dumps({"data": Evil(), "fine_labels": []}))
    (folder / "test").write_bytes(pickle.dumps({"data": Evil(), "fine_labels": []}))
    with pytest.raises(ValueError, match=r"cannot be read as one \(UnpicklingError: refusing to load builtins.print"):
        data.load("cifar100", tmp_path)


def test_damaged_or_wrong_files_are_named_before_training(tmp_path):
    # each failed only mid-run before (an EOFError or UnpicklingError traceback, or a loss that
    # refused label 10, or a linear layer that refused 20x20 images), after the run folder existed
    _write_mnist(tmp_path / "m", gz=True)
    name = disk_data.MNIST_FILES["train_images"]
    whole = (tmp_path / "m" / f"{name}.gz").read_bytes()
    (tmp_path / "m" / f"{name}.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=rf"{name}.gz: expected a complete gzip file, got one that cannot be read"):
        data.load("mnist", tmp_path / "m")
    (tmp_path / "m" / f"{name}.gz").write_bytes(whole)
    labels = tmp_path / "m" / f"{disk_data.MNIST_FILES['test_labels']}.gz"
    labels.write_bytes(gzip.compress(_idx_bytes(np.array([1, 10, 3, 4]))))
    with pytest.raises(ValueError, match=r"data_dir: expected MNIST test labels in 0..9, got values from 1 to 10"):
        data.load("mnist", tmp_path / "m")
    labels.write_bytes(gzip.compress(_idx_bytes(np.array([1, 2, 3, 4]))))
    (tmp_path / "m" / f"{name}.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros((6, 20, 20)))))
    with pytest.raises(ValueError, match=r"data_dir: expected MNIST train images of 28x28 pixels, got \(20, 20\)"):
        data.load("mnist", tmp_path / "m")

    folder = tmp_path / "c" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        (folder / name).write_bytes(pickle.dumps(_cifar_batch(3, "labels", True, i), protocol=2))
    whole = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(whole[:100])
    with pytest.raises(ValueError, match=r"test_batch: expected a CIFAR python batch \(a pickled dict of arrays\)"):
        data.load("cifar10", tmp_path / "c")
    batch = _cifar_batch(3, "labels", True, 0)
    batch[b"labels"][1] = 12
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=r"data_dir: expected CIFAR-10 test labels in 0..9, got values from \d+ to 12"):
        data.load("cifar10", tmp_path / "c")


def test_bad_dataset_arguments():
    with pytest.raises(ValueError, match="dataset: expected one of"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="data_dir"):
        data.load("cifar10", None)
