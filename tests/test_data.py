"""Tests for tfsplit.data: loading by name, normalization, augmentation and tf.data pipelines.

The readers behind `load_arrays` are tested in test_loaders.py, the synthetic set in
test_synthetic.py.
"""

# isort: off
import tfsplit  # noqa: F401  (first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: on
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from tfsplit import data
from tfsplit.data import common, synthetic

# ----------------------------------------------------------------------------------------------
# Loading by name.
# ----------------------------------------------------------------------------------------------


def _synthetic(seed=0, train_size=200, test_size=50):
    return data.load_arrays("synthetic", seed=seed, train_size=train_size, test_size=test_size)


def test_datasets_and_public_names():
    assert data.DATASETS == (
        "synthetic",
        "synthetic_hard",
        "cifar10",
        "cifar100",
        "fashion_mnist",
        "stl10",
        "image_folder",
    )
    assert data.DatasetInfo is common.DatasetInfo
    assert issubclass(data.DatasetFileError, ValueError)
    assert issubclass(data.DatasetDownloadError, RuntimeError)
    assert data.SYNTHETIC_CLASSES is synthetic.SYNTHETIC_CLASSES
    assert (data.SYNTHETIC_TRAIN_SIZE, data.SYNTHETIC_TEST_SIZE) == (10000, 2000)
    assert data.CROP_PADDING == 4
    assert all(hasattr(data, name) for name in data.__all__)


def test_synthetic_through_load_arrays_can_be_resized():
    (x, y), (xt, _), info = data.load_arrays(
        "synthetic", seed=2, train_size=20, test_size=10, image_size=48
    )
    (x32, y32), _, info32 = data.load_arrays("synthetic", seed=2, train_size=20, test_size=10)
    assert x.shape == (20, 48, 48, 3) and xt.shape == (10, 48, 48, 3) and x.dtype == np.uint8
    assert info.image_shape == (48, 48, 3) and (info.mean, info.std) == (info32.mean, info32.std)
    np.testing.assert_array_equal(y, y32)
    np.testing.assert_allclose(x.mean(axis=(1, 2)), x32.mean(axis=(1, 2)), atol=1.5)
    (same, _), _, same_info = data.load_arrays(
        "synthetic", seed=2, train_size=20, test_size=10, image_size=32, channels=3
    )
    np.testing.assert_array_equal(same, x32)  # already 32x32 RGB: untouched
    assert same_info == info32


# ----------------------------------------------------------------------------------------------
# normalize and augment_batch.
# ----------------------------------------------------------------------------------------------

_INFO = data.DatasetInfo("synthetic", 10, (2, 2, 3), 4, 4, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))


def test_normalize_hand_computed():
    pixels = np.array([[[255, 0, 51]]], np.uint8)
    expected = [[[1.0, -1.0, 0.2]]]  # (1 - .5)/.5, (0 - .25)/.25, (.2 - 0)/1
    np.testing.assert_allclose(data.normalize(pixels, _INFO), expected, rtol=1e-6)
    floats = np.array([[[1.0, 0.0, 0.2]]], np.float64)
    out = data.normalize(floats, _INFO)
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_normalize_inside_tf_function_and_dataset():
    pixels = np.full((2, 2, 2, 3), 255, np.uint8)
    in_graph = tf.function(lambda x: data.normalize(x, _INFO))(pixels)
    from_data = next(
        iter(tf.data.Dataset.from_tensors(pixels).map(lambda x: data.normalize(x, _INFO)))
    )
    np.testing.assert_allclose(in_graph, np.broadcast_to([1.0, 3.0, 1.0], (2, 2, 2, 3)))
    np.testing.assert_allclose(from_data, in_graph)


def test_normalize_rejects_bad_input():
    with pytest.raises(ValueError, match="3 channels"):
        data.normalize(np.zeros((2, 2, 4), np.uint8), _INFO)
    with pytest.raises(ValueError, match="DatasetInfo"):
        data.normalize(np.zeros((2, 2, 3), np.uint8), {"mean": (0, 0, 0)})
    with pytest.raises(ValueError, match="integer or float"):
        data.normalize(tf.constant([["a", "b", "c"]]), _INFO)


def test_normalize_one_channel():
    info = data.DatasetInfo("gray", 10, (2, 2, 1), 1, 1, (0.2,), (0.4,))
    out = data.normalize(np.array([[[0], [255]], [[51], [102]]], np.uint8), info)
    np.testing.assert_allclose(out[..., 0], [[-0.5, 2.0], [0.0, 0.5]], rtol=1e-6, atol=1e-6)


def _find_crop(image, augmented):
    """(top, left, flipped) of the paper-style crop of `image` that equals `augmented`, or None."""
    pad = data.CROP_PADDING
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    height, width = image.shape[:2]
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            crop = padded[top : top + height, left : left + width]
            for flipped, candidate in ((False, crop), (True, crop[:, ::-1])):
                if np.array_equal(candidate, augmented):
                    return top, left, flipped
    return None


def test_augment_batch_gives_padded_crops_and_flips():
    images = np.random.default_rng(0).integers(1, 256, (64, 8, 8, 3), dtype=np.uint8)
    out = data.augment_batch(images, tf.constant([7, 11], tf.int64)).numpy()
    assert out.shape == images.shape and out.dtype == np.uint8
    found = [_find_crop(image, augmented) for image, augmented in zip(images, out)]
    assert None not in found
    tops, lefts, flips = (np.array(column) for column in zip(*found))
    assert set(tops) == set(lefts) == set(range(2 * data.CROP_PADDING + 1))
    assert 0.25 < flips.mean() < 0.75
    assert np.mean([not np.array_equal(a, b) for a, b in zip(images, out)]) > 0.9


@pytest.mark.parametrize("shape", [(24, 6, 10, 1), (6, 96, 96, 3)])
def test_augment_batch_crops_any_height_width_and_channels(shape):
    images = np.random.default_rng(2).integers(1, 256, shape, dtype=np.uint8)
    out = tf.function(data.augment_batch)(images, tf.constant([3, 4], tf.int64)).numpy()
    assert out.shape == images.shape
    assert None not in [_find_crop(image, augmented) for image, augmented in zip(images, out)]


def test_augment_batch_is_seeded_and_same_in_graph():
    images = np.random.default_rng(1).integers(1, 256, (16, 32, 32, 3), dtype=np.uint8)
    seed = tf.constant([1, 2], tf.int64)
    eager = data.augment_batch(images, seed)
    graph = tf.function(data.augment_batch)(images, seed)
    np.testing.assert_array_equal(eager, graph)
    np.testing.assert_array_equal(eager, data.augment_batch(images, seed))
    other = data.augment_batch(images, tf.constant([1, 3], tf.int64))
    assert not np.array_equal(eager, other)


def test_augment_batch_rejects_unbatched_images():
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        data.augment_batch(np.zeros((32, 32, 3), np.uint8), tf.constant([1, 2], tf.int64))


# ----------------------------------------------------------------------------------------------
# Pipelines.
# ----------------------------------------------------------------------------------------------


def _build(**kwargs):
    args = dict(batch_size=32, eval_batch_size=40, train_size=100, test_size=50, seed=5)
    args.update(kwargs)
    splits = data.build_datasets("synthetic", **args)
    return splits.train, splits.test, splits.info  # what these tests check


def _epoch(dataset):
    batches = list(dataset.as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def test_pipelines_shapes_dtypes_and_partial_last_batch():
    train, test, info = _build()
    assert info.train_size == 100 and info.test_size == 50
    train_batches = list(train.as_numpy_iterator())
    assert [len(b[1]) for b in train_batches] == [32, 32, 32, 4]
    test_batches = list(test.as_numpy_iterator())
    assert [len(b[1]) for b in test_batches] == [40, 10]
    for images, labels in train_batches + test_batches:
        assert images.dtype == np.float32 and images.shape[1:] == (32, 32, 3)
        assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 10
    assert train.element_spec[0].shape.as_list() == [None, 32, 32, 3]


def test_train_order_is_seeded_and_changes_each_epoch():
    train_a, _, _ = _build(augment=False)
    train_b, _, _ = _build(augment=False)
    first_a, second_a = _epoch(train_a), _epoch(train_a)
    first_b, second_b = _epoch(train_b), _epoch(train_b)
    np.testing.assert_array_equal(first_a[1], first_b[1])
    np.testing.assert_array_equal(second_a[1], second_b[1])
    np.testing.assert_array_equal(first_a[0], first_b[0])
    assert not np.array_equal(first_a[1], second_a[1])  # reshuffled each epoch
    np.testing.assert_array_equal(np.sort(first_a[1]), np.sort(second_a[1]))
    other, _, _ = _build(augment=False, seed=6)
    assert not np.array_equal(_epoch(other)[1][:50], first_a[1][:50])


def _pixels(images, info):
    """uint8 pixels back from normalized images, to match samples exactly."""
    return np.round((images * np.array(info.std) + np.array(info.mean)) * 255).astype(np.uint8)


def test_unaugmented_train_holds_each_sample_once_with_its_label():
    (x, y), _, info = _synthetic(seed=5, train_size=100, test_size=50)
    train, _, _ = _build(augment=False)
    images, labels = _epoch(train)
    label_of = {image.tobytes(): label for image, label in zip(x, y)}
    recovered = [image.tobytes() for image in _pixels(images, info)]
    assert sorted(recovered) == sorted(label_of)
    assert [label_of[image] for image in recovered] == labels.tolist()


def test_augmented_train_is_seeded_changes_images_and_keeps_shapes():
    (x, _), _, info = _synthetic(seed=5, train_size=100, test_size=50)
    augmented_a, _, _ = _build(augment=True)
    augmented_b, _, _ = _build(augment=True)
    plain, _, _ = _build(augment=False)
    images_a, labels_a = _epoch(augmented_a)
    images_b, labels_b = _epoch(augmented_b)
    plain_images, plain_labels = _epoch(plain)
    np.testing.assert_array_equal(images_a, images_b)  # reproducible for a seed
    np.testing.assert_array_equal(labels_a, plain_labels)  # augmentation keeps the order
    assert images_a.shape == plain_images.shape
    changed = np.mean([not np.allclose(a, p) for a, p in zip(images_a, plain_images)])
    assert changed > 0.8


def test_augmentation_changes_from_epoch_to_epoch():
    augmented, _, info = _build(augment=True)
    plain, _, _ = _build(augment=False)  # same seed: same order as `augmented`, epoch by epoch
    crops = []
    for _ in range(2):
        (images, _), (plain_images, _) = _epoch(augmented), _epoch(plain)
        keys = [image.tobytes() for image in _pixels(plain_images, info)]
        crops.append(dict(zip(keys, images)))
    same = [np.array_equal(crops[0][key], crops[1][key]) for key in crops[0]]
    assert np.mean(same) < 0.2


def test_test_pipeline_is_ordered_and_not_augmented():
    _, (xt, yt), info = _synthetic(seed=5, train_size=100, test_size=50)
    _, test, _ = _build(augment=True)
    for _ in range(2):
        images, labels = _epoch(test)
        np.testing.assert_array_equal(labels, yt)
        np.testing.assert_allclose(images, data.normalize(xt, info), atol=1e-5)


@pytest.mark.parametrize("shape", [(10, 32, 32, 1), (5, 96, 96, 3), (7, 20, 12, 2)])
def test_pipelines_keep_any_image_shape(shape):
    images = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    labels = np.arange(shape[0], dtype=np.int32) % 3
    channels = shape[-1]
    info = data.DatasetInfo(
        "x", 3, shape[1:], shape[0], shape[0], (0.5,) * channels, (0.25,) * channels
    )
    train = data.build_train_dataset(images, labels, info, 4, seed=1)
    test = data.build_eval_dataset(images, labels, info, 4)
    for dataset in (train, test):
        assert dataset.element_spec[0].shape.as_list() == [None, *shape[1:]]
        batch, batch_labels = next(iter(dataset))
        assert batch.shape == (4, *shape[1:]) and batch.dtype == tf.float32
    test_images, test_labels = _epoch(test)
    np.testing.assert_allclose(test_images, (images / 255.0 - 0.5) / 0.25, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(test_labels, labels)


def test_the_validation_split_is_held_out_of_training_and_drawn_from_the_seed():
    args = dict(batch_size=32, eval_batch_size=40, train_size=100, test_size=50, augment=False)
    splits = data.build_datasets("synthetic", seed=5, validation_fraction=0.2, **args)
    assert (splits.info.train_size, splits.info.validation_size) == (80, 20)
    (x_train, _), _, _ = data.load_arrays("synthetic", seed=5, train_size=100, test_size=50)
    info = splits.info
    trained = {image.tobytes() for image in _pixels(_epoch(splits.train)[0], info)}
    held = {image.tobytes() for image in _pixels(_epoch(splits.validation)[0], info)}
    assert len(trained) == 80 and len(held) == 20 and not trained & held
    assert trained | held == {image.tobytes() for image in x_train}
    other = data.build_datasets("synthetic", seed=6, validation_fraction=0.2, **args)
    assert {i.tobytes() for i in _pixels(_epoch(other.validation)[0], other.info)} != held
    assert data.build_datasets("synthetic", seed=5, **args).validation is None  # 0: none
    for fraction in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="validation_fraction"):
            data.build_datasets("synthetic", validation_fraction=fraction, **args)


def test_pipeline_feeds_keras_fit():
    train, test, info = _build(train_size=64, test_size=32)
    inputs = keras.Input(info.image_shape)
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(info.num_classes)(pooled))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(train, epochs=1, validation_data=test, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(eval_batch_size=1.5), "eval_batch_size"),
        (dict(augment="yes"), "augment"),
        (dict(seed=-1), "seed"),
        (dict(train_size=0), "train_size"),
    ],
)
def test_build_datasets_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _build(**kwargs)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("mnist", {}, "name"),
        ("synthetic", dict(path="/tmp/x"), "generated, not read"),
        ("cifar10", dict(path=123), "path"),
        ("synthetic", dict(test_size=-3), "test_size"),
        ("synthetic", dict(image_size=0), "image_size"),
        ("synthetic", dict(image_size=32.0), "image_size"),
        ("synthetic", dict(channels=2), "channels"),
        ("synthetic", dict(channels=True), "channels"),
        ("synthetic", dict(channels=3.0), "channels"),
        ("cifar10", dict(channels=1), r"RGB images; `channels=1` applies to \('fashion_mnist',\)"),
    ],
)
def test_load_arrays_rejects_bad_arguments(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.load_arrays(name, **kwargs)


def test_dataset_info_validates_fields():
    with pytest.raises(ValueError, match="image_shape"):
        data.DatasetInfo("x", 10, (32, 32), 1, 1, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="one value per channel"):
        data.DatasetInfo("x", 10, (32, 32, 3), 1, 1, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="std"):
        data.DatasetInfo("x", 10, (32, 32, 1), 1, 1, (0.5,), (0.0,))
    with pytest.raises(ValueError, match="num_classes"):
        data.DatasetInfo("x", 0, (32, 32, 1), 1, 1, (0.5,), (0.5,))
