"""What happens when a run is killed, signalled, fed non-finite values, bad files or a full disk: the real
command in a subprocess where it applies."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metamask_fast import runfolder
from metamask_fast.train import main

from interrupts import checkpoint_past, interrupt_at, wait_for

# 2 epochs of 5 steps on the digits, a checkpoint after every step.
ARGS = ["--epochs", "2", "--batch-size", "256", "--checkpoint-every", "1", "--knn-every", "1", "--meta-interval", "2",
        "--no-progress"]


def command(folder: Path) -> list[str]:
    return [sys.executable, "-m", "metamask_fast.train", *ARGS, "--output-dir", str(folder)]


def final_state(folder: Path) -> dict:
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert checkpoint["finished"]
    return {"model": checkpoint["model"], "net_optimizer": checkpoint["net_optimizer"],
            "mask_optimizer": checkpoint["mask_optimizer"], "step": checkpoint["step"],
            "backbone": torch.load(folder / "backbone.pt", weights_only=True),
            "mask": torch.load(folder / "mask.pt", weights_only=True)}


def assert_bitwise_equal(a, b) -> None:
    flat_a, spec_a = torch.utils._pytree.tree_flatten(a)
    flat_b, spec_b = torch.utils._pytree.tree_flatten(b)
    assert spec_a == spec_b
    for x, y in zip(flat_a, flat_b):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole") / "run"
    result = subprocess.run(command(folder), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return folder


def test_sigkill_at_random_moments_then_rerun_gives_the_same_weights(tmp_path, uninterrupted):
    folder = tmp_path / "run"
    kill_at_random_moments_until_done(command(folder), folder)
    assert_bitwise_equal(final_state(folder), final_state(uninterrupted))
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # every epoch once, none lost, none doubled


def kill_at_random_moments_until_done(argv: list[str], folder: Path) -> None:
    """Run ``argv`` (which writes ``folder``) again and again, SIGKILLing the first two tries at a random
    moment once training has started, until one finishes; at least two kills must have landed."""
    rng = random.Random(1234)
    kills = 0
    for attempt in range(8):
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if attempt < 2:
            # Kill only once training has started (the checkpoint exists), at a random moment after that.
            deadline = time.monotonic() + 120
            while process.poll() is None and not (folder / "checkpoint.pt").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
            if process.poll() is None:
                process.kill()
                kills += 1
        _, stderr = process.communicate(timeout=600)
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL, stderr
    assert process.returncode == 0 and kills >= 2


def test_a_write_cut_short_by_a_kill_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL in the middle of writing a checkpoint: the complete previous file stays, the partial one
    is a temporary file that the next start removes."""
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous complete checkpoint")
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from metamask_fast.runfolder import atomic_write\n"
        "def write(f):\n"
        "    f.write(b'half of a new one')\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"atomic_write(Path({str(target)!r}), write)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"previous complete checkpoint"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint.pt.tmp-")


def test_sigterm_sigint_and_sigusr1_write_a_checkpoint_and_exit_with_a_message(tmp_path, uninterrupted):
    """SIGTERM, then SIGINT, then SIGUSR1 (no SLURM job here: nothing is requeued), each once a newer checkpoint is
    on disk: each stop exits with 128 + the signal and one line naming the checkpoint's step; the same command then
    finishes bitwise as the uninterrupted run."""
    folder = tmp_path / "run"
    step = 0
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        process = subprocess.Popen(command(folder), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env={k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"})
        assert wait_for(checkpoint_past(folder, step), process, timeout=120)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 128 + signum, stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and f"stopped by {signal.Signals(signum).name} after step" in lines[0], stderr
        assert "run the same command to resume" in lines[0]
        stopped_at = torch.load(folder / "checkpoint.pt", weights_only=True)["step"]
        assert f"after step {stopped_at};" in lines[0] and stopped_at > step
        step = stopped_at
    result = subprocess.run(command(folder), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert_bitwise_equal(final_state(folder), final_state(uninterrupted))


def test_a_full_disk_at_checkpoint_time_stops_cleanly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        if ".checkpoint.pt.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            calls.append(fd)
            if len(calls) == 4:  # the checkpoints of steps 1, 2, 3 are written; the 4th finds the disk full
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(runfolder.os, "fsync", fsync)
    code = main([*ARGS, "--output-dir", str(folder)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "No space left on device" in err and "checkpoint.pt" in err
    assert "the run stopped at step 4" in err and "run the same command to resume" in err
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["step"] == 3  # intact and readable
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]
    monkeypatch.undo()
    assert main([*ARGS, "--output-dir", str(folder)]) == 0  # with room again, the same command resumes


def test_an_unwritable_run_folder_is_found_at_start(tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file")
    assert main([*ARGS, "--output-dir", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --output-dir: cannot write to" in err


def write_folder(root: Path, rng) -> None:
    for split, count in (("train", 7), ("test", 3)):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / split / label / f"{i}.png")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_is_skipped_with_a_warning(tmp_path, capfd, workers):
    write_folder(tmp_path / "data", np.random.default_rng(2))
    (tmp_path / "data" / "train" / "cat" / "3.png").write_bytes(b"not a png")  # corrupt
    (tmp_path / "data" / "test" / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    folder = tmp_path / "run"
    code = main(["--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "7",
                 "--backbone", "resnet18", "--image-size", "16", "--bt-dims", "8", "--cl-dims", "8", "--knn-k", "3",
                 "--workers", str(workers), "--no-progress", "--output-dir", str(folder)])
    err = capfd.readouterr().err
    assert code == 0, err
    assert "train/cat/3.png" in err and "skipped" in err and "Traceback" not in err
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 <= summary["knn_k3_t0.1_top1_last"] <= 1


def test_an_empty_image_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    code = main(["--dataset", "folder", "--data-dir", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "argument --data-dir: folder: no images" in err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_of_another_model_is_refused_and_kept(tmp_path, capsys):
    folder = tmp_path / "run"
    assert main(["--epochs", "1", "--batch-size", "512", "--method", "barlowtwins", "--no-progress",
                 "--output-dir", str(folder)]) == 0
    before = (folder / "checkpoint.pt").read_bytes()
    code = main(["--epochs", "1", "--batch-size", "512", "--method", "barlowtwins", "--backbone", "resnet18",
                 "--no-progress", "--output-dir", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "backbone: 'digits_convnet' there, 'resnet18' now" in err
    assert (folder / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_checkpoint_is_a_clear_error_and_is_kept(tmp_path, capsys, damage):
    folder = tmp_path / "run"
    assert main(["--epochs", "1", "--batch-size", "512", "--method", "simclr", "--no-progress",
                 "--output-dir", str(folder)]) == 0
    path = folder / "checkpoint.pt"
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage]
    path.write_bytes(damaged)
    code = main(["--epochs", "1", "--batch-size", "512", "--method", "simclr", "--no-progress",
                 "--output-dir", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot read checkpoint" in err and "Traceback" not in err
    assert path.read_bytes() == damaged


def poison_steps(monkeypatch, bad_calls) -> None:
    """Put a NaN into the first view's batch on the given (1-based) calls of the training step."""
    from metamask_fast.meta import MetaMaskStep

    original, seen = MetaMaskStep.step, []

    def step(self, x0, x1):
        seen.append(1)
        if len(seen) in bad_calls:
            x0 = x0.clone()
            x0[0, 0, 0, 0] = float("nan")
        return original(self, x0, x1)

    monkeypatch.setattr(MetaMaskStep, "step", step)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    poison_steps(monkeypatch, {3, 4, 8})
    assert main([*ARGS, "--max-bad-steps", "3", "--output-dir", str(folder)]) == 0
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [2, 1]
    for record in records:
        assert all(np.isfinite(record[key]) for key in ("loss", "loss_bt", "loss_cl"))
    model = torch.load(folder / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.isfinite(value).all() for value in model.values() if value.is_floating_point())


def test_too_many_bad_steps_in_a_row_stop_with_the_last_good_state(tmp_path, monkeypatch, capsys):
    good = tmp_path / "good"
    with monkeypatch.context() as patch:  # the state after step 3, by a SIGTERM there
        interrupt_at(patch, 3)
        assert main([*ARGS, "--output-dir", str(good)]) == 128 + signal.SIGTERM
    capsys.readouterr()
    folder = tmp_path / "run"
    with monkeypatch.context() as patch:
        poison_steps(patch, set(range(4, 100)))
        assert main([*ARGS, "--max-bad-steps", "3", "--output-dir", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 consecutive steps (up to step 6) had a non-finite loss or gradient" in err
    assert "last good state (step 3" in err
    stopped = torch.load(folder / "checkpoint.pt", weights_only=True)
    reference = torch.load(good / "checkpoint.pt", weights_only=True)
    assert stopped["step"] == 6 and reference["step"] == 3
    # The weights, mask and momentum are those of step 3 (the learning rates moved on with the schedule: the
    # skipped steps 4-6 crossed the end of epoch 1).
    assert_bitwise_equal(stopped["model"], reference["model"])
    for key in ("net_optimizer", "mask_optimizer"):
        assert_bitwise_equal(stopped[key]["state"], reference[key]["state"])


# 2 epochs of 5 steps on a CIFAR-format folder of 40 images.
CIFAR_ARGS = ["--dataset", "cifar10", "--epochs", "2", "--batch-size", "8", "--backbone", "resnet18", "--image-size",
              "16", "--bt-dims", "32,32", "--cl-dims", "32,16", "--knn-k", "3", "--checkpoint-every", "1",
              "--knn-every", "1", "--meta-interval", "2", "--no-progress"]


def test_sigkill_then_rerun_is_bitwise_on_a_cifar_folder_with_views_made_on_the_device(tmp_path):
    from test_train_runs import write_cifar

    write_cifar(tmp_path / "data", "cifar10", 40, 10, np.random.default_rng(7))
    argv = [sys.executable, "-m", "metamask_fast.train", *CIFAR_ARGS, "--augment-on", "device", "--workers", "0",
            "--data-dir", str(tmp_path / "data")]
    whole = subprocess.run([*argv, "--output-dir", str(tmp_path / "whole")], capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr
    assert "data: cifar10 train, 40 images, 0.1 MB on cpu, both views made there a batch at a time" in whole.stdout
    folder = tmp_path / "killed"
    kill_at_random_moments_until_done([*argv, "--output-dir", str(folder)], folder)
    assert_bitwise_equal(final_state(folder), final_state(tmp_path / "whole"))
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]


def test_a_cifar_file_that_would_run_code_stops_the_command_before_it_runs(tmp_path):
    """A crafted ``data_batch_1`` (its unpickling would call ``os.system``) in the data folder: the real command
    exits 2 with one line naming the file, and the code never runs."""
    from test_datasets import RunsCode
    from test_train_runs import write_cifar

    write_cifar(tmp_path / "data", "cifar10", 40, 10, np.random.default_rng(7))
    marker = tmp_path / "ran"
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": RunsCode(f"touch {marker}"), b"labels": [0] * 8}))
    result = subprocess.run([sys.executable, "-m", "metamask_fast.train", *CIFAR_ARGS, "--data-dir", str(tmp_path / "data"),
                             "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("metamask_fast.train: error: argument --data-dir: cifar10: "), lines
    assert f"{batch} refers to posix.system, which a CIFAR file never holds; it was not loaded" in lines[0]
    assert not marker.exists() and not (tmp_path / "run").exists()
