"""torchrun: 2 CPU processes (gloo), killed without warning and resumed, train like one process at the
same global batch; the checkpoint is the usual one."""
import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import checkpoint
import evaluate
import run
from conftest import ROOT, TINY_FLAGS, slow, write_tiny_mnist

# 20 steps of a global batch of 16 (8 per process) on 128 images, 8 steps an epoch, saved every 5: the run is killed
# after its first save, in the middle of an epoch and of the warm-up, and the resumed run crosses epochs and saves.
STEPS, BATCH = 20, 16
FLAGS = [*TINY_FLAGS, "--batch_size", str(BATCH), "--lr", "1e-3", "--warmup", "10", "--n_samples", "1", "--sampler",
         "ddim", "--sampling_steps", "2", "--no_progress", "--device", "cpu", "--save_every", "5"]


def flags(work, ckpt, *extra):
    return ["--data_dir", str(work / "data"), *FLAGS, "--max_steps", str(STEPS), "--checkpoint", str(ckpt),
            "--out_dir", str(work), *extra]


def launch(work, ckpt, nproc, *extra, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "run.py",
           *flags(work, ckpt, *extra)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if not wait:
        return p
    out, err = p.communicate(timeout=240)
    return p.returncode, out, err


def kill_at_first_save(work, ckpt):
    """Launch a 2-process run and SIGKILL torchrun and both workers (process groups of their own) as soon as its
    first checkpoint exists. Returns the step it was saved at."""
    p = launch(work, ckpt, 2, wait=False)
    deadline = time.time() + 120
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    pids = subprocess.run(["pgrep", "-f", str(ckpt)], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.communicate()
    return checkpoint.load(ckpt)["step"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process run under torchrun, killed without warning after its first save and resumed, and while it
    runs the 1-process run in this process (run.main, on one thread as each worker): {nproc: (checkpoint,
    stdout)}, with the killed run's step at 'killed_at' (the resumed run's stdout is the 2-process one)."""
    work = tmp_path_factory.mktemp("ddp")
    write_tiny_mnist(str(work / "data"))
    two = {}

    def killed_and_resumed():
        try:
            two["killed_at"] = kill_at_first_save(work, work / "p2.pt")
            two["rc"], two["out"], two["err"] = launch(work, work / "p2.pt", 2, "--resume")
        except BaseException as e:  # raised again below, in the test's thread
            two["error"] = e
    thread = threading.Thread(target=killed_and_resumed)
    thread.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as one:
            run.main(flags(work, work / "p1.pt"))
    finally:
        torch.set_num_threads(threads)
        thread.join()
    if "error" in two:
        raise two["error"]
    assert two["rc"] == 0, two["err"][-3000:]
    return work, {1: (checkpoint.load(work / "p1.pt"), one.getvalue()),
                  2: (checkpoint.load(work / "p2.pt"), two["out"]), "killed_at": two["killed_at"]}


def test_two_processes_match_one_at_the_same_global_batch(runs):
    """The killed and resumed 2-process run against the uninterrupted 1-process one: a resume that lost or
    repeated any state (weights, Adam, EMA, random numbers, data order) would not match."""
    _, res = runs
    one, two = res[1][0], res[2][0]
    assert len(one["loss_history"]) == len(two["loss_history"]) == STEPS
    torch.testing.assert_close(two["loss_history"], one["loss_history"], rtol=1e-4, atol=0)
    for k in one["ema"]:
        torch.testing.assert_close(two["ema"][k], one["ema"][k], rtol=1e-3, atol=1e-4)
    assert set(one) == set(two) and two["train_config"]["batch_size"] == BATCH  # same format, global batch


def test_killed_two_process_run_resumes(runs):
    _, res = runs
    killed, done = res["killed_at"], res[2][0]
    assert 0 < killed < STEPS, f"the run was killed at step {killed}; nothing left to resume"
    assert done["step"] == STEPS and [(s["from_step"], s["to_step"]) for s in done["sessions"]] == \
        [(0, killed), (killed, STEPS)]
    assert all(s["processes"] == 2 for s in done["sessions"])


def test_only_rank_zero_prints_and_the_checkpoint_evaluates(runs, tmp_path):
    work, res = runs
    out = res[2][1]
    assert out.count("configuration:") == 1 and '"processes": 2' in out and out.count("trained to step") == 1
    evaluate.main(["--checkpoint", str(work / "p2.pt"), "--n_samples", "2", "--sampler", "ddim", "--sampling_steps",
                   "2", "--out", str(tmp_path / "g.png"), "--no_progress", "--device", "cpu"])
    assert (tmp_path / "g.png").exists()


def test_batch_that_does_not_divide_is_a_clear_error(runs, tmp_path):
    work, _ = runs
    rc, out, err = launch(work, tmp_path / "x.pt", 2, "--batch_size", "15")
    msg = "error: --batch_size 15 is the global batch and must divide evenly over the 2 processes"
    assert rc != 0 and msg in err.splitlines()
    # each process says it once, rank 0 without a prefix; rank 1 may be stopped by torchrun before it prints
    said = [line for line in err.splitlines() if "--batch_size 15" in line]
    assert said.count(msg) == 1 and set(said) <= {msg, "[rank 1] " + msg}, said
    # torchrun itself reports the failed workers (with its own traceback); the workers print one line
    assert os.path.join(ROOT, "run.py") not in err and not (tmp_path / "x.pt").exists()


@slow  # 26 s on 2 cores; test_killed_two_process_run_resumes covers resuming a 2-process run
def test_sigterm_to_one_process_stops_all_at_the_same_step_and_resumes(runs):
    work, res = runs
    ckpt, total = work / "term.pt", 60  # 7.5 epochs of 8 steps; the lr is constant after warm-up
    p = launch(work, ckpt, 2, "--max_steps", str(total), wait=False)
    deadline = time.time() + 120
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    pgrep = subprocess.run(["pgrep", "-f", str(ckpt)], capture_output=True, text=True)
    pids = [int(pid) for pid in pgrep.stdout.split()]
    rank1 = [pid for pid in pids if b"\0RANK=1\0" in b"\0" + open(f"/proc/{pid}/environ", "rb").read()]
    assert len(rank1) == 1, pids
    os.kill(rank1[0], signal.SIGTERM)  # one process only, as a scheduler or `kill` might do
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "interrupted by signal 15 at step" in out, (out[-1500:], err[-1500:])
    stopped = checkpoint.load(ckpt)
    assert 0 < stopped["step"] < total and stopped["step"] % 25 == 0  # agreed at a logging boundary
    rc, out, err = launch(work, ckpt, 2, "--resume", "--max_steps", str(total))
    assert rc == 0, err[-3000:]
    done = checkpoint.load(ckpt)
    assert done["step"] == total
    torch.testing.assert_close(done["loss_history"][:STEPS], res[2][0]["loss_history"], rtol=1e-6, atol=0)
