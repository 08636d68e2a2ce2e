"""Writes a dataset as TFRecord shards plus index.json, for training with data.name=shards.

  tfsplit-prepare-data --dataset=cifar10 --out=/data/cifar10-shards --num_shards=8
  tfsplit-train --config=configs/deprune.py --config.data.name=shards \
      --config.data.path=/data/cifar10-shards --workdir=...

Any dataset tfsplit reads (the flags are `load_arrays`'s arguments) becomes N shards per split
(contiguous blocks of the stored order; raw pixels, or PNG with --encoding=png) and an index with
the counts, classes, image shape, normalization and each shard's size and sha256. The index is
written last, so a crash never leaves one that lists missing shards. --out must be empty or an
earlier output.
"""

import sys

from absl import app, flags

import tfsplit  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfsplit.data import DATASETS, shards
from tfsplit.records import holdout
from tfsplit_tools import cli

_DATASET = flags.DEFINE_enum("dataset", None, DATASETS, "Dataset to write.", required=True)
_PATH = flags.DEFINE_string("path", None, "The dataset's local files (as load_arrays' path).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic sets.")
_TRAIN_SIZE = flags.DEFINE_integer("train_size", None, "The first N training samples only.")
_TEST_SIZE = flags.DEFINE_integer("test_size", None, "The first N test samples only.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Side of the square images written.")
_CHANNELS = flags.DEFINE_integer("channels", None, "3 repeats a gray dataset's channel.")
_OUT = flags.DEFINE_string("out", None, "Directory to write the shards into.", required=True)
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 8, "Shards per split.")
_VALIDATION_FRACTION = flags.DEFINE_float(
    "validation_fraction",
    holdout.VALIDATION_FRACTION,
    "Share of the training set held out (drawn from --seed) and written as the validation "
    "split; training asks for the same (config.data.validation_fraction). 0: none.",
)
_ENCODING = flags.DEFINE_enum(
    "encoding",
    shards.DEFAULT_ENCODING,
    shards.ENCODINGS,
    "raw: uint8 pixels (fastest to train from); png: lossless, smaller, slower to decode.",
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Write into a non-empty directory that is not an earlier output."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    index = shards.write_shards(
        _DATASET.value,
        _OUT.value,
        num_shards=_NUM_SHARDS.value,
        path=_PATH.value,
        seed=_SEED.value,
        train_size=_TRAIN_SIZE.value,
        test_size=_TEST_SIZE.value,
        image_size=_IMAGE_SIZE.value,
        channels=_CHANNELS.value,
        overwrite=_OVERWRITE.value,
        encoding=_ENCODING.value,
        validation_fraction=_VALIDATION_FRACTION.value,
    )
    info = index.info
    print(f"{info.name}: {info.num_classes} classes, images {'x'.join(map(str, info.image_shape))}")
    print(f"{'split':<10} {'samples':>9} {'shards':>7} {'bytes':>14}")
    for split in shards.SPLITS:
        entries = index.split(split)
        samples = sum(s.num_samples for s in entries)
        size = sum(s.num_bytes for s in entries)
        if entries:
            print(f"{split:<10} {samples:>9,} {len(entries):>7} {size:>14,}")
    print(f"wrote {index.path}")


if __name__ == "__main__":  # python -m: the quieting reaches only what is still to load (cli)
    cli.quiet_tensorflow_startup(sys.argv)
    cli.run(main)
