"""Tests for benchmarks.grain_loader: Grain batches of TFRecord shards."""

# isort: off
import tfsplit  # noqa: F401  (first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: on
import json
import os

import numpy as np
import pytest

from benchmarks.grain_loader import GrainShardLoader, augment_batch
from tfsplit import data
from tfsplit.data import shards
from tfsplit.data.common import DatasetFileError
from tfsplit.data.pipeline import CROP_PADDING

TRAIN_SIZE, TEST_SIZE, BATCH = 200, 50, 32


@pytest.fixture(scope="module")
def arrays():
    return data.load_arrays("synthetic", seed=1, train_size=TRAIN_SIZE, test_size=TEST_SIZE)


@pytest.fixture(scope="module")
def shard_dir(arrays, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("grain") / "raw")
    shards.write_array_shards(*arrays, out_dir, num_shards=4)
    return out_dir


def pixels(images, info):
    """The uint8 pixels that normalized `images` came from."""
    restored = (images * np.float32(info.std) + np.float32(info.mean)) * 255
    return np.rint(restored).astype(np.uint8)


def check_one_epoch(loader, split_arrays, info):
    """The epoch holds every sample of `split_arrays` exactly once, with its label and pixels."""
    batches = list(loader)
    assert len(batches) == len(loader) == -(-len(split_arrays[1]) // BATCH)
    for images, labels in batches:
        assert images.dtype == np.float32 and labels.dtype == np.int32
        assert images.shape[1:] == info.image_shape and len(images) == len(labels)
    images = pixels(np.concatenate([b[0] for b in batches]), info)
    labels = np.concatenate([b[1] for b in batches])
    assert len(labels) == len(split_arrays[1])
    # Synthetic images are distinct, so each one's position in the stored arrays identifies it.
    stored = {image.tobytes(): i for i, image in enumerate(split_arrays[0])}
    assert len(stored) == len(split_arrays[0])
    positions = [stored[image.tobytes()] for image in images]
    assert sorted(positions) == list(range(len(split_arrays[1])))
    np.testing.assert_array_equal(labels, np.asarray(split_arrays[1])[positions])
    return positions


def test_one_epoch_is_every_sample_once(shard_dir, arrays):
    train, _, info = arrays
    positions = check_one_epoch(GrainShardLoader(shard_dir, BATCH, augment=False), train, info)
    assert positions != sorted(positions)  # Shuffled across shards, not the stored order.


def test_png_shards_and_test_split(arrays, tmp_path):
    shards.write_array_shards(*arrays, str(tmp_path), num_shards=4, encoding="png")
    _, test, info = arrays
    check_one_epoch(GrainShardLoader(str(tmp_path), BATCH, augment=False, split="test"), test, info)


def test_epochs_reshuffle_and_seed_repeats(shard_dir):
    def epochs(seed, count=2):
        loader = GrainShardLoader(shard_dir, BATCH, seed=seed, num_threads=2)
        return [np.concatenate([labels for _, labels in loader]) for _ in range(count)]

    first, second = epochs(seed=3)
    again_first, again_second = epochs(seed=3)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, again_first)
    np.testing.assert_array_equal(second, again_second)
    (other,) = epochs(seed=4, count=1)
    assert not np.array_equal(first, other)


def test_same_seed_gives_same_augmented_batches(shard_dir):
    batches = [list(GrainShardLoader(shard_dir, BATCH, seed=5, num_threads=4)) for _ in range(2)]
    for (images, labels), (images_again, labels_again) in zip(*batches):
        np.testing.assert_array_equal(images, images_again)
        np.testing.assert_array_equal(labels, labels_again)


def test_augment_crops_and_flips_the_padded_images(shard_dir, arrays):
    info = arrays[2]
    augmented = list(GrainShardLoader(shard_dir, BATCH, seed=2))
    plain = list(GrainShardLoader(shard_dir, BATCH, seed=2, augment=False))
    assert len(augmented) == len(plain)
    for (images, labels), (plain_images, plain_labels) in zip(augmented, plain):
        assert images.dtype == np.float32 and images.shape == plain_images.shape
        np.testing.assert_array_equal(labels, plain_labels)  # The order ignores augmentation.
    images = np.concatenate([b[0] for b in augmented])
    plain_images = np.concatenate([b[0] for b in plain])
    assert not np.allclose(images, plain_images)
    # Every augmented image is one crop of its zero-padded original, flipped or not.
    p, size = CROP_PADDING, info.image_shape[0]
    padded = np.pad(pixels(plain_images, info), [(0, 0), (p, p), (p, p), (0, 0)])
    for image, source in zip(pixels(images, info), padded):
        crops = [
            crop[:, ::flip]
            for row in range(2 * p + 1)
            for col in range(2 * p + 1)
            for crop in [source[row : row + size, col : col + size]]
            for flip in (1, -1)
        ]
        assert any(np.array_equal(image, crop) for crop in crops)


def test_augment_batch_draws_every_crop_and_both_flips():
    image = np.arange(1, 65, dtype=np.uint8).reshape(8, 8, 1)  # Distinct pixels: crops differ.
    out = augment_batch(np.repeat(image[None], 4000, axis=0), np.random.default_rng(0))
    assert out.shape == (4000, 8, 8, 1) and out.dtype == np.uint8
    padded = np.pad(image, [(CROP_PADDING,) * 2, (CROP_PADDING,) * 2, (0, 0)])
    crops = {
        padded[row : row + 8, col : col + 8][:, ::flip].tobytes(): (row, col, flip)
        for row in range(2 * CROP_PADDING + 1)
        for col in range(2 * CROP_PADDING + 1)
        for flip in (1, -1)
    }
    assert len(crops) == 2 * (2 * CROP_PADDING + 1) ** 2
    drawn = [crops.get(crop.tobytes()) for crop in out]
    assert None not in drawn and set(drawn) == set(crops.values())


def test_record_count_differing_from_index_names_the_file(shard_dir, tmp_path):
    for name in os.listdir(shard_dir):
        with open(os.path.join(shard_dir, name), "rb") as f, open(tmp_path / name, "wb") as g:
            g.write(f.read())
    index = json.loads((tmp_path / "index.json").read_text())
    listed = index["splits"]["train"]["shards"]
    listed[0]["num_samples"] += 1  # The split's total still adds up: only the files disagree.
    listed[1]["num_samples"] -= 1
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(DatasetFileError, match=f"{listed[0]['file']} holds 50 records.*lists 51"):
        GrainShardLoader(str(tmp_path), BATCH)


def test_truncated_shard_names_the_file(shard_dir, tmp_path):
    for name in os.listdir(shard_dir):
        with open(os.path.join(shard_dir, name), "rb") as f, open(tmp_path / name, "wb") as g:
            g.write(f.read())
    shard = tmp_path / "train-00002-of-00004.tfrecord"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DatasetFileError, match="train-00002-of-00004.tfrecord.*runs past the end"):
        GrainShardLoader(str(tmp_path), BATCH)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(path="s3://bucket/shards"), "s3:// paths are not supported"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=2.0), "batch_size"),
        (dict(seed=-1), "seed"),
        (dict(augment=1), "augment"),
        (dict(num_threads=0), "num_threads"),
        (dict(split="val"), "split"),
    ],
)
def test_bad_arguments_raise(shard_dir, kwargs, message):
    arguments = dict(path=shard_dir, batch_size=BATCH) | kwargs
    with pytest.raises(ValueError, match=message):
        GrainShardLoader(**arguments)
