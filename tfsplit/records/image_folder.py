"""The layout of an image folder (train/<class>/, val/<class>/ or test/) and the order its files
are read in, without TensorFlow: `tfsplit.data.image_folder` (tf.data) and
`tfsplit.device.image_folder` (a device) list the same classes, labels and files from here.

Class names sorted (Python string order) give the label ids 0..C-1, as in Keras's
`image_dataset_from_directory`; train and val must hold the same classes. Files are ordered
round-robin over the classes (the first file of every class, then the second, ...) so that the
first n samples of a split are balanced.
"""

import os

import numpy as np

DEFAULT_IMAGE_SIZE = 64
EXTENSIONS = (".jpg", ".jpeg", ".png")
# The images are ImageNet photos (Imagenet100) or photos like them: use ImageNet's statistics.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TEST_FOLDERS = ("val", "test")
LAYOUT = "expected path/train/<class>/*.jpg|*.jpeg|*.png and path/val/<class>/* (or test/)"


class ImageFolderError(ValueError):
    """A folder that is not laid out as an image folder; says what is wrong and what is expected."""


def _subdirectories(folder):
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _images_in(folder):
    names = [e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")]
    return sorted(os.path.join(folder, n) for n in names if n.lower().endswith(EXTENSIONS))


def split_folders(path):
    """(train folder, test folder) of the image folder at `path`: val/ wins over test/."""
    train = os.path.join(path, "train")
    if not os.path.isdir(train):
        raise ImageFolderError(f"Image folder {path} has no train/ directory; {LAYOUT}")
    for name in TEST_FOLDERS:
        test = os.path.join(path, name)
        if os.path.isdir(test):
            return train, test
    raise ImageFolderError(f"Image folder {path} has neither val/ nor test/; {LAYOUT}")


def list_classes(path):
    """The class names of the image folder at `path`; label i is the i-th name.

    Raises:
      ImageFolderError: when the layout is wrong, there are no classes, or train/ and val/
        (or test/) hold different classes.
    """
    train, test = split_folders(os.fspath(path))
    classes = _subdirectories(train)
    if not classes:
        raise ImageFolderError(f"{train} holds no class directories; {LAYOUT}")
    test_classes = _subdirectories(test)
    if test_classes != classes:
        raise ImageFolderError(
            f"{train} and {test} must hold the same class directories. Only in train: "
            f"{sorted(set(classes) - set(test_classes))}; only in {os.path.basename(test)}: "
            f"{sorted(set(test_classes) - set(classes))}"
        )
    return tuple(classes)


def list_split(folder, classes):
    """(file paths, int32 labels) of one split's folder, round-robin over the classes."""
    per_class = []
    for name in classes:
        files = _images_in(os.path.join(folder, name))
        if not files:
            raise ImageFolderError(
                f"{os.path.join(folder, name)} holds no images ({', '.join(EXTENSIONS)}); {LAYOUT}"
            )
        per_class.append(files)
    labels = np.repeat(np.arange(len(classes), dtype=np.int32), [len(f) for f in per_class])
    ranks = np.concatenate([np.arange(len(f)) for f in per_class])
    order = np.lexsort((labels, ranks))  # by rank within the class, then by class
    paths = [f for files in per_class for f in files]
    return [paths[i] for i in order], labels[order]
