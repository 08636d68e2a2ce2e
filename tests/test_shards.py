"""Tests for tfsplit.data.shards: the TFRecord shard format, its writer, reader and tool."""

# isort: off
import tfsplit  # noqa: F401  (first: sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: on
import concurrent.futures
import hashlib
import json
import os
import pathlib
import re
import shutil
import struct

import numpy as np
import pytest
import tensorflow as tf
from test_tools import run_tool  # the tools in a subprocess, as test_tools runs them

from tfsplit import data
from tfsplit.data import shards
from tfsplit.training import train
from tfsplit.training.config import base_config, phase
from tfsplit.training.trainer import load_run_arrays

TRAIN_SIZE, TEST_SIZE = 200, 50


@pytest.fixture(scope="module")
def arrays():
    return data.load_arrays("synthetic", seed=1, train_size=TRAIN_SIZE, test_size=TEST_SIZE)


@pytest.fixture(scope="module")
def written(arrays, tmp_path_factory):
    """A shard directory of 4 train and 4 test shards, shared read-only by the tests."""
    out = tmp_path_factory.mktemp("shards") / "synthetic"
    train_arrays, test_arrays, info = arrays
    shards.write_array_shards(train_arrays, test_arrays, info, str(out), num_shards=4)
    return out


@pytest.fixture(scope="module")
def written_png(arrays, tmp_path_factory):
    """The same shards with PNG images."""
    out = tmp_path_factory.mktemp("shards") / "synthetic-png"
    train_arrays, test_arrays, info = arrays
    shards.write_array_shards(
        train_arrays, test_arrays, info, str(out), num_shards=4, encoding="png"
    )
    return out


@pytest.fixture(params=["raw", "png"])
def copy(request, written, written_png, tmp_path):
    """A private copy of `written` (raw, then PNG images) to damage."""
    source = written if request.param == "raw" else written_png
    return pathlib.Path(shutil.copytree(source, tmp_path / "copy"))


def _epoch(dataset):
    batches = list(dataset.as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _pixels(images, info):
    """uint8 pixels back from normalized images, to match samples exactly."""
    return np.round((images * np.array(info.std) + np.array(info.mean)) * 255).astype(np.uint8)


def _build(path, **kwargs):
    args = dict(batch_size=32, eval_batch_size=16, seed=3)
    args.update(kwargs)
    splits = shards.build_shard_datasets(str(path), **args)
    return splits.train, splits.test, splits.info  # what these tests check


# ----------------------------------------------------------------------------------------------
# Writing and the index.
# ----------------------------------------------------------------------------------------------


def test_index_lists_contiguous_shards_with_sizes_and_checksums(written, arrays):
    info = arrays[2]
    index = data.load_index(str(written))
    assert index.info == info  # name, classes, shape, sizes, and the exact mean and std
    assert sorted(os.listdir(written)) == sorted(
        ["index.json"]
        + [f"{split}-{i:05d}-of-00004.tfrecord" for split in ("train", "test") for i in range(4)]
    )
    assert [s.num_samples for s in index.train] == [50, 50, 50, 50]
    assert [s.num_samples for s in index.test] == [13, 13, 12, 12]
    for shard in index.train + index.test:
        content = pathlib.Path(shard.path).read_bytes()
        assert shard.num_bytes == len(content)
        assert shard.sha256 == hashlib.sha256(content).hexdigest()
    raw = json.loads((written / "index.json").read_text())
    assert raw["version"] == 1 and raw["shard_assignment"] == "contiguous"
    assert raw["splits"]["train"]["num_samples"] == TRAIN_SIZE
    assert data.load_index(str(written / "index.json")) == index


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_shards_decode_to_the_exact_arrays(written, written_png, arrays, encoding):
    (x, y), (xt, yt), info = arrays
    path = written if encoding == "raw" else written_png
    assert data.load_index(str(path)).encoding == encoding
    (sx, sy), (sxt, syt), sinfo = data.load_shard_arrays(str(path))
    assert sinfo == info and sx.dtype == np.uint8 and sy.dtype == np.int32
    np.testing.assert_array_equal(sx, x)
    np.testing.assert_array_equal(sy, y)
    np.testing.assert_array_equal(sxt, xt)
    np.testing.assert_array_equal(syt, yt)


def test_write_refuses_foreign_directories_and_replaces_earlier_output(arrays, tmp_path):
    train_arrays, test_arrays, info = arrays
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        shards.write_array_shards(train_arrays, test_arrays, info, str(foreign), num_shards=2)
    shards.write_array_shards(
        train_arrays, test_arrays, info, str(foreign), num_shards=2, overwrite=True
    )
    assert (foreign / "notes.txt").read_text() == "mine"  # other files are left alone
    out = str(tmp_path / "out")
    shards.write_array_shards(train_arrays, test_arrays, info, out, num_shards=3)
    (tmp_path / "out" / "train-00000-of-00002.tfrecord.partial").write_bytes(b"crashed")
    index = shards.write_array_shards(train_arrays, test_arrays, info, out, num_shards=2)
    assert sorted(os.listdir(out)) == sorted(
        ["index.json"] + [os.path.basename(s.path) for s in index.train + index.test]
    )
    with pytest.raises(ValueError, match="num_shards=51"):
        shards.write_array_shards(train_arrays, test_arrays, info, out, num_shards=51)
    with pytest.raises(ValueError, match="uint8"):
        shards.write_array_shards((train_arrays[0] * 1.0, train_arrays[1]), test_arrays, info, out)


# ----------------------------------------------------------------------------------------------
# Pipelines.
# ----------------------------------------------------------------------------------------------


def test_pipelines_give_the_batches_of_the_in_memory_pipelines(written, arrays):
    (x, y), (xt, yt), info = arrays
    train_ds, test_ds, shard_info = _build(written, augment=False)
    assert shard_info == info
    expected = list(data.build_eval_dataset(xt, yt, info, 16).as_numpy_iterator())
    got = list(test_ds.as_numpy_iterator())
    assert len(got) == len(expected) == int(test_ds.cardinality()) == 4
    for (images, labels), (expected_images, expected_labels) in zip(got, expected):
        np.testing.assert_array_equal(images, expected_images)
        np.testing.assert_array_equal(labels, expected_labels)
    batches = list(train_ds.as_numpy_iterator())
    assert [len(b[1]) for b in batches] == [32] * 6 + [8] and int(train_ds.cardinality()) == 7
    assert train_ds.element_spec[0].shape.as_list() == [None, 32, 32, 3]
    assert batches[0][0].dtype == np.float32 and batches[0][1].dtype == np.int32
    images, labels = _epoch(train_ds)
    label_of = {image.tobytes(): label for image, label in zip(x, y)}
    recovered = [image.tobytes() for image in _pixels(images, info)]
    assert sorted(recovered) == sorted(label_of)  # every sample once per epoch
    assert [label_of[image] for image in recovered] == labels.tolist()


@pytest.mark.parametrize("cache", [False, True])
def test_train_order_and_augmentation_are_deterministic_from_the_seed(written, cache):
    """Same seed, same batches, epoch after epoch (a cache replays its first epoch's file order,
    so its later epochs differ from an uncached pipeline's, but are as reproducible)."""
    first, _, _ = _build(written, seed=3, cache=cache)
    again, _, _ = _build(written, seed=3, cache=cache)
    epochs = [_epoch(first) for _ in range(2)]
    for expected in epochs:
        images, labels = _epoch(again)
        np.testing.assert_array_equal(labels, expected[1])
        np.testing.assert_array_equal(images, expected[0])
    assert not np.array_equal(epochs[0][1], epochs[1][1])  # reshuffled each epoch
    np.testing.assert_array_equal(np.sort(epochs[0][1]), np.sort(epochs[1][1]))
    other, _, _ = _build(written, seed=4, cache=cache)
    assert not np.array_equal(_epoch(other)[1], epochs[0][1])


def test_devices_read_disjoint_whole_shards_that_cover_the_training_set(written, arrays):
    (x, _), _, info = arrays
    parts = []
    for device in range(3):
        train_ds, test_ds, device_info = _build(
            written, augment=False, shard_index=device, num_shards=3
        )
        assert device_info.train_size == (100 if device == 0 else 50)  # shards 0+3, 1, 2
        assert device_info.test_size == TEST_SIZE and int(test_ds.cardinality()) == 4
        parts.append({image.tobytes() for image in _pixels(_epoch(train_ds)[0], info)})
    assert sum(len(p) for p in parts) == TRAIN_SIZE
    assert set().union(*parts) == {image.tobytes() for image in x}
    with pytest.raises(ValueError, match="4 training shards.*num_shards=5"):
        _build(written, shard_index=0, num_shards=5)
    with pytest.raises(ValueError, match="shard_index"):
        _build(written, shard_index=2, num_shards=2)


def test_build_datasets_reads_shards_and_splits_in_memory_sets_per_device(written, arrays):
    (x, y), _, info = arrays
    train_ds, _, _, shard_info = data.build_datasets(
        "shards", 32, 16, path=str(written), shard_index=1, num_shards=2
    )
    assert shard_info.train_size == 100
    args = dict(seed=1, train_size=TRAIN_SIZE, test_size=TEST_SIZE, augment=False)
    train_ds, _, _, device_info = data.build_datasets("synthetic", 32, 16, **args, num_shards=3)
    assert device_info.train_size == 67
    images, labels = _epoch(train_ds)
    expected = sorted(image.tobytes() for image in x[0::3])
    assert sorted(image.tobytes() for image in _pixels(images, info)) == expected
    assert "shards" in data.SOURCES and "shards" not in data.DATASETS


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(train_size=10), "`train_size` must be None for shards"),
        (dict(image_size=16), "`image_size` must be None for shards"),
        (dict(channels=3), "`channels` must be None for shards"),
        (dict(path=None), "Received: path=None"),
        (dict(path="gs://bucket/data"), "gs:// paths are not supported"),
        (dict(num_shards=0), "num_shards"),
        (dict(shard_index=-1), "shard_index"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_shards_source_rejects_bad_arguments(written, kwargs, message):
    args = dict(batch_size=8, eval_batch_size=8, path=str(written))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        data.build_datasets("shards", **args)


# ----------------------------------------------------------------------------------------------
# Faults: each names the file.
# ----------------------------------------------------------------------------------------------


def _flip_byte(path, offset):
    content = bytearray(path.read_bytes())
    content[offset] ^= 0xFF
    path.write_bytes(bytes(content))


def test_checksum_mismatch_names_the_shard(copy):
    shard = copy / "train-00002-of-00004.tfrecord"
    _flip_byte(shard, 100)
    with pytest.raises(data.DatasetFileError, match=f"{shard}.*sha256.*expects"):
        _build(copy)


def test_truncated_and_missing_shards_name_the_file(copy):
    shard = copy / "train-00001-of-00004.tfrecord"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(data.DatasetFileError, match=f"{shard} has .* bytes.*truncated"):
        _build(copy, verify_checksums=False)
    (copy / "test-00003-of-00004.tfrecord").unlink()
    with pytest.raises(data.DatasetFileError, match="test-00003-of-00004.tfrecord is missing"):
        _build(copy, shard_index=0, num_shards=4)  # device 0 skips shard 1; the test set is whole


def test_corrupt_shard_fails_the_epoch_naming_it(copy):
    shard = copy / "train-00003-of-00004.tfrecord"
    _flip_byte(shard, shard.stat().st_size // 2)  # same size: only the checksum would tell
    train_ds, _, _ = _build(copy, verify_checksums=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"{shard} gave .* samples but"):
        _epoch(train_ds)


def _first_record(path):
    """The bytes of a TFRecord file's first record: length, its CRC, data, the data's CRC."""
    content = path.read_bytes()
    (length,) = struct.unpack("<Q", content[:8])
    return content[: 8 + 4 + length + 4]


def _bad_image_record(path):
    """A well-formed record (valid CRCs) whose image is neither raw pixels nor a PNG."""
    example = tf.train.Example()
    example.ParseFromString(next(iter(tf.data.TFRecordDataset(str(path)))).numpy())
    example.features.feature["image"].bytes_list.value[0] = b"not an image"
    scratch = path.with_suffix(".scratch")
    with tf.io.TFRecordWriter(str(scratch)) as writer:
        writer.write(example.SerializeToString())
    record = scratch.read_bytes()
    scratch.unlink()
    return record


@pytest.mark.parametrize("damage", ["cut_at_a_record_boundary", "undecodable_image"])
def test_an_epoch_never_ends_short_silently(copy, damage):
    """Damage that TFRecordDataset reads without an error still fails the epoch, naming the file.

    The shards pass every check when the pipeline is built; one is then damaged between epochs
    (as a file replaced on a shared disk), so only the per-shard count can notice.
    """
    shard = copy / "train-00000-of-00004.tfrecord"
    train_ds, _, _ = _build(copy, augment=False)
    assert len(_epoch(train_ds)[1]) == TRAIN_SIZE
    content = shard.read_bytes()
    first = _first_record(shard)
    if damage == "cut_at_a_record_boundary":
        shard.write_bytes(first)
        assert len(list(tf.data.TFRecordDataset(str(shard)))) == 1  # read without any error
    else:
        shard.write_bytes(_bad_image_record(shard) + content[len(first) :])
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=f"{shard} (gave 1 |holds an image that is not)"
    ):
        _epoch(train_ds)


def _edit_index(copy, edit):
    path = copy / "index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda i: i.pop("num_classes"), "missing field num_classes"),
        (lambda i: i.update(version=2), "format version 2 is not supported"),
        (lambda i: i["splits"]["test"].update(num_samples=49), "hold 50 samples.*is 49"),
        (lambda i: i.update(std=[0.1, 0.0, 0.2]), "field std"),
        (lambda i: i.update(image_shape=[32, 32]), "field image_shape"),
        (
            lambda i: i["splits"]["train"]["shards"][1].update(sha256="abc"),
            r"field splits\.train\.shards\[1\]\.sha256",
        ),
        (
            lambda i: i["splits"]["train"]["shards"][0].update(file="../elsewhere.tfrecord"),
            r"field splits\.train\.shards\[0\]\.file",
        ),
        (lambda i: i["splits"].pop("test"), "missing field splits.test"),
    ],
)
def test_bad_index_names_the_file_and_the_field(copy, edit, message):
    path = _edit_index(copy, edit)
    with pytest.raises(data.DatasetFileError, match=f"{path}.*{message}"):
        data.load_index(str(copy))


def test_missing_and_unparsable_index_name_the_file(copy, tmp_path):
    (copy / "index.json").write_text("{not json")
    with pytest.raises(data.DatasetFileError, match=f"{copy / 'index.json'} is not valid JSON"):
        _build(copy)
    with pytest.raises(data.DatasetFileError, match=f"{tmp_path / 'index.json'} not found"):
        _build(tmp_path)


# ----------------------------------------------------------------------------------------------
# The tool and training end to end.
# ----------------------------------------------------------------------------------------------


def _prepare_data(*argv):
    return run_tool("prepare_data", argv, tmp=None)


def test_prepare_data_tool_writes_shards_and_refuses_foreign_directories(tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("x")
    tiny = ["--dataset=synthetic", "--train_size=40", "--test_size=20", "--num_shards=2"]
    runs = [tiny + [f"--out={tmp_path / 'out'}"], tiny + [f"--out={tmp_path / 'foreign'}"]]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        written, refused = pool.map(lambda argv: _prepare_data(*argv), runs)
    assert written.returncode == 0, written.stderr[-3000:]
    assert re.search(r"^train +36 +2 ", written.stdout, re.M), written.stdout
    assert re.search(r"^validation +4 +2 ", written.stdout, re.M), written.stdout  # 0.1 of 40
    assert f"wrote {tmp_path / 'out' / 'index.json'}" in written.stdout
    info = data.load_index(str(tmp_path / "out")).info
    assert (info.train_size, info.validation_size, info.test_size) == (36, 4, 20)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-3000:]
    assert lines[0].startswith("tfsplit-prepare-data: error: ") and "keep.txt" in lines[0]


def test_export_reloads_a_shards_run_from_its_shard_directory(written, arrays):
    config = base_config("deprune")
    config.data.name = "shards"
    config.data.path = str(written)
    config.data.train_size = 10  # Ignored: the shards fix the sizes.
    (x, y), (xt, yt), info = load_run_arrays(config)
    assert info == arrays[2]
    np.testing.assert_array_equal(x, arrays[0][0])
    np.testing.assert_array_equal(yt, arrays[1][1])


def test_training_from_shards_end_to_end(arrays, tmp_path):
    """Validated every epoch on the shards' validation split, tested once at the end."""
    train_arrays, test_arrays, info = arrays
    written = tmp_path / "shards"
    index = shards.write_array_shards(
        train_arrays, test_arrays, info, str(written), num_shards=2, validation_fraction=0.1
    )
    assert (index.info.train_size, index.info.validation_size) == (180, 20)
    config = base_config("deprune")
    config.data.name = "shards"
    config.data.path = str(written)
    config.data.batch_size = 64
    config.data.eval_batch_size = 64
    config.data.augment = False
    config.model.width_multiplier = 0.125
    config.calibration_batches = 2
    config.phases = [
        phase(budget=4, epochs=1, learning_rate=0.05),
        phase(budget=16, epochs=1, learning_rate=0.05, reset="deprune"),
    ]
    summary = train(config, str(tmp_path / "run"))
    assert summary["dataset"] == "synthetic"
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(metrics) == 2 and all(np.isfinite(m["train_cross_entropy"]) for m in metrics)
    assert summary["train_payload_bytes_up"] > 0
    # 20 validation samples: accuracy in twentieths; 50 test samples: in fiftieths.
    assert [round(20 * m["val_accuracy"], 4) % 1 for m in metrics] == [0, 0]
    assert round(50 * summary["final_test_accuracy"], 4) % 1 == 0
    assert summary["final_val_accuracy"] == metrics[-1]["val_accuracy"]
    config.data.validation_fraction = 0.2
    with pytest.raises(ValueError, match="hold out 0.1 of the training set .* not 0.2"):
        train(config, str(tmp_path / "other"))
