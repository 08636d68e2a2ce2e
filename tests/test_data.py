"""Tests for tfsplit.data: the synthetic set, CIFAR readers, normalization and tf.data pipelines."""

import hashlib
import io
import os
import pickle
import socket
import tarfile

# isort: off
import tfsplit  # noqa: F401  (first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: on
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from tfsplit import data

# ----------------------------------------------------------------------------------------------
# Synthetic dataset.
# ----------------------------------------------------------------------------------------------


# sha256 of the seed-0 set with 16 train and 8 test samples. Changing the generator changes it:
# update it only on purpose (and the normalization constants with it).
GOLDEN_DIGEST = "bd4d414f2ccc73c74be25ceb9e058564e162ca728c802ea57666c62416c5d1c5"


def _synthetic(seed=0, train_size=200, test_size=50):
    return data.load_arrays("synthetic", seed=seed, train_size=train_size, test_size=test_size)


def test_synthetic_same_seed_gives_identical_arrays():
    (x1, y1), (t1, u1), _ = _synthetic(seed=3)
    (x2, y2), (t2, u2), _ = _synthetic(seed=3)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_array_equal(u1, u2)


def test_synthetic_different_seed_gives_different_arrays():
    (x1, y1), _, _ = _synthetic(seed=3)
    (x2, y2), _, _ = _synthetic(seed=4)
    assert not np.array_equal(x1, x2)
    assert not np.array_equal(y1, y2)


def test_synthetic_golden_checksum():
    """Pins the generator's output: the same seed must give the same bytes on every machine."""
    (x, y), (xt, yt), _ = _synthetic(seed=0, train_size=16, test_size=8)
    digest = hashlib.sha256(x.tobytes() + y.tobytes() + xt.tobytes() + yt.tobytes()).hexdigest()
    assert digest == GOLDEN_DIGEST


def test_synthetic_prefix_does_not_depend_on_size():
    (x_small, y_small), (t_small, _), _ = _synthetic(train_size=30, test_size=7)
    (x_big, y_big), (t_big, _), _ = _synthetic(train_size=200, test_size=50)
    np.testing.assert_array_equal(x_small, x_big[:30])
    np.testing.assert_array_equal(y_small, y_big[:30])
    np.testing.assert_array_equal(t_small, t_big[:7])


def test_synthetic_shapes_dtypes_labels_and_balance():
    (x, y), (xt, yt), info = _synthetic(train_size=200, test_size=50)
    assert x.shape == (200, 32, 32, 3) and x.dtype == np.uint8
    assert xt.shape == (50, 32, 32, 3) and xt.dtype == np.uint8
    assert y.dtype == np.int32 and yt.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(y, minlength=10), [20] * 10)
    np.testing.assert_array_equal(np.bincount(yt, minlength=10), [5] * 10)
    # Every block of 10 holds each class once, so any prefix is balanced within one sample.
    np.testing.assert_array_equal(np.sort(y[:10]), np.arange(10))
    assert info == data.DatasetInfo(
        "synthetic", 10, (32, 32, 3), 200, 50, data._SYNTH_MEAN, data._SYNTH_STD
    )
    assert x.std() > 30  # pictures with contrast, not flat fields


def test_synthetic_train_and_test_differ():
    (x, _), (xt, _), _ = _synthetic(train_size=100, test_size=100)
    assert not np.array_equal(x, xt)
    train_rows = {row.tobytes() for row in x}
    assert not any(row.tobytes() in train_rows for row in xt)


def test_synthetic_default_sizes_and_normalization_constants():
    (x, y), (xt, yt), info = data.load_arrays("synthetic")
    assert (len(x), len(xt)) == (data.SYNTHETIC_TRAIN_SIZE, data.SYNTHETIC_TEST_SIZE)
    assert (info.train_size, info.test_size) == (10000, 2000)
    pixels = x.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(pixels.mean(axis=0), info.mean, atol=1e-3)
    np.testing.assert_allclose(pixels.std(axis=0), info.std, atol=1e-3)


def test_synthetic_mean_colour_does_not_name_the_class():
    """No single trivial cue: a nearest-centroid classifier on the mean colour stays weak."""
    (x, y), (xt, yt), _ = _synthetic(train_size=1000, test_size=500)
    features, test_features = x.mean(axis=(1, 2)), xt.mean(axis=(1, 2))
    centroids = np.stack([features[y == c].mean(axis=0) for c in range(10)])
    distances = ((test_features[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    accuracy = np.mean(distances.argmin(axis=1) == yt)
    assert accuracy < 0.4


def test_synthetic_class_table_is_consistent():
    assert len(set(data.SYNTHETIC_CLASSES)) == 10
    for shape, texture, colour in data.SYNTHETIC_CLASSES:
        assert shape in data._SHAPES and texture in data._TEXTURES
        assert colour in data.SYNTHETIC_HUES
    # No attribute alone names a class except where noted in the module: each colour and each
    # texture is shared by at least two classes.
    for position in (1, 2):
        values = [c[position] for c in data.SYNTHETIC_CLASSES]
        assert min(values.count(v) for v in set(values)) >= 2


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
    return data.build_datasets("synthetic", **args)


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


def test_load_arrays_rejects_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        data.load_arrays("mnist")
    with pytest.raises(ValueError, match="path"):
        data.load_arrays("synthetic", path="/tmp/x")
    with pytest.raises(ValueError, match="test_size"):
        data.load_arrays("synthetic", test_size=-3)


def test_dataset_info_validates_fields():
    with pytest.raises(ValueError, match="image_shape"):
        data.DatasetInfo("x", 10, (32, 32), 1, 1, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="one value per channel"):
        data.DatasetInfo("x", 10, (32, 32, 3), 1, 1, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="std"):
        data.DatasetInfo("x", 10, (32, 32, 1), 1, 1, (0.5,), (0.0,))
    with pytest.raises(ValueError, match="num_classes"):
        data.DatasetInfo("x", 0, (32, 32, 1), 1, 1, (0.5,), (0.5,))


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
    train, test, info = data.build_datasets(
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


def test_offline_download_fails_with_a_clear_message(monkeypatch):
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


def test_keras_download_path_converts_arrays(monkeypatch):
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
