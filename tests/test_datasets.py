"""The dataset readers on tiny datasets written to disk in each real format, and the two-view augmentation.

Every image carries its own index in known pixels, so that the tests can check the order, the labels and
the pixel orientation (STL-10 stores its images column-major) of what is read back.
"""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from metamask_fast.data import DatasetError, TwoViews, load_images, simclr_augmentation


def coded_images(count: int, size: int, offset: int) -> np.ndarray:
    """uint8 [count, 3, size, size]: image i has value (offset + i) at pixel (0, 0) of channel 0, and a
    gradient along the rows of channel 1 (orientation marker)."""
    images = np.zeros((count, 3, size, size), dtype=np.uint8)
    for i in range(count):
        images[i, 0, 0, 0] = offset + i
        images[i, 1] = np.arange(size, dtype=np.uint8)[:, None]  # row r has value r
    return images


def write_cifar(root, name):
    if name == "cifar10":
        folder, files, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], b"labels"
        splits = {"train": files, "test": ["test_batch"]}
        meta = ("batches.meta", b"label_names", [f"class{i}".encode() for i in range(10)])
    else:
        folder, key = root / "cifar-100-python", b"fine_labels"
        splits = {"train": ["train"], "test": ["test"]}
        meta = ("meta", b"fine_label_names", [f"fine{i}".encode() for i in range(100)])
    folder.mkdir(parents=True)
    offset = 0
    for split_files in splits.values():
        for file_name in split_files:
            images = coded_images(3, 32, offset)
            entry = {b"data": images.reshape(3, -1), key: [(offset + i) % 10 for i in range(3)]}
            (folder / file_name).write_bytes(pickle.dumps(entry))
            offset += 3
    (folder / meta[0]).write_bytes(pickle.dumps({meta[1]: meta[2]}))
    return folder


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, name):
    write_cifar(tmp_path, name)
    train = load_images(name, tmp_path, "train")
    test = load_images(name, tmp_path, "test")
    n_train = 15 if name == "cifar10" else 3
    assert train.images.shape == (n_train, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.images[:, 0, 0, 0].tolist() == list(range(n_train))
    assert train.labels.tolist() == [i % 10 for i in range(n_train)]
    assert torch.equal(train.images[0, 1, :, 0], torch.arange(32, dtype=torch.uint8))  # rows stay rows
    assert test.images[:, 0, 0, 0].tolist() == [n_train, n_train + 1, n_train + 2]
    assert train.classes[:2] == (["class0", "class1"] if name == "cifar10" else ["fine0", "fine1"])


def test_cifar_missing_and_malformed_files_name_themselves(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar10: .*cifar-10-batches-py/data_batch_1 is missing; put the dataset"):
        load_images("cifar10", tmp_path)
    folder = write_cifar(tmp_path, "cifar10")
    (folder / "data_batch_3").write_bytes((folder / "data_batch_3").read_bytes()[:100])  # truncated
    with pytest.raises(DatasetError, match=r"data_batch_3 is not a readable CIFAR batch"):
        load_images("cifar10", tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        load_images("cifar10", tmp_path, "validation")
    batch = folder / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": coded_images(3, 32, 0).reshape(3, -1), b"labels": [0, 10, 1]}))
    with pytest.raises(DatasetError, match=r"data_batch_3 is not a readable CIFAR batch .*class indices in 0..9"):
        load_images("cifar10", tmp_path)


def python2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR batch as the published files hold it: Python 2's cPickle at protocol 2, strings as byte strings
    (SHORT_BINSTRING), the array through numpy 1's ``numpy.core.multiarray._reconstruct`` and its state (written
    opcode by opcode: Python 3 cannot write byte strings this way)."""
    assert data.dtype == np.uint8 and data.ndim == 2 and all(0 <= label < 256 for label in labels)

    def string(value: bytes) -> bytes:
        return b"U" + bytes([len(value)]) + value if len(value) < 256 else b"T" + len(value).to_bytes(4, "little") + value

    def small_int(value: int) -> bytes:
        return b"K" + bytes([value]) if value < 256 else b"M" + value.to_bytes(2, "little")

    minus_one = b"J" + (-1).to_bytes(4, "little", signed=True)
    dtype = (b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + string(b"|") + b"NNN" + minus_one + minus_one + b"K\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b") + b"\x87R"
             + b"(K\x01" + small_int(data.shape[0]) + small_int(data.shape[1]) + b"\x86" + dtype + b"\x89"
             + string(data.tobytes()) + b"tb")
    listed = b"](" + b"".join(small_int(label) for label in labels) + b"e"
    return (b"\x80\x02}(" + string(b"batch_label") + string(b"training batch 1 of 5") + string(b"data") + array
            + string(b"labels") + listed + b"u.")


def test_the_published_files_python2_pickles_still_load(tmp_path):
    """The restricted unpickler reads the format as published (Python 2, numpy 1) and as Python 3 writes it at
    every protocol (0-2 encode bytes through _codecs.encode, 5 rebuilds arrays with _frombuffer)."""
    folder = write_cifar(tmp_path, "cifar10")
    images = coded_images(3, 32, 0).reshape(3, -1)
    (folder / "data_batch_1").write_bytes(python2_cifar_pickle(images, [0, 1, 2]))
    for protocol, file_name in zip((0, 2, 4, 5), ("data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")):
        offset = int(file_name[-1]) * 3 - 3
        entry = {b"data": coded_images(3, 32, offset).reshape(3, -1), b"labels": [(offset + i) % 10 for i in range(3)]}
        (folder / file_name).write_bytes(pickle.dumps(entry, protocol=protocol))
    train = load_images("cifar10", tmp_path, "train")
    assert train.images[:, 0, 0, 0].tolist() == list(range(15))
    assert torch.equal(train.images[:3], torch.from_numpy(images.reshape(3, 3, 32, 32)))
    assert train.labels.tolist() == [i % 10 for i in range(15)]


class RunsCode:
    """An object whose unpickling calls ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


@pytest.mark.parametrize("file_name", ["data_batch_2", "batches.meta"])
def test_a_cifar_file_that_would_run_code_is_refused_unrun(tmp_path, file_name):
    folder = write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "ran"
    entry = {b"data": coded_images(3, 32, 0).reshape(3, -1), b"labels": RunsCode(f"touch {marker}")}
    if file_name == "batches.meta":
        entry = {b"label_names": [RunsCode(f"touch {marker}")]}
    (folder / file_name).write_bytes(pickle.dumps(entry))
    assert not marker.exists()
    with pytest.raises(DatasetError, match=rf"cifar10: .*/{file_name} refers to (posix|os)\.system, which a CIFAR "
                                           r"file never holds; it was not loaded \(loading it could run code\)"):
        load_images("cifar10", tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("payload, refused", [
    (np.zeros((3, 3072), dtype=np.float64), r"an array of float64"),
    (np.zeros((3, 3072), dtype=object), r"an array of object"),
    (np.zeros((3, 3072), dtype=np.uint8).view(np.recarray), r"numpy\.rec\.recarray"),
    (torch.zeros(3), r"torch\._utils\._rebuild_tensor_v2|torch\.storage\._load_from_bytes|collections\.OrderedDict"),
    (eval, r"(__builtin__|builtins)\.eval"),  # Python 3 names it as Python 2 would at protocol 2
])
@pytest.mark.parametrize("protocol", [2, 5])
def test_anything_but_uint8_arrays_and_the_formats_own_types_is_refused(tmp_path, payload, refused, protocol):
    folder = write_cifar(tmp_path, "cifar10")
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": payload, b"labels": [0, 1, 2]}, protocol=protocol))
    with pytest.raises(DatasetError, match=rf"data_batch_1 refers to {refused}"):
        load_images("cifar10", tmp_path)


def write_stl10(root):
    folder = root / "stl10_binary"
    folder.mkdir()
    for part, count, offset in (("train", 2, 0), ("test", 3, 10), ("unlabeled", 4, 20)):
        images = coded_images(count, 96, offset)
        # STL-10's layout: each channel stored column-major.
        images.transpose(0, 1, 3, 2).copy().tofile(folder / f"{part}_X.bin")
        if part != "unlabeled":
            np.array([1 + (offset + i) % 10 for i in range(count)], dtype=np.uint8).tofile(folder / f"{part}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    return folder


def test_stl10_binaries(tmp_path):
    write_stl10(tmp_path)
    train = load_images("stl10", tmp_path, "train")
    assert train.images.shape == (2, 3, 96, 96)
    assert torch.equal(train.images[1, 1, :, 0], torch.arange(96, dtype=torch.uint8))  # column-major undone
    assert train.images[:, 0, 0, 0].tolist() == [0, 1] and train.labels.tolist() == [0, 1]
    both = load_images("stl10", tmp_path, "train+unlabeled")
    assert both.images[:, 0, 0, 0].tolist() == [0, 1, 20, 21, 22, 23]
    assert both.labels.tolist() == [0, 1, -1, -1, -1, -1]
    assert load_images("stl10", tmp_path, "test").labels.tolist() == [0, 1, 2]
    assert train.classes[0] == "c0"


def test_stl10_malformed_binaries(tmp_path):
    folder = write_stl10(tmp_path)
    (folder / "test_X.bin").write_bytes(b"\x00" * 1000)
    with pytest.raises(DatasetError, match=r"test_X.bin holds 1000 bytes, not a whole number of 3×96×96 images"):
        load_images("stl10", tmp_path, "test")
    np.array([11, 1], dtype=np.uint8).tofile(folder / "train_y.bin")
    with pytest.raises(DatasetError, match=r"train_y.bin does not hold one label 1-10"):
        load_images("stl10", tmp_path, "train")


def test_image_folders_with_and_without_classes(tmp_path):
    for class_name, count in (("dogs", 2), ("cats", 3)):
        (tmp_path / "labelled" / class_name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (20, 12), (i, 0, 0)).save(tmp_path / "labelled" / class_name / f"{i}.png")
    (tmp_path / "labelled" / "cats" / "notes.txt").write_text("not an image")
    labelled = load_images("folder", tmp_path / "labelled")
    assert labelled.classes == ["cats", "dogs"] and labelled.labels.tolist() == [0, 0, 0, 1, 1]
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.jpg")
    flat = load_images("folder", tmp_path / "flat")
    assert len(flat) == 1 and flat.labels is None
    with pytest.raises(DatasetError, match=r"flat/test does not exist"):
        load_images("folder", tmp_path / "flat", "test")
    # Splits share the training classes' indices; a hidden folder is not a class.
    for split, classes in (("train", ("a", "b", "c")), ("test", ("c", "a"))):
        for name in classes:
            (tmp_path / "split" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "split" / split / name / "x.png")
    (tmp_path / "split" / "train" / ".ipynb_checkpoints").mkdir()
    assert load_images("folder", tmp_path / "split", "test").labels.tolist() == [0, 2]
    assert load_images("folder", tmp_path / "split", "train").classes == ["a", "b", "c"]
    (tmp_path / "split" / "test" / "zebra").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "split" / "test" / "zebra" / "x.png")
    with pytest.raises(DatasetError, match="classes the training images do not have: zebra"):
        load_images("folder", tmp_path / "split", "test")
    (tmp_path / "only-test" / "test").mkdir(parents=True)
    with pytest.raises(DatasetError, match="has a test/ folder but no train/ folder"):
        load_images("folder", tmp_path / "only-test", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_images("folder", tmp_path / "empty")


@pytest.mark.parametrize("name,size", [("cifar10", 32), ("stl10", 96)])
def test_two_views_are_independent_draws_of_the_recipe(tmp_path, name, size):
    images = load_images(*(("cifar10", write_cifar(tmp_path, "cifar10").parent) if name == "cifar10"
                           else ("stl10", write_stl10(tmp_path).parent)), "train")
    augmentation = simclr_augmentation(name, size)
    names = [type(t).__name__ for t in augmentation.transforms]
    assert names[:4] == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomApply", "RandomGrayscale"]
    assert ("RandomApply" in names[4:5]) == (size >= 64)  # the blur only from 64 px up
    torch.manual_seed(0)
    view0, view1, label = TwoViews(images, augmentation)[1]
    assert view0.shape == view1.shape == (3, size, size) and view0.dtype == torch.float32
    assert not torch.equal(view0, view1) and label == int(images.labels[1])


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="name must be one of"):
        load_images("imagenet", "/nowhere")
