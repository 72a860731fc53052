"""run.py and evaluate.py end to end on tiny data, determinism, and bad input."""
import contextlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import config
import evaluate
import run
from conftest import ROOT, TINY_FLAGS, expect_user_error


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run.py training (a few steps) shared by the tests below, in this process (run.main, as
    `python run.py` runs it; the real processes are tested below), sampling with 2 DDIM steps."""
    from conftest import write_tiny_mnist
    work = tmp_path_factory.mktemp("run")
    data = write_tiny_mnist(str(work / "data"))
    cwd, out = os.getcwd(), io.StringIO()
    try:
        os.chdir(work)
        with contextlib.redirect_stdout(out):
            run.main(["--data_dir", data, *TINY_FLAGS, "--batch_size", "16", "--max_steps", "6", "--save_every", "4",
                      "--n_samples", "3", "--no_progress", "--seed", "1", "--sampler", "ddim", "--sampling_steps", "2",
                      "--out_dir", "out/new"])  # a folder that does not exist yet: run.py creates it
    finally:
        os.chdir(cwd)
    return work, subprocess.CompletedProcess([], 0, out.getvalue(), "")


def test_run_writes_checkpoint_samples_and_plot(trained):
    work, p = trained
    assert "configuration:" in p.stdout.splitlines()[0]  # the resolved configuration comes first
    for name in ("ddpm_trained.pt", "out/new/generated_samples.jpg", "out/new/train_loss.png"):
        assert os.path.getsize(work / name) > 0, name
    ckpt = checkpoint.load(work / "ddpm_trained.pt")
    assert ckpt["step"] == 6 and len(ckpt["loss_history"]) == 6
    assert ckpt["model_args"]["ch"] == 8 and ckpt["model_args"]["ch_mult"] == (1, 2)
    assert ckpt["train_config"]["batch_size"] == 16 and ckpt["meta"]["preset"] == "paper"
    assert {"model", "ema", "optimizer", "rng", "diffusion_args"} <= set(ckpt)
    assert not [f for f in os.listdir(work) if f.endswith(".tmp")]  # atomic writes leave nothing behind


def test_evaluate_writes_jpg_and_npz(trained, capsys, monkeypatch):
    work, _ = trained
    monkeypatch.chdir(work)
    evaluate.main(["--n_samples", "4", "--save_samples", "s.npz", "--out", "e.jpg", "--no_progress", "--seed", "3",
                   "--sampler", "ddim", "--sampling_steps", "5"])
    assert "EMA" in capsys.readouterr().out
    s = np.load(work / "s.npz")["samples"]
    assert s.shape == (4, 28, 28) and s.dtype == np.uint8
    from PIL import Image
    assert Image.open(work / "e.jpg").size[0] > 28 * 4


def test_same_seed_same_samples(trained, capsys):
    work, _ = trained
    out = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        evaluate.main(["--checkpoint", str(work / "ddpm_trained.pt"), "--n_samples", "2", "--seed", str(seed),
                       "--device", "cpu", "--out", str(work / f"{name}.jpg"), "--sampler", "ddim", "--eta", "1",
                       "--sampling_steps", "5",
                       "--save_samples", str(work / f"{name}.npz"), "--no_progress"])
        out.append(np.load(work / f"{name}.npz")["samples"])
    assert np.array_equal(out[0], out[1])
    assert not np.array_equal(out[0], out[2])


def test_bare_state_dict_loads_with_default_arguments(tmp_path):
    from checkpoint import build_model
    from checkpoint import load as load_checkpoint
    from model import UNet
    torch.save(UNet().state_dict(), tmp_path / "bare.pt")
    model, diffusion = build_model(load_checkpoint(str(tmp_path / "bare.pt")))
    assert model.model_args["ch"] == 64 and diffusion.T == 1000


@pytest.mark.parametrize("argv, match", [
    (["--n_epochs", "0"], "--n_epochs must be >= 1"),
    (["--n_samples", "0"], "--n_samples must be >= 1"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--device", "tpu9"], "device"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--ch_mult", "1,x"], "--ch_mult"),
    (["--attn_res", "13"], "attn_res 13 is not a resolution"),
    (["--checkpoint", "ddpm_trained.pt/x.pt"], "ddpm_trained.pt is a file, not a folder"),
    (["--resume", "--checkpoint", "missing.pt"], "no checkpoint at missing.pt"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs CUDA"),
    (["--amp", "int8"], "invalid choice: 'int8'"),
    (["--sampling_steps", "10"], "for the few-step samplers (--sampler ddim"),
    (["--sampler", "ddim", "--sampling_steps", "0"], "sampling steps must be in [1, 1000]"),
    (["--sampler", "ddim", "--eta", "-1"], "--eta must be >= 0"),
    (["--sampler", "ddim", "--spacing", "quadratic", "--sampling_steps", "1001"], "must be in [1, 1000]"),
    (["--sampler", "dpm++2m", "--eta", "1"], "--eta is for --sampler ddim; dpm++2m has none"),
    (["--spacing", "karras"], "restart, ddpm-respaced or edm)"),
    (["--ch", "5"], "ch must be even and >= 4"),
])
def test_run_bad_input(argv, match, capsys, tmp_path, monkeypatch):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ddpm_trained.pt").write_bytes(b"good checkpoint")
    expect_user_error(capsys, run.main, argv, match)
    assert (tmp_path / "ddpm_trained.pt").read_bytes() == b"good checkpoint"  # nothing overwritten


@pytest.mark.parametrize("argv, match", [
    (["--n_samples", "0"], "--n_samples must be >= 1"),
    (["--checkpoint", "nope.pt"], "does not exist"),
    (["--checkpoint", "notackpt.pt"], "not a readable PyTorch checkpoint"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--metrics", "--bpd_timesteps", "0"], "--bpd_timesteps"),
    (["--bpd_images", "5"], "--bpd_images is for --metrics"),
    (["--metrics", "--n_samples", "3"], "--metrics needs 10 <= --n_samples"),
    (["--out", "samples.gif"], "use a .png, .jpg or .jpeg file name"),  # refused before the checkpoint is read
    (["--from_samples", "s.npz"], "--from_samples is for --metrics"),
    (["--metrics", "--from_samples", "s.npz", "--save_samples", "t.npz"], "drop --save_samples"),
    (["--metrics", "--from_samples", "missing.npz"], "--from_samples missing.npz does not exist"),
    (["--metrics", "--from_samples", "notackpt.pt"], "is not a readable .npz file"),
    (["--metrics", "--from_samples", "floats.npz"], "must hold 'samples', uint8 (N, 28, 28)"),
    (["--metrics", "--from_samples", "few.npz"], "holds 3 samples; the metrics need 10 to 10000"),
])
def test_evaluate_bad_input(argv, match, capsys, tmp_path, monkeypatch):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notackpt.pt").write_bytes(b"this is not a checkpoint")
    (tmp_path / "generated_samples.jpg").write_bytes(b"old")
    np.savez(tmp_path / "floats.npz", samples=np.zeros((20, 28, 28), np.float32))
    np.savez(tmp_path / "few.npz", samples=np.zeros((3, 28, 28), np.uint8))
    expect_user_error(capsys, evaluate.main, argv, match)
    assert (tmp_path / "generated_samples.jpg").read_bytes() == b"old"


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # both at once: start-up dominates
             for script, argv in (("evaluate.py", ["--checkpoint", "missing.pt"]), ("run.py", ["--n_epochs", "0"]))]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_dry_run_prints_preset_with_overrides(capsys):
    run.main(["--preset", "cpu", "--lr", "5e-4", "--dry_run", "--device", "cpu"])
    out = capsys.readouterr().out
    assert '"lr": 0.0005' in out and f'"ch": {config.PRESETS["cpu"]["ch"]}' in out


def test_metrics_from_a_samples_file_equal_the_metrics_when_sampling(trained, capsys):
    """--metrics --from_samples scores a --save_samples file (say, drawn on a GPU) exactly as the
    samples would have been scored when drawn, and carries the sampler settings along."""
    import json
    work, _ = trained
    common = ["--metrics", "--data_dir", str(work / "data"), "--no_progress", "--device", "cpu"]
    evaluate.main(["--checkpoint", str(work / "ddpm_trained.pt"), "--n_samples", "12", "--sampler", "ddim",
                   "--sampling_steps", "3", "--eta", "1", "--out", str(work / "m.png"), "--save_samples",
                   str(work / "m.npz"), "--bpd_images", "0", "--metrics_out", str(work / "drawn.json"), *common])
    evaluate.main(["--from_samples", str(work / "m.npz"), "--metrics_out", str(work / "scored.json"), *common])
    drawn, scored = (json.load(open(work / f"{name}.json")) for name in ("drawn", "scored"))
    for k in ("n_samples", "fid", "fid_floor", "precision", "recall", "confidence", "kl_to_uniform"):
        assert scored[k] == drawn[k], k
    assert scored["n_samples"] == 12 and "bits_per_dim" not in scored
    assert scored["sampler"] == drawn["sampler"] == {"sampler": "ddim", "sampling_steps": 3, "eta": 1.0,
                                                      "spacing": "uniform"}
    assert scored["from_samples"] == str(work / "m.npz") and scored["torch"] == torch.__version__
    assert "scoring 12 samples from" in capsys.readouterr().out
