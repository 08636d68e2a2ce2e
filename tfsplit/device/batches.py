"""Batches of a set held in memory, on a device without TensorFlow: shuffled with numpy (a
permutation drawn from (seed, epoch)), and augmented as the TensorFlow pipeline does (a random
crop of the image padded with 4 black pixels, a random horizontal flip) from another random
stream.
"""

import numpy as np

from tfsplit.device.dataset import DeviceDataError, _check_int, normalize
from tfsplit.device.disk_images import DiskImages

CROP_PADDING = 4  # As tfsplit.data.pipeline: random crop of the image zero-padded by 4 pixels.


def _augment_batch(images, rng, pad_value):
    """The pipeline's augmentation with numpy: each image cropped at its own offset in
    [0, 2 * CROP_PADDING] of the image padded with `pad_value`, then flipped with probability
    1/2. The same crops as `tfsplit.data.pipeline.augment_batch` for the same offsets and flips;
    the random stream (numpy's) differs from TensorFlow's.
    """
    count, height, width, channels = images.shape
    offsets = rng.integers(0, 2 * CROP_PADDING + 1, size=(count, 2))
    flip = rng.random((count, 1)) < 0.5
    rows = offsets[:, :1] + np.arange(height)
    cols = offsets[:, 1:] + np.arange(width)
    cols = np.where(flip, cols[:, ::-1], cols)
    padded = np.empty(
        (count, height + 2 * CROP_PADDING, width + 2 * CROP_PADDING, channels), images.dtype
    )
    padded[...] = np.asarray(pad_value, images.dtype)
    padded[:, CROP_PADDING:-CROP_PADDING, CROP_PADDING:-CROP_PADDING] = images
    return padded[np.arange(count)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _check_batches(images, labels, batch_size, seed, epoch, shuffle, augment, drop_remainder):
    if not isinstance(images, (np.ndarray, DiskImages)) or images.ndim != 4:
        raise DeviceDataError(
            "`images` must be a numpy array (N, H, W, C) or `DiskImages`. Received: "
            f"{type(images).__name__} of shape {getattr(images, 'shape', None)}"
        )
    if not isinstance(labels, np.ndarray) or labels.shape != images.shape[:1]:
        raise DeviceDataError(
            f"`labels` must be a numpy array (N,) with N = {len(images)}. "
            f"Received: shape {np.shape(labels)}"
        )
    if not len(images):
        raise DeviceDataError("`images` must hold at least one sample. Received: 0 samples")
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    _check_int("epoch", epoch, 0)
    for name, value in (
        ("shuffle", shuffle),
        ("augment", augment),
        ("drop_remainder", drop_remainder),
    ):
        if not isinstance(value, bool):
            raise DeviceDataError(f"`{name}` must be a bool. Received: {name}={value!r}")
    if drop_remainder and batch_size > len(images):
        raise DeviceDataError(
            f"`drop_remainder` would drop every sample: {len(images)} samples, fewer than "
            f"batch_size={batch_size}"
        )


def batches(
    images,
    labels,
    batch_size,
    seed,
    epoch,
    shuffle=True,
    augment=False,
    drop_remainder=False,
    pad_value=None,
    normalization=None,
):
    """One epoch of (images, labels) batches from arrays held in memory.

    The TensorFlow pipelines keep the last partial batch, for training and evaluation alike,
    and so does this by default (`drop_remainder=False`).

    Args:
      images: (N, H, W, C) array, e.g. `load_shards`'s normalized float32 images, or the
        `DiskImages` of its uint8 pixels.
      labels: (N,) array.
      batch_size: samples per batch.
      seed, epoch: ints >= 0; the epoch's order (and augmentation) are drawn from both, so the
        same pair gives the same batches and each epoch another order. The order cannot match
        tf.data's: numpy draws it.
      shuffle: False keeps the stored order (evaluation).
      augment: random crop of the padded image and random horizontal flip, per image.
      drop_remainder: drop the last batch when it is partial.
      pad_value: what the crop pads with, one value or one per channel; required with
        `augment`. Pass the loader's `info["pad_value"]`, the normalized black pixel: the
        TensorFlow pipeline pads the uint8 pixels with 0 before it normalizes.
      normalization: (mean, std) for uint8 `images` (a loader's `normalized=False`): each batch
        is augmented as uint8 (padded with 0, as TensorFlow does) and then normalized, so the
        set stays in memory as uint8. `pad_value` is then not needed.

    Returns:
      An iterator of (images, labels) batches; the arguments are checked before it is returned.

    Raises:
      DeviceDataError: on a bad argument.
    """
    _check_batches(images, labels, batch_size, seed, epoch, shuffle, augment, drop_remainder)
    if augment and normalization is None:
        pad = np.asarray(pad_value if pad_value is not None else [], np.float64)
        if pad.size not in (1, images.shape[-1]) or not np.all(np.isfinite(pad)):
            raise DeviceDataError(
                f"`pad_value` must be one finite number or {images.shape[-1]} (one per channel) "
                f"with augment=True: pass info['pad_value']. Received: pad_value={pad_value!r}"
            )
    order_seed, augment_seed = np.random.SeedSequence([seed, epoch]).spawn(2)
    count = len(images)
    order = np.random.default_rng(order_seed).permutation(count) if shuffle else np.arange(count)
    stop = count - count % batch_size if drop_remainder else count
    augment_rng = np.random.default_rng(augment_seed)

    def iterate():
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            batch = images[index]
            if augment:
                batch = _augment_batch(batch, augment_rng, 0 if normalization else pad_value)
            if normalization is not None:
                batch = normalize(batch, *normalization)
            yield batch, labels[index]

    return iterate()
