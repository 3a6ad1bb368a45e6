"""What happens to a run on a cluster: a rank killed under ``torchrun --max-restarts``, pre-emption signals on any
rank (with SLURM's requeue), a loader process that dies or raises, and memory over a long run. The real command
in subprocesses (gloo, two ranks on the CPU), each finished run compared bitwise with an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from metamask_fast.reporting import MEASURED_KEYS
from metamask_fast.runfolder import is_partial_write

from interrupts import checkpoint_past, wait_for
from test_fault_tolerance import ARGS, CIFAR_ARGS, assert_bitwise_equal, final_state

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *flags,
            "-m", "metamask_fast.train", *ARGS]


def records(folder: Path) -> list[dict]:
    """``metrics.jsonl`` without what depends on the machine and the moment (times, memory)."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in MEASURED_KEYS} for line in lines]


def children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def ranks(torchrun_pid: int) -> dict[int, int]:
    """The pids of torchrun's worker processes by their RANK."""
    found = {}
    for pid in children(torchrun_pid):
        try:
            environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        except FileNotFoundError:
            continue
        found[int(environ["RANK"])] = pid
    return found


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """An uninterrupted two-rank run of ARGS."""
    folder = tmp_path_factory.mktemp("two") / "run"
    result = subprocess.run([*torchrun(), "--output-dir", str(folder)], capture_output=True, text=True,
                            env=ONE_THREAD, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


# ---------------------------------------------------------------------------------------------- elastic restart


def test_torchrun_restarts_killed_ranks_and_the_run_ends_bitwise(tmp_path, two_ranks):
    """Rank 1 SIGKILLed at a random moment, then rank 0 SIGKILLed while it writes a checkpoint: with exactly as many
    restarts as kills (``--max-restarts 2``) torchrun's restarted groups resume from the last checkpoint (no restart
    is wasted at start-up), the killed write leaves the previous checkpoint intact, and the run ends with the
    uninterrupted run's weights, mask, optimizer states and records, each epoch once."""
    folder = tmp_path / "run"
    process = subprocess.Popen([*torchrun("--max-restarts", "2"), "--output-dir", str(folder)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    try:
        # Kill 1: rank 1, at a random moment once the first checkpoint exists.
        assert wait_for(lambda: (folder / "checkpoint.pt").exists(), process)
        time.sleep(random.Random(21).uniform(0.0, 1.0))
        first = ranks(process.pid)
        assert len(first) == 2
        os.kill(first[1], signal.SIGKILL)
        # Kill 2: rank 0 of the restarted group, the moment its temporary checkpoint file appears.
        assert wait_for(lambda: len(second := children(process.pid)) == 2 and set(second).isdisjoint(first.values()),
                        process)
        partial = wait_for(lambda: next(folder.glob(".checkpoint.pt.tmp-*"), None), process, poll=0)
        assert partial is not None
        writer = int(partial.name.rsplit("-", 1)[1])
        os.kill(writer, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{writer}").exists() or "Z" in Path(f"/proc/{writer}/stat").read_text().split()[2],
                 process, poll=0.001)
        cut_short = partial.exists()
        previous = torch.load(folder / "checkpoint.pt", weights_only=True)  # complete, and the one before
        stdout, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert cut_short, "the kill landed after the write finished"
    assert not previous["finished"] and previous["step"] >= 1
    resumed = [line for line in stdout.splitlines() if "resuming from" in line]
    assert [line.rsplit("(", 1)[1] for line in resumed] == ["torchrun restart 1)", "torchrun restart 2)"], stdout
    assert "Connection refused" not in stderr
    assert not [p for p in folder.iterdir() if is_partial_write(p)]
    assert_bitwise_equal(final_state(folder), final_state(two_ranks))
    assert records(folder) == records(two_ranks) and [r["epoch"] for r in records(folder)] == [1, 2]


# ---------------------------------------------------------------------------------------------- pre-emption


def stand_in_scontrol(tmp_path: Path, run: Path) -> tuple[dict, Path]:
    """An environment with SLURM_JOB_ID set and a stand-in ``scontrol`` first on PATH, which records its arguments
    and a copy of the run's checkpoint as it is when it is called."""
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\ncp {run / "checkpoint.pt"} {tmp_path / "at_requeue.pt"}\n')
    script.chmod(0o755)
    return {**ONE_THREAD, "SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, log


def stop(process: subprocess.Popen, folder: Path, target: str, signum: int, after_step: int) -> tuple[int, list[str]]:
    """Once a checkpoint past ``after_step`` is on disk, ``signum`` to ``target`` (rank 0, rank 1 or torchrun); the
    step of the checkpoint the run then stops with, and the ranks' lines saying so."""
    try:
        assert wait_for(checkpoint_past(folder, after_step), process)
        workers = wait_for(lambda: (found := ranks(process.pid)) and len(found) == 2 and found, process)
        os.kill({"rank 0": workers[0], "rank 1": workers[1], "torchrun": process.pid}[target], signum)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, stderr[-3000:]  # torchrun's, its workers having stopped with 128 + signum
    if target != "torchrun":  # (torchrun itself, stopped by the signal, reports that instead)
        assert f"exitcode  : {128 + signum}" in stderr, stderr[-3000:]
    step = torch.load(folder / "checkpoint.pt", weights_only=True)["step"]
    lines = [line for line in stderr.splitlines() if line.startswith("metamask_fast.train: stopped by")]
    assert len(lines) == 2 and step > after_step, stderr[-3000:]
    for line in lines:
        assert line.startswith(f"metamask_fast.train: stopped by {signal.Signals(signum).name} after step {step}; "
                               f"checkpoint written to {folder / 'checkpoint.pt'}; ")
    return step, lines


def test_preemption_signals_stop_every_rank_at_one_step_and_slurm_requeues_after_the_checkpoint(tmp_path, two_ranks):
    """Under SLURM (job id set, a stand-in ``scontrol``): SIGUSR1 (``--signal=USR1@90``) on rank 1, then SIGTERM
    on rank 0, then SIGUSR1 on torchrun passing it on (``--signals-to-handle``). Each time both ranks stop after
    the same step with one checkpoint; SIGUSR1 alone asks ``scontrol requeue $SLURM_JOB_ID``, once, with that
    checkpoint already on disk. The same command then finishes bitwise as the uninterrupted run."""
    folder = tmp_path / "run"
    env, log = stand_in_scontrol(tmp_path, folder)
    forward = ["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]
    argv = [*torchrun(*forward), "--output-dir", str(folder)]

    def start():
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)

    step, lines = stop(start(), folder, "rank 1", signal.SIGUSR1, after_step=0)
    assert log.read_text() == "requeue 4242\n"
    assert torch.load(tmp_path / "at_requeue.pt", weights_only=True)["step"] == step
    assert sum(line.endswith("; asked SLURM to requeue job 4242 (scontrol requeue 4242); the requeued job resumes "
                             "from it") for line in lines) == 1
    step, lines = stop(start(), folder, "rank 0", signal.SIGTERM, after_step=step)
    assert log.read_text() == "requeue 4242\n"  # SIGTERM (scancel's signal too) does not requeue
    assert all(line.endswith("; run the same command to resume") for line in lines)
    step, lines = stop(start(), folder, "torchrun", signal.SIGUSR1, after_step=step)
    assert log.read_text() == "requeue 4242\n" * 2
    assert torch.load(tmp_path / "at_requeue.pt", weights_only=True)["step"] == step
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_bitwise_equal(final_state(folder), final_state(two_ranks))
    assert records(folder) == records(two_ranks) and [r["epoch"] for r in records(folder)] == [1, 2]


def test_requeue_without_a_slurm_job_is_refused_at_start(tmp_path):
    env = {key: value for key, value in ONE_THREAD.items() if key != "SLURM_JOB_ID"}
    result = subprocess.run([sys.executable, "-m", "metamask_fast.train", "--requeue", "--output-dir", str(tmp_path / "r")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("metamask_fast.train: error: argument --requeue: SLURM_JOB_ID is not set")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------- loader processes


def assert_one_line_loader_error(stderr: str, cause: str, folder: Path) -> None:
    errors = [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1, stderr
    assert errors[0].startswith("metamask_fast.train: error: a data loader process failed (") and cause in errors[0]
    assert errors[0].endswith(f"the last checkpoint in {folder} is intact; run the same command to resume")


def test_a_loader_process_that_dies_or_raises_ends_the_run_with_one_line_and_the_rerun_is_bitwise(tmp_path):
    """Views made by two PIL loader processes on a CIFAR-format folder (the PIL path, seeded per sample). First
    SIGTERM in epoch 1, which stops the run cleanly. Then one loader process SIGKILLed once a newer checkpoint is
    on disk; then, from there, a MemoryError in a loader process in epoch 2 (an error in decoding that
    is not an unreadable image, which would be skipped; injected into the real command's ``__main__``). Each ends
    the run with exit code 1 and one line naming the cause, the checkpoint before it intact; the same command then
    finishes bitwise as an uninterrupted run. (Barlow Twins alone: the loader is the same, the steps cheaper.)"""
    from test_train_runs import write_cifar

    write_cifar(tmp_path / "data", "cifar10", 40, 10, np.random.default_rng(7))
    arguments = [*CIFAR_ARGS, "--method", "barlowtwins", "--augment-on", "workers", "--workers", "2",
                 "--data-dir", str(tmp_path / "data")]
    whole, folder = tmp_path / "whole", tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "metamask_fast.train", *arguments, "--output-dir", str(whole)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "data: 40 training images, both views made by PIL in 2 loader processes" in result.stdout
    argv = [sys.executable, "-m", "metamask_fast.train", *arguments, "--output-dir", str(folder)]

    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(checkpoint_past(folder, 0), process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    stopped = torch.load(folder / "checkpoint.pt", weights_only=True)["step"]
    assert 1 <= stopped < 9 and f"stopped by SIGTERM after step {stopped};" in stderr

    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(checkpoint_past(folder, stopped), process)
        workers = wait_for(lambda: children(process.pid), process)
        os.kill(workers[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, stderr
    assert_one_line_loader_error(stderr, f"DataLoader worker (pid {workers[0]}) is killed by signal: Killed", folder)
    assert stopped < torch.load(folder / "checkpoint.pt", weights_only=True)["step"] < 10

    script = (
        "import sys\n"
        "from metamask_fast.data import pipeline\n"
        "original = pipeline.SeededTwoViews.__getitem__\n"
        "def getitem(self, key):\n"
        "    if key[0] == 1:\n"
        "        raise MemoryError('decoding needed more memory than there is')\n"
        "    return original(self, key)\n"
        "pipeline.SeededTwoViews.__getitem__ = getitem\n"
        "from metamask_fast.train import main\n"
        f"sys.exit(main({argv[3:]!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr
    assert_one_line_loader_error(result.stderr, "MemoryError: decoding needed more memory than there is", folder)
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]) == (1, 0, 5)  # epoch 1's end

    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "resuming from" in result.stdout, result.stderr
    assert_bitwise_equal(final_state(folder), final_state(whole))
    assert records(folder) == records(whole) and [r["epoch"] for r in records(folder)] == [1, 2]


# ---------------------------------------------------------------------------------------------- soak


@pytest.mark.slow
def test_a_long_digits_run_does_not_grow(tmp_path):
    """A long digits run: resident memory after epoch 40 within 5 % of after epoch 5, and the same open files and
    threads in every epoch from the fifth on (each epoch's record holds them).

    The run is ``METAMASK_FAST_SOAK_RUN``'s folder when that is set: ``.ci/run`` points it at its quick start, the
    default 50-epoch run of README, so that CI trains no second long run. Otherwise this trains the default recipe
    for 40 epochs (about two minutes on 2 cores)."""
    folder = Path(os.environ.get("METAMASK_FAST_SOAK_RUN") or tmp_path / "run")
    if "METAMASK_FAST_SOAK_RUN" not in os.environ:
        result = subprocess.run([sys.executable, "-m", "metamask_fast.train", "--epochs", "40", "--no-progress",
                                 "--output-dir", str(folder)], capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines][:40] == list(range(1, 41)), "not a run of 40 epochs or more, in one process"
    fifth, fortieth = lines[4], lines[39]
    print(f"{folder}: after epoch 5: {fifth['rss_mb']} MB, {fifth['open_files']} files, {fifth['threads']} threads; "
          f"after epoch 40: {fortieth['rss_mb']} MB, {fortieth['open_files']} files, {fortieth['threads']} threads")
    assert abs(fortieth["rss_mb"] - fifth["rss_mb"]) <= 0.05 * fifth["rss_mb"]
    assert {(r["open_files"], r["threads"]) for r in lines[4:]} == {(fifth["open_files"], fifth["threads"])}
