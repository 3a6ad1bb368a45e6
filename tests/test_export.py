"""write_embeddings: exact round trips of every layout, refusal to overwrite, argument checks."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch

from metamask_fast.export import write_embeddings

NAMES = ["plain.png", 'with, a comma and "quotes".png', "ünïcødé ✓", "  spaces  ", "", "a;b\tc"]


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(len(NAMES), 5, generator=generator)
    features[0, 0] = 0.1  # not exactly representable: a lossy text format would show
    features[1, 1] = 1e-30
    features[2, 2] = -3.4e38
    labels = torch.tensor([3, -1, 0, 7, 2, 1])
    return features, labels, list(NAMES)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


# -------------------------------------------------------------------------------------------- layouts


def test_pt_round_trip(tmp_path, data):
    features, labels, names = data
    paths = write_embeddings(tmp_path / "emb.pt", features, labels, names)
    assert paths == [tmp_path / "emb.pt"]
    assert listing(tmp_path) == ["emb.pt"]
    loaded = torch.load(tmp_path / "emb.pt")  # the default weights_only=True loader reads it
    assert set(loaded) == {"features", "labels", "names"}
    assert loaded["features"].dtype == torch.float32 and torch.equal(loaded["features"], features)
    assert loaded["labels"].dtype == torch.int64 and torch.equal(loaded["labels"], labels)
    assert loaded["names"] == names


def test_pt_without_labels_keeps_dtype_and_stores_only_the_rows(tmp_path):
    base = torch.randn(100, 8, dtype=torch.float64)
    view = base[10:13, ::2]  # non-contiguous view of a larger storage
    write_embeddings(tmp_path / "emb.pt", view, None, ["a", "b", "c"])
    loaded = torch.load(tmp_path / "emb.pt")
    assert loaded["labels"] is None
    assert loaded["features"].dtype == torch.float64 and torch.equal(loaded["features"], view)
    assert loaded["features"].untyped_storage().nbytes() == view.numel() * 8


def test_npy_round_trip(tmp_path, data):
    features, labels, names = data
    paths = write_embeddings(tmp_path / "emb.npy", features, labels, names)
    assert paths == [tmp_path / "emb.npy", tmp_path / "emb.labels.npy", tmp_path / "emb.names.txt"]
    assert listing(tmp_path) == ["emb.labels.npy", "emb.names.txt", "emb.npy"]
    array = np.load(tmp_path / "emb.npy")
    assert array.dtype == np.float32 and np.array_equal(array, features.numpy())
    label_array = np.load(tmp_path / "emb.labels.npy")
    assert label_array.dtype == np.int64 and np.array_equal(label_array, labels.numpy())
    assert (tmp_path / "emb.names.txt").read_text(encoding="utf-8").splitlines() == names


def test_npy_without_labels_writes_no_labels_file(tmp_path, data):
    features, _, names = data
    paths = write_embeddings(tmp_path / "run.v2.npy", features, None, names)
    assert [p.name for p in paths] == ["run.v2.npy", "run.v2.names.txt"]
    assert listing(tmp_path) == ["run.v2.names.txt", "run.v2.npy"]


def test_npy_writes_bfloat16_as_float32(tmp_path):
    features = torch.randn(2, 3).bfloat16()
    write_embeddings(tmp_path / "e.npy", features, None, ["a", "b"])
    array = np.load(tmp_path / "e.npy")
    assert array.dtype == np.float32 and np.array_equal(array, features.float().numpy())


@pytest.mark.parametrize("suffix", [".pt", ".npy"])
def test_csv_round_trip(tmp_path, data, suffix):
    features, labels, names = data
    paths = write_embeddings(tmp_path / f"emb{suffix}", features, labels, names, csv=True)
    assert paths[-1] == tmp_path / "emb.csv"
    rows = read_csv(tmp_path / "emb.csv")
    assert rows[0] == ["name", "label", "f0", "f1", "f2", "f3", "f4"]
    assert [row[0] for row in rows[1:]] == names
    assert [int(row[1]) for row in rows[1:]] == labels.tolist()
    parsed = torch.tensor([[float(x) for x in row[2:]] for row in rows[1:]], dtype=torch.float64)
    assert torch.equal(parsed.float(), features)  # float32 -> text -> float32 is exact
    assert torch.equal(parsed, features.double())


def test_csv_without_labels_leaves_the_label_empty_and_keeps_float64_exact(tmp_path):
    features = torch.tensor([[1 / 3, 2.0**-1074], [-0.0, 1e308]], dtype=torch.float64)
    write_embeddings(tmp_path / "e.pt", features, None, ["line\nbreak", "x"], csv=True)  # .pt allows it
    rows = read_csv(tmp_path / "e.csv")
    assert [row[:2] for row in rows[1:]] == [["line\nbreak", ""], ["x", ""]]
    assert torch.equal(torch.tensor([[float(x) for x in row[2:]] for row in rows[1:]], dtype=torch.float64),
                       features)


def test_accepts_gradients_and_a_str_path(tmp_path):
    features = torch.randn(2, 2, requires_grad=True) * 2
    (path,) = write_embeddings(str(tmp_path / "e.pt"), features, None, ("a", "b"))
    assert path == tmp_path / "e.pt"
    assert torch.equal(torch.load(path)["features"], features.detach())


def test_no_temporary_files_are_left_and_permissions_follow_the_umask(tmp_path, data):
    features, labels, names = data
    old = os.umask(0o022)
    try:
        paths = write_embeddings(tmp_path / "emb.npy", features, labels, names, csv=True)
    finally:
        os.umask(old)
    assert listing(tmp_path) == sorted(p.name for p in paths)
    for path in paths:
        assert path.stat().st_mode & 0o777 == 0o644, path.name


# ------------------------------------------------------------------------------------ never overwrite


@pytest.mark.parametrize("existing", ["emb.npy", "emb.labels.npy", "emb.names.txt", "emb.csv"])
def test_refuses_to_overwrite_and_writes_nothing(tmp_path, data, existing):
    features, labels, names = data
    content = b"keep me \x00\xff"
    (tmp_path / existing).write_bytes(content)
    with pytest.raises(FileExistsError, match=existing.replace(".", r"\.")):
        write_embeddings(tmp_path / "emb.npy", features, labels, names, csv=True)
    assert (tmp_path / existing).read_bytes() == content
    assert listing(tmp_path) == [existing]


def test_refuses_to_overwrite_a_pt_file(tmp_path, data):
    features, labels, names = data
    write_embeddings(tmp_path / "emb.pt", features, labels, names)
    before = (tmp_path / "emb.pt").read_bytes()
    with pytest.raises(FileExistsError, match="emb.pt"):
        write_embeddings(tmp_path / "emb.pt", features * 2, None, names)
    assert (tmp_path / "emb.pt").read_bytes() == before


def test_a_failed_write_removes_what_it_wrote(tmp_path, data, monkeypatch):
    features, labels, names = data

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("metamask_fast.export._write_csv", broken)
    with pytest.raises(OSError, match="disk full"):
        write_embeddings(tmp_path / "emb.npy", features, labels, names, csv=True)
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------------------------- checks


@pytest.mark.parametrize("name", ["emb.csv", "emb.txt", "emb", "emb.NPY", "emb.pth", ".npy"])
def test_rejects_other_suffixes(tmp_path, data, name):
    features, labels, names = data
    with pytest.raises(ValueError, match="path"):
        write_embeddings(tmp_path / name, features, labels, names)
    assert listing(tmp_path) == []


def test_rejects_a_missing_folder(tmp_path, data):
    with pytest.raises(FileNotFoundError, match="path"):
        write_embeddings(tmp_path / "missing" / "emb.pt", *data)


def test_rejects_names_the_text_files_cannot_hold(tmp_path, data):
    features, labels, names = data
    for bad in ("two\nlines", "carriage\rreturn", "para\u2029graph"):
        with pytest.raises(ValueError, match=r"names\[1\]"):
            write_embeddings(tmp_path / "emb.npy", features, labels, [names[0], bad, *names[2:]])
    with pytest.raises(ValueError, match=r"names\[0\].*UTF-8"):
        write_embeddings(tmp_path / "emb.pt", features, labels, ["\udcff", *names[1:]], csv=True)
    assert listing(tmp_path) == []
    write_embeddings(tmp_path / "emb.pt", features, labels, ["\udcff", *names[1:]])  # pickled: fine


@pytest.mark.parametrize(
    "changes, error, name",
    [
        (dict(path=42), TypeError, "path"),
        (dict(features=np.zeros((6, 5), dtype=np.float32)), TypeError, "features"),
        (dict(features=torch.zeros(6, 5, dtype=torch.int64)), TypeError, "features"),
        (dict(features=torch.zeros(6)), ValueError, "features"),
        (dict(features=torch.zeros(0, 5)), ValueError, "features"),
        (dict(features=torch.zeros(6, 0)), ValueError, "features"),
        (dict(labels=torch.zeros(6, dtype=torch.int32)), TypeError, "labels"),
        (dict(labels=torch.zeros(5, dtype=torch.int64)), ValueError, "labels"),
        (dict(labels=[0] * 6), TypeError, "labels"),
        (dict(names=["a"] * 5), ValueError, "names"),
        (dict(names="abcdef"), TypeError, "names"),
        (dict(names=["a"] * 5 + [3]), TypeError, r"names\[5\]"),
        (dict(csv="yes"), TypeError, "csv"),
    ],
)
def test_rejects_bad_arguments(tmp_path, data, changes, error, name):
    features, labels, names = data
    arguments = dict(path=tmp_path / "emb.npy", features=features, labels=labels, names=names, csv=True)
    arguments.update(changes)
    with pytest.raises(error, match=name):
        write_embeddings(arguments.pop("path"), **arguments)
    assert listing(tmp_path) == []
