"""``python -m metamask_fast.train``: the run folder, the three methods and the command-line contract."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from metamask_fast import train as train_module
from metamask_fast.backbones import DigitsConvNet
from metamask_fast.models import DimensionalMask
from metamask_fast.config import TrainConfig, resolve
from metamask_fast.train import build_model, main

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt", "backbone.pt", "mask.pt", "loss.png",
             "knn.png", "mask.png", "correlation.png", "dims.png")
KNN = "knn_k20_t0.1_top1"  # the digits' protocol: k = 20 neighbours
SUMMARY_KEYS = (f"{KNN}_last", f"{KNN}_best", "knn_raw_pixels", "knn_random_init", "epochs", "seconds", "method")


def read_config(output_dir: Path) -> dict:
    return yaml.safe_load((output_dir / "config.yaml").read_text())


def run_in_process(tmp_path: Path, *arguments: str) -> tuple[Path, dict]:
    output_dir = tmp_path / "run"
    assert main(["--output-dir", str(output_dir), "--no-progress", *arguments]) == 0
    return output_dir, json.loads((output_dir / "summary.json").read_text())


def test_default_run_writes_a_complete_run_folder(tmp_path, capsys):
    output_dir, summary = run_in_process(tmp_path, "--epochs", "1")
    assert sorted(p.name for p in output_dir.iterdir()) == sorted(RUN_FILES)

    for key in SUMMARY_KEYS:
        assert key in summary, key
    assert summary["method"] == "metamask" and summary["epochs"] == 1 and summary["seconds"] > 0
    for key in (f"{KNN}_last", "knn_raw_pixels", "knn_random_init"):
        assert 0.1 < summary[key] <= 1.0, (key, summary[key])
    # Raw pixels do not depend on the network: a fixed number of this fixed split (k=20).
    assert summary["knn_raw_pixels"] > 0.95

    config = read_config(output_dir)
    assert config["method"] == "metamask" and config["epochs"] == 1 and config["output_dir"] == str(output_dir)
    # The digits recipe (issue 18): AdamW 2e-3 at batch 256, kNN with k = 20.
    assert (config["optimizer"], config["lr"], config["batch_size"], config["knn_k"]) == ("adamw", 2e-3, 256, 20)

    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1
    steps_per_epoch = 1437 // config["batch_size"]
    assert records[0]["epoch"] == 1 and records[0]["step"] == steps_per_epoch
    for key in ("loss", "loss_bt", "loss_cl", "lr", "mask_lr", "mask_mean", "mask_min", "mask_max", "seconds"):
        assert math.isfinite(records[0][key]), key
    assert records[0]["lr"] == config["lr"]
    # The meta-gradient moved the mask away from its initial 0.5 everywhere-value.
    assert records[0]["mask_min"] < 0.5 < records[0]["mask_max"]

    assert records[0][KNN] == summary[f"{KNN}_last"] == records[0][f"{KNN}_best"]
    checkpoint = torch.load(output_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["config"]["method"] == "metamask" and checkpoint["finished"]
    assert checkpoint["net_optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert all("exp_avg_sq" in state for state in checkpoint["net_optimizer"]["state"].values())
    assert checkpoint["mask_optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert checkpoint["mask_optimizer"] is not None
    model = build_model(resolve(TrainConfig()))
    model.load_state_dict(checkpoint["model"])

    backbone = DigitsConvNet()
    backbone.load_state_dict(torch.load(output_dir / "backbone.pt", weights_only=True))
    mask = DimensionalMask(backbone.feature_dim)
    mask.load_state_dict(torch.load(output_dir / "mask.pt", weights_only=True))
    assert torch.equal(mask.logits, model.mask.logits)
    images = torch.rand(5, 1, 16, 16)
    model.eval(), backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(backbone(images) * mask(), model.features(images))

    printed = capsys.readouterr().out
    assert "raw pixels" in printed and "random init" in printed and str(output_dir) in printed
    assert "second_order: finite_difference" in printed  # the resolved config is printed


def test_knn_every_auto_gives_the_curve_ten_points_or_more(tmp_path):
    assert [resolve(TrainConfig(epochs=e)).knn_every for e in (1, 9, 10, 50, 1000)] == [1, 1, 1, 5, 100]
    assert resolve(TrainConfig(epochs=50, knn_every=7)).knn_every == 7
    output_dir, _ = run_in_process(tmp_path, "--epochs", "3", "--batch-size", "512")
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if KNN in r] == [1, 2, 3]
    assert (output_dir / "knn.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_says_why_it_runs_without_compiled_ops(tmp_path, capsys, monkeypatch):
    from metamask_fast import ops

    monkeypatch.setattr(ops, "HAS_EXTENSION", False)
    monkeypatch.setattr(ops, "_EXTENSION_ERROR", "disabled by METAMASK_FAST_NO_EXT=1")
    monkeypatch.setenv("METAMASK_FAST_BACKEND", "torch")
    output_dir, summary = run_in_process(tmp_path, "--epochs", "1", "--method", "barlowtwins")
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("metamask_fast.train: engine: compiled_ops: false (disabled by METAMASK_FAST_NO_EXT=1), "
                            "bt_loss: torch (Triton skipped: METAMASK_FAST_BACKEND=torch), device: cpu ("), first
    assert summary["engine"]["compiled_ops"] is False and summary["engine"]["bt_loss"] == "torch"
    assert summary["engine"]["compiled_ops_why_not"] == "disabled by METAMASK_FAST_NO_EXT=1"


@pytest.mark.parametrize("method", ["barlowtwins", "simclr"])
def test_single_loss_methods_keep_the_mask_at_identity(tmp_path, method):
    output_dir, summary = run_in_process(tmp_path, "--method", method, "--epochs", "1", "--batch-size", "256")
    assert summary["method"] == method and summary["mask_min"] == summary["mask_max"] == 1.0
    mask = torch.load(output_dir / "mask.pt", weights_only=True)
    assert torch.equal(mask["logits"], torch.ones(64))
    checkpoint = torch.load(output_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["mask_optimizer"] is None
    record = json.loads((output_dir / "metrics.jsonl").read_text())
    assert record["step"] == 1437 // 256
    assert math.isfinite(record["loss_bt"]) and math.isfinite(record["loss_cl"])
    trained = "loss_bt" if method == "barlowtwins" else "loss_cl"
    assert record["loss"] == record[trained]


def test_first_order_metamask_and_flags_are_honoured(tmp_path):
    output_dir, summary = run_in_process(tmp_path, "--second-order", "none", "--epochs", "2", "--batch-size",
                                         "512", "--lr", "0.01", "--mask-lr", "0.2", "--seed", "3")
    config = read_config(output_dir)
    assert (config["second_order"], config["batch_size"], config["lr"], config["mask_lr"], config["seed"]) == (
        "none", 512, 0.01, 0.2, 3)
    assert config["device"] == "cpu" or torch.cuda.is_available()
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    # Cosine schedule per epoch: epoch 2 of 2 runs at half the initial rate.
    assert [r["lr"] for r in records] == pytest.approx([0.01, 0.005])
    assert [r["mask_lr"] for r in records] == pytest.approx([0.2, 0.1])
    assert summary["epochs"] == 2


def test_meta_interval_and_exact_second_order_are_honoured(tmp_path):
    output_dir, _ = run_in_process(tmp_path, "--second-order", "exact", "--meta-interval", "2", "--epochs", "1",
                                   "--batch-size", "256")
    config = read_config(output_dir)
    assert (config["second_order"], config["meta_interval"]) == ("exact", 2)
    (record,) = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    # 5 steps of 256 digits: meta steps at steps 0, 2 and 4. Their keys average over those steps only.
    assert record["step"] == 5 and record["meta_step"] == pytest.approx(3 / 5)
    assert math.isfinite(record["mask_grad_norm"]) and record["mask_grad_norm"] > 0


def test_divergence_ends_with_one_line_and_exit_code_1(tmp_path, capsys):
    arguments = ["--method", "simclr", "--lr", "1e8", "--epochs", "2", "--batch-size", "512", "--no-progress"]
    assert main(["--output-dir", str(tmp_path / "run"), *arguments]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--lr" in error and "non-finite" in error


def test_existing_non_empty_output_dir_is_refused_untouched(tmp_path, capsys):
    output_dir = tmp_path / "precious"
    output_dir.mkdir()
    (output_dir / "results.txt").write_text("do not lose me")
    assert main(["--epochs", "1", "--output-dir", str(output_dir)]) == 2
    assert [p.name for p in output_dir.iterdir()] == ["results.txt"]
    assert (output_dir / "results.txt").read_text() == "do not lose me"
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--output-dir" in error


def test_abbreviated_flags_are_refused(tmp_path, capsys):
    assert main(["--epoch", "3", "--output-dir", str(tmp_path / "run")]) == 2
    assert "unrecognized arguments: --epoch 3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_auto_means_the_default(tmp_path):
    config, _, _ = train_module.parse_config(["--device", "auto", "--output-dir", "auto", "--backbone", "auto"])
    assert (config.device, config.output_dir, config.backbone) == (None, None, None)


def test_help_exits_cleanly(capsys):
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--second-order" in help_text and "--config" in help_text and "--resume" in help_text


BAD_COMMAND_LINES = {
    "epochs-zero": (["--epochs", "0"], "--epochs"),
    "epochs-negative": (["--epochs", "-3"], "--epochs"),
    "epochs-text": (["--epochs", "many"], "--epochs"),
    "batch-size-zero": (["--batch-size", "0"], "--batch-size"),
    "batch-size-one": (["--batch-size", "1"], "--batch-size"),
    "batch-size-too-large": (["--batch-size", "1438"], "--batch-size"),
    "lr-zero": (["--lr", "0"], "--lr"),
    "lr-negative": (["--lr", "-0.1"], "--lr"),
    "lr-nan": (["--lr", "nan"], "--lr"),
    "lr-inf": (["--lr", "inf"], "--lr"),
    "mask-lr-zero": (["--mask-lr", "0"], "--mask-lr"),
    "unknown-method": (["--method", "byol"], "--method"),
    "unknown-second-order": (["--second-order", "newton"], "--second-order"),
    "seed-text": (["--seed", "x"], "--seed"),
    "meta-interval-zero": (["--meta-interval", "0"], "--meta-interval"),
    "device-nonsense": (["--device", "tpu"], "--device"),
    "seed-too-large": (["--seed", str(2**64)], "--seed"),
    "epochs-too-large": (["--epochs", "9" * 400], "--epochs"),
    "knn-k-larger-than-train-set": (["--knn-k", "1438"], "--knn-k"),
    "output-dir-empty": (["--output-dir", ""], "--output-dir"),
    "device-cuda-index": (["--device", "cuda:99"], "--device"),
    "unwritable-output-dir": (["--output-dir", "{blocker}/run"], "--output-dir"),
    "unknown-optimizer": (["--optimizer", "adam"], "--optimizer"),
    "lars-eta-zero": (["--optimizer", "lars", "--eta", "0"], "--eta"),
    "betas-not-below-one": (["--optimizer", "adamw", "--betas", "0.9,1.0"], "--betas"),
    "betas-one-value": (["--optimizer", "adamw", "--betas", "0.9"], "--betas"),
    "adam-eps-zero": (["--optimizer", "adamw", "--adam-eps", "0"], "--adam-eps"),
    "exclude-bias-norm-without-lars": (["--exclude-bias-norm"], "--exclude-bias-norm"),
    "warmup-not-below-epochs": (["--epochs", "3", "--warmup-epochs", "3"], "--warmup-epochs"),
    "scale-loss-zero": (["--scale-loss", "0"], "--scale-loss"),
    "lr-biases-negative": (["--lr-biases", "-1"], "--lr-biases"),
    "asymmetric-views-on-digits": (["--augmentation", "asymmetric"], "--augmentation"),
}
if not torch.cuda.is_available():
    BAD_COMMAND_LINES["device-cuda-unavailable"] = (["--device", "cuda"], "--device")
# The real entry point, one interpreter per case, for a sample of the cases above (each start costs
# seconds of imports); every case also runs in-process through main().
SUBPROCESS_CASES = ["epochs-zero", "batch-size-too-large", "lr-nan", "unknown-method", "unwritable-output-dir",
                    "device-cuda-unavailable" if not torch.cuda.is_available() else "device-cuda-index"]


def bad_command_line(case: str, workdir: Path) -> list[str]:
    blocker = workdir / "a-file"
    blocker.write_text("not a directory")
    arguments = [a.format(blocker=blocker) for a in BAD_COMMAND_LINES[case][0]]
    if "--output-dir" not in arguments:
        arguments += ["--output-dir", str(workdir / case)]
    return arguments


def assert_one_line_error(returncode: int, stdout: str, stderr: str, case: str, workdir: Path) -> None:
    assert returncode == 2, stderr
    assert "Traceback" not in stderr and "usage:" not in stderr and stdout == ""
    argument = BAD_COMMAND_LINES[case][1]
    assert stderr.count("\n") == 1 and stderr.startswith(f"metamask_fast.train: error: argument {argument}"), stderr
    # Nothing is created for a command line that is refused.
    assert not (workdir / case).exists()


@pytest.mark.parametrize("case", sorted(BAD_COMMAND_LINES))
def test_bad_command_line_returns_2_with_one_line(tmp_path, capsys, case):
    returncode = main(bad_command_line(case, tmp_path))
    captured = capsys.readouterr()
    assert_one_line_error(returncode, captured.out, captured.err, case, tmp_path)


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory):
    """The sampled bad command lines as real subprocesses, started together so their imports overlap."""
    workdir = tmp_path_factory.mktemp("cli")
    processes = {
        case: subprocess.Popen([sys.executable, "-m", "metamask_fast.train", *bad_command_line(case, workdir)],
                               cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for case in SUBPROCESS_CASES
    }
    results = {}
    for case, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        results[case] = (process.returncode, stdout, stderr)
    return workdir, results


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_command_line_subprocess_exits_2_with_one_line(subprocess_results, case):
    workdir, results = subprocess_results
    assert_one_line_error(*results[case], case, workdir)
