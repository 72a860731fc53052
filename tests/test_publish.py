"""export.py (the published checkpoint and its checksum) and make_pics.py (the README pictures)."""
import hashlib
import os

import pytest
import torch

import checkpoint
import evaluate
import export
import make_pics
import run
from conftest import TINY_FLAGS, short_chain, write_tiny_mnist
from utils import UserError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("publish")
    data = write_tiny_mnist(str(work / "data"))
    ckpt = str(work / "train.pt")
    run.main(["--data_dir", data, *TINY_FLAGS, "--batch_size", "16", "--max_steps", "5", "--n_samples", "1",
              "--sampler", "ddim", "--sampling_steps", "2",  # its sample is not looked at: 2 steps, not 1000
              "--no_progress", "--device", "cpu", "--checkpoint", ckpt, "--out_dir", str(work)])
    return work, ckpt


def test_export_keeps_ema_weights_arguments_and_history_and_writes_checksum(trained):
    work, src = trained
    out = str(work / "pub" / "ddpm_trained.pt")
    os.makedirs(work / "pub")
    export.main(["--checkpoint", src, "--out", out])
    pub, full = checkpoint.load(out), checkpoint.load(src)
    assert pub["weights"] == "ema" and not {"optimizer", "ema", "rng"} & set(pub)
    assert all(torch.equal(pub["model"][k], full["ema"][k]) for k in full["ema"])
    assert not all(torch.equal(pub["model"][k], full["model"][k]) for k in full["model"])  # EMA, not raw
    assert pub["model_args"] == full["model_args"] and torch.equal(pub["loss_history"], full["loss_history"])
    assert pub["sessions"] == full["sessions"] and len(full["sessions"]) == 1  # the ledger is published too
    assert os.path.getsize(out) < os.path.getsize(src)
    digest, name = open(out + ".sha256").read().split()
    assert name == "ddpm_trained.pt" and digest == hashlib.sha256(open(out, "rb").read()).hexdigest()


def test_exported_checkpoint_samples_but_cannot_resume_or_give_raw_weights(trained, capsys):
    work, src = trained
    out = str(work / "exp.pt")
    export.main(["--checkpoint", src, "--out", out])
    evaluate.main(["--checkpoint", out, "--n_samples", "2", "--sampler", "ddim", "--sampling_steps", "3",
                   "--out", str(work / "e.png"), "--no_progress", "--device", "cpu"])
    assert "EMA weights" in capsys.readouterr().out
    with pytest.raises(UserError, match="EMA weights only"):
        evaluate.main(["--checkpoint", out, "--no_ema", "--out", str(work / "e2.png"), "--device", "cpu"])
    with pytest.raises(UserError, match="cannot be resumed"):
        run.main(["--resume", "--checkpoint", out, "--device", "cpu", "--out_dir", str(work)])
    with pytest.raises(UserError, match="must differ"):
        export.main(["--checkpoint", out, "--out", out])


def test_make_pics_writes_the_four_pictures(trained):
    work, src = trained
    src = short_chain(src, work / "short.pt", T=50)  # the reverse process's 10 columns stay distinct timesteps
    pics = work / "pics"  # a folder that does not exist yet: make_pics.py creates it
    make_pics.main(["--checkpoint", src, "--out_dir", str(pics), "--n_samples", "10", "--n_reverse", "2",
                    "--no_progress", "--device", "cpu"])
    for name in ("train loss.png", "generated samples.png", "reverse process.png", "generated_samples.jpg"):
        assert (pics / name).stat().st_size > 1000, name
    fast = work / "fast"
    fast.mkdir()
    make_pics.main(["--checkpoint", src, "--out_dir", str(fast), "--n_samples", "10", "--n_reverse", "2",
                    "--sampler", "dpm++2m-sde", "--sampling_steps", "5", "--no_progress", "--device", "cpu"])
    assert (fast / "reverse process.png").stat().st_size > 1000
    assert (fast / "generated samples.png").read_bytes() != (pics / "generated samples.png").read_bytes()
    with pytest.raises(UserError, match="--eta is for --sampler ddim"):
        make_pics.main(["--checkpoint", src, "--out_dir", str(fast), "--sampler", "dpm++2m", "--eta", "1"])
    (work / "afile").write_text("x")  # a folder that cannot be made is refused before sampling
    with pytest.raises(UserError, match="afile is a file, not a folder"):
        make_pics.main(["--checkpoint", src, "--out_dir", str(work / "afile" / "pics")])


def test_float16_export_halves_the_file_and_loads_as_float32(trained):
    work, src = trained
    out16, out32 = str(work / "half.pt"), str(work / "full.pt")
    export.main(["--checkpoint", src, "--out", out16, "--dtype", "float16"])
    export.main(["--checkpoint", src, "--out", out32])
    pub, full = checkpoint.load(out16), checkpoint.load(src)
    assert pub["meta"]["weights_dtype"] == "float16" and pub["meta"]["preset"] == full["meta"]["preset"]
    assert all(pub["model"][k].dtype == torch.float16 for k in pub["model"] if full["ema"][k].is_floating_point())
    params = sum(v.numel() for v in full["ema"].values())
    assert os.path.getsize(out32) - os.path.getsize(out16) > 1.9 * params  # 2 of 4 bytes saved per number
    model, _ = checkpoint.build_model(pub)
    for k, v in model.state_dict().items():
        assert v.dtype == full["ema"][k].dtype and torch.equal(v, full["ema"][k].half().to(v.dtype)), k


def test_export_writes_a_new_file_and_replaces_one_only_with_overwrite(trained, monkeypatch):
    work, src = trained
    monkeypatch.chdir(work)
    export.main(["--checkpoint", src])  # the default output is a new file, never a published one
    assert os.path.exists(work / "ddpm_exported.pt") and os.path.exists(work / "ddpm_exported.pt.sha256")
    published = work / "published.pt"
    published.write_bytes(b"the published checkpoint")
    (work / "published.pt.sha256").write_text("abc  published.pt\n")
    with pytest.raises(UserError, match="exists.*--overwrite"):
        export.main(["--checkpoint", src, "--out", str(published)])
    assert published.read_bytes() == b"the published checkpoint"  # untouched
    export.main(["--checkpoint", src, "--out", str(published), "--overwrite"])
    assert checkpoint.load(str(published))["weights"] == "ema"


def test_checkpoint_with_nan_weights_is_refused_with_one_line(trained, capsys):
    work, src = trained
    ckpt = checkpoint.load(src)
    key = next(k for k, v in ckpt["ema"].items() if v.is_floating_point())
    ckpt["ema"][key] = torch.full_like(ckpt["ema"][key], float("nan"))
    bad = str(work / "nan.pt")
    checkpoint.save(bad, ckpt)
    for call in (lambda: evaluate.main(["--checkpoint", bad, "--out", str(work / "nan.png"), "--device", "cpu"]),
                 lambda: export.main(["--checkpoint", bad, "--out", str(work / "nan_export.pt")])):
        with pytest.raises(UserError, match=f"not finite.*first {key}"):
            call()
    assert not os.path.exists(work / "nan.png") and not os.path.exists(work / "nan_export.pt")


def test_image_grid_is_torchvisions_make_grid():
    """utils.image_grid (no torchvision import) lays digits out as make_grid(padding=2, pad_value=1) does."""
    from torchvision.utils import make_grid

    import utils
    x = torch.rand(7, 1, 28, 28)
    for nrow in (1, 3, 5, 10):
        assert torch.equal(utils.image_grid(x, nrow), make_grid(x, nrow=nrow, padding=2, pad_value=1.0)[0])
