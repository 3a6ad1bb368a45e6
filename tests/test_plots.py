"""write_plots: which PNGs it writes for which inputs, that they are real images, and its argument checks."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

from metamask_fast import plots  # noqa: E402
from metamask_fast.plots import write_plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _records(epochs: int = 12, knn_every: int = 4, virtual_every: int = 3) -> list[dict]:
    """Records shaped like metrics.jsonl lines of a meta_interval run: loss_cl_virtual on some epochs only,
    the kNN keys (and their _best variant) only on the monitor's epochs."""
    records = []
    for epoch in range(1, epochs + 1):
        record = {"epoch": epoch, "step": 11 * epoch, "loss": 310.0 / epoch + 1.0, "loss_bt": 300.0 / epoch,
                  "loss_cl": 1.0 + 1.0 / epoch, "lr": 1e-3, "mask_mean": 0.5}
        if epoch % virtual_every == 0:
            record["loss_cl_virtual"] = 1.5
        if epoch % knn_every == 0:
            record["knn_k200_t0.1_top1"] = 0.4 + epoch / 100
            record["knn_k20_t0.1_top1"] = 0.35 + epoch / 100
            record["knn_k200_t0.1_top1_best"] = 0.9
        records.append(record)
    return records


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        width, height = image.size
        assert width > 0 and height > 0
        extrema = image.convert("RGB").getextrema()
        assert any(low < high for low, high in extrema), f"{path.name} is a single colour"


def _names(paths) -> list[str]:
    return [p.name for p in paths]


# --------------------------------------------------------------------------------------------- output


def test_all_four_plots_are_written_as_real_pngs(tmp_path):
    mask = torch.rand(64)
    correlation = torch.eye(64) + 0.1 * torch.randn(64, 64).clamp(-1, 1)
    paths = write_plots(tmp_path, _records(), mask=mask, correlation=correlation.clamp(-1, 1))
    assert _names(paths) == ["loss.png", "knn.png", "mask.png", "correlation.png"]
    for path in paths:
        assert path.parent == tmp_path and path.is_file()
        _assert_png(path)
    # Nothing else (no temporary files) is left in the run folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(_names(paths))


def test_records_read_back_from_a_metrics_jsonl_file(tmp_path):
    lines = "\n".join(json.dumps(r) for r in _records())
    (tmp_path / "metrics.jsonl").write_text(lines + "\n")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert _names(write_plots(tmp_path, records)) == ["loss.png", "knn.png"]


def test_optional_plots_are_skipped(tmp_path):
    records = [{k: v for k, v in r.items() if not k.startswith("knn_")} for r in _records()]
    paths = write_plots(tmp_path, records)
    assert _names(paths) == ["loss.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]
    _assert_png(paths[0])


def test_best_and_last_knn_variants_alone_do_not_make_a_knn_plot(tmp_path):
    records = [{"epoch": e, "loss": 1.0 / e, "knn_k20_t0.1_top1_best": 0.5, "knn_k20_t0.1_top1_last": 0.4}
               for e in range(1, 4)]
    assert _names(write_plots(tmp_path, records)) == ["loss.png"]


def test_records_with_missing_and_sporadic_keys(tmp_path):
    # loss_cl only on some epochs, one kNN point in all, None and non-finite values, no loss_bt at all.
    records = [{"epoch": 1, "loss": 5.0}, {"epoch": 2, "loss": 4.0, "loss_cl": 1.2, "loss_cl_virtual": 1.3},
               {"epoch": 3, "loss": None, "knn_k20_t0.1_top1": 0.3}, {"epoch": 4, "loss": 3.0, "loss_cl": 1.1},
               {"epoch": 5, "loss": float("nan"), "loss_cl": float("inf")}]  # a diverged last epoch
    paths = write_plots(tmp_path, records)
    assert _names(paths) == ["loss.png", "knn.png"]
    for path in paths:
        _assert_png(path)


def test_loss_panels_follow_the_keys_present_and_log_scale_only_when_positive():
    records = [{"epoch": e, "loss": 100.0 / e, "loss_cl": -1.0 + e} for e in range(1, 30)]
    series = {key: plots._series(records, [float(r["epoch"]) for r in records], key) for key in plots.LOSS_KEYS}
    series = {key: xy for key, xy in series.items() if xy[0]}
    figure = plots._loss_figure(series)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["loss", "loss_cl"]
    assert [ax.get_yscale() for ax in figure.axes] == ["log", "linear"]  # loss_cl has a value <= 0


def test_only_records_without_any_plotted_key_write_nothing(tmp_path):
    assert write_plots(tmp_path, [{"epoch": 1, "lr": 0.1}]) == []
    assert list(tmp_path.iterdir()) == []


def test_existing_plots_are_replaced(tmp_path):
    (tmp_path / "loss.png").write_bytes(b"old")
    (path,) = write_plots(tmp_path, [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.0}])
    _assert_png(path)


def test_mask_accepts_a_parameter_that_requires_grad(tmp_path):
    mask = torch.sigmoid(torch.randn(100, requires_grad=True))
    (path,) = write_plots(tmp_path, [{"epoch": 0}], mask=mask)
    assert path.name == "mask.png"
    _assert_png(path)


def test_small_correlation_is_drawn_unchanged_with_a_fixed_symmetric_range():
    correlation = torch.eye(9, dtype=torch.float64) * 0.5
    figure = plots._correlation_figure(correlation)
    (image,) = figure.axes[0].get_images()
    assert np.array_equal(image.get_array(), correlation.numpy())
    assert image.get_clim() == (-1.0, 1.0)
    assert figure.axes[0].get_title() == "cross-correlation 9×9"
    assert len(figure.axes) == 2  # the heat map and its colour bar


@pytest.mark.parametrize("size", [2048, 513, 1000])
def test_large_correlation_is_block_averaged_to_at_most_512(size):
    correlation = torch.randn(size, size, dtype=torch.float64).clamp(-1, 1)
    figure = plots._correlation_figure(correlation)
    (image,) = figure.axes[0].get_images()
    drawn = np.asarray(image.get_array())
    factor = -(-size // 512)
    assert drawn.shape[0] == drawn.shape[1] <= 512
    assert f"block-averaged {factor}×{factor}" in figure.axes[0].get_title()
    # Reference by plain slicing (partial blocks at the edges): the mean over each block of rows, then the
    # mean of that over each block of columns, is the mean of each factor×factor block.
    matrix = correlation.numpy()
    starts = range(0, size, factor)
    rows = np.stack([matrix[i:i + factor].mean(axis=0) for i in starts])
    reference = np.stack([rows[:, j:j + factor].mean(axis=1) for j in starts], axis=1)
    np.testing.assert_allclose(drawn, reference, rtol=0, atol=1e-12)


def test_2048_correlation_renders_quickly(tmp_path):
    correlation = (0.05 * torch.randn(2048, 2048)).clamp(-1, 1)
    correlation.fill_diagonal_(1.0)
    write_plots(tmp_path, [{"epoch": 0}], correlation=correlation[:8, :8])  # import matplotlib, warm caches
    start = time.perf_counter()
    (path,) = write_plots(tmp_path, [{"epoch": 0}], correlation=correlation)
    elapsed = time.perf_counter() - start
    _assert_png(path)
    assert elapsed < 3.0, f"correlation.png took {elapsed:.2f} s"  # about 0.3 s here; generous for slow CI


# --------------------------------------------------------------------------------------------- checks


def test_run_dir_must_exist_and_be_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="run_dir"):
        write_plots(tmp_path / "missing", _records())
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="run_dir"):
        write_plots(tmp_path / "file", _records())
    with pytest.raises(TypeError, match="run_dir"):
        write_plots(None, _records())


def test_bad_records(tmp_path):
    with pytest.raises(ValueError, match="records"):
        write_plots(tmp_path, [])
    with pytest.raises(TypeError, match="records"):
        write_plots(tmp_path, {"epoch": 1, "loss": 1.0})
    with pytest.raises(TypeError, match=r"records\[1\]"):
        write_plots(tmp_path, [{"epoch": 1}, "loss"])
    with pytest.raises(ValueError, match=r"records\[0\].*epoch"):
        write_plots(tmp_path, [{"loss": 1.0}])
    with pytest.raises(ValueError, match=r"records\[0\].*epoch"):
        write_plots(tmp_path, [{"epoch": True, "loss": 1.0}])
    with pytest.raises(ValueError, match="records.*'loss'"):
        write_plots(tmp_path, [{"epoch": 1, "loss": "1.0"}])
    assert list(tmp_path.iterdir()) == []


def test_bad_mask_and_correlation(tmp_path):
    records = _records()
    with pytest.raises(ValueError, match="correlation"):
        write_plots(tmp_path, records, correlation=torch.zeros(4, 5))
    with pytest.raises(ValueError, match="correlation"):
        write_plots(tmp_path, records, correlation=torch.zeros(4))
    with pytest.raises(ValueError, match="correlation"):
        write_plots(tmp_path, records, correlation=torch.tensor([[0.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(TypeError, match="correlation"):
        write_plots(tmp_path, records, correlation=np.eye(3))
    with pytest.raises(ValueError, match="mask"):
        write_plots(tmp_path, records, mask=torch.rand(3, 3))
    with pytest.raises(ValueError, match="mask"):
        write_plots(tmp_path, records, mask=torch.empty(0))
    with pytest.raises(TypeError, match="mask"):
        write_plots(tmp_path, records, mask=torch.ones(3, dtype=torch.int64))
    # Every check runs before the first file is written.
    assert list(tmp_path.iterdir()) == []


def test_knn_plot_draws_the_references_and_annotates_the_last_values():
    records = _records(epochs=12, knn_every=1)
    epochs = [float(r["epoch"]) for r in records]
    series = {key: plots._series(records, epochs, key) for key in ("knn_k200_t0.1_top1", "knn_k20_t0.1_top1")}
    figure = plots._knn_figure(series, {"raw pixels": 0.9111, "network at random init": 0.775})
    (ax,) = figure.axes
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["knn_k200_t0.1_top1", "knn_k20_t0.1_top1", "raw pixels (91.11%)",
                      "network at random init (77.50%)"]
    horizontal = {line.get_label(): set(line.get_ydata()) for line in ax.get_lines()[2:]}
    assert horizontal == {"raw pixels (91.11%)": {0.9111}, "network at random init (77.50%)": {0.775}}
    assert len(ax.get_lines()[0].get_xdata()) == 12
    assert sorted(text.get_text() for text in ax.texts) == ["47.00%", "52.00%"]  # 0.35 + 0.12, 0.4 + 0.12
    assert [t.get_text() for t in ax.get_legend().get_texts()] == labels


def test_bad_references(tmp_path):
    with pytest.raises(TypeError, match="references"):
        write_plots(tmp_path, _records(), references=[0.9])
    with pytest.raises(ValueError, match="references"):
        write_plots(tmp_path, _records(), references={"raw pixels": float("nan")})
    with pytest.raises(ValueError, match="references"):
        write_plots(tmp_path, _records(), references={3: 0.5})
    assert list(tmp_path.iterdir()) == []
