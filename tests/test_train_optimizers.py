"""The trainer on each network optimizer (SGD, LARS, AdamW), with warm-up, a biases group and scale_loss."""

import json
import math
import signal

import pytest
import torch

from metamask_fast import config as cfg
from metamask_fast.optim import LARS
from metamask_fast.reporting import MEASURED_KEYS
from metamask_fast.train import WarmupCosine, main, parse_config

from interrupts import interrupt_at

QUICK = ["--no-progress", "--batch-size", "256", "--knn-every", "1"]


def run(folder, *arguments):
    assert main([*QUICK, "--output-dir", str(folder), *arguments]) == 0
    summary = json.loads((folder / "summary.json").read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return summary, records, torch.load(folder / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("optimizer, state_key", [("lars", "mu"), ("adamw", "exp_avg")])
def test_each_optimizer_trains_the_digits_above_random_init(tmp_path, optimizer, state_key):
    """``--optimizer lars|adamw --epochs 2`` with the optimizer's default rates, at the protocol these rates were
    first measured with (batch 128, k = 200; at the digits' k = 20 a random network is already at 93 %)."""
    folder = tmp_path / optimizer
    assert main(["--no-progress", "--knn-every", "1", "--output-dir", str(folder), "--optimizer", optimizer,
                 "--epochs", "2", "--batch-size", "128", "--knn-k", "200"]) == 0
    summary = json.loads((folder / "summary.json").read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
    knn = "knn_k200_t0.1_top1"
    assert summary[f"{knn}_last"] > summary["knn_random_init"] + 0.02, summary
    assert all(math.isfinite(r["loss"]) and r.get("skipped_steps", 0) == 0 for r in records)
    state = checkpoint["net_optimizer"]["state"]
    assert state and all(state_key in s for s in state.values())
    config = json.loads(json.dumps(checkpoint["config"]))
    assert config["optimizer"] == optimizer


def test_warm_up_then_cosine_per_step_and_a_biases_group(tmp_path):
    # 5 steps per epoch (1,437 digits, batch 256): 5 warm-up steps, then a cosine over the other 10.
    _, records, checkpoint = run(tmp_path / "run", "--optimizer", "lars", "--lr", "0.1", "--lr-biases", "0.01",
                                 "--epochs", "3", "--warmup-epochs", "1")
    schedule = WarmupCosine(5, 15)
    # A literal transcription: s/w during the warm-up, then 0.5·(1 + cos(π·(s − w)/(total − w))).
    assert [schedule(s) for s in (0, 2, 5, 10, 15)] == pytest.approx(
        [0.0, 0.4, 1.0, 0.5 * (1 + math.cos(math.pi * 5 / 10)), 0.0])
    # The recorded rate is the one at each epoch's first step: steps 0, 5 and 10.
    assert [r["lr"] for r in records] == pytest.approx([0.1 * schedule(s) for s in (0, 5, 10)])
    assert [r["mask_lr"] for r in records] == pytest.approx([0.3 * schedule(s) for s in (0, 5, 10)])
    weights_group, biases_group = checkpoint["net_optimizer"]["param_groups"]
    assert weights_group["lr"] == pytest.approx(0.0) and biases_group["lr"] == pytest.approx(0.0)  # the end
    assert weights_group["initial_lr"] == 0.1 and biases_group["initial_lr"] == 0.01
    # The 1-d weights (biases, norms) form the second group.
    model_shapes = [tuple(t.shape) for name, t in checkpoint["model"].items() if name.endswith(("weight", "bias"))]
    assert len(biases_group["params"]) == sum(1 for shape in model_shapes if len(shape) == 1)


def test_scale_loss_weights_the_barlow_twins_term(tmp_path):
    _, records, _ = run(tmp_path / "run", "--scale-loss", "0.1", "--epochs", "1")
    (record,) = records
    # Per step loss = 0.1 · loss_bt + 10 · loss_cl, so the epoch's means obey it too.
    assert record["loss"] == pytest.approx(0.1 * record["loss_bt"] + 10 * record["loss_cl"], rel=1e-6)


def test_an_interrupted_lars_warm_up_run_resumes_bitwise(tmp_path, monkeypatch, capsys):
    arguments = ["--optimizer", "lars", "--lr", "0.05", "--epochs", "3", "--warmup-epochs", "1",
                 "--checkpoint-every", "3", "--meta-interval", "2"]
    _, whole_records, whole = run(tmp_path / "whole", *arguments)
    interrupt_at(monkeypatch, 7)
    folder = tmp_path / "stopped"
    assert main([*QUICK, "--output-dir", str(folder), *arguments]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    _, records, resumed = run(folder, *arguments)
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for key in ("net_optimizer", "mask_optimizer", "schedulers"):
        assert json.dumps(_plain(whole[key])) == json.dumps(_plain(resumed[key])), key
    drop = MEASURED_KEYS
    assert [{k: v for k, v in r.items() if k not in drop} for r in records] == [
        {k: v for k, v in r.items() if k not in drop} for r in whole_records]


def _plain(value):
    """Optimizer and scheduler states as JSON (tensors as lists), to compare them exactly."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def test_settings_added_later_keep_the_identity_of_existing_runs():
    """Runs before the optimizer settings existed used SGD, no warm-up, scale 1: at those values the settings
    hash (the default run folder's name) and the identity a checkpoint is checked against are as before, so
    existing run folders still resume. The hashes are those of 100c041, before these settings; "a9185c44" is
    the default digits run of then, which the digits-sgd preset spells out."""
    old_default = cfg.resolve(cfg.TrainConfig(optimizer="sgd", batch_size=128, knn_k=200, augment_on="batch"))
    assert cfg.describe(old_default) == "a9185c44"
    preset, _, _ = parse_config(["--config", "digits-sgd"])
    assert cfg.describe(cfg.resolve(preset)) == "a9185c44"
    authors = cfg.TrainConfig(dataset="cifar10", epochs=800, batch_size=512, lr=1e-3, mask_lr=1e-3, augment_on="workers")
    assert cfg.describe(cfg.resolve(authors)) == "f0446ecc"
    assert not set(cfg.LATER_FIELDS) & set(cfg.identity(old_default))
    assert cfg.identity(cfg.resolve(cfg.TrainConfig(optimizer="lars")))["optimizer"] == "lars"
    assert cfg.identity(cfg.resolve(cfg.TrainConfig()))["optimizer"] == "adamw"  # the digits default since issue 18


def test_lars_is_refused_bad_arguments_by_name():
    params = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="eta"):
        LARS(params, lr=0.1, eta=0)
    with pytest.raises(TypeError, match="weight_decay_filter"):
        LARS(params, lr=0.1, weight_decay_filter=1)


def test_asymmetric_views_solarize_the_second_view_only():
    from torchvision import transforms

    from metamask_fast.data import view_augmentations

    first, second = view_augmentations("asymmetric", "cifar10", 32)
    solarize = [[t for t in view.transforms if isinstance(t, transforms.RandomSolarize)] for view in (first, second)]
    assert solarize[0] == [] and [(t.threshold, t.p) for t in solarize[1]] == [(128, 0.2)]
    for view in (first, second):
        (jitter,) = [t.transforms[0] for t in view.transforms if isinstance(t, transforms.RandomApply)]
        assert jitter.saturation == (0.8, 1.2) and jitter.brightness == (0.6, 1.4)
    same_first, same_second = view_augmentations("simclr", "cifar10", 32)
    assert same_first is same_second
    assert not any(isinstance(t, transforms.RandomSolarize) for t in same_first.transforms)


def test_a_pair_of_augmentations_is_applied_one_per_view():
    import numpy as np

    from metamask_fast.data import ImageSet, SeededTwoViews

    images = ImageSet(torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)),
                      None, None)
    views = SeededTwoViews(images, (lambda image: "first", lambda image: "second"), seed=0)
    assert views[(0, 1)] == ("first", "second")


def test_cifar10_lars_preset_runs_on_a_cifar_folder(tmp_path):
    import pickle

    import numpy as np

    rng = np.random.default_rng(3)
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, count in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 10)]:
        pixels = rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({b"data": pixels, b"labels": rng.integers(0, 3, count).tolist()}))
    run_folder = tmp_path / "run"
    # The preset as it is, but for its size: fewer epochs and images, narrower heads.
    assert main(["--config", "cifar10-lars", "--data-dir", str(tmp_path / "data"), "--epochs", "2",
                 "--warmup-epochs", "1", "--batch-size", "8", "--image-size", "16", "--bt-dims", "32,32",
                 "--cl-dims", "32,16", "--knn-k", "3", "--workers", "0", "--no-progress",
                 "--output-dir", str(run_folder)]) == 0
    checkpoint = torch.load(run_folder / "checkpoint.pt", weights_only=True)
    config = checkpoint["config"]
    assert (config["optimizer"], config["eta"], config["exclude_bias_norm"], config["augmentation"],
            config["scale_loss"]) == ("lars", 0.02, True, "asymmetric", 0.1)
    assert all("mu" in state for state in checkpoint["net_optimizer"]["state"].values())
    summary = json.loads((run_folder / "summary.json").read_text())
    assert summary["steps"] == 4 and 0.0 <= summary["knn_k3_t0.1_top1_last"] <= 1.0
