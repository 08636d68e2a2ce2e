"""Tests for tfsplit.data.image_folder.build_image_folder_datasets: image folders decoded every
epoch inside tf.data, checked against the in-memory loader (`image_folder.load`)."""

# isort: off
import tfsplit  # noqa: F401  (first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: on
import math
import os
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow as tf

from tfsplit import data
from tfsplit.data import image_folder

CLASSES = ("ant", "bee", "cow")
TRAIN_PER_CLASS, TEST_PER_CLASS = 10, 4
TRAIN_SIZE, TEST_SIZE = 3 * TRAIN_PER_CLASS, 3 * TEST_PER_CLASS
SIZE = 16


def _write(path, image, encoder):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pathlib.Path(path).write_bytes(encoder(image).numpy())


def _jpeg(image):
    return tf.io.encode_jpeg(image, quality=95)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes of 10 training and 4 test images: noisy 16x16 PNGs and JPEGs, one gray PNG, one
    RGBA PNG named .jpeg and one 20x12 JPEG (resized). Shared read-only by the tests."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(7)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", TEST_PER_CLASS)):
        for name in CLASSES:
            for i in range(count):
                image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                encoder, extension = (tf.io.encode_png, "png") if i % 2 else (_jpeg, "jpg")
                _write(root / split / name / f"{i:02d}.{extension}", image, encoder)
    gray = rng.integers(0, 256, (SIZE, SIZE, 1), dtype=np.uint8)
    _write(root / "train" / "bee" / "03.png", gray, tf.io.encode_png)
    rgba = rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
    os.remove(root / "train" / "cow" / "04.jpg")
    _write(root / "train" / "cow" / "04.jpeg", rgba, tf.io.encode_png)
    wide = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    _write(root / "val" / "ant" / "02.jpg", wide, _jpeg)
    return root


@pytest.fixture(scope="module")
def arrays(folder):
    return image_folder.load(folder, image_size=SIZE)


@pytest.fixture
def copy(folder, tmp_path):
    """A private copy of `folder` to damage."""
    return pathlib.Path(shutil.copytree(folder, tmp_path / "copy"))


def _build(path, **kwargs):
    args = dict(batch_size=8, eval_batch_size=5, image_size=SIZE, seed=3)
    args.update(kwargs)
    splits = image_folder.build_image_folder_datasets(path, **args)
    return splits.train, splits.test, splits.info  # what these tests check


def _epoch(dataset):
    batches = list(dataset.as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _pixels(images, info):
    """uint8 pixels back from normalized images, to match samples exactly."""
    return np.round((images * np.array(info.std) + np.array(info.mean)) * 255).astype(np.uint8)


def test_test_split_is_the_in_memory_loaders_normalized_in_stored_order(folder, arrays):
    _, (xt, yt), loaded_info = arrays
    train_ds, test_ds, info = _build(folder)
    assert info == loaded_info  # one device: the same sizes, shape, mean and std
    batches = list(test_ds.as_numpy_iterator())
    assert [len(b[1]) for b in batches] == [5, 5, 2] and int(test_ds.cardinality()) == 3
    images, labels = _epoch(test_ds)
    assert images.dtype == np.float32 and labels.dtype == np.int32
    np.testing.assert_array_equal(images, data.normalize(xt, info).numpy())
    np.testing.assert_array_equal(labels, yt)
    assert labels.tolist() == [0, 1, 2] * TEST_PER_CLASS  # round-robin over the classes


def test_training_epoch_gives_every_file_once_in_batches_keras_can_count(folder, arrays):
    (x, y), _, _ = arrays
    train_ds, _, info = _build(folder, augment=False)
    assert train_ds.element_spec[0].shape.as_list() == [None, SIZE, SIZE, 3]
    assert train_ds.element_spec[1].dtype == tf.int32
    assert int(train_ds.cardinality()) == math.ceil(TRAIN_SIZE / 8) == 4
    assert [len(b[1]) for b in train_ds.as_numpy_iterator()] == [8, 8, 8, 6]
    images, labels = _epoch(train_ds)
    index_of = {image.tobytes(): i for i, image in enumerate(x)}
    assert len(index_of) == TRAIN_SIZE  # noisy images: all distinct
    order = [index_of[image.tobytes()] for image in _pixels(images, info)]
    assert sorted(order) == list(range(TRAIN_SIZE))  # every file exactly once
    np.testing.assert_array_equal(images, data.normalize(x[order], info).numpy())
    np.testing.assert_array_equal(labels, y[order])


@pytest.mark.parametrize("augment", [False, True])
def test_training_batches_are_the_in_memory_pipelines(folder, arrays, augment):
    """Same seed, same order and crops as `build_train_dataset` on the loaded arrays."""
    (x, y), _, info = arrays
    train_ds, _, _ = _build(folder, augment=augment, seed=5)
    expected = data.build_train_dataset(x, y, info, 8, augment=augment, seed=5)
    for _ in range(2):
        got, want = list(train_ds.as_numpy_iterator()), list(expected.as_numpy_iterator())
        assert len(got) == len(want) == 4
        for (images, labels), (expected_images, expected_labels) in zip(got, want):
            np.testing.assert_array_equal(images, expected_images)
            np.testing.assert_array_equal(labels, expected_labels)


def test_order_and_augmentation_are_reshuffled_each_epoch_and_fixed_by_the_seed(folder):
    first, _, _ = _build(folder, seed=3)
    again, _, _ = _build(folder, seed=3)
    epochs = [_epoch(first) for _ in range(2)]
    for expected in epochs:
        images, labels = _epoch(again)
        np.testing.assert_array_equal(labels, expected[1])
        np.testing.assert_array_equal(images, expected[0])
    assert not np.array_equal(epochs[0][1], epochs[1][1])  # a new order every epoch
    np.testing.assert_array_equal(np.sort(epochs[0][1]), np.sort(epochs[1][1]))
    other, _, _ = _build(folder, seed=4)
    assert not np.array_equal(_epoch(other)[1], epochs[0][1])


def test_sizes_take_the_first_files_of_each_split(folder, arrays):
    (x, y), (xt, yt), _ = arrays
    train_ds, test_ds, info = _build(folder, augment=False, train_size=7, test_size=4)
    assert (info.train_size, info.test_size) == (7, 4)
    assert int(train_ds.cardinality()) == 1 and int(test_ds.cardinality()) == 1
    images, labels = _epoch(train_ds)
    assert sorted(labels.tolist()) == sorted(y[:7].tolist()) == [0, 0, 0, 1, 1, 2, 2]
    assert sorted(i.tobytes() for i in _pixels(images, info)) == sorted(i.tobytes() for i in x[:7])
    images, labels = _epoch(test_ds)
    np.testing.assert_array_equal(images, data.normalize(xt[:4], info).numpy())
    np.testing.assert_array_equal(labels, yt[:4])


@pytest.mark.parametrize("num_shards", [3, 4])
def test_devices_train_on_disjoint_parts_that_cover_the_training_files(folder, arrays, num_shards):
    (x, y), (xt, _), _ = arrays
    parts = []
    for device in range(num_shards):
        train_ds, test_ds, info = _build(
            folder, augment=False, shard_index=device, num_shards=num_shards
        )
        assert info.train_size == len(x[device::num_shards]) and info.test_size == TEST_SIZE
        assert int(train_ds.cardinality()) == math.ceil(info.train_size / 8)
        images, labels = _epoch(train_ds)
        pixels = _pixels(images, info)
        assert sorted(p.tobytes() for p in pixels) == sorted(
            i.tobytes() for i in x[device::num_shards]  # every num_shards-th file, as in memory
        )
        np.testing.assert_array_equal(np.sort(labels), np.sort(y[device::num_shards]))
        parts.append({p.tobytes() for p in pixels})
        assert len(_epoch(test_ds)[1]) == len(xt)  # the test set is never split
    assert sum(len(p) for p in parts) == TRAIN_SIZE
    assert set().union(*parts) == {i.tobytes() for i in x}


def test_an_unreadable_file_fails_the_epoch_naming_it(copy):
    train_ds, test_ds, _ = _build(copy)
    assert len(_epoch(train_ds)[1]) == TRAIN_SIZE
    jpeg = copy / "train" / "bee" / "06.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])  # truncated after the build
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"Image file {jpeg} could not be"):
        _epoch(train_ds)
    last = copy / "val" / "cow" / "03.png"  # the last test file: found at the end of the epoch
    last.write_bytes(b"not an image at all")
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"Image file {last} could not be"):
        _epoch(test_ds)
    gone = copy / "val" / "ant" / "00.jpg"
    last.unlink()
    gone.unlink()
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"Image file {gone} could not be"):
        _epoch(test_ds)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "batch_size=0"),
        (dict(eval_batch_size=2.0), "eval_batch_size=2.0"),
        (dict(augment="yes"), "augment='yes'"),
        (dict(seed=-1), "seed=-1"),
        (dict(image_size=0), "image_size=0"),
        (dict(shard_index=3, num_shards=3), "shard_index=3"),
        (dict(num_shards=0), "num_shards=0"),
        (dict(num_shards=31), "has 30 training files.*num_shards=31"),
        (dict(train_size=31), "has 30 train samples.*train_size=31"),
        (dict(test_size=0), "test_size=0"),
    ],
)
def test_bad_arguments_raise_value_error(folder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _build(folder, **kwargs)


def test_bad_paths_raise_dataset_file_error(tmp_path):
    with pytest.raises(data.DatasetFileError, match="needs `path`"):
        _build(None)
    with pytest.raises(data.DatasetFileError, match="not a directory"):
        _build(tmp_path / "nowhere")
    with pytest.raises(data.DatasetFileError, match="no train/ directory"):
        _build(tmp_path)


def test_build_datasets_streams_image_folders_unless_cached(folder, arrays):
    """Streamed by default; `cache` holds the decoded set and gives the same batches."""
    args = dict(path=str(folder), image_size=SIZE, seed=5)
    streamed, _, _, info = data.build_datasets("image_folder", 8, 5, **args)
    cached, _, _, cached_info = data.build_datasets("image_folder", 8, 5, cache=True, **args)
    assert info == cached_info
    for (images, labels), (cached_images, cached_labels) in zip(streamed, cached):
        np.testing.assert_array_equal(images.numpy(), cached_images.numpy())
        np.testing.assert_array_equal(labels.numpy(), cached_labels.numpy())
    with pytest.raises(ValueError, match="RGB"):
        data.build_datasets("image_folder", 8, 5, channels=1, **args)
