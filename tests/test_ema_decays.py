"""--ema_decays: more EMAs along one run, stored in the checkpoint, resumed bitwise, and chosen for
sampling and export with --ema. Tiny runs of run.main in this process (the code of `python run.py`)."""
import pytest
import torch

import checkpoint
import config
import evaluate
import export
import run
from config import TrainConfig
from conftest import TINY_FLAGS, expect_user_error, same_weights, write_tiny_mnist
from utils import UserError

TRAIN = [*TINY_FLAGS, "--device", "cpu", "--batch_size", "16", "--max_steps", "8", "--save_every", "4",
         "--n_samples", "1", "--sampler", "ddim", "--sampling_steps", "2", "--no_progress", "--data_dir", "data"]
SAMPLE = ["--n_samples", "1", "--sampler", "ddim", "--sampling_steps", "2", "--no_progress", "--device", "cpu"]
TWO = ["--ema_decay", "0.3", "--ema_decays", "0.2,0.9"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs of 8 steps: the main EMA 0.3 with extras 0.2 and 0.9; the same stopped at step 5 and resumed;
    one with only the main EMA, of decay 0.2 (what that extra must equal). Decays this short, since the
    warm-up min(decay, (1 + n) / (10 + n)) rules the first steps: 0.2 and 0.3 part at step 2."""
    work = tmp_path_factory.mktemp("ema")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        write_tiny_mnist(str(work / "data"))
        run.main([*TRAIN, "--checkpoint", "two.pt", *TWO])
        run.main([*TRAIN, "--checkpoint", "cut.pt", *TWO, "--max_steps", "5"])
        run.main([*TRAIN, "--checkpoint", "cut.pt", "--resume"])  # the extra EMAs come from the checkpoint
        run.main([*TRAIN, "--checkpoint", "one.pt", "--ema_decay", "0.2"])
    return work, {k: checkpoint.load(work / f"{k}.pt") for k in ("two", "cut", "one")}


def test_an_extra_ema_is_the_main_ema_of_that_decay_and_changes_nothing_else(runs):
    _, r = runs
    two, one = r["two"], r["one"]
    assert list(two["ema_extra"]) == ["0.2", "0.9"] and two["train_config"]["ema_decays"] == (0.2, 0.9)
    assert torch.equal(two["loss_history"], one["loss_history"])
    assert all(torch.equal(two["model"][k], one["model"][k]) for k in one["model"])  # training is untouched
    assert all(torch.equal(two["ema_extra"]["0.2"][k], one["ema"][k]) for k in one["ema"])  # the same rule, bitwise
    assert not all(torch.equal(two["ema"][k], one["ema"][k]) for k in one["ema"])  # 0.3 is another average
    assert one["ema_extra"] == {}


def test_stop_and_resume_with_extra_emas_is_bitwise_the_uninterrupted_run(runs):
    _, r = runs
    cut, two = r["cut"], r["two"]
    assert cut["step"] == 8 and torch.equal(cut["loss_history"], two["loss_history"])
    same_weights(cut, two)
    assert cut["ema_extra"].keys() == two["ema_extra"].keys()
    for d in two["ema_extra"]:
        for k, v in two["ema_extra"][d].items():
            assert torch.equal(cut["ema_extra"][d][k], v), (d, k)


def test_resume_keeps_the_extra_emas(runs, capsys, monkeypatch):
    work, _ = runs
    monkeypatch.chdir(work)
    expect_user_error(capsys, run.main, [*TRAIN, "--checkpoint", "two.pt", "--resume", "--ema_decays", "0.5"],
                      "--ema_decays (0.5,) but the checkpoint has (0.2, 0.9)")
    expect_user_error(capsys, run.main, [*TRAIN, "--checkpoint", "one.pt", "--resume", "--ema_decays", "0.5"],
                      "--ema_decays (0.5,) but the checkpoint has ()")
    old = dict(checkpoint.load(work / "one.pt"))  # a file from before --ema_decays: no key in either place
    del old["ema_extra"]
    old["train_config"] = {k: v for k, v in old["train_config"].items() if k != "ema_decays"}
    args = run.get_parser().parse_args(["--resume", "--ema_decays", ""])
    flags = {k: getattr(args, k, None) for k in config.DEFAULTS}
    assert config.resolve_resume(old, "one.pt", **flags)[2].ema_decays == ()


@pytest.mark.parametrize("argv, match", [
    (["--ema_decays", "0.9,1"], "--ema_decays must be decays in (0, 1), each once, got (0.9, 1.0)"),
    (["--ema_decays", "0.9,0.9"], "each once"),
    (["--ema_decays", "0.999", "--ema_decay", "0.999"], "--ema_decays repeats --ema_decay 0.999"),
    (["--ema_decays", "0.9;0.99"], "expected comma-separated numbers"),
])
def test_ema_decays_flag_errors(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expect_user_error(capsys, run.main, [*argv, "--dry_run", "--device", "cpu"], match)


def test_config_takes_a_list_from_a_checkpoint():
    assert TrainConfig(ema_decays=[0.9, 0.99]).ema_decays == (0.9, 0.99)


def test_ema_chooses_the_stored_average_for_sampling(runs, capsys):
    work, r = runs
    two = r["two"]
    for decay, want in ((0.2, two["ema_extra"]["0.2"]), (0.3, two["ema"]), (None, two["ema"])):
        model, _ = checkpoint.build_model(two, ema=decay)
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items()), decay
    evaluate.main(["--checkpoint", str(work / "two.pt"), "--ema", "0.2", "--out", str(work / "e.png"), *SAMPLE])
    assert "EMA 0.2 weights" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"--ema 0.5: no EMA of that decay here; this checkpoint holds the EMAs of "
                                        r"decays 0.3 \(the main one\), 0.2, 0.9 \(train"):
        evaluate.main(["--checkpoint", str(work / "two.pt"), "--ema", "0.5", "--out", str(work / "e.png"), *SAMPLE])
    expect_user_error(capsys, evaluate.main, ["--checkpoint", str(work / "two.pt"), "--ema", "0.2", "--no_ema",
                                              "--out", str(work / "e.png"), *SAMPLE], "drop --ema or --no_ema")


def test_export_publishes_the_chosen_average_and_records_its_decay(runs):
    work, r = runs
    two = r["two"]
    export.main(["--checkpoint", str(work / "two.pt"), "--out", str(work / "p9.pt"), "--ema", "0.9"])
    pub = checkpoint.load(work / "p9.pt")
    assert pub["ema_decay"] == 0.9 and "ema_extra" not in pub
    assert all(torch.equal(pub["model"][k], v) for k, v in two["ema_extra"]["0.9"].items())
    assert not all(torch.equal(pub["model"][k], v) for k, v in two["ema"].items())
    assert checkpoint.export(two)["ema_decay"] == 0.3  # the main EMA by default
    assert checkpoint.ema_weights(pub, 0.9) is pub["model"]
    with pytest.raises(UserError, match="this exported checkpoint holds only the EMA of decay 0.9$"):
        checkpoint.build_model(pub, ema=0.3)
    bare = {"model_args": two["model_args"], "diffusion_args": two["diffusion_args"], "model": two["model"]}
    with pytest.raises(UserError, match="no EMA of that decay here; this checkpoint holds no EMA weights"):
        checkpoint.build_model(bare, ema=0.3)  # not the raw weights in silence
    with pytest.raises(UserError, match="no EMA of that decay"):
        export.main(["--checkpoint", str(work / "two.pt"), "--out", str(work / "p5.pt"), "--ema", "0.5"])
