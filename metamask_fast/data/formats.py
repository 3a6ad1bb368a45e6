"""The on-disk formats: image datasets read from disk in torchvision's own layouts.

- ``cifar10``: ``<data_dir>/cifar-10-batches-py/`` (``data_batch_1`` … ``data_batch_5``, ``test_batch``), the
  pickles that ``torchvision.datasets.CIFAR10(data_dir, download=True)`` unpacks.
- ``cifar100``: ``<data_dir>/cifar-100-python/`` (``train``, ``test``; fine labels).
- ``stl10``: ``<data_dir>/stl10_binary/`` (``train_X.bin``/``train_y.bin``, ``test_X.bin``/``test_y.bin``,
  ``unlabeled_X.bin``), the binaries of ``torchvision.datasets.STL10``; splits ``train``, ``test``,
  ``unlabeled`` and ``train+unlabeled`` (label -1 for unlabeled images).
- ``folder``: any folder of images; with one sub-folder per class the labels are the sorted class names'
  indices, and a flat folder has no labels.

The pickles and binaries are read here rather than through torchvision's dataset classes, which refuse any
file whose MD5 differs from the published archive's (a subset, a re-packed copy). ``download=True`` asks
torchvision to fetch the published archive into ``data_dir`` first. A missing or malformed dataset raises
:class:`DatasetError`, whose message says which file is wrong and where the files belong.

A pickle can run any code while it loads, so the CIFAR files are read by :class:`CifarUnpickler`, which admits
only what the format holds: dicts, lists, strings, bytes and numbers (the pickle format's own types) and numpy's
uint8 arrays, through the functions numpy itself pickles them with. A file that refers to anything else (a crafted
``data_batch_1`` in a shared data folder) is refused before any of it runs.
"""

from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

__all__ = ["DATASETS", "DatasetError", "ImageSet", "load_images", "pil_image", "CifarUnpickler", "RefusedPickle"]

DATASETS = ("cifar10", "cifar100", "stl10", "folder")

_DOWNLOADERS = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
                "stl10": torchvision.datasets.STL10}


class DatasetError(ValueError):
    """A dataset that is missing or malformed on disk; the message says what to fix."""


@dataclass
class ImageSet:
    """Images of one split: ``images`` a uint8 tensor ``[N, 3, H, W]`` (CIFAR, STL-10) or a list of file
    paths (folders); ``labels`` an int64 tensor ``[N]`` (-1: unlabeled) or None; ``classes`` the class
    names where known."""

    images: torch.Tensor | list[Path]
    labels: torch.Tensor | None
    classes: list[str] | None

    def __len__(self) -> int:
        return len(self.images)


def load_images(name: str, data_dir: str | Path, split: str = "train", *, download: bool = False) -> ImageSet:
    """One split of dataset ``name`` (see the module docstring) from ``data_dir``."""
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    data_dir = Path(data_dir)
    if download and name in _DOWNLOADERS:
        _download(name, data_dir)
    if name == "cifar10":
        return _cifar(data_dir / "cifar-10-batches-py", split, "cifar10",
                      {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}, b"labels")
    if name == "cifar100":
        return _cifar(data_dir / "cifar-100-python", split, "cifar100", {"train": ["train"], "test": ["test"]},
                      b"fine_labels")
    if name == "stl10":
        return _stl10(data_dir / "stl10_binary", split)
    return _folder(data_dir, split)


def _download(name: str, data_dir: Path) -> None:
    try:
        if name == "stl10":
            _DOWNLOADERS[name](str(data_dir), split="train", download=True)
        else:
            _DOWNLOADERS[name](str(data_dir), train=True, download=True)
    except Exception as error:  # noqa: BLE001  (no network, a full disk, ...: one clear line)
        raise DatasetError(f"could not download {name} into {data_dir}: {error}") from error


def _missing(name: str, path: Path, layout: str) -> DatasetError:
    return DatasetError(
        f"{name}: {path} is missing; put the dataset under the data folder as {layout} (torchvision's layout), "
        f"or pass --download (download=True in Python) where a network is reachable"
    )


def _split_check(split: str, splits) -> None:
    if split not in splits:
        raise ValueError(f"split must be one of {tuple(splits)}, got {split!r}")


class RefusedPickle(pickle.UnpicklingError):
    """A pickle that refers to something a CIFAR file never holds; ``str()`` names it."""


def _uint8_only(dtype) -> None:
    if np.dtype(dtype) != np.uint8:
        raise RefusedPickle(f"an array of {np.dtype(dtype)} (CIFAR images are uint8)")


def _reconstruct(subtype, shape, code):
    """``numpy.core.multiarray._reconstruct`` (how numpy pickles an array up to protocol 4), for plain arrays."""
    if subtype is not np.ndarray:
        raise RefusedPickle(f"an array of type {getattr(subtype, '__name__', subtype)!r}")
    return _NUMPY_RECONSTRUCT(subtype, shape, code)


def _dtype(spec, align=False, copy=False):
    """``numpy.dtype`` for uint8 alone (the array's state then carries no objects)."""
    if not isinstance(spec, (str, bytes)):
        raise RefusedPickle(f"a numpy dtype built from {type(spec).__name__}")
    _uint8_only(spec.decode("ascii", "replace") if isinstance(spec, bytes) else spec)
    return np.dtype(spec, align, copy)


def _frombuffer(buffer, dtype, shape, order, *rest):
    """``numpy.core.numeric._frombuffer`` (how numpy pickles an array at protocol 5), for uint8 alone."""
    _uint8_only(dtype)
    return _NUMPY_FROMBUFFER(buffer, dtype, shape, order, *rest)


def _latin1(text, encoding):
    """``_codecs.encode`` as Python 3 pickles bytes at protocols 0-2: a latin-1 string back to bytes."""
    if not isinstance(text, str) or encoding != "latin1":
        raise RefusedPickle(f"_codecs.encode with {encoding!r}")
    return codecs.encode(text, "latin1")


_NUMPY_CORE = getattr(np, "_core", None) or np.core
_NUMPY_RECONSTRUCT = _NUMPY_CORE.multiarray._reconstruct
_NUMPY_FROMBUFFER = _NUMPY_CORE.numeric._frombuffer
# The globals a CIFAR pickle may name, as numpy 1 and numpy 2 write them.
_CIFAR_GLOBALS = {
    **{(f"{core}.multiarray", "_reconstruct"): _reconstruct for core in ("numpy.core", "numpy._core")},
    **{(f"{core}.numeric", "_frombuffer"): _frombuffer for core in ("numpy.core", "numpy._core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1,
}


class CifarUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR-10/100's files that can run no code: the pickle format's own types and numpy's
    uint8 arrays (through checked stand-ins for numpy's reconstructors); any other global raises
    :class:`RefusedPickle` naming it, before it is looked up."""

    def find_class(self, module: str, name: str):
        allowed = _CIFAR_GLOBALS.get((module, name))
        if allowed is None:
            raise RefusedPickle(f"{module}.{name}")
        return allowed

    def persistent_load(self, pid):
        raise RefusedPickle("a persistent id")


def _load_cifar_pickle(path: Path, name: str):
    """The object in CIFAR file ``path`` (:class:`CifarUnpickler`); a refused one is a :class:`DatasetError`."""
    try:
        with open(path, "rb") as f:
            return CifarUnpickler(f, encoding="bytes").load()
    except RefusedPickle as refused:
        raise DatasetError(f"{name}: {path} refers to {refused}, which a CIFAR file never holds; it was not loaded "
                           "(loading it could run code): replace it with the file from the published archive") from None


def _cifar(folder: Path, split: str, name: str, files: dict[str, list[str]], label_key: bytes) -> ImageSet:
    _split_check(split, files)
    images, labels = [], []
    for file_name in files[split]:
        path = folder / file_name
        if not path.is_file():
            raise _missing(name, path, f"{folder.name}/{' '.join(files[split])}")
        try:
            entry = _load_cifar_pickle(path, name)
            data = np.asarray(entry[b"data"], dtype=np.uint8)
            batch_labels = np.asarray(entry[label_key], dtype=np.int64)
            data = data.reshape(len(batch_labels), 3, 32, 32)
            classes = 10 if name == "cifar10" else 100
            if batch_labels.ndim != 1 or not ((batch_labels >= 0) & (batch_labels < classes)).all():
                raise ValueError(f"labels must be {len(batch_labels)} class indices in 0..{classes - 1}")
        except DatasetError:
            raise
        except Exception as error:  # noqa: BLE001  (truncated, not a pickle, wrong keys or sizes)
            raise DatasetError(f"{name}: {path} is not a readable CIFAR batch ({type(error).__name__}: {error}); "
                               f"replace it with the file from the published archive") from error
        images.append(torch.from_numpy(data))
        labels.append(torch.from_numpy(batch_labels))
    classes = _cifar_classes(folder, name)
    return ImageSet(torch.cat(images), torch.cat(labels), classes)


def _cifar_classes(folder: Path, name: str) -> list[str] | None:
    meta, key = (folder / "batches.meta", b"label_names") if name == "cifar10" else (folder / "meta", b"fine_label_names")
    try:
        return [c.decode() for c in _load_cifar_pickle(meta, name)[key]]
    except DatasetError:  # a refused file is an error, as for the images
        raise
    except Exception:  # noqa: BLE001  (the names are a convenience; the images do not need them)
        return None


def _stl10(folder: Path, split: str) -> ImageSet:
    _split_check(split, ("train", "test", "unlabeled", "train+unlabeled"))
    parts = {"train": ["train"], "test": ["test"], "unlabeled": ["unlabeled"], "train+unlabeled": ["train", "unlabeled"]}
    images, labels = [], []
    for part in parts[split]:
        x_path = folder / f"{part}_X.bin"
        if not x_path.is_file():
            raise _missing("stl10", x_path, "stl10_binary/{train,test,unlabeled}_X.bin and {train,test}_y.bin")
        raw = np.fromfile(x_path, dtype=np.uint8)
        if raw.size % (3 * 96 * 96) != 0:
            raise DatasetError(f"stl10: {x_path} holds {raw.size} bytes, not a whole number of 3×96×96 images; "
                               f"replace it with the file from the published archive")
        # Each image is stored channel by channel, column-major: transpose to row-major [N, 3, H, W].
        data = raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
        images.append(torch.from_numpy(np.ascontiguousarray(data)))
        if part == "unlabeled":
            labels.append(torch.full((len(data),), -1, dtype=torch.int64))
            continue
        y_path = folder / f"{part}_y.bin"
        if not y_path.is_file():
            raise _missing("stl10", y_path, "stl10_binary/{train,test}_y.bin")
        y = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
        if len(y) != len(data) or (len(y) and (y.min() < 0 or y.max() > 9)):
            raise DatasetError(f"stl10: {y_path} does not hold one label 1-10 per image of {x_path.name}")
        labels.append(torch.from_numpy(y))
    classes = None
    names = folder / "class_names.txt"
    if names.is_file():
        classes = names.read_text().split()
    return ImageSet(torch.cat(images), torch.cat(labels), classes)


def _class_dirs(folder: Path) -> list[Path]:
    """Sub-folders that name classes (hidden ones such as ``.ipynb_checkpoints`` are not classes)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder(root: Path, split: str) -> ImageSet:
    """``root/<split>``; for split "train" also ``root`` itself when it has no ``train`` sub-folder (and no
    ``test`` one, which would otherwise be read as a class). Class indices follow the sorted class names of
    the training folder, so that every split uses the same ones."""
    if not root.is_dir():
        raise DatasetError(f"folder: {root} is not a directory of images")
    if split == "train":
        folder = root / "train" if (root / "train").is_dir() else root
        if folder == root and (root / "test").is_dir():
            raise DatasetError(f"folder: {root} has a test/ folder but no train/ folder; put the training images "
                               f"in {root / 'train'}")
    else:
        folder = root / split
        if not folder.is_dir():
            raise DatasetError(f"folder: {folder} does not exist; put the {split} images there (one sub-folder "
                               "per class)")
    extensions = tuple(torchvision.datasets.folder.IMG_EXTENSIONS)
    class_dirs = _class_dirs(folder)
    if class_dirs:
        train_folder = root / "train" if (root / "train").is_dir() else root
        names = [p.name for p in (_class_dirs(train_folder) if split != "train" else class_dirs)]
        unknown = [p.name for p in class_dirs if p.name not in names]
        if unknown:
            raise DatasetError(f"folder: {folder} has classes the training images do not have: {', '.join(unknown[:5])}")
        files, labels = [], []
        for class_dir in class_dirs:
            found = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in extensions)
            files += found
            labels += [names.index(class_dir.name)] * len(found)
        result = ImageSet(files, torch.tensor(labels, dtype=torch.int64), names)
    else:
        result = ImageSet(sorted(p for p in folder.iterdir() if p.suffix.lower() in extensions), None, None)
    if not len(result):
        raise DatasetError(f"folder: no images ({', '.join(extensions)}) in {folder}")
    return result


def pil_image(images: ImageSet, index: int):
    """Image ``index`` of ``images`` as an RGB PIL image (read from disk for folders)."""
    from PIL import Image

    item = images.images[index]
    if isinstance(item, Path):
        try:
            with Image.open(item) as opened:
                return opened.convert("RGB")
        except OSError as error:
            raise DatasetError(f"folder: cannot read image {item}: {error}") from None
    return Image.fromarray(item.permute(1, 2, 0).numpy())
