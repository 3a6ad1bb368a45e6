"""``python -m metamask_fast.linear`` and ``python -m metamask_fast.embed`` on a real run folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metamask_fast import embed, linear
from metamask_fast.backbones import DigitsConvNet
from metamask_fast.data import load_digits_split
from metamask_fast.models import DimensionalMask
from metamask_fast.train import main as train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval") / "run"
    assert train(["--epochs", "1", "--batch-size", "256", "--no-progress", "--output-dir", str(folder)]) == 0
    return folder


def reference_features(run, images: torch.Tensor) -> torch.Tensor:
    """The run's masked features computed from its plain state dicts, independently of the commands."""
    backbone = DigitsConvNet()
    backbone.load_state_dict(torch.load(run / "backbone.pt", weights_only=True))
    mask = DimensionalMask(backbone.feature_dim)
    mask.load_state_dict(torch.load(run / "mask.pt", weights_only=True))
    backbone.eval()
    with torch.no_grad():
        return backbone(images) * mask()


def test_linear_probe_writes_top1_and_top5(run, tmp_path, capsys):
    output = tmp_path / "linear.json"
    assert linear.main(["--run", str(run), "--epochs", "20", "--device", "cpu", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["num_train"] == 1437 and result["num_test"] == 360 and result["epochs"] == 20
    # 10 balanced classes: chance is 10 % top-1 and 50 % top-5; a linear probe on trained features does far better.
    assert 0.5 < result["top1"] <= result["top5"] <= 1.0
    assert "top-1" in capsys.readouterr().out
    before = output.read_bytes()
    code = linear.main(["--run", str(run), "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "argument --output" in err and "exists" in err
    assert output.read_bytes() == before


@pytest.mark.parametrize("suffix", [".npy", ".pt"])
def test_embed_writes_the_runs_features_labels_and_names(run, tmp_path, suffix):
    output = tmp_path / f"test{suffix}"
    assert embed.main(["--run", str(run), "--output", str(output), "--device", "cpu", "--csv"]) == 0
    split = load_digits_split()
    expected = reference_features(run, split.test_images)
    if suffix == ".npy":
        features = torch.from_numpy(np.load(output))
        labels = torch.from_numpy(np.load(tmp_path / "test.labels.npy"))
        names = (tmp_path / "test.names.txt").read_text().splitlines()
    else:
        saved = torch.load(output, weights_only=True)
        features, labels, names = saved["features"], saved["labels"], saved["names"]
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(labels, split.test_labels)
    assert names[:2] == ["test/0", "test/1"] and len(names) == 360
    assert (tmp_path / "test.csv").read_text().startswith("name,label,f0,")


@pytest.mark.parametrize("argv,needle", [
    (["--run", "{missing}", "--output", "{out}.npy"], "argument --run"),
    (["--run", "{run}", "--output", "{out}.txt"], "argument --output"),
    (["--run", "{run}", "--output", "{out}.npy", "--split", "validation"], "argument --split"),
    (["--run", "{run}", "--output", "{out}.npy", "--device", "tpu"], "argument --device"),
])
def test_embed_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys, argv, needle):
    argv = [a.format(missing=tmp_path / "nothing", run=run, out=tmp_path / "e") for a in argv]
    assert embed.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"metamask_fast.embed: error: {needle}"), err
    assert not any(tmp_path.glob("e*"))
