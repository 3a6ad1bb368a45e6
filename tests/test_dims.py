"""The dimensional analysis (evaluate.dimension_analysis), its plot (dims.png) and its command
(python -m metamask_fast.dims), against a literal recomputation on synthetic features with known useful and
confounding dimensions, and on real run folders."""

from __future__ import annotations

import json

import pytest
import torch

from metamask_fast import plots
from metamask_fast.dims import main as dims_main
from metamask_fast.evaluate import dimension_analysis, dimension_counts, knn_top1_accuracy
from metamask_fast.train import main as train_main


def synthetic(seed=0, useful=5, confounding=19, n_train=300, n_test=101):
    """Features whose first ``useful`` dimensions carry the class (4 classes) and the rest are noise; the mask
    values rank the useful ones first, but not in index order."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, useful, generator=g) * 3
    labels = torch.randint(0, 4, (n_train + n_test,), generator=g)
    x = torch.cat([centres[labels] + 0.5 * torch.randn(len(labels), useful, generator=g),
                   torch.randn(len(labels), confounding, generator=g) * 3], dim=1)
    permutation = torch.randperm(useful + confounding, generator=g)
    x = x[:, permutation]
    mask = torch.rand(useful + confounding, generator=g) * 0.4
    mask[permutation.argsort()[:useful]] += 0.6  # the useful dimensions, where the permutation put them
    return x[:n_train], labels[:n_train], x[n_train:], labels[n_train:], mask


def literal(train_x, train_y, test_x, test_y, columns, k, temperature):
    return knn_top1_accuracy(train_x[:, columns], train_y, test_x[:, columns], test_y, k=k, temperature=temperature)


@pytest.mark.parametrize("dims", [1, 2, 7, 24, 64, 512, 2048])
def test_dimension_counts_span_one_to_all_on_a_log_scale(dims):
    counts = dimension_counts(dims)
    assert counts[0] == 1 and counts[-1] == dims and counts == sorted(set(counts))
    assert len(counts) == min(dims, 12) or len(counts) <= 12
    if dims >= 64:
        ratios = [b / a for a, b in zip(counts, counts[1:])]
        assert max(ratios) < 3 * min(ratios)  # evenly spread in log


def test_analysis_equals_a_literal_recomputation_and_the_curves_part():
    train_x, train_y, test_x, test_y, mask = synthetic()
    result = dimension_analysis(train_x, train_y, test_x, test_y, mask, k=7, temperature=0.1, draws=3, seed=4)
    ranked = sorted(range(len(mask)), key=lambda i: (-mask[i].item(), i))  # highest first, ties by index
    g = torch.Generator().manual_seed(4)
    for i, n in enumerate(result["dims"]):
        assert result["highest"][i] == literal(train_x, train_y, test_x, test_y, ranked[:n], 7, 0.1)
        assert result["lowest"][i] == literal(train_x, train_y, test_x, test_y, ranked[len(ranked) - n:], 7, 0.1)
        draws = [literal(train_x, train_y, test_x, test_y, torch.randperm(24, generator=g)[:n], 7, 0.1)
                 for _ in range(3)]
        assert result["random"][i] == pytest.approx(sum(draws) / 3)
    assert result["all"] == literal(train_x, train_y, test_x, test_y, ranked, 7, 0.1)
    few = max(i for i, n in enumerate(result["dims"]) if n <= 5)  # only useful dimensions among the highest
    assert result["dims"][few] >= 3
    assert result["highest"][few] > 0.9 > 0.5 > result["lowest"][few]


def test_equal_mask_values_keep_the_first_and_last_dimensions():
    train_x, train_y, test_x, test_y, mask = synthetic(seed=1)
    result = dimension_analysis(train_x, train_y, test_x, test_y, torch.ones(24), k=5, temperature=0.1, draws=1)
    for i, n in enumerate(result["dims"]):
        assert result["highest"][i] == literal(train_x, train_y, test_x, test_y, list(range(n)), 5, 0.1)
        assert result["lowest"][i] == literal(train_x, train_y, test_x, test_y, list(range(24 - n, 24)), 5, 0.1)


def test_analysis_rejects_bad_input():
    train_x, train_y, test_x, test_y, mask = synthetic()
    with pytest.raises(ValueError, match="mask must have one value per feature dimension"):
        dimension_analysis(train_x, train_y, test_x, test_y, mask[:5], k=3, temperature=0.1)
    with pytest.raises(ValueError, match="draws"):
        dimension_analysis(train_x, train_y, test_x, test_y, mask, k=3, temperature=0.1, draws=0)


def test_dims_plot(tmp_path):
    train_x, train_y, test_x, test_y, mask = synthetic()
    result = dimension_analysis(train_x, train_y, test_x, test_y, mask, k=7, temperature=0.1, draws=2)
    assert [p.name for p in plots.write_plots(tmp_path, [{"epoch": 0}], dims=result)] == ["dims.png"]
    figure = plots._dims_figure(result)
    (ax,) = figure.axes
    assert ax.get_xscale() == "log"
    assert [line.get_label() for line in ax.get_lines()] == [
        "highest mask values", "lowest mask values", "random (mean of 2)",
        f"all 24 dimensions ({100 * result['all']:.2f}%)"]
    assert list(ax.get_lines()[0].get_ydata()) == result["highest"]
    with pytest.raises(ValueError, match="dims"):
        plots.write_plots(tmp_path, [{"epoch": 0}], dims={**result, "lowest": result["lowest"][:-1]})
    with pytest.raises(TypeError, match="dims"):
        plots.write_plots(tmp_path, [{"epoch": 0}], dims=[1, 2])


def test_trainer_and_command_on_real_run_folders(tmp_path, capsys):
    metamask, baseline = tmp_path / "metamask", tmp_path / "barlowtwins"
    common = ["--epochs", "1", "--batch-size", "512", "--no-progress"]
    assert train_main([*common, "--output-dir", str(metamask)]) == 0
    assert train_main([*common, "--method", "barlowtwins", "--output-dir", str(baseline)]) == 0
    summary = json.loads((metamask / "summary.json").read_text())
    assert (metamask / "dims.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["dimensions"]["dims"][-1] == 64 and summary["dimensions"]["k"] == 20
    assert not (baseline / "dims.png").exists() and "dimensions" not in json.loads(
        (baseline / "summary.json").read_text())
    capsys.readouterr()

    # The command: the same analysis for any run, never over an existing file.
    assert dims_main(["--run", str(metamask)]) == 2
    assert "exists; refusing to overwrite" in capsys.readouterr().err
    out = tmp_path / "again"
    out.mkdir()
    assert dims_main(["--run", str(metamask), "--output", str(out), "--device", "cpu"]) == 0
    # The same features up to the batch size of the extraction (a neighbour may flip): within 2 of 360 digits.
    again = json.loads((out / "dims.json").read_text())
    assert again["highest"] == pytest.approx(summary["dimensions"]["highest"], abs=2 / 360)
    assert dims_main(["--run", str(baseline), "--device", "cpu"]) == 0
    assert (baseline / "dims.png").read_bytes()[:4] == b"\x89PNG"
    assert "dimensions: highest mask values" in capsys.readouterr().out
    for argv, message in ((["--run", str(baseline), "--draws", "0"], "--draws"),
                          (["--run", str(tmp_path / "nothing")], "--run"),
                          (["--run", str(metamask), "--output", str(tmp_path / "missing")], "--output")):
        assert dims_main(argv) == 2
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1
