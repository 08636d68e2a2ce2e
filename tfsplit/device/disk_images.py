"""A set of uint8 images kept in one file and read batch by batch: a device that trains holds the
batch it needs, not the whole set. The file's pages stay in the operating system's cache, which
gives them back under memory pressure; the process's own memory does not grow with the set."""

import os

import numpy as np

from tfsplit.device.spec import DeviceError


class DiskImages:
    """uint8 images (N, H, W, C) in the file `path`, one after the other; indexed as a numpy
    array by an int array or a slice (`images[order[:64]]`), which reads those images.

    Write one with `DiskImages.writer(path, shape)`: `append(images)` for each part, then
    `finish()`, which returns the set.
    """

    def __init__(self, path, count, image_shape):
        self.path, self.image_shape = os.fspath(path), tuple(int(d) for d in image_shape)
        self.shape = (int(count),) + self.image_shape
        self.dtype, self.ndim = np.dtype(np.uint8), 4
        self._image_bytes = int(np.prod(self.image_shape))
        size = os.path.getsize(self.path)
        if size != self.shape[0] * self._image_bytes:
            raise DeviceError(
                f"{self.path} holds {size} bytes; {self.shape[0]} images of "
                f"{self.image_shape} take {self.shape[0] * self._image_bytes} (rewrite it)"
            )
        self._file = open(self.path, "rb", buffering=0)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        rows = np.arange(len(self))[index]
        if rows.ndim != 1:
            raise TypeError("DiskImages take an int array or a slice of images.")
        out = np.empty((len(rows),) + self.image_shape, np.uint8)
        flat = out.reshape(len(rows), -1)
        for i, row in enumerate(rows):  # a read per image: batches are a few dozen images
            got = os.preadv(self._file.fileno(), [flat[i]], int(row) * self._image_bytes)
            if got != self._image_bytes:
                raise DeviceError(f"{self.path} ended inside image {row} (changed while in use)")
        return out

    def close(self):
        self._file.close()

    @staticmethod
    def writer(path, image_shape):
        return _Writer(path, image_shape)


class _Writer:
    def __init__(self, path, image_shape):
        self.path, self.image_shape, self.count = os.fspath(path), tuple(image_shape), 0
        self._file = open(self.path + ".partial", "wb")

    def append(self, images):
        images = np.ascontiguousarray(images, np.uint8)
        if images.shape[1:] != self.image_shape:
            raise DeviceError(
                f"Images of {self.image_shape} go to {self.path}. Received: {images.shape[1:]}"
            )
        self._file.write(images.tobytes())
        self.count += len(images)

    def finish(self):
        self._file.close()
        os.replace(self.path + ".partial", self.path)
        return DiskImages(self.path, self.count, self.image_shape)
