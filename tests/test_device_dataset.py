"""tfsplit.device.dataset: a device without TensorFlow reads shards and image folders into the
exact images the TensorFlow pipeline gives, refuses bad files with one clear error type, and
batches with numpy."""

# isort: off
import tfsplit  # noqa: F401  (first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: on
import functools
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tfsplit import data, records
from tfsplit.data import image_folder, pipeline, shards
from tfsplit.device import batches as batching
from tfsplit.device import dataset
from tfsplit.device import image_folder as device_folder
from tfsplit.device.dataset import DeviceDataError
from tfsplit.device.disk_images import DiskImages
from tfsplit.device.spec import DeviceError

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_SIZE, TEST_SIZE = 48, 20


@pytest.fixture(scope="module")
def arrays():
    return data.load_arrays("synthetic", seed=1, train_size=TRAIN_SIZE, test_size=TEST_SIZE)


@pytest.fixture(scope="module", params=["raw", "png"])
def written(request, arrays, tmp_path_factory):
    """4 train and 4 test shards of the synthetic set, raw then PNG; read-only."""
    out = tmp_path_factory.mktemp("shards") / request.param
    train, test, info = arrays
    shards.write_array_shards(train, test, info, str(out), num_shards=4, encoding=request.param)
    return out


@pytest.fixture
def copy(written, tmp_path):
    """A private copy of `written` to damage."""
    return pathlib.Path(shutil.copytree(written, tmp_path / "copy"))


def _epoch(dataset_):
    batches = list(dataset_.as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _sorted(images, labels):
    """Samples as a canonical list (a set that keeps duplicates): label, then image bytes."""
    return sorted((int(y), x.tobytes()) for x, y in zip(images, labels))


# ----------------------------------------------------------------------------------------------
# Shards: the TensorFlow pipeline's images, bit for bit.
# ----------------------------------------------------------------------------------------------


def test_shards_load_the_tensorflow_eval_images_bit_for_bit(written, arrays):
    info = arrays[2]
    _, _, test_ds, _ = shards.build_shard_datasets(str(written), batch_size=16, eval_batch_size=7)
    (x_train, y_train), _, _ = shards.load_shard_arrays(str(written))
    expected = {
        "test": _epoch(test_ds),  # the streamed shards' evaluation pipeline
        "train": _epoch(pipeline.build_eval_dataset(x_train, y_train, info, 16)),
    }
    for split, (want_images, want_labels) in expected.items():
        images, labels, got_info = dataset.load_shards(str(written), split)
        assert images.dtype == np.float32 and labels.dtype == np.int32
        np.testing.assert_array_equal(images, want_images)
        np.testing.assert_array_equal(labels, want_labels)
        assert got_info["size"] == len(want_labels)
    assert got_info["num_classes"] == info.num_classes
    assert got_info["image_shape"] == info.image_shape and got_info["classes"] is None
    assert got_info["mean"] == info.mean and got_info["std"] == info.std
    black = pipeline.normalize(np.zeros((1, 1, 3), np.uint8), info).numpy().reshape(-1)
    np.testing.assert_array_equal(np.float32(got_info["pad_value"]), black)


def test_pixels_on_disk_give_the_same_batches_as_pixels_in_memory(written, tmp_path):
    """`disk_dir` keeps the uint8 pixels in a file read batch by batch: the same augmented,
    shuffled batches as the pixels in memory, and the file is checked for its size."""
    in_memory = dataset.load_shards(str(written), "train", 1, 2, normalized=False)
    on_disk = dataset.load_shards(str(written), "train", 1, 2, False, disk_dir=str(tmp_path))
    assert isinstance(on_disk[0], DiskImages) and on_disk[0].shape == in_memory[0].shape
    np.testing.assert_array_equal(on_disk[1], in_memory[1])
    norm = (in_memory[2]["mean"], in_memory[2]["std"])
    for (x, y), (want_x, want_y) in zip(
        batching.batches(*on_disk[:2], 5, 0, 3, augment=True, normalization=norm),
        batching.batches(*in_memory[:2], 5, 0, 3, augment=True, normalization=norm),
    ):
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)
    path = on_disk[0].path
    with open(path, "ab") as f:
        f.write(b"x")
    with pytest.raises(DeviceError, match="rewrite it"):
        DiskImages(path, len(on_disk[1]), in_memory[0].shape[1:])
    with pytest.raises(DeviceDataError, match="normalized=False"):
        dataset.load_shards(str(written), "test", disk_dir=str(tmp_path))


def test_a_device_part_is_the_tensorflow_device_part(written):
    for shard_index in range(2):
        train_ds, _, _, info = shards.build_shard_datasets(
            str(written), 8, 8, augment=False, shard_index=shard_index, num_shards=2
        )
        images, labels, got = dataset.load_shards(str(written), "train", shard_index, 2)
        assert got["size"] == info.train_size == len(labels)
        assert _sorted(images, labels) == _sorted(*_epoch(train_ds))
    test = dataset.load_shards(str(written), "test", 1, 2)[1]
    assert len(test) == TEST_SIZE  # evaluation is never split across devices
    with pytest.raises(DeviceDataError, match="4 training shards.*num_shards=5"):
        dataset.load_shards(str(written), "train", 0, 5)
    with pytest.raises(DeviceDataError, match="shard_index"):
        dataset.load_shards(str(written), "train", 2, 2)


# ----------------------------------------------------------------------------------------------
# Bad files: one error type, one line, naming the file.
# ----------------------------------------------------------------------------------------------


def _load_fails(path, match, split="train"):
    with pytest.raises(DeviceDataError, match=match) as caught:
        dataset.load_shards(str(path), split)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_a_corrupt_byte_fails_the_checksum_before_parsing(copy):
    shard = copy / "train-00002-of-00004.tfrecord"
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0xFF
    shard.write_bytes(bytes(content))
    index = records.read_index(str(copy))
    want = index.train[2].sha256
    message = _load_fails(copy, f"Shard {shard} has sha256 [0-9a-f]{{64}}; its index expects")
    assert want in message and records.file_sha256(str(shard)) in message
    dataset.load_shards(str(copy), "test")  # the test shards are intact


def test_truncated_missing_and_malformed_shards_name_the_file(copy):
    shard = copy / "train-00001-of-00004.tfrecord"
    shard.write_bytes(shard.read_bytes()[:-10])
    _load_fails(copy, f"Shard {shard} has \\d+ bytes; its index expects \\d+ \\(truncated")
    # The same cut file listed with its own size and checksum: the record framing tells.
    index = json.loads((copy / "index.json").read_text())
    entry = index["splits"]["train"]["shards"][1]
    entry.update(num_bytes=shard.stat().st_size, sha256=records.file_sha256(str(shard)))
    (copy / "index.json").write_text(json.dumps(index))
    _load_fails(copy, f"{shard}: a record of .* runs past the end")
    (copy / "test-00003-of-00004.tfrecord").unlink()
    _load_fails(copy, "test-00003-of-00004.tfrecord is missing", split="test")


def test_a_wrong_image_shape_names_the_shard(copy):
    index = json.loads((copy / "index.json").read_text())
    index["image_shape"] = [16, 16, 3]
    (copy / "index.json").write_text(json.dumps(index))
    _load_fails(copy, f"Shard {copy}.*(not 768 bytes|shape \\(32, 32, 3\\); expected)")


def test_bad_indexes_fail_as_the_pipeline_says(copy, tmp_path):
    path = copy / "index.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    _load_fails(copy, f"{path} is not valid JSON")
    _load_fails(tmp_path, f"{tmp_path / 'index.json'} not found")
    index = json.loads(text)
    index["splits"]["train"]["shards"][1]["sha256"] = "abc"
    path.write_text(json.dumps(index))
    message = _load_fails(copy, r"field splits\.train\.shards\[1\]\.sha256")
    with pytest.raises(data.DatasetFileError) as caught:  # one set of rules, the same words
        data.load_index(str(copy))
    assert str(caught.value) == message
    with pytest.raises(DeviceDataError, match="local directory"):
        dataset.load_shards("s3://bucket/shards", "train")
    with pytest.raises(DeviceDataError, match="split"):
        dataset.load_shards(str(copy), "validation")


# ----------------------------------------------------------------------------------------------
# Image folders.
# ----------------------------------------------------------------------------------------------

SIZE = 16
# (class, split, file, (height, width), mode): val/ holds images at the target size only (read
# exactly as TensorFlow reads them); train/ also holds images to shrink, to enlarge, and a JPEG.
FILES = [
    ("b_cat", "train", "1.png", (24, 20), "RGB"),
    ("b_cat", "train", "2.jpg", (16, 16), "RGB"),
    ("b_cat", "train", "3.png", (10, 12), "L"),
    ("a_dog", "train", "x.PNG", (16, 16), "RGBA"),
    ("a_dog", "train", "y.jpeg", (40, 33), "RGB"),
    ("c", "train", "only.png", (16, 16), "L"),
    ("b_cat", "val", "1.png", (16, 16), "RGB"),
    ("b_cat", "val", "2.png", (16, 16), "LA"),
    ("a_dog", "val", "1.png", (16, 16), "RGBA"),
    ("c", "val", "1.png", (16, 16), "L"),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for name, split, file, shape, mode in FILES:
        pixels = rng.integers(0, 256, (*shape, len(mode)), dtype=np.uint8)
        pixels = pixels.reshape(shape) if mode == "L" else pixels  # modes follow the channels
        (root / split / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / split / name / file)
    (root / "train" / "c" / "notes.txt").write_text("not an image")
    (root / "train" / ".hidden").mkdir()
    return root


def test_image_folder_matches_the_tensorflow_image_folder_pipeline(folder):
    train_ds, _, test_ds, info = image_folder.build_image_folder_datasets(
        str(folder), 4, 3, image_size=SIZE, augment=False
    )
    images, labels, got = device_folder.load_image_folder(str(folder), "test", SIZE)
    assert got["classes"] == ("a_dog", "b_cat", "c") and got["num_classes"] == 3
    want_images, want_labels = _epoch(test_ds)
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(images, want_images)  # decoded, not resized: exact
    # Round robin over the sorted classes: a_dog, b_cat, c, then b_cat's second file.
    np.testing.assert_array_equal(labels, [0, 1, 2, 1])

    (x_train, y_train), _, _ = image_folder.load(str(folder), image_size=SIZE)
    want_images, want_labels = _epoch(pipeline.build_eval_dataset(x_train, y_train, info, 4))
    images, labels, got = device_folder.load_image_folder(str(folder), "train", SIZE)
    np.testing.assert_array_equal(labels, want_labels)
    assert images.shape == want_images.shape == (6, SIZE, SIZE, 3) and got["size"] == 6
    np.testing.assert_array_equal(labels, [0, 1, 2, 0, 1, 1])  # x.PNG 1.png only y.jpeg 2.jpg 3.png
    level = 1 / 255 / min(image_folder.STD) * 1.001  # one pixel level, normalized
    # PNGs at the target size: exact. Resized PNGs: Pillow's float32 filter is TensorFlow's, but
    # sums in another order, so a pixel may round one level away. JPEGs: TensorFlow decodes with
    # libjpeg's fast integer IDCT, Pillow with the accurate one: a few levels apart.
    for index, levels in zip(range(6), (0, 1, 0, 6, 6, 1)):
        np.testing.assert_allclose(images[index], want_images[index], rtol=0, atol=levels * level)
    assert np.mean(images[[1, 5]] != want_images[[1, 5]]) < 0.05

    part = device_folder.load_image_folder(str(folder), "train", SIZE, shard_index=1, num_shards=2)
    np.testing.assert_array_equal(part[1], want_labels[1::2])


def test_image_folder_holds_out_the_same_validation_files_as_tensorflow(folder):
    """A third of train/'s 6 files (2, drawn from the seed) is the validation split on both
    sides, and neither side trains on them."""
    args = dict(image_size=SIZE, augment=False, validation_fraction=1 / 3, seed=7)
    splits = image_folder.build_image_folder_datasets(str(folder), 4, 3, **args)
    assert (splits.info.train_size, splits.info.validation_size) == (4, 2)
    want_images, want_labels = _epoch(splits.validation)
    load = functools.partial(
        device_folder.load_image_folder, str(folder), image_size=SIZE, validation_fraction=1 / 3
    )
    images, labels, _ = load("validation", seed=7)
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_allclose(images, want_images, rtol=0, atol=6 / 255 / min(image_folder.STD))
    train_images, _, _ = load("train", seed=7)
    assert len(train_images) == 4
    for image in images:  # held out: in no training batch
        assert not any(np.array_equal(image, train) for train in train_images)
    assert not np.array_equal(load("validation", seed=8)[0], images)  # another seed, other files


def test_augmentation_constants_are_the_pipelines():
    assert batching.CROP_PADDING == pipeline.CROP_PADDING


def test_bad_image_folders_fail_clearly(folder, tmp_path):
    broken = pathlib.Path(shutil.copytree(folder, tmp_path / "broken"))
    (broken / "val" / "c" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DeviceDataError, match="1.png could not be read or decoded"):
        device_folder.load_image_folder(str(broken), "test", SIZE)
    shutil.rmtree(broken / "val" / "c")
    with pytest.raises(DeviceDataError, match="same class directories.*only in val: \\[\\]"):
        device_folder.load_image_folder(str(broken), "train", SIZE)
    with pytest.raises(DeviceDataError, match="no train/ directory"):
        device_folder.load_image_folder(str(tmp_path), "train", SIZE)
    with pytest.raises(DeviceDataError, match="image_size"):
        device_folder.load_image_folder(str(folder), "train", 0)


# ----------------------------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------------------------


def _samples(count=23, shape=(6, 5, 3)):
    images = np.arange(count * np.prod(shape), dtype=np.float32).reshape(count, *shape)
    return images, np.arange(count, dtype=np.int32)


def _labels(iterator):
    return [b[1] for b in iterator]


def test_batches_cover_every_sample_once_per_epoch_in_a_seeded_order():
    images, labels = _samples()
    epoch0 = list(batching.batches(images, labels, 5, seed=3, epoch=0))
    assert [len(b[1]) for b in epoch0] == [5, 5, 5, 5, 3]  # the last partial batch is kept
    order = np.concatenate([b[1] for b in epoch0])
    assert sorted(order) == list(range(23)) and list(order) != list(range(23))
    for batch_images, batch_labels in epoch0:
        np.testing.assert_array_equal(batch_images, images[batch_labels])
    again = np.concatenate(_labels(batching.batches(images, labels, 5, seed=3, epoch=0)))
    np.testing.assert_array_equal(again, order)
    for seed, epoch in ((3, 1), (4, 0)):
        other = np.concatenate(_labels(batching.batches(images, labels, 5, seed, epoch)))
        assert sorted(other) == list(range(23)) and list(other) != list(order)
    stored = np.concatenate(_labels(batching.batches(images, labels, 5, 0, 0, shuffle=False)))
    np.testing.assert_array_equal(stored, labels)
    dropped = _labels(batching.batches(images, labels, 5, 0, 0, drop_remainder=True))
    assert [len(b) for b in dropped] == [5] * 4


def test_augment_crops_padded_images_and_flips_them():
    pixels = np.random.default_rng(0).integers(1, 256, (40, 8, 8, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    images, labels = dataset.normalize(pixels, mean, std), np.arange(40, dtype=np.int32)
    black = dataset.normalize(np.zeros(3, np.uint8), mean, std)
    args = dict(seed=1, epoch=2, augment=True)
    augmented = list(batching.batches(images, labels, 16, pad_value=black, **args))
    assert [b[0].shape for b in augmented] == [(16, 8, 8, 3)] * 2 + [(8, 8, 8, 3)]
    # Padding the normalized images with the normalized black pixel is padding the uint8 pixels
    # with 0 and then normalizing, as the TensorFlow pipeline does.
    on_pixels = list(batching.batches(pixels, labels, 16, pad_value=0, **args))
    for (got, got_labels), (raw, raw_labels) in zip(augmented, on_pixels):
        np.testing.assert_array_equal(got_labels, raw_labels)
        np.testing.assert_array_equal(got, dataset.normalize(raw, mean, std))
    everything = np.concatenate([b[0] for b in augmented])
    assert np.any(np.all(everything == black, axis=-1))  # some padding came in
    assert not np.array_equal(everything, images[np.concatenate([b[1] for b in augmented])])
    with pytest.raises(DeviceDataError, match="pad_value"):
        batching.batches(images, labels, 16, seed=1, epoch=0, augment=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(seed=-1), "seed"),
        (dict(epoch=1.5), "epoch"),
        (dict(shuffle=1), "shuffle"),
        (dict(labels=np.zeros(3, np.int32)), "labels"),
        (dict(images=np.zeros((23, 5))), "images"),
        (dict(batch_size=30, drop_remainder=True), "drop_remainder"),
    ],
)
def test_batches_check_their_arguments_up_front(kwargs, match):
    images, labels = _samples()
    args = dict(images=images, labels=labels, batch_size=4, seed=0, epoch=0)
    args.update(kwargs)
    with pytest.raises(DeviceDataError, match=match):
        batching.batches(**args)


# ----------------------------------------------------------------------------------------------
# Without TensorFlow.
# ----------------------------------------------------------------------------------------------


def test_shards_load_in_a_process_where_tensorflow_cannot_be_imported(written, tmp_path):
    code = (
        "import sys\n"
        "for name in ('tensorflow', 'tf_keras', 'tensorboard'):\n"
        "    sys.modules[name] = None  # any import of it now fails\n"
        "import numpy as np\n"
        "from tfsplit.device import batches as batching, dataset\n"
        f"images, labels, info = dataset.load_shards({str(written)!r}, 'test')\n"
        f"np.save({str(tmp_path / 'images.npy')!r}, images)\n"
        "batch = next(batching.batches(images, labels, 4, 0, 0, augment=True,\n"
        "                             pad_value=info['pad_value']))\n"
        "assert batch[0].shape == (4, *info['image_shape'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    want = dataset.load_shards(str(written), "test")[0]
    np.testing.assert_array_equal(np.load(tmp_path / "images.npy"), want)
