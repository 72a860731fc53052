"""Kill-safe training: SIGKILL + --resume is bitwise identical, saves are atomic, signals save,
NaN stops cleanly, hostile or broken checkpoints are refused."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import config
import run
from checkpoint import load as load_checkpoint
from checkpoint import load_weights
from config import TrainConfig
from conftest import ROOT, TINY, TINY_FLAGS, expect_user_error, same_weights, write_tiny_mnist
from diffusion import GaussianDiffusion
from model import UNet
from train import TrainingDiverged, train_func
from utils import UserError, cpu_model

# 15 steps of batch 16 on 128 images (8 per epoch), saved every 5: a crash after step 7 or 10 resumes from step 5,
# in the middle of an epoch, and crosses an epoch's end and a save (step 8, step 10) after the resume.
STEPS, SAVE_EVERY = 15, 5
TRAIN = [os.path.join(ROOT, "run.py"), "--device", "cpu", *TINY_FLAGS, "--dropout", "0.1", "--batch_size", "16",
         "--max_steps", str(STEPS), "--save_every", str(SAVE_EVERY), "--n_samples", "1", "--sampler", "ddim",
         "--sampling_steps", "2", "--no_progress"]
KILL_AT = (7, 10)  # inside a save interval, and just before a save
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")  # processes side by side: one thread each, as in this process


def wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.02)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This module's runs, in this process and in the processes it starts, on one thread each: the killed runs
    train side by side with the reference, and a resumed run is compared bitwise with one of the same threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("resume")
    write_tiny_mnist(str(w / "data"))
    return w


@pytest.fixture(scope="module")
def killed(work):
    """The runs SIGKILLed after optimizer step k (KILL_AT), started side by side: {k: its process}, each
    with its checkpoint k{k}.pt as the kill left it; while they run, the reference trains (fixture below)."""
    procs = {}
    for k in KILL_AT:
        argv = TRAIN[1:] + ["--data_dir", "data", "--checkpoint", f"k{k}.pt"]
        procs[k] = subprocess.Popen([sys.executable, "-c", KILL_AT_STEP.format(root=ROOT, kill_at=k, argv=argv)],
                                    cwd=work, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ONE_THREAD)
    return procs


@pytest.fixture(scope="module")
def reference(work, killed):
    """The uninterrupted run, trained in this process (run.main, as `python run.py` runs it), while the killed
    runs train; their processes have ended when it returns."""
    run.main([*TRAIN[1:], "--data_dir", str(work / "data"), "--checkpoint", str(work / "ref.pt"),
              "--out_dir", str(work)])
    for p in killed.values():
        p.stdout_stderr = p.communicate(timeout=240)
    return checkpoint.load(work / "ref.pt")


# run.py in a process that SIGKILLs itself right after optimizer step KILL_AT, before that step's
# checkpoint could be written: a crash at a step the test chooses, not after a clock delay.
KILL_AT_STEP = """
import os, signal, sys
sys.path.insert(0, {root!r})
import run, train
make_step = train.make_step
def killing_make_step(*args):
    step, calls = make_step(*args), []
    def killing_step(*batch):
        out = step(*batch)
        calls.append(1)
        if len(calls) == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return killing_step
train.make_step = killing_make_step
run.main({argv!r})
"""


@pytest.mark.parametrize("kill_at", KILL_AT)
def test_sigkill_then_resume_is_bitwise_identical(work, killed, reference, kill_at, monkeypatch):
    print(f"SIGKILL after optimizer step {kill_at}")
    p = killed[kill_at]
    assert p.returncode == -signal.SIGKILL, p.stdout_stderr[1][-2000:]
    killed_ckpt = checkpoint.load(work / f"k{kill_at}.pt")
    start = SAVE_EVERY * ((kill_at - 1) // SAVE_EVERY)  # the last save before the crash
    assert killed_ckpt["step"] == start
    monkeypatch.chdir(work)  # resumed in this process: a new process would add only its start-up
    run.main(["--resume", "--checkpoint", f"k{kill_at}.pt", "--data_dir", "data", "--device", "cpu", "--n_samples",
              "1", "--sampler", "ddim", "--sampling_steps", "2", "--no_progress"])
    resumed = checkpoint.load(work / f"k{kill_at}.pt")
    assert resumed["step"] == STEPS and torch.equal(resumed["loss_history"], reference["loss_history"])
    same_weights(resumed, reference)
    # the ledger: the killed session up to its last save, then the resumed one, each with its machine
    assert [(s["from_step"], s["to_step"]) for s in resumed["sessions"]] == [(0, start), (start, STEPS)]
    assert killed_ckpt["sessions"] == resumed["sessions"][:1] and all(s["seconds"] > 0 for s in resumed["sessions"])
    assert resumed["sessions"][1]["cpu"] == cpu_model() and resumed["sessions"][1]["device"] == "cpu"
    assert f"in 2 sessions: steps 0-{start} on " in checkpoint.training_time(resumed)


def test_sigint_saves_and_exits_cleanly(work):
    # one run per signal, side by side (each on one thread): most of a run's seconds are its start-up
    runs = {}
    for sig, code, name in ((signal.SIGINT, 130, "int"), (signal.SIGTERM, 143, "term")):
        os.makedirs(work / name, exist_ok=True)
        runs[name] = sig, code, subprocess.Popen(
            [sys.executable, *TRAIN, "--data_dir", "data", "--checkpoint", f"{name}.pt", "--out_dir", name,
             "--max_steps", "100000", "--save_every", "2"], cwd=work, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=ONE_THREAD)
    for name, (sig, _, proc) in runs.items():
        wait_for(work / f"{name}.pt", proc)
        proc.send_signal(sig)
    for name, (_, code, proc) in runs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        assert "Traceback" not in err and "--resume" in out
        at = int(out.split(" at step ")[1].split(";")[0])
        assert checkpoint.load(work / f"{name}.pt")["step"] == at  # saved at the interruption
        os.remove(work / f"{name}.pt")


def test_kill_during_save_keeps_previous_checkpoint(work, reference):
    """A process SIGKILLed halfway through writing a checkpoint leaves the old file intact."""
    script = ("import os, signal, sys; sys.path.insert(0, %r); from utils import atomic_write\n"
              "def half(f):\n    f.write(b'partial' * 1000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
              "atomic_write('ref.pt', half)\n" % ROOT)
    before = (work / "ref.pt").read_bytes()
    p = subprocess.run([sys.executable, "-c", script], cwd=work)
    assert p.returncode == -signal.SIGKILL
    assert (work / "ref.pt").read_bytes() == before
    assert load_checkpoint(str(work / "ref.pt"))["step"] == STEPS


@pytest.mark.parametrize("flags, match", [
    (["--ch", "16"], "--ch 16 but the checkpoint has 8"),
    (["--batch_size", "32"], "--batch_size 32 but the checkpoint has 16"),
    (["--seed", "3"], "--seed 3 but the checkpoint has 0"),
    (["--var_type", "fixed_small"], "--var_type fixed_small but the checkpoint has fixed_large"),
])
def test_resume_with_other_model_or_data_order_is_refused(work, reference, capsys, monkeypatch, flags, match):
    monkeypatch.chdir(work)
    expect_user_error(capsys, run.main, ["--resume", "--checkpoint", "ref.pt", *flags], match)


def test_resume_honours_explicit_default_values(work, reference):
    args = run.get_parser().parse_args(["--resume", "--max_steps", "0", "--save_every", "1000"])
    cfg = config.resolve_resume(reference, "ref.pt", **{k: getattr(args, k, None) for k in config.DEFAULTS})[2]
    assert cfg.max_steps == 0 and cfg.save_every == 1000 and cfg.batch_size == 16  # not the saved 15 / 5


def test_new_run_over_an_unfinished_one_is_refused(work, reference, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    ckpt = dict(reference, step=10)  # an interrupted run: 10 of 15 steps
    checkpoint.save(str(tmp_path / "ddpm_trained.pt"), ckpt)
    expect_user_error(capsys, run.main, ["--data_dir", str(work / "data"), "--device", "cpu"],
                      "holds an unfinished run (step 10 of 15)")
    assert checkpoint.load(tmp_path / "ddpm_trained.pt")["step"] == 10


def test_checkpoint_with_pickled_code_is_refused_and_not_run(tmp_path, capsys):
    import evaluate
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Evil(), "model_args": {}}, tmp_path / "evil.pt")
    expect_user_error(capsys, evaluate.main, ["--checkpoint", str(tmp_path / "evil.pt"),
                                              "--out", str(tmp_path / "x.jpg")], "refusing to load")
    assert not marker.exists()


def test_truncated_checkpoint_is_a_one_line_error(work, tmp_path, capsys):
    data = (work / "ref.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(str(tmp_path / "cut.pt"))


def test_architecture_mismatch_names_keys_and_shapes():
    small, other = UNet(**TINY), UNet(**{**TINY, "ch": 16, "attn_resolutions": ()})
    with pytest.raises(UserError) as e:
        load_weights(small, other.state_dict(), "x.pt")
    msg = str(e.value)
    assert "shape mismatches" in msg and "conv_in.weight: checkpoint (16, 1, 3, 3) vs model (8, 1, 3, 3)" in msg
    assert "missing keys" in msg and "qkv" in msg.split("missing keys")[1]  # the attention layers


def test_checkpoint_of_another_preset_loads_with_its_own_arguments(work, reference):
    from checkpoint import build_model
    model, _ = build_model(load_checkpoint(str(work / "ref.pt")))
    assert model.model_args["ch"] == 8 and model.model_args != UNet().model_args


class NaNAfter(torch.nn.Module):
    """Wraps a model; from the n-th forward on it returns NaN (an injected fault)."""

    def __init__(self, model, n):
        super().__init__()
        self.model, self.n, self.calls = model, n, 0
        self.model_args = model.model_args

    def forward(self, x, t):
        self.calls += 1
        out = self.model(x, t)
        return out * float("nan") if self.calls >= self.n else out


class NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class NaNGradAt(NaNAfter):
    """Finite loss, NaN gradients at the n-th forward only: the weights break without the loss showing it."""

    def forward(self, x, t):
        self.calls += 1
        out = self.model(x, t)
        return NaNGrad.apply(out) if self.calls == self.n else out


def train_until_diverged(model, cfg, tmp_path, match):
    """Train a faulty model on random digits; it must raise TrainingDiverged(match). Returns the checkpoint left."""
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    path = str(tmp_path / "nan.pt")
    with pytest.raises(TrainingDiverged, match=match):
        train_func(model, GaussianDiffusion(), images, cfg, path, progress=False)
    return load_checkpoint(path)


def test_nan_gradient_is_caught_before_it_is_saved(tmp_path):
    torch.manual_seed(0)
    model = NaNGradAt(UNet(**TINY), n=26)  # step 26 is a save point
    cfg = TrainConfig(n_epochs=100, batch_size=8, save_every=13, log_every=100, warmup=0)
    ckpt = train_until_diverged(model, cfg, tmp_path, "gradient norm became nan at step 26")
    assert ckpt["step"] == 13
    assert all(torch.isfinite(v).all() for k in ("model", "ema") for v in ckpt[k].values())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = NaNAfter(UNet(**TINY), n=17)
    cfg = TrainConfig(n_epochs=100, batch_size=8, save_every=5, log_every=3, warmup=0)
    ckpt = train_until_diverged(model, cfg, tmp_path, "at step 17")
    assert ckpt["step"] == 15 and torch.isfinite(ckpt["loss_history"]).all()


def test_unwritable_output_folder_fails_before_training(tmp_path, capsys, monkeypatch):
    """A missing --out_dir is created (tests/test_scripts.py's run writes into one); a path that cannot
    become a folder, because a file is in the way, is refused before any data is loaded or folder made."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    t0 = time.time()
    expect_user_error(capsys, run.main, ["--out_dir", "afile/out", "--checkpoint", "new/c.pt", "--data_dir", "nodata"],
                      "afile is a file, not a folder")
    assert time.time() - t0 < 5 and not (tmp_path / "nodata").exists()  # refused before loading any data
    assert not (tmp_path / "new").exists()  # nor any folder made


def test_speed_and_estimated_time_are_printed_once(tmp_path, capsys):
    """After the second logging point: seconds per step, the time left, and the hint (run.py: the
    cpu preset, for the paper preset on a CPU)."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    cfg = TrainConfig(n_epochs=100, max_steps=12, batch_size=8, log_every=3, warmup=0, save_every=100)
    train_func(UNet(**TINY), GaussianDiffusion(), images, cfg, str(tmp_path / "s.pt"), progress=False,
               speed_hint="try --preset cpu")
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("speed:")]
    assert len(lines) == 1 and "the remaining 6 steps take about" in lines[0], lines
    assert lines[0].endswith(". try --preset cpu")
    average = [line for line in out if line.startswith("average speed:")]
    assert len(average) == 1 and " steps/s over steps 3-12 on cpu " in average[0], average
