"""`build_datasets`: training and test pipelines of any source, by name (the room's top).

It only dispatches: datasets held in memory go through `load_arrays` and the batches of
`pipeline`, image folders stream through `image_folder`, and TFRecord shards through `shards`.
"""

import dataclasses

from tfsplit.data import common, image_folder, shards
from tfsplit.data.arrays import DATASETS, load_arrays
from tfsplit.data.pipeline import build_eval_dataset, build_train_dataset
from tfsplit.records import holdout

# What `build_datasets` reads: the datasets, and TFRecord shards streamed from disk (not arrays).
SOURCES = (*DATASETS, "shards")


def build_datasets(
    name,
    batch_size,
    eval_batch_size,
    augment=True,
    seed=0,
    path=None,
    train_size=None,
    test_size=None,
    image_size=None,
    channels=None,
    shard_index=0,
    num_shards=1,
    cache=False,
    service_address=None,
    local_cache_dir=None,
    validation_fraction=0.0,
    position=None,
):
    """Training, validation and test pipelines of (float32 normalized images, int32 labels)
    batches.

    Args:
      name: one of `SOURCES`: a `load_arrays` dataset (held in memory), "image_folder" (files
        read and decoded while training, unless `cache`) or "shards" (TFRecord shards streamed
        from the directory or object-store URL `path`, see `tfsplit.data.shards`).
      path, seed, train_size, test_size, image_size, channels: as in `load_arrays`; `seed`
        also fixes the shuffling order and the augmentation. For "shards", `path` is required
        and the sizes and `channels` must be None: the shards fix them.
      batch_size: training batch size.
      eval_batch_size: test batch size.
      augment: whether training batches get the random crop and flip.
      shard_index: this device's number, 0 <= shard_index < num_shards.
      num_shards: devices sharing the training set. Device i trains on every num_shards-th
        sample from the i-th (in memory) or on every num_shards-th shard file (shards), so the
        devices' parts are disjoint and cover the set; the test set is never split.
      cache: shards and image folders: decode this device's training part once and train from
        memory (the other sets are held decoded already).
      service_address: shards: a tf.data service dispatcher whose workers read and decode the
        shards (see `build_shard_datasets`).
      local_cache_dir: s3:// shards: a local directory that keeps the verified shards.
      validation_fraction: the share of the training set held out for validation, drawn from
        `seed` (`tfsplit.records.holdout`) before the devices' parts; 0 holds out nothing.
        Shards hold the validation split they were written with (`tfsplit-prepare-data
        --validation_fraction`), so for them it must be 0 or the fraction they were written with.
      position: in-memory sets and image folders: the variable that holds the (epoch, first
        batch) the next iterator starts at (`pipeline.epoch_plans`); a run that sets it after a
        resume (`tfsplit.callbacks.DataPosition`) trains on the batches the uninterrupted run
        would have. Shards draw their order anew in each process (a resumed epoch reads them in
        another order).

    Returns:
      `Splits(train, validation, test, info)`: `validation` is None when nothing is held out;
      `info.train_size` counts this device's training samples.
    """
    common.check_pipeline_arguments(
        batch_size, eval_batch_size, seed, shard_index, num_shards, augment=augment
    )
    if name == "shards":
        _check_unset_for_shards(
            path,
            train_size=train_size,
            test_size=test_size,
            image_size=image_size,
            channels=channels,
        )
        return shards.build_shard_datasets(
            path,
            batch_size,
            eval_batch_size,
            augment,
            seed,
            shard_index,
            num_shards,
            cache,
            service_address=service_address,
            local_cache_dir=local_cache_dir,
            validation_fraction=validation_fraction,
        )
    if name not in SOURCES:
        raise ValueError(f"`name` must be one of {SOURCES}. Received: name={name!r}")
    if local_cache_dir is not None:
        raise ValueError(
            "`local_cache_dir` keeps shards read from an object store (name='shards', path "
            f"s3://...). Received: name={name!r}, local_cache_dir={local_cache_dir!r}"
        )
    if name == "image_folder" and not cache and service_address is None:
        if channels not in (None, 3):
            raise ValueError(f"Image folders give RGB images. Received: channels={channels!r}")
        return image_folder.build_image_folder_datasets(
            path,
            batch_size,
            eval_batch_size,
            image_size,
            augment,
            seed,
            shard_index,
            num_shards,
            train_size,
            test_size,
            validation_fraction,
            position,
        )
    if service_address is not None:
        raise ValueError(
            "`service_address` applies to streamed shards (name='shards'); an in-memory set "
            f"is batched in this process. Received: name={name!r}, "
            f"service_address={service_address!r}"
        )
    (x_train, y_train), (x_test, y_test), info = load_arrays(
        name, path, seed, train_size, test_size, image_size, channels
    )
    kept, held = holdout.held_out(len(x_train), validation_fraction, seed)
    validation = x_train[held], y_train[held]
    x_train, y_train = (
        common.device_part(a[kept], shard_index, num_shards, name, "samples")
        for a in (x_train, y_train)
    )
    info = dataclasses.replace(info, train_size=len(x_train), validation_size=len(held))
    return common.Splits(
        build_train_dataset(x_train, y_train, info, batch_size, augment, seed, position),
        build_eval_dataset(*validation, info, eval_batch_size) if len(held) else None,
        build_eval_dataset(x_test, y_test, info, eval_batch_size),
        info,
    )


def _check_unset_for_shards(path, **fixed):
    """Shards fix the sizes and channels they were written with, and are read from `path`."""
    for key, value in fixed.items():
        if value is not None:
            raise ValueError(
                f"`{key}` must be None for shards: the shards fix it (rewrite them with "
                f"tfsplit-prepare-data to change it). Received: {key}={value!r}"
            )
    if path is None:
        raise ValueError(
            "shards are read from `path`, a directory written by tfsplit-prepare-data. "
            "Received: path=None"
        )
