"""Raw bytes of a dataset's files from an archive (.tar, .tar.gz) or its extracted directory.

CIFAR and STL-10 ship as one archive holding a folder of fixed file names. Users pass either the
archive or the extracted folder (or that folder's parent, where it was extracted), and every reader
accepts all three the same way, with errors that say which file was missing and what was expected.
"""

import os
import tarfile

from tfsplit.data.common import DatasetFileError


def read_dataset_files(path, folder, names, title, expected):
    """{file name: (where it was read, raw bytes)} of `names` inside `folder`.

    Args:
      path: the archive holding `folder/<name>`, the extracted `folder` directory, or its parent.
      folder: the directory name inside the archive, e.g. "cifar-10-batches-py".
      names: the file names to read, e.g. ("data_batch_1", "test_batch").
      title: the dataset's name for messages, e.g. "CIFAR-10".
      expected: the end of every error message: what the user should pass and where to get it.

    Returns:
      dict from each of `names` to (a description of where it was read, its bytes).

    Raises:
      DatasetFileError: when `path` does not exist, is not a readable archive, or lacks a file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_folder_files(path, folder, names, title, expected)
    if os.path.isfile(path):
        return _read_tar_members(path, folder, names, title, expected)
    raise DatasetFileError(f"{title} path does not exist: {path}; {expected}")


def _read_tar_members(path, folder, names, title, expected):
    """Reads the wanted members in one pass and stops as soon as it has them all.

    Stopping early matters for STL-10, whose archive ends with 2.7 GB of unlabeled images.
    """
    wanted = {f"{folder}/{name}" for name in names}
    found = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                name = member.name.removeprefix("./")
                if name in wanted and member.isfile():
                    raw = archive.extractfile(member).read()
                    found[name.rsplit("/", 1)[1]] = (f"{path}:{name}", raw)
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DatasetFileError(f"Cannot read {title} archive {path}: {err!r}; {expected}") from err
    missing = sorted(wanted - {f"{folder}/{name}" for name in found})
    if missing:
        raise DatasetFileError(f"{title} archive {path} lacks {', '.join(missing)}; {expected}")
    return found


def _read_folder_files(path, folder, names, title, expected):
    """Reads from `path/folder` when it exists, else from `path` itself."""
    directory = os.path.join(path, folder)
    if not os.path.isdir(directory):
        directory = path
    found = {}
    for name in names:
        file_path = os.path.join(directory, name)
        if not os.path.isfile(file_path):
            raise DatasetFileError(f"{title} file not found: {file_path}; {expected}")
        with open(file_path, "rb") as handle:
            found[name] = (file_path, handle.read())
    return found
