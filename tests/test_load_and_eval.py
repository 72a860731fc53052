"""load_and_eval.sh against a local `python -m http.server`: a good file, a wrong hash, an
unreachable URL, a 404, no downloader, the published copy, and an existing checkpoint kept.

The script ends by exec'ing evaluate.py. One test lets that run (a grid from the installed file); the
others give it a stand-in Python (PYTHON, which the script honours) that records the command it was
handed and its folder: the same checks of the script, without a torch start-up (3-4 s) each."""
import glob
import hashlib
import io
import os
import shutil
import subprocess
import sys

import pytest
import torch

from checkpoint import export as export_checkpoint
from conftest import ROOT, TINY
from diffusion import GaussianDiffusion
from model import UNet

EVAL_ARGS = ["--", "--n_samples", "2", "--sampler", "ddim", "--sampling_steps", "3", "--no_progress",
             "--device", "cpu", "--out", "grid.png"]


def _checkpoint_bytes(seed):
    torch.manual_seed(seed)
    net = UNet(**TINY)
    ckpt = export_checkpoint({"model_args": net.model_args, "diffusion_args": GaussianDiffusion().args,
                              "model": net.state_dict(), "ema": net.state_dict(), "step": 1, "total_steps": 1})
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def files():
    return {"good": _checkpoint_bytes(0), "other": _checkpoint_bytes(1)}


@pytest.fixture
def repo(tmp_path, files):
    """A copy of the repo's scripts with a published tiny checkpoint and its checksum."""
    r = tmp_path / "repo"
    (r / "checkpoints").mkdir(parents=True)
    for f in glob.glob(os.path.join(ROOT, "*.py")) + [os.path.join(ROOT, "load_and_eval.sh")]:
        shutil.copy(f, r)
    (r / "checkpoints" / "ddpm_trained.pt").write_bytes(files["good"])
    digest = hashlib.sha256(files["good"]).hexdigest()
    (r / "checkpoints" / "ddpm_trained.pt.sha256").write_text(f"{digest}  ddpm_trained.pt\n")
    return r


@pytest.fixture(scope="module")
def server(tmp_path_factory, files):
    """http://127.0.0.1:PORT/ serving good.pt and other.pt."""
    d = tmp_path_factory.mktemp("srv")
    (d / "good.pt").write_bytes(files["good"])
    (d / "other.pt").write_bytes(files["other"])
    cmd = [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(d)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
    port = int(line.split(" port ")[1].split()[0])
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


# Records evaluate.py's command line (and the folder it runs in) in ./evaluate_call.txt; runs anything else.
RECORDER = """#!/bin/sh
case "$1" in
    */evaluate.py) printf '%s\\n' "$PWD" "$@" > evaluate_call.txt ;;
    *) exec {python} "$@" ;;
esac
"""


def run_script(repo, *args, env=None, cwd=None, evaluate=False):
    """sh load_and_eval.sh ARGS in cwd (default: the repo); evaluate.py runs only with evaluate=True."""
    python = sys.executable
    if not evaluate:
        python = str(repo.parent / "recorder.sh")
        with open(python, "w") as f:
            f.write(RECORDER.format(python=sys.executable))
        os.chmod(python, 0o755)
    e = dict(os.environ, PYTHON=python)
    e.pop("DDPM_CHECKPOINT_URL", None)
    e.update(env or {})
    return subprocess.run(["sh", str(repo / "load_and_eval.sh"), *args], cwd=cwd or repo, env=e,
                          capture_output=True, text=True, timeout=300)


def evaluated(repo, dest, cwd=None):
    """The script handed over to the repo's evaluate.py with the installed file and EVAL_ARGS, in cwd."""
    cwd = cwd or repo
    call = (cwd / "evaluate_call.txt").read_text().splitlines()
    (cwd / "evaluate_call.txt").unlink()
    return call == [str(cwd), str(repo / "evaluate.py"), "--checkpoint", dest, *EVAL_ARGS[1:]]


def leftovers(repo):
    return sorted(p.name for p in repo.iterdir() if p.name.startswith(".ddpm_"))


def test_good_download_is_verified_installed_and_evaluated(repo, server, files):
    r = run_script(repo, f"{server}/good.pt", *EVAL_ARGS, evaluate=True)
    assert r.returncode == 0, r.stderr
    assert (repo / "ddpm_trained_published.pt").read_bytes() == files["good"]
    assert (repo / "grid.png").stat().st_size > 0
    assert "SHA-256 verified" in r.stdout and leftovers(repo) == []


def test_url_from_the_environment(repo, server, files):
    r = run_script(repo, *EVAL_ARGS, env={"DDPM_CHECKPOINT_URL": f"{server}/good.pt"})
    assert r.returncode == 0, r.stderr
    assert "downloading" in r.stdout and (repo / "ddpm_trained_published.pt").read_bytes() == files["good"]
    assert evaluated(repo, "ddpm_trained_published.pt")


@pytest.mark.parametrize("name, message", [("other.pt", "SHA-256 mismatch"), ("missing.pt", "download failed")])
def test_wrong_hash_or_404_installs_nothing(repo, server, name, message):
    r = run_script(repo, f"{server}/{name}", *EVAL_ARGS)
    assert r.returncode != 0 and message in r.stderr
    assert not (repo / "ddpm_trained_published.pt").exists() and not (repo / "grid.png").exists()
    assert leftovers(repo) == []


def test_unreachable_url_installs_nothing(repo):
    import socket
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_script(repo, f"http://127.0.0.1:{port}/ddpm_trained.pt", *EVAL_ARGS)
    assert r.returncode != 0 and "download failed" in r.stderr
    assert not (repo / "ddpm_trained_published.pt").exists() and leftovers(repo) == []


def test_no_url_uses_the_published_copy_and_checks_it(repo, files):
    r = run_script(repo, *EVAL_ARGS)
    assert r.returncode == 0, r.stderr
    assert "published copy" in r.stdout and (repo / "ddpm_trained_published.pt").read_bytes() == files["good"]
    assert evaluated(repo, "ddpm_trained_published.pt")
    (repo / "ddpm_trained_published.pt").unlink()
    (repo / "checkpoints" / "ddpm_trained.pt").write_bytes(files["other"])  # corrupted in the clone
    r = run_script(repo, *EVAL_ARGS)
    assert r.returncode != 0 and "SHA-256 mismatch" in r.stderr
    assert not (repo / "ddpm_trained_published.pt").exists() and leftovers(repo) == []


def test_own_training_is_kept_and_a_different_installed_file_never_replaced(repo, files):
    """The README's sequence: `python run.py` writes ./ddpm_trained.pt, then load_and_eval.sh installs the
    published one beside it as ./ddpm_trained_published.pt; a different file of that name is kept too."""
    (repo / "ddpm_trained.pt").write_bytes(b"my own training")
    r = run_script(repo, *EVAL_ARGS)
    assert r.returncode == 0, r.stderr
    assert (repo / "ddpm_trained_published.pt").read_bytes() == files["good"]
    assert (repo / "ddpm_trained.pt").read_bytes() == b"my own training" and leftovers(repo) == []
    assert evaluated(repo, "ddpm_trained_published.pt")
    (repo / "ddpm_trained_published.pt").write_bytes(b"something else")
    r = run_script(repo, *EVAL_ARGS)
    assert r.returncode != 0 and "is not the published checkpoint" in r.stderr
    assert (repo / "ddpm_trained_published.pt").read_bytes() == b"something else" and leftovers(repo) == []
    r = run_script(repo, *EVAL_ARGS, env={"DDPM_CHECKPOINT_DEST": "published.pt"})
    assert r.returncode == 0, r.stderr
    assert (repo / "published.pt").read_bytes() == files["good"] and evaluated(repo, "published.pt")


def test_run_from_another_folder_installs_and_writes_there(repo, tmp_path, files):
    here = tmp_path / "elsewhere"
    here.mkdir()
    r = run_script(repo, *EVAL_ARGS, cwd=here)
    assert r.returncode == 0, r.stderr
    assert (here / "ddpm_trained_published.pt").read_bytes() == files["good"]
    assert evaluated(repo, "ddpm_trained_published.pt", cwd=here)  # so its --out grid.png is written here
    assert not (repo / "ddpm_trained_published.pt").exists()


def test_without_curl_or_wget_a_clear_error(repo, tmp_path, server):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "dirname", "awk", "mktemp", "rm", "cp", "mv", "chmod", "sync", "sha256sum", "shasum"):
        if shutil.which(tool):
            os.symlink(shutil.which(tool), bin_dir / tool)
    r = run_script(repo, f"{server}/good.pt", *EVAL_ARGS, env={"PATH": str(bin_dir)})
    assert r.returncode != 0 and "neither curl nor wget" in r.stderr
    assert not (repo / "ddpm_trained_published.pt").exists() and leftovers(repo) == []


def test_bad_arguments(repo):
    r = run_script(repo, "http://127.0.0.1:1/x", "--n_samples", "2")
    assert r.returncode != 0 and "unexpected argument" in r.stderr


def test_choose_another_published_checkpoint(repo, files):
    (repo / "checkpoints" / "ddpm_cond.pt").write_bytes(files["other"])
    digest = hashlib.sha256(files["other"]).hexdigest()
    (repo / "checkpoints" / "ddpm_cond.pt.sha256").write_text(f"{digest}  ddpm_cond.pt\n")
    r = run_script(repo, *EVAL_ARGS, env={"DDPM_CHECKPOINT": "ddpm_cond.pt"})
    assert r.returncode == 0, r.stderr
    assert (repo / "ddpm_cond_published.pt").read_bytes() == files["other"]
    assert evaluated(repo, "ddpm_cond_published.pt") and not (repo / "ddpm_trained_published.pt").exists()
    for bad in ("nope.pt", "../ddpm_cond.pt"):
        r = run_script(repo, *EVAL_ARGS, env={"DDPM_CHECKPOINT": bad})
        assert r.returncode != 0 and ("must be a file name" in r.stderr or "no published checkpoint" in r.stderr)
        assert not (repo / "nope.pt").exists() and leftovers(repo) == []
    assert "ddpm_cond.pt ddpm_trained.pt" in run_script(repo, env={"DDPM_CHECKPOINT": "nope.pt"}).stderr
