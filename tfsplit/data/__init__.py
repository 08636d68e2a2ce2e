"""Training data: datasets by name, as numpy arrays or batched, normalized, augmented tf.data.

`load_arrays` reads a dataset by name; the `build_*` functions turn arrays into tf.data pipelines
that yield float32 images normalized with the dataset's per-channel mean and std (`normalize`,
shared with export code). All arrays are uint8 images (N, H, W, C) and int32 labels (N,).

| name          | source (path=None)      | classes | default images                          |
|---------------|-------------------------|---------|-----------------------------------------|
| synthetic     | generated from `seed`   | 10      | 32x32x3                                 |
| synthetic_hard| generated from `seed`   | 80      | 32x32x3 (every attribute combination)   |
| cifar10       | keras.datasets download | 10      | 32x32x3                                 |
| cifar100      | keras.datasets download | 100     | 32x32x3 (fine labels)                   |
| fashion_mnist | keras.datasets download | 10      | 32x32x1 (28x28 zero-padded by 2 pixels) |
| stl10         | none: `path` required   | 10      | 96x96x3                                 |
| image_folder  | none: `path` required   | folders | 64x64x3 (any JPEG/PNG, resized)         |

`build_datasets` also streams "shards" (not a `load_arrays` name; `SOURCES` lists both): TFRecord
shards and their index.json, written from any dataset above by `write_shards`
(`tfsplit-prepare-data`) and read by `build_shard_datasets` with `path` the shard directory.
The `shard_index`/`num_shards` arguments give each device its own part of the training set, for
every source.

Two arguments adapt any dataset to a model: `image_size` gives square images of that side
(resized, antialiased; Fashion-MNIST is padded at 32 and kept at 28) and `channels=3` repeats the
gray channel of Fashion-MNIST (its mean and std are repeated with it). The augmentation (random
crop of the image zero-padded by `CROP_PADDING`, random horizontal flip) and the normalization work
for any height, width and channel count.

Modules, bottom-up; each imports only modules listed before it:
- `common`: `DatasetInfo`, the errors, argument checks, resizing;
- storage: `files` (archives, folders), `s3_urls`, `retry`, `s3_client` (boto3 settings, what its
  errors mean), `object_streams` (one object as a file), `object_store` (S3 as files);
- readers: `synthetic`, `cifar`, `fashion_mnist`, `stl10`;
- `pipeline`: `normalize`, `augment_batch`, the batches every source ends in;
- `image_folder` (read whole or streamed), `arrays` (`load_arrays` by name);
- shards: `shard_index`, `shard_fetch`, `shard_writer`, `shard_reader`, `shards` (their face);
- `service` (the tf.data service), `builder` (`build_datasets`, the top).
"""

from tfsplit.data.arrays import DATASETS, load_arrays
from tfsplit.data.builder import SOURCES, build_datasets
from tfsplit.data.common import DatasetDownloadError, DatasetFileError, DatasetInfo, Splits
from tfsplit.data.pipeline import (
    CROP_PADDING,
    augment_batch,
    build_eval_dataset,
    build_train_dataset,
    normalize,
)
from tfsplit.data.shards import (
    ShardIndex,
    build_shard_datasets,
    load_index,
    load_shard_arrays,
    write_array_shards,
    write_shards,
)
from tfsplit.data.synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_HUES,
    SYNTHETIC_TEST_SIZE,
    SYNTHETIC_TRAIN_SIZE,
)

__all__ = [
    "CROP_PADDING",
    "DATASETS",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_HUES",
    "SYNTHETIC_TEST_SIZE",
    "SYNTHETIC_TRAIN_SIZE",
    "SOURCES",
    "Splits",
    "ShardIndex",
    "DatasetDownloadError",
    "DatasetFileError",
    "DatasetInfo",
    "augment_batch",
    "build_datasets",
    "build_eval_dataset",
    "build_shard_datasets",
    "build_train_dataset",
    "load_arrays",
    "load_index",
    "load_shard_arrays",
    "normalize",
    "write_array_shards",
    "write_shards",
]
