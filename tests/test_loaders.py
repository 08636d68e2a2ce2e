"""Tests for the dataset readers in tfsplit.data (CIFAR, Fashion-MNIST, STL-10, image folders).

Every reader is tested against small files the test writes in the real formats, through the public
`tfsplit.data.load_arrays` / `build_datasets`, plus its error messages.
"""

import gzip
import io
import os
import pickle
import socket
import struct
import tarfile

# isort: off
import tfsplit  # noqa: F401  (first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: on
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from tfsplit import data
from tfsplit.data import common, fashion_mnist, image_folder, stl10


def _epoch(dataset):
    batches = list(dataset.as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


# ----------------------------------------------------------------------------------------------
# Shared helpers: resizing.
# ----------------------------------------------------------------------------------------------


def test_resize_images_keeps_the_size_it_already_has():
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    assert common.resize_images(images, 4) is images


def test_resize_images_shapes_flat_colours_and_averages():
    colours = np.array([[10, 200, 30], [255, 0, 128]], np.uint8)
    flat = np.broadcast_to(colours[:, None, None, :], (2, 12, 10, 3)).copy()
    out = common.resize_images(flat, 5)  # non-square in, square out: the aspect is not kept
    assert out.shape == (2, 5, 5, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.broadcast_to(colours[:, None, None, :], out.shape))
    # Halving a checker of 0 and 100 with the antialiasing (triangle) filter: every output pixel
    # weighs 4 input pixels per axis by 1/8, 3/8, 3/8, 1/8, so inside it is exactly 50; at the
    # border the filter is cut and renormalized, which moves it by at most one level.
    checker = (np.indices((8, 8)).sum(axis=0) % 2 * 100).astype(np.uint8)[None, ..., None]
    halved = common.resize_images(checker, 4)[0, ..., 0]
    np.testing.assert_array_equal(halved[1:3, 1:3], 50)
    np.testing.assert_allclose(halved, 50, atol=1)


def test_resize_images_rejects_bad_size():
    with pytest.raises(ValueError, match="image_size"):
        common.resize_images(np.zeros((1, 4, 4, 3), np.uint8), 0)


# ----------------------------------------------------------------------------------------------
# CIFAR from local files and through keras.datasets.
# ----------------------------------------------------------------------------------------------

_LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": ("cifar-100-python", ["train"], ["test"]),
}


def _fake_cifar(name, per_file=2):
    """{file name: pickled bytes} in the CIFAR python layout, and the HWC images and labels."""
    folder, train_files, test_files = _LAYOUTS[name]
    rng = np.random.default_rng(0)
    files, expected = {}, {"train": ([], []), "test": ([], [])}
    for split, names in (("train", train_files), ("test", test_files)):
        for file_name in names:
            images = rng.integers(0, 256, (per_file, 32, 32, 3), dtype=np.uint8)
            labels = list(rng.integers(0, 10 if name == "cifar10" else 100, per_file))
            # CIFAR rows are CHW: 1024 red values, then green, then blue.
            batch = {b"data": images.transpose(0, 3, 1, 2).reshape(per_file, 3072)}
            if name == "cifar10":
                batch[b"labels"] = labels
            else:
                batch.update({b"fine_labels": labels, b"coarse_labels": [0] * per_file})
            files[f"{folder}/{file_name}"] = pickle.dumps(batch, protocol=2)
            expected[split][0].append(images)
            expected[split][1].append(labels)
    joined = {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in expected.items()}
    return files, joined


def _write_folder(root, files):
    for relative, raw in files.items():
        os.makedirs(os.path.join(root, os.path.dirname(relative)), exist_ok=True)
        with open(os.path.join(root, relative), "wb") as handle:
            handle.write(raw)


def _write_tar(path, files):
    with tarfile.open(path, "w:gz") as archive:
        for relative, raw in files.items():
            member = tarfile.TarInfo(relative)
            member.size = len(raw)
            archive.addfile(member, io.BytesIO(raw))


def _assert_loaded(result, expected, name):
    (x, y), (xt, yt), info = result
    np.testing.assert_array_equal(x, expected["train"][0])
    np.testing.assert_array_equal(y, expected["train"][1])
    np.testing.assert_array_equal(xt, expected["test"][0])
    np.testing.assert_array_equal(yt, expected["test"][1])
    assert x.dtype == np.uint8 and y.dtype == np.int32 and yt.dtype == np.int32
    assert info.name == name and info.image_shape == (32, 32, 3)
    assert info.num_classes == (10 if name == "cifar10" else 100)
    assert (info.train_size, info.test_size) == (len(x), len(xt))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_extracted_directory(tmp_path, name):
    files, expected = _fake_cifar(name)
    _write_folder(tmp_path, files)
    folder = tmp_path / _LAYOUTS[name][0]
    _assert_loaded(data.load_arrays(name, path=folder), expected, name)
    _assert_loaded(data.load_arrays(name, path=str(tmp_path)), expected, name)  # the parent


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_tar_gz(tmp_path, name):
    files, expected = _fake_cifar(name)
    archive = tmp_path / ("cifar-10-python.tar.gz" if name == "cifar10" else "c100.tar.gz")
    _write_tar(archive, files)
    _assert_loaded(data.load_arrays(name, path=archive), expected, name)


def test_cifar_pixel_order_is_chw_to_hwc(tmp_path):
    files, _ = _fake_cifar("cifar10", per_file=1)
    row = np.zeros(3072, np.uint8)
    row[0], row[1], row[32], row[1024], row[2048 + 1023] = 10, 20, 30, 40, 50
    files["cifar-10-batches-py/test_batch"] = pickle.dumps({b"data": row[None], b"labels": [7]})
    _write_folder(tmp_path, files)
    _, (xt, yt), _ = data.load_arrays("cifar10", path=tmp_path)
    image = xt[0]
    assert (image[0, 0, 0], image[0, 1, 0], image[1, 0, 0]) == (10, 20, 30)  # red: row-major
    assert image[0, 0, 1] == 40  # first green value
    assert image[31, 31, 2] == 50  # last blue value
    assert yt.tolist() == [7]


def test_cifar_sizes_take_the_first_samples(tmp_path):
    files, expected = _fake_cifar("cifar10")
    _write_folder(tmp_path, files)
    (x, y), (xt, _), info = data.load_arrays("cifar10", path=tmp_path, train_size=3, test_size=1)
    np.testing.assert_array_equal(x, expected["train"][0][:3])
    np.testing.assert_array_equal(y, expected["train"][1][:3])
    assert len(xt) == 1 and (info.train_size, info.test_size) == (3, 1)
    with pytest.raises(ValueError, match="train_size=11"):
        data.load_arrays("cifar10", path=tmp_path, train_size=11)


def test_cifar_pipelines_from_local_files(tmp_path):
    files, _ = _fake_cifar("cifar100")
    _write_tar(tmp_path / "cifar-100-python.tar.gz", files)
    train, _, test, info = data.build_datasets(
        "cifar100", 2, 4, path=tmp_path / "cifar-100-python.tar.gz"
    )
    assert info.num_classes == 100
    images, labels = _epoch(train)
    assert images.shape == (2, 32, 32, 3) and labels.dtype == np.int32
    assert _epoch(test)[0].shape == (2, 32, 32, 3)


def test_cifar_missing_path_names_what_is_expected(tmp_path):
    missing = tmp_path / "nowhere" / "cifar-10-python.tar.gz"
    with pytest.raises(data.DatasetFileError, match="does not exist") as error:
        data.load_arrays("cifar10", path=missing)
    assert str(missing) in str(error.value) and "cifar-10-batches-py" in str(error.value)


def test_cifar_missing_batch_file_is_named(tmp_path):
    files, _ = _fake_cifar("cifar10")
    del files["cifar-10-batches-py/data_batch_3"]
    _write_folder(tmp_path, files)
    with pytest.raises(data.DatasetFileError, match="data_batch_3"):
        data.load_arrays("cifar10", path=tmp_path / "cifar-10-batches-py")
    _write_tar(tmp_path / "partial.tar.gz", files)
    with pytest.raises(data.DatasetFileError, match="lacks cifar-10-batches-py/data_batch_3"):
        data.load_arrays("cifar10", path=tmp_path / "partial.tar.gz")


def test_cifar_corrupt_files_are_named(tmp_path):
    files, _ = _fake_cifar("cifar100")
    files["cifar-100-python/test"] = b"not a pickle"
    _write_folder(tmp_path, files)
    with pytest.raises(data.DatasetFileError, match="cifar-100-python/test is corrupt"):
        data.load_arrays("cifar100", path=tmp_path)
    files["cifar-100-python/test"] = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})
    _write_folder(tmp_path, files)
    with pytest.raises(data.DatasetFileError, match="fine_labels"):
        data.load_arrays("cifar100", path=tmp_path)
    files["cifar-100-python/test"] = pickle.dumps(
        {b"data": np.zeros((2, 5)), b"fine_labels": [1, 2]}
    )
    _write_folder(tmp_path, files)
    with pytest.raises(data.DatasetFileError, match=r"\(N, 3072\)"):
        data.load_arrays("cifar100", path=tmp_path)
    not_tar = tmp_path / "cifar-100-python.tar.gz"
    not_tar.write_bytes(b"garbage")
    with pytest.raises(data.DatasetFileError, match="Cannot read CIFAR-100 archive"):
        data.load_arrays("cifar100", path=not_tar)


def test_cifar_offline_download_fails_with_a_clear_message(monkeypatch):
    def offline(**kwargs):
        raise Exception("URL fetch failure: [Errno -2] Name or service not known")

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    timeout_before = socket.getdefaulttimeout()
    with pytest.raises(data.DatasetDownloadError) as error:
        data.load_arrays("cifar10")
    message = str(error.value)
    assert "offline" in message and "Name or service not known" in message
    assert "cifar-10-python.tar.gz" in message and "`path`" in message
    assert socket.getdefaulttimeout() == timeout_before


def test_cifar_keras_download_path_converts_arrays(monkeypatch):
    calls = []

    def fake_load_data(**kwargs):
        calls.append(kwargs)
        images = np.zeros((3, 32, 32, 3), np.uint8)
        return (images, np.array([[1], [2], [3]], np.int64)), (images[:1], np.array([[4]]))

    monkeypatch.setattr(keras.datasets.cifar100, "load_data", fake_load_data)
    (x, y), (xt, yt), info = data.load_arrays("cifar100", test_size=1)
    assert calls == [{"label_mode": "fine"}]
    assert y.tolist() == [1, 2, 3] and y.dtype == np.int32 and yt.tolist() == [4]
    assert info.num_classes == 100 and info.train_size == 3


def test_cifar_can_be_resized(tmp_path):
    files, expected = _fake_cifar("cifar10")
    _write_folder(tmp_path, files)
    (x, _), (xt, _), info = data.load_arrays("cifar10", path=tmp_path, image_size=16)
    assert x.shape == (10, 16, 16, 3) and xt.shape == (2, 16, 16, 3)
    assert info.image_shape == (16, 16, 3)
    np.testing.assert_allclose(x.mean(), expected["train"][0].mean(), atol=2.0)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST: IDX files and keras.datasets.
# ----------------------------------------------------------------------------------------------


def _idx(array, type_code=0x08):
    """The IDX encoding of a uint8 array: zero, zero, type, ndim, big-endian dims, then data."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _fashion_arrays(train=5, test=3):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (train + test, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, train + test).astype(np.uint8)
    return {
        "train-images-idx3-ubyte": images[:train],
        "train-labels-idx1-ubyte": labels[:train],
        "t10k-images-idx3-ubyte": images[train:],
        "t10k-labels-idx1-ubyte": labels[train:],
    }


def _write_fashion(directory, arrays, gzipped=()):
    os.makedirs(directory, exist_ok=True)
    for name, array in arrays.items():
        raw = _idx(array)
        if name in gzipped:
            name, raw = name + ".gz", gzip.compress(raw)
        with open(os.path.join(directory, name), "wb") as handle:
            handle.write(raw)


def test_parse_idx_reads_the_header_shape():
    raw = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(fashion_mnist.parse_idx(raw, 2, "x"), [[1, 2, 3], [4, 5, 6]])


def test_readers_validate_their_arguments():
    with pytest.raises(ValueError, match="raw"):
        fashion_mnist.parse_idx("text", 1, "x")
    with pytest.raises(ValueError, match="ndim"):
        fashion_mnist.parse_idx(b"", 0, "x")
    with pytest.raises(ValueError, match="count"):
        stl10.parse_labels(b"\x01", "x", 0)
    with pytest.raises(ValueError, match="train_size"):
        common.take_first((np.zeros(3), np.zeros(3)), 0, "train", "X")
    with pytest.raises(ValueError, match="image_size"):
        stl10.load("/nowhere", image_size=-1)


@pytest.mark.parametrize("gzipped", [(), "all", ("train-images-idx3-ubyte",)])
def test_fashion_from_idx_files_is_padded_to_32_with_one_channel(tmp_path, gzipped):
    arrays = _fashion_arrays()
    _write_fashion(tmp_path, arrays, tuple(arrays) if gzipped == "all" else gzipped)
    (x, y), (xt, yt), info = data.load_arrays("fashion_mnist", path=tmp_path)
    assert x.shape == (5, 32, 32, 1) and xt.shape == (3, 32, 32, 1) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[:, 2:30, 2:30, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(xt[:, 2:30, 2:30, 0], arrays["t10k-images-idx3-ubyte"])
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not x[:, border].any()  # 2 black pixels on every side
    assert y.dtype == np.int32 and y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert yt.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert info == data.DatasetInfo("fashion_mnist", 10, (32, 32, 1), 5, 3, (0.2860,), (0.3530,))


def test_fashion_size_and_channel_options(tmp_path):
    arrays = _fashion_arrays()
    _write_fashion(tmp_path, arrays)
    (x, _), _, info = data.load_arrays("fashion_mnist", path=tmp_path, image_size=28)
    np.testing.assert_array_equal(x[..., 0], arrays["train-images-idx3-ubyte"])
    assert info.image_shape == (28, 28, 1)
    (x, _), (xt, _), info = data.load_arrays("fashion_mnist", path=tmp_path, channels=3)
    assert x.shape == (5, 32, 32, 3) and xt.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(x[..., 1], x[..., 0])
    np.testing.assert_array_equal(x[..., 2], x[..., 0])
    assert info.mean == (0.2860,) * 3 and info.std == (0.3530,) * 3
    (x, _), _, info = data.load_arrays("fashion_mnist", path=tmp_path, image_size=14, channels=1)
    assert x.shape == (5, 14, 14, 1) and info.image_shape == (14, 14, 1)
    (x, _), _, _ = data.load_arrays("fashion_mnist", path=tmp_path, train_size=2, test_size=1)
    np.testing.assert_array_equal(x[:, 2:30, 2:30, 0], arrays["train-images-idx3-ubyte"][:2])


def test_fashion_rejects_wrong_magic_numbers(tmp_path):
    arrays = _fashion_arrays()
    _write_fashion(tmp_path, arrays)
    labels_file = tmp_path / "train-labels-idx1-ubyte"
    labels_file.write_bytes(_idx(arrays["train-images-idx3-ubyte"]))  # images where labels go
    with pytest.raises(data.DatasetFileError, match="magic number 0x00000803, expected 0x00000801"):
        data.load_arrays("fashion_mnist", path=tmp_path)
    _write_fashion(tmp_path, arrays)
    images = arrays["t10k-images-idx3-ubyte"]
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(images, type_code=0x0D))  # floats
    with pytest.raises(data.DatasetFileError, match="t10k-images-idx3-ubyte is not an IDX"):
        data.load_arrays("fashion_mnist", path=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00")
    with pytest.raises(data.DatasetFileError, match="under 4 bytes"):
        data.load_arrays("fashion_mnist", path=tmp_path)


def test_fashion_rejects_corrupt_and_missing_files(tmp_path):
    arrays = _fashion_arrays()
    _write_fashion(tmp_path, arrays)
    images_file = tmp_path / "train-images-idx3-ubyte"
    images_file.write_bytes(_idx(arrays["train-images-idx3-ubyte"])[:-1])
    with pytest.raises(data.DatasetFileError, match="truncated"):
        data.load_arrays("fashion_mnist", path=tmp_path)
    images_file.unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(data.DatasetFileError, match="Cannot read .*train-images-idx3-ubyte.gz"):
        data.load_arrays("fashion_mnist", path=tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(data.DatasetFileError, match=r"not found: .*train-images-idx3-ubyte\[.gz\]"):
        data.load_arrays("fashion_mnist", path=tmp_path)
    with pytest.raises(data.DatasetFileError, match="not a directory"):
        data.load_arrays("fashion_mnist", path=tmp_path / "nowhere")


def test_fashion_rejects_inconsistent_contents(tmp_path):
    arrays = _fashion_arrays()
    arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"][:4]
    _write_fashion(tmp_path, arrays)
    with pytest.raises(data.DatasetFileError, match="5 images but 4 labels"):
        data.load_arrays("fashion_mnist", path=tmp_path)
    arrays = _fashion_arrays()
    arrays["t10k-labels-idx1-ubyte"][1] = 10
    _write_fashion(tmp_path, arrays)
    with pytest.raises(data.DatasetFileError, match="label 10; expected 0..9"):
        data.load_arrays("fashion_mnist", path=tmp_path)
    arrays = _fashion_arrays()
    arrays["train-images-idx3-ubyte"] = np.zeros((5, 32, 32), np.uint8)
    _write_fashion(tmp_path, arrays)
    with pytest.raises(data.DatasetFileError, match=r"\(5, 32, 32\); expected \(N, 28, 28\)"):
        data.load_arrays("fashion_mnist", path=tmp_path)


def test_fashion_offline_download_fails_with_a_clear_message(monkeypatch):
    def offline():
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    timeout_before = socket.getdefaulttimeout()
    with pytest.raises(data.DatasetDownloadError) as error:
        data.load_arrays("fashion_mnist")
    message = str(error.value)
    assert "offline" in message and "Temporary failure in name resolution" in message
    assert "t10k-labels-idx1-ubyte.gz" in message and "`path`" in message
    assert socket.getdefaulttimeout() == timeout_before


def _fake_fashion_download(monkeypatch, train=6, test=4):
    arrays = _fashion_arrays(train, test)

    def load_data():
        return (
            (arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]),
            (arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]),
        )

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", load_data)
    return arrays


def test_fashion_keras_download_path_is_padded_and_converted(monkeypatch):
    arrays = _fake_fashion_download(monkeypatch)
    (x, y), (xt, yt), info = data.load_arrays("fashion_mnist")
    assert x.shape == (6, 32, 32, 1) and xt.shape == (4, 32, 32, 1)
    np.testing.assert_array_equal(x[:, 2:30, 2:30, 0], arrays["train-images-idx3-ubyte"])
    assert y.dtype == np.int32 and yt.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert (info.train_size, info.test_size) == (6, 4)


@pytest.mark.parametrize("channels", [None, 3])
def test_fashion_pipelines_yield_padded_batches(monkeypatch, channels):
    _fake_fashion_download(monkeypatch)
    train, _, test, info = data.build_datasets("fashion_mnist", 4, 3, seed=1, channels=channels)
    depth = 1 if channels is None else 3
    assert train.element_spec[0].shape.as_list() == [None, 32, 32, depth]
    images, labels = _epoch(train)
    assert images.shape == (6, 32, 32, depth) and images.dtype == np.float32
    assert labels.dtype == np.int32
    test_images, _ = _epoch(test)
    assert test_images.shape == (4, 32, 32, depth)
    black = (0.0 - 0.2860) / 0.3530  # the padding, normalized
    np.testing.assert_allclose(test_images[:, :2], black, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# STL-10: the binary archive.
# ----------------------------------------------------------------------------------------------


def _stl_bytes(images):
    """STL-10's layout: per image, the red, green, blue planes, each stored column by column."""
    return images.transpose(0, 3, 2, 1).tobytes()


def _fake_stl(train=3, test=2):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (train + test, 96, 96, 3), dtype=np.uint8)
    labels = rng.integers(1, 11, train + test).astype(np.uint8)
    labels[0], labels[1] = 1, 10  # both ends of the stored range
    files = {
        "stl10_binary/train_X.bin": _stl_bytes(images[:train]),
        "stl10_binary/train_y.bin": labels[:train].tobytes(),
        "stl10_binary/test_X.bin": _stl_bytes(images[train:]),
        "stl10_binary/test_y.bin": labels[train:].tobytes(),
        "stl10_binary/class_names.txt": b"airplane\nbird\n",
    }
    expected = {
        "train": (images[:train], labels[:train] - 1),
        "test": (images[train:], labels[train:] - 1),
    }
    return files, expected


def test_stl10_pixel_order_matches_the_official_reader():
    raw = np.zeros(3 * 96 * 96, np.uint8)
    raw[0], raw[1], raw[96], raw[96 * 96], raw[-1] = 10, 20, 30, 40, 50
    image = stl10.parse_images(raw.tobytes(), "x")[0]
    assert image.shape == (96, 96, 3)
    assert image[0, 0, 0] == 10  # first red value: top-left
    assert image[1, 0, 0] == 20  # second value: one row down (column-major)
    assert image[0, 1, 0] == 30  # after 96 values: the next column
    assert image[0, 0, 1] == 40  # first green value
    assert image[95, 95, 2] == 50  # last blue value
    official = np.reshape(raw, (-1, 3, 96, 96)).transpose(0, 3, 2, 1)
    np.testing.assert_array_equal(stl10.parse_images(raw.tobytes(), "x"), official)


@pytest.mark.parametrize("where", ["folder", "parent", "tar.gz"])
def test_stl10_from_folder_parent_or_archive(tmp_path, where):
    files, expected = _fake_stl()
    if where == "tar.gz":
        path = tmp_path / "stl10_binary.tar.gz"
        _write_tar(path, files)
    else:
        _write_folder(tmp_path, files)
        path = tmp_path / "stl10_binary" if where == "folder" else tmp_path
    (x, y), (xt, yt), info = data.load_arrays("stl10", path=path)
    np.testing.assert_array_equal(x, expected["train"][0])
    np.testing.assert_array_equal(xt, expected["test"][0])
    assert y.dtype == np.int32 and y.tolist() == expected["train"][1].tolist()
    assert y[:2].tolist() == [0, 9]
    assert yt.tolist() == expected["test"][1].tolist()
    assert info == data.DatasetInfo("stl10", 10, (96, 96, 3), 3, 2, stl10.MEAN, stl10.STD)


def test_stl10_resized_to_32(tmp_path):
    files, expected = _fake_stl()
    flat = np.zeros((2, 96, 96, 3), np.uint8) + np.array([7, 70, 200], np.uint8)
    files["stl10_binary/test_X.bin"] = _stl_bytes(flat)
    _write_folder(tmp_path, files)
    (x, _), (xt, _), info = data.load_arrays("stl10", path=tmp_path, image_size=32, train_size=2)
    assert x.shape == (2, 32, 32, 3) and info.image_shape == (32, 32, 3)
    np.testing.assert_array_equal(xt, np.broadcast_to([7, 70, 200], (2, 32, 32, 3)))
    # Shrinking by 3 averages 3x3 blocks (more or less): the mean of each channel survives.
    np.testing.assert_allclose(
        x.mean(axis=(1, 2)), expected["train"][0][:2].mean(axis=(1, 2)), atol=1.0
    )


def test_stl10_without_path_says_where_to_get_it():
    with pytest.raises(data.DatasetFileError) as error:
        data.load_arrays("stl10")
    message = str(error.value)
    assert "stl10_binary.tar.gz" in message and "https://cs.stanford.edu/~acoates/stl10/" in message
    assert "`path`" in message and "not downloaded" in message


def test_stl10_rejects_bad_files(tmp_path):
    files, _ = _fake_stl()
    files["stl10_binary/train_X.bin"] += b"\x00"
    _write_folder(tmp_path, files)
    with pytest.raises(data.DatasetFileError, match="train_X.bin holds 82945 bytes"):
        data.load_arrays("stl10", path=tmp_path)
    files, _ = _fake_stl()
    files["stl10_binary/test_y.bin"] = bytes([3, 0])
    _write_folder(tmp_path, files)
    with pytest.raises(data.DatasetFileError, match="test_y.bin holds labels 0..3; expected 1..10"):
        data.load_arrays("stl10", path=tmp_path)
    files["stl10_binary/test_y.bin"] = bytes([3])
    _write_folder(tmp_path, files)
    with pytest.raises(data.DatasetFileError, match="1 labels for 2 images"):
        data.load_arrays("stl10", path=tmp_path)
    del files["stl10_binary/train_y.bin"]
    _write_tar(tmp_path / "partial.tar", files)
    with pytest.raises(data.DatasetFileError, match="lacks stl10_binary/train_y.bin"):
        data.load_arrays("stl10", path=tmp_path / "partial.tar")


def test_stl10_pipelines_yield_96_pixel_batches(tmp_path):
    files, expected = _fake_stl(train=5, test=3)
    _write_folder(tmp_path, files)
    train, _, test, _ = data.build_datasets("stl10", 2, 2, path=tmp_path)
    assert train.element_spec[0].shape.as_list() == [None, 96, 96, 3]
    images, labels = _epoch(train)
    assert images.shape == (5, 96, 96, 3) and images.dtype == np.float32
    assert sorted(labels.tolist()) == sorted(expected["train"][1].tolist())
    assert [len(b[1]) for b in test.as_numpy_iterator()] == [2, 1]


# ----------------------------------------------------------------------------------------------
# Image folders (Imagenet100-style).
# ----------------------------------------------------------------------------------------------


def _flat(colour, height=12, width=10):
    return np.broadcast_to(np.array(colour, np.uint8), (height, width, len(colour))).copy()


def _write_image(path, image, encoder=tf.io.encode_png):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(encoder(image).numpy())


def _jpeg(image):
    return tf.io.encode_jpeg(image, quality=100)


def _image_folder(root, test_folder="val"):
    """Three classes; JPEG and PNG, gray and RGBA PNGs, upper-case extensions, ignored files."""
    rng = np.random.default_rng(4)
    pictures = {}
    for split in ("train", test_folder):
        for name, colour in (("emu", (200, 30, 30)), ("cat", (30, 200, 30)), ("dog", (0, 0, 250))):
            folder = os.path.join(root, split, name)
            _write_image(os.path.join(folder, "a.png"), _flat(colour))
            _write_image(os.path.join(folder, "b.JPG"), _flat(colour), _jpeg)
            noisy = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            _write_image(os.path.join(folder, "c.png"), noisy)
            pictures[(split, name)] = noisy
        with open(os.path.join(root, split, "cat", "notes.txt"), "w") as handle:
            handle.write("not an image")
        _write_image(os.path.join(root, split, "cat", ".hidden.png"), _flat((1, 2, 3)))
    _write_image(os.path.join(root, "train", "dog", "d.png"), _flat((90,), 5, 7))  # gray
    _write_image(os.path.join(root, "train", "emu", "e.jpeg"), _flat((20, 40, 60, 128)))  # RGBA
    return pictures


def test_image_folder_decodes_labels_and_orders_round_robin(tmp_path):
    pictures = _image_folder(tmp_path)
    (x, y), (xt, yt), info = data.load_arrays("image_folder", path=tmp_path, image_size=8)
    assert image_folder.list_classes(tmp_path) == ("cat", "dog", "emu")
    # Round-robin over the sorted classes: the first file of every class, then the second, ...
    assert y.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 1, 2]
    assert yt.tolist() == [0, 1, 2] * 3
    assert x.shape == (11, 8, 8, 3) and x.dtype == np.uint8 and y.dtype == np.int32
    assert info == data.DatasetInfo(
        "image_folder", 3, (8, 8, 3), 11, 9, image_folder.MEAN, image_folder.STD
    )
    colours = {0: (30, 200, 30), 1: (0, 0, 250), 2: (200, 30, 30)}
    for index in range(3):  # a.png: flat colours survive the 12x10 -> 8x8 resize exactly
        np.testing.assert_array_equal(x[index], _flat(colours[index], 8, 8))
        np.testing.assert_allclose(x[3 + index], _flat(colours[index], 8, 8), atol=3)  # JPEG
    np.testing.assert_array_equal(x[6], pictures[("train", "cat")])  # 8x8 PNG: kept exactly
    np.testing.assert_array_equal(xt[8], pictures[("val", "emu")])
    np.testing.assert_array_equal(x[9], _flat((90, 90, 90), 8, 8))  # gray -> RGB
    np.testing.assert_array_equal(x[10], _flat((20, 40, 60), 8, 8))  # RGBA (.jpeg name) -> RGB


def test_image_folder_default_size_test_folder_and_prefix(tmp_path):
    _image_folder(tmp_path, test_folder="test")
    (x, y), (xt, yt), info = data.load_arrays(
        "image_folder", path=tmp_path, train_size=4, test_size=3
    )
    assert x.shape == (4, 64, 64, 3) and xt.shape == (3, 64, 64, 3)
    assert y.tolist() == [0, 1, 2, 0] and yt.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="has 11 train samples.*train_size=12"):
        data.load_arrays("image_folder", path=tmp_path, train_size=12)


def test_image_folder_names_unreadable_images(tmp_path):
    _image_folder(tmp_path)
    (tmp_path / "val" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "val" / "emu" / "text.png").write_text("hello")
    with pytest.raises(data.DatasetFileError) as error:
        data.load_arrays("image_folder", path=tmp_path, image_size=8)
    message = str(error.value)
    assert message.startswith("2 image file(s) could not be read or decoded")
    assert str(tmp_path / "val" / "dog" / "broken.jpg") in message
    assert str(tmp_path / "val" / "emu" / "text.png") in message


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(data.DatasetFileError, match="needs `path`"):
        data.load_arrays("image_folder")
    with pytest.raises(data.DatasetFileError, match="not a directory"):
        data.load_arrays("image_folder", path=tmp_path / "nowhere")
    with pytest.raises(data.DatasetFileError, match="no train/ directory"):
        data.load_arrays("image_folder", path=tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(data.DatasetFileError, match="neither val/ nor test/"):
        data.load_arrays("image_folder", path=tmp_path)
    (tmp_path / "val").mkdir()
    with pytest.raises(data.DatasetFileError, match="holds no class directories"):
        data.load_arrays("image_folder", path=tmp_path)


def test_image_folder_class_and_file_errors(tmp_path):
    _image_folder(tmp_path)
    os.makedirs(tmp_path / "train" / "fox")
    os.makedirs(tmp_path / "val" / "ant")
    with pytest.raises(
        data.DatasetFileError, match=r"Only in train: \['fox'\]; only in val: \['ant'\]"
    ):
        data.load_arrays("image_folder", path=tmp_path)
    os.makedirs(tmp_path / "val" / "fox")
    os.rmdir(tmp_path / "val" / "ant")
    (tmp_path / "train" / "fox" / "readme.txt").write_text("no pictures yet")
    with pytest.raises(data.DatasetFileError, match=r"train/fox holds no images \(.jpg"):
        data.load_arrays("image_folder", path=tmp_path)


def test_image_folder_pipelines(tmp_path):
    _image_folder(tmp_path)
    train, _, test, info = data.build_datasets("image_folder", 4, 5, path=tmp_path, image_size=16)
    assert info.num_classes == 3
    images, labels = _epoch(train)
    assert images.shape == (11, 16, 16, 3) and images.dtype == np.float32
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert [len(b[1]) for b in test.as_numpy_iterator()] == [5, 4]
