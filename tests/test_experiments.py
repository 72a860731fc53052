"""experiments/ on tiny data and models: each script's rows or steps, what it skips, the files it writes
and the table it prints. Most run the repo scripts they drive (run.py, evaluate.py, export.py) in this
process (the `in_process` fixture: no second torch import per call); common.run_script's subprocess is
tested on its own, and one script runs as a real process from another folder."""
import contextlib
import importlib
import io
import os
import sys
import types

import numpy as np
import pytest
import torch

import checkpoint
import config
from checkpoint import sha256_file
from conftest import ROOT, TINY, TINY_FLAGS, expect_user_error, sh, slow, write_tiny_mnist
from model import UNet
from utils import UserError, cpu_model

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import common  # noqa: E402
import rules  # noqa: E402

TINY_PRESET = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_res=(14,), dropout=0.0)


def tiny_checkpoint(path, T=100, num_classes=None):
    """An untrained tiny UNet as a checkpoint whose chain has T steps (the 1000-step sampler then takes T)."""
    torch.manual_seed(0)
    net = UNet(**TINY, num_classes=num_classes)
    checkpoint.save(path, {"model_args": net.model_args, "diffusion_args": {"T": T}, "model": net.state_dict(),
                           "ema": net.state_dict()})
    return str(path)


@pytest.fixture
def in_process(monkeypatch):
    """common.run_script calling the repo script's main() here: its output to the log, if any, and printed
    where show(line) is true (every line without a log), as run_script does. Returns the list of calls,
    each (script, *flags)."""
    calls = []

    def run_script(script, *args, log=None, show=None, check=True, cwd=None, **_):
        calls.append((os.path.basename(script), *map(str, args)))
        module = importlib.import_module(os.path.basename(script)[:-3])
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.chdir(cwd) if cwd else contextlib.nullcontext():
            module.main([str(a) for a in args])
        if log:
            with open(log, "a") as f:
                f.write(out.getvalue())
        print("".join(line for line in out.getvalue().splitlines(True) if (show(line) if show else not log)), end="")
        return 0
    monkeypatch.setattr(common, "run_script", run_script)
    return calls


def test_run_script_prints_logs_and_fails(tmp_path, capsys):
    code = "print('shown'); print(' hidden'); import sys; sys.exit(3)"
    assert common.run_script("-c", code, show=lambda line: not line.startswith(" "), check=False) == 3
    assert capsys.readouterr().out == "shown\n"
    with pytest.raises(UserError, match="-c .* exited 3 .its output is in .*x.log"):
        common.run_script("-c", code, log=str(tmp_path / "x.log"))
    assert (tmp_path / "x.log").read_text() == "shown\n hidden\n" and capsys.readouterr().out == ""


def test_stamp(tmp_path):
    path = tiny_checkpoint(tmp_path / "c.pt")
    r = common.stamp({"fid": 1.0}, path)
    assert r["checkpoint_sha256"] == sha256_file(path) and r["cpu"] == cpu_model() and r["torch"] == torch.__version__
    assert r["fid"] == 1.0 and "commit" in r and "checkpoint_sha256" not in common.stamp({})
    assert common.stamp({"cpu": "the machine that drew the samples"})["cpu"] == "the machine that drew the samples"


def test_run_rows_skips_done_rows_asks_skip_in_turn_stamps_and_writes(tmp_path, capsys):
    """The sweep runner: a done row is skipped (said so), skip() is asked only when a row's turn comes (it
    sees the rows written before it), each row is measure()'s metrics plus its fields, stamped, no .tmp left."""
    path = tiny_checkpoint(tmp_path / "c.pt")
    common.write_json(tmp_path / "a.json", {"fid": 0.0})
    rows = [(str(tmp_path / f"{n}.json"), path, n) for n in ("a", "b", "c", "d")]

    def measure(row, tmp):
        common.write_json(tmp, {"fid": 1.0, "row": "measure's"})
        return {"row": row}

    def skip(row):  # d runs only if c has not been written: it has
        return "d: skipped, c is in" if row == "d" and os.path.exists(tmp_path / "c.json") else None
    assert common.run_rows(rows, measure, skip=skip) == [str(tmp_path / "b.json"), str(tmp_path / "c.json")]
    assert capsys.readouterr().out == "a: done before, skipped\nd: skipped, c is in\n"
    b = common.read_json(tmp_path / "b.json")
    assert b["fid"] == 1.0 and b["row"] == "b" and b["checkpoint_sha256"] == sha256_file(path)
    assert b["cpu"] == cpu_model()
    assert common.read_json(tmp_path / "a.json") == {"fid": 0.0} and not list(tmp_path.glob("*.tmp"))
    assert common.run_rows(rows[1:3], measure, done=lambda p: False) == [rows[1][0], rows[2][0]]  # done() decides


def test_rules():
    """Each rule picks what its docstring says, and refuses a tie."""
    base = [{"fid": 10.0, "precision": 0.8}, {"fid": 11.0, "precision": 0.81}]
    assert rules.beats({"fid": 9.0, "precision": 0.82}, base)
    assert not rules.beats({"fid": 9.0, "precision": 0.81}, base)  # a tie on precision
    assert not rules.beats({"fid": 10.5, "precision": 1.0}, base)
    groups = {"x": [{"fid": 3.0}, {"fid": 5.0}], "y": [{"fid": 4.5}, {"fid": 3.0}], "z": [{"fid": 2.0}, {"fid": 9.0}]}
    assert rules.lowest_mean_fid(groups) == ("y", 3.75) and rules.lowest_mean_fid({}) is None
    ref = {"fid": 10.0, "nfe": 1000}
    grid = [ref, {"fid": 11.0, "nfe": 50}, {"fid": 10.9, "nfe": 20}, {"fid": 11.2, "nfe": 10}]
    assert rules.fewest_nfe_within(grid, ref) is grid[2] and rules.fewest_nfe_within([ref], ref) is None


def test_sampler_sweep_rows_come_from_the_registry(monkeypatch):
    import sampler_sweep
    import samplers
    few = [s.name for s in samplers.SAMPLERS.values() if s.spacing is not None]
    names = [name for name, _ in sampler_sweep.rows([10, 20], ddpm=True)]
    assert names[:len(few)] == [f"{s}-10" for s in few] and names[-1] == "ddpm-1000" and "ddpm-10" not in names
    assert len(names) == 2 * len(few) + len(few) * (len(samplers.SPACINGS) - 1) + 1
    assert dict(sampler_sweep.rows([20], ddpm=False))["edm-20"][-1] == "10"  # the nearest NFE: 19, two a step
    assert [sampler_sweep.steps_for_nfe("edm", n) for n in (1, 2, 3, 50, 100)] == [1, 1, 2, 25, 50]
    monkeypatch.setitem(samplers.SAMPLERS, "new", types.SimpleNamespace(name="new", spacing="karras", options={},
                                                                         nfe=lambda steps: steps))
    rows = dict(sampler_sweep.rows([10], ddpm=False))
    assert rows["new-10"] == ["--sampler", "new", "--sampling_steps", "10"]
    assert rows["new-20-karras"][-2:] == ["--spacing", "karras"] and "ddpm-1000" not in rows


def fake_row(sampler, spacing, nfe, fid):
    return {"sampler": {"sampler": sampler, **({"spacing": spacing} if spacing else {})}, "nfe": nfe, "fid": fid,
            "n_samples": 10, "fid_floor": 5.0, "precision": 0.5, "recall": 0.5, "confidence": 0.5,
            "sampling_seconds": 1.0}


def test_sampler_sweep(tmp_path, in_process, capsys):
    """Rows done before are skipped (all but one here); the one left is measured, stamped; table and plot."""
    import sampler_sweep
    import samplers
    ckpt, data, out = tiny_checkpoint(tmp_path / "c.pt"), write_tiny_mnist(str(tmp_path / "data")), tmp_path / "sw"
    out.mkdir()
    rows = sampler_sweep.rows([2], ddpm=False)
    for name, flags in rows[1:]:
        sampler, steps = flags[1], int(flags[3])
        spacing = flags[5] if len(flags) > 4 else samplers.SAMPLERS[sampler].spacing
        common.write_json(str(out / f"{name}.json"), fake_row(sampler, spacing, steps, 40.0))
    common.write_json(str(out / "ddpm-1000.json"), fake_row("ddpm", None, 1000, 39.0))
    argv = [ckpt, "10", "--nfe", "2", "--no_ddpm", "--dir", str(out), "--data_dir", data, "--device", "cpu"]
    sampler_sweep.main(argv)
    assert rows[0][0] == "ddim-2" and len(in_process) == 1 and in_process[0][-4:] == ("--data_dir", data,
                                                                                       "--device", "cpu")
    r = common.read_json(out / "ddim-2.json")
    assert r["sampler"]["sampler"] == "ddim" and r["n_samples"] == 10 and r["checkpoint_sha256"] == sha256_file(ckpt)
    assert r["cpu"] == cpu_model() and not list(out.glob("*.tmp")) and (out / "ddim-2.png").exists()
    text = capsys.readouterr().out
    assert "n = 10, feature-FID floor" in text and "fewest NFE within 10% of the 1000-step sampler's FID: " in text
    assert (out / "fid_vs_nfe.png").stat().st_size > 0
    sampler_sweep.main(argv)
    assert len(in_process) == 1 and "ddim-2: done before, skipped" in capsys.readouterr().out


def test_sampler_sweep_in_process(tmp_path, in_process):
    """--in_process: the row comes from evaluate.main in this process, not from common.run_script."""
    import sampler_sweep
    out = tmp_path / "sw"
    sampler_sweep.main([tiny_checkpoint(tmp_path / "c.pt"), "10", "--dir", str(out), "--protocol", "select",
                        "--samplers", "ddim", "--eps_scales", "1.0", "--select_seeds", "10", "--select_nfe", "2",
                        "--data_dir", write_tiny_mnist(str(tmp_path / "data")), "--device", "cpu", "--in_process"])
    r = common.read_json(out / "select" / "ddim_eta1_eps1-s10.json")
    assert not in_process and r["nfe"] == 2 and r["sampler"]["eta"] == 1.0


def test_sampler_sweep_protocol(tmp_path, in_process, capsys):
    """Issue 25's protocol end to end on a tiny checkpoint: the plan alone samples nothing; the selection's
    rows, each with its setting and seed; the report as one command (the selection first, then each sampler's
    setting of lowest mean FID), the 1000-step row from an npz (else drawn) and the winner on a conditional
    checkpoint; a second run skips every row."""
    import sampler_sweep
    ckpt, cond = tiny_checkpoint(tmp_path / "c.pt"), tiny_checkpoint(tmp_path / "cond.pt", num_classes=10)
    data, out, npz = write_tiny_mnist(str(tmp_path / "data")), tmp_path / "sw", tmp_path / "ddpm.npz"
    np.savez(npz, samples=np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8))
    common_flags = [ckpt, "10", "--dir", str(out), "--samplers", "ddim,edm", "--select_nfe", "3", "--select_seeds",
                    "10,11", "--eps_scales", "1.0,1.01", "--churns", "5", "--data_dir", data, "--device", "cpu"]
    select = [*common_flags, "--protocol", "select"]
    sampler_sweep.main([*select, "--plan"])
    assert not in_process and "8 rows, 8 to do: 24 NFE per sample in all" in capsys.readouterr().out  # 8 x 3
    report = [*common_flags, "--protocol", "report", "--nfe", "2", "--report_seeds", "0", "--ddpm_npz", str(npz),
              "--cond", cond, "--guidance_scale", "1", "--digits", "3"]
    sampler_sweep.main([*report, "--plan"])  # the report plans the selection's rows first
    plan = capsys.readouterr().out
    assert "12 rows, 12 to do" in plan and plan.index("select/edm_churn5_eps1.01-s11") < plan.index("report/")
    sampler_sweep.main([*report[:-8], "--plan"])  # without --ddpm_npz the report draws the 1000-step row itself
    assert "report/ddpm-1000                                 NFE 1000  --sampler ddpm --seed 0" in \
        capsys.readouterr().out
    sampler_sweep.main([*report[:-8], "--no_ddpm", "--plan"])
    assert "report/ddpm-1000" not in capsys.readouterr().out
    sampler_sweep.main(report)  # one command: the selection, then the report with the selection's choices
    assert len(in_process) == 8 + 4
    rows = common.read_rows(out / "select")
    assert len(rows) == 8 and {(r["setting"], r["seed"]) for r in rows} >= {("edm_churn5_eps1.01", 11)}
    r = common.read_json(out / "select" / "edm_churn5_eps1.01-s11.json")
    assert r["sampler"] == {"sampler": "edm", "sampling_steps": 2, "spacing": "karras", "churn": 5.0, "s_tmin": 0.01,
                            "s_tmax": 1.0, "s_noise": 1.007, "eps_scale": 1.01} and r["nfe"] == 3
    assert r["real_subsets_seed"] == 11 and r["checkpoint_sha256"] == sha256_file(ckpt)
    fid = {}
    for r in rows:
        fid.setdefault(r["setting"], []).append(r["fid"])
    best = {s: min((k for k in fid if k.startswith(s)), key=lambda k: sum(fid[k])) for s in ("ddim", "edm")}
    names = sorted(os.path.basename(p)[:-5] for p in map(str, (out / "report").glob("*.json")))
    winner = min(best.values(), key=lambda k: sum(fid[k]))
    assert names == sorted(["ddim-nfe2-s0", "edm-nfe2-s0", "ddpm-1000", f"cond-{winner}-w1-s0"])
    assert common.read_json(out / "report" / "edm-nfe2-s0.json")["setting"] == best["edm"]
    c = common.read_json(out / "report" / f"cond-{winner}-w1-s0.json")
    assert c["guidance_scale"] == 1.0 and c["checkpoint_sha256"] == sha256_file(cond) and "conditional_accuracy" in c
    text = capsys.readouterr().out
    assert f"*{best['edm']}" in text and "ddpm-1000" in text and "rows at the nearest NFE" in text
    assert "per 1000 digits (the median of 8 rows done on this CPU" in text  # the plan's time: measured speeds
    assert (out / "report" / "fid_vs_nfe.png").stat().st_size > 0
    sampler_sweep.main(report)
    assert len(in_process) == 12 and "edm-nfe2-s0: done before, skipped" in capsys.readouterr().out


def test_recipe_trials(tmp_path, in_process, capsys, monkeypatch):
    """A trial trains with --eval_every, is judged, gets a row with its time, speed (the ledger's) and CPU; the
    table shows the curve from its checkpoint; its extra EMA is judged too; a trial done before is skipped."""
    import recipe_trials
    monkeypatch.setitem(config.DEFAULTS, "log_every", 1)  # a logging point after the first: the ledger's speed
    data = write_tiny_mnist(str(tmp_path / "data"))
    tiny = "+".join(TINY_FLAGS[:-2] + ["--batch_size", "16", "--max_steps", "3", "--eval_samples", "10"])
    argv = ["10", "--trials", f"min_snr:0:{tiny}+--loss_weight+min_snr+--ema_decays+0.9", "--sampler_flags",
            "--sampler ddim --sampling_steps 2", "--data_dir", data, "--dir", str(tmp_path / "trials")]
    recipe_trials.main(argv)
    out = capsys.readouterr().out
    ckpt = checkpoint.load(tmp_path / "trials" / "min_snr-s0.pt")
    assert ckpt["step"] == 3 and [e["step"] for e in ckpt["eval_history"]] == [3]
    assert ckpt["train_config"]["loss_weight"] == "min_snr" and "eval at step 3" in out
    assert f"curve (feature-FID, n = 10): {ckpt['eval_history'][0]['fid']:.2f} at 3" in out
    r = common.read_json(tmp_path / "trials" / "min_snr-s0.json")
    assert r["trial"].startswith("min_snr:0:") and r["train_seconds"] >= 0
    assert r["steps_per_second"] == ckpt["sessions"][-1]["steps_per_s"] > 0 and r["checkpoint_sha256"]
    assert [(s["from_step"], s["cpu"]) for s in r["sessions"]] == [(0, cpu_model())]
    assert r["cpu"] == cpu_model() and r["sampler"]["sampler"] == "ddim" and r["n_samples"] == 10
    assert (tmp_path / "trials" / "recipe_curves.png").stat().st_size > 0
    # the extra EMA, judged like the main one (evaluate.py --ema picks it: tests/test_ema_decays.py)
    ema = common.read_json(tmp_path / "trials" / "ema" / "min_snr-s0-ema0.9.json")
    assert ema["ema"] == 0.9 and ema["n_samples"] == 10 and ema["sampler"] == r["sampler"]
    assert "EMA 0.9: feature-FID +0.00 against the main EMA, mean of 1 trials" in out  # the same after 3 steps
    recipe_trials.main(argv)
    assert len(in_process) == 3 and out.count("done before, skipped") == 0
    assert capsys.readouterr().out.count("done before, skipped") == 2


def test_ema_rule():
    """A stored EMA wins if it beats the main one on FID and precision in every trial, by more than SPREAD."""
    main, spread = {"fid": 30.0, "precision": 0.70}, rules.SPREAD

    def verdict(*rows):
        return rules.ema_verdict("0.99", [(main, {"fid": f, "precision": p}) for f, p in rows])
    assert verdict((30 - 2 * spread, 0.71), (30 - spread / 2, 0.72)).endswith("; wins by the rule")  # mean gain 1.25x
    assert "gain above 1.11: False" in verdict((30 - spread / 2, 0.71))
    assert "every one: False" in verdict((30 - 3 * spread, 0.71), (30 - 3 * spread, 0.70))  # precision ties
    assert verdict((28.0, 0.71)).startswith("EMA 0.99: feature-FID -2.00 against the main EMA, mean of 1 trials")


def test_recipe_trials_rule(tmp_path, in_process, capsys):
    """The rule: an option wins if every seed beats every baseline seed on FID and precision; a later seed
    of an option whose first seed lost is not trained, but only once the whole baseline is in."""
    import argparse

    import recipe_trials
    args = argparse.Namespace(dir=str(tmp_path), baseline="base", sampler_flags="",
                              trials=["base:0:", "base:1:", "a:0:x", "b:0:y", "a:1:x", "b:1:y"])

    def row(name, fid, precision):
        common.write_json(tmp_path / f"{name}.json", {"fid": fid, "precision": precision})
    row("base-s0", 10.0, 0.80), row("a-s0", 9.0, 0.82), row("b-s0", 9.0, 0.80)  # b ties base-s0's precision
    assert recipe_trials.lost_already(args, "b:1:y") is None  # base-s1 not in yet: nothing is decided
    row("base-s1", 11.0, 0.81)
    assert recipe_trials.lost_already(args, "a:1:x") is None and recipe_trials.lost_already(args, "a:0:x") is None
    recipe_trials.run_trials(args, ["b:1:y"])  # skipped: nothing trained, nothing judged
    assert not in_process and "b-s1: not trained, its seed 0 already lost to base" in capsys.readouterr().out
    assert recipe_trials.verdicts(args) == [
        "a: leads, seeds still to run (mean feature-FID -14% against base's)",
        "b: loses (a seed does not beat every base seed on FID and precision)"]
    row("a-s1", 9.5, 0.85)
    assert recipe_trials.verdicts(args)[0] == "a: wins (mean feature-FID -12% against base's)"
    row("a-s1", 10.5, 0.85)  # beats base-s1 but not base-s0 on FID
    assert recipe_trials.verdicts(args)[0].startswith("a: loses")
    args.trials += ["c:0:z", "c:1:z", "c:2:z"]
    row("c-s1", 20.0, 0.5)  # a losing seed, but not the first: the first decides
    assert recipe_trials.lost_already(args, "c:2:z") is None


@slow  # about 30 s on 2 cores: the real processes of the test above
def test_recipe_trials_in_real_processes(tmp_path):
    write_tiny_mnist(str(tmp_path / "data"))
    tiny = "+".join(TINY_FLAGS[:-2] + ["--batch_size", "16", "--max_steps", "3", "--eval_samples", "10"])
    p = sh([os.path.join(ROOT, "experiments", "recipe_trials.py"), "12", "--trials", f"base:0:{tiny}",
            "--sampler_flags", "--sampler ddim --sampling_steps 2", "--data_dir", "data", "--dir", "trials"],
           cwd=tmp_path)
    assert "eval at step 3" in p.stdout and "curve (feature-FID, n = 10): " in p.stdout
    assert checkpoint.load(tmp_path / "trials" / "base-s0.pt")["step"] == 3
    assert "base-s0.log" in os.listdir(tmp_path / "trials")


def test_guidance_sweep(tmp_path, in_process, capsys):
    import guidance_sweep
    cond, uncond = tiny_checkpoint(tmp_path / "c.pt", num_classes=10), tiny_checkpoint(tmp_path / "u.pt")
    data = write_tiny_mnist(str(tmp_path / "data"))
    guidance_sweep.main([cond, uncond, "10", "--scales", "0.5", "--dir", str(tmp_path / "g"), "--sampler", "ddim",
                         "--sampling_steps", "2", "--data_dir", data, "--device", "cpu"])
    assert sorted(os.listdir(tmp_path / "g")) == ["cond_w0.5.json", "cond_w0.5.png", "uncond.json", "uncond.png"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].split()[:2] == ["conditional", "0.5"] and lines[-1].split()[:2] == ["unconditional", "-"]
    assert [c[0] for c in in_process] == ["evaluate.py", "evaluate.py"] and "--guidance_scale" in in_process[0]
    assert common.read_json(tmp_path / "g" / "cond_w0.5.json")["checkpoint_sha256"] == sha256_file(cond)
    guidance_sweep.main([cond, uncond, "10", "--scales", "0.5", "--dir", str(tmp_path / "g")])  # done: only the table
    assert len(in_process) == 2 and capsys.readouterr().out.count("done before, skipped") == 2


def test_gpu_dry_run_in_a_real_process_from_another_folder(tmp_path):
    """The documented dry run, as a user runs it (plus the data): both paths' speeds from their ledgers, the
    choice and its reason, the resume (bitwise on a CPU: difference 0), the run stopped by its budget with its
    checkpoint saved and resumable, the float16 export, the samples, the JSON."""
    write_tiny_mnist(str(tmp_path / "data"))
    out = sh([os.path.join(ROOT, "experiments", "gpu.py"), "--device", "cpu", "--tiny", "--out", "g"],
             cwd=tmp_path).stdout
    r, g = common.read_json(tmp_path / "g" / "gpu.json"), tmp_path / "g"
    assert r["device"] == "cpu" and r["commit"] and r["cpu"] == cpu_model()
    assert all(r["speed"][p] > 0 for p in ("default", "graph_step")) and r["path"] in r["speed"]
    assert (r["path"] == "graph_step") == (r["speed"]["graph_step"] > r["speed"]["default"])
    assert f"training on the {r['path']} path: {r['why']}" in out and ("falling back" in r["why"]) == (
        r["path"] == "default")
    run = checkpoint.load(g / "ddpm_run.pt")
    assert run["step"] == r["steps"] > 2 and run["total_steps"] == 1600 and checkpoint.is_unfinished(run)
    assert [(s["from_step"], s["to_step"]) for s in run["sessions"]] == [(0, 2), (2, r["steps"])]  # resumed at 2
    assert "interrupted by signal 15" in out and r["resume_rel_diff"] == 0  # steps 2 on, against the speed row's
    assert r["exported_sha256"] == sha256_file(g / "ddpm_paper.pt") and checkpoint.load(g / "ddpm_paper.pt")[
        "meta"]["weights_dtype"] == "float16"
    samples = np.load(g / "samples.npz")
    assert samples["samples"].shape == (10, 28, 28) and '"sampler": "dpm++2m-sde"' in str(samples["meta"])


@slow  # 11-14 s on a shared 2-core machine: the sampling figures (1000-step sampler, 100 digits with DDIM-50)
def test_benchmark_sample_only(tmp_path, capsys, monkeypatch):
    import benchmark
    from diffusion import GaussianDiffusion
    monkeypatch.setitem(config.PRESETS, "tiny", TINY_PRESET)
    monkeypatch.setattr(benchmark, "GaussianDiffusion", lambda **kw: GaussianDiffusion(**{"T": 50, **kw}))  # short
    benchmark.main(["--preset", "tiny", "--device", "cpu", "--sample_only", "--json", str(tmp_path / "b.json")])
    r = common.read_json(tmp_path / "b.json")
    assert r["preset"] == "tiny" and r["sample_10_s"] > 0 and r["flops_per_forward"] > 0 and "full_step_s" not in r
    assert f"sample_100_ddim50_s      {r['sample_100_ddim50_s']:.4g}" in capsys.readouterr().out


def test_benchmark_training(tmp_path, capsys, monkeypatch):
    """The bare step (train.make_step) and the full one (train_func's ledger: its speed is rounded there) on a
    tiny preset; the matmul peak, the profile and the sampling figures are stubbed (test_benchmark_sample_only
    times the sampling)."""
    import benchmark
    monkeypatch.setitem(config.PRESETS, "tiny", TINY_PRESET)
    monkeypatch.setattr(benchmark, "peak_matmul_flops", lambda device, dtype: 1e9)
    monkeypatch.setattr(benchmark, "sample_time", lambda *args: 1.0)
    monkeypatch.setattr(benchmark, "dense_op_share", lambda *args: None)
    monkeypatch.setattr(benchmark, "WARMUP", 2)  # the first logging point: the full step's speed counts from it
    benchmark.main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--batch_size", "8", "--json",
                    str(tmp_path / "b.json")])
    r = common.read_json(tmp_path / "b.json")
    assert r["bare_step_s"] > 0 and r["train_img_per_s"] == pytest.approx(8 / r["full_step_s"])
    assert 1 / r["full_step_s"] == pytest.approx(round(1 / r["full_step_s"], 3), abs=1e-9)  # the ledger's figure
    assert r["commit"] and r["cpu"] == cpu_model()
    assert f"full_step_s              {r['full_step_s']:.4g}" in capsys.readouterr().out


def test_headline(tmp_path, in_process, capsys, monkeypatch):
    """A row's seed is sampled and scored once; then only the table."""
    import headline
    monkeypatch.setattr(headline, "OUT", str(tmp_path))
    monkeypatch.setattr(headline, "ROWS", {"tiny": (tiny_checkpoint(tmp_path / "c.pt"), [], "a tiny row")})
    monkeypatch.setattr(headline, "SAMPLER", ["--sampler", "ddim", "--sampling_steps", "2", "--n_samples", "10"])
    argv = ["--rows", "tiny", "--seeds", "0", "--data_dir", write_tiny_mnist(str(tmp_path / "data"))]
    headline.main(argv)
    assert {"tiny_seed0.npz", "tiny_seed0.json"} <= set(os.listdir(tmp_path)) and len(in_process) == 2
    # the scores name their samples relative to the repo root, not by this machine's absolute path
    assert not os.path.isabs(common.read_json(tmp_path / "tiny_seed0.json")["from_samples"])
    assert "| a tiny row | " in capsys.readouterr().out
    headline.main(argv)
    assert len(in_process) == 2 and "| a tiny row | " in capsys.readouterr().out


def test_headline_restores_from_history(monkeypatch):
    """A row's checkpoint missing from the tree comes from git history; a commit that lacks it is one clear error."""
    import headline
    monkeypatch.setattr(headline, "RESTORED", {"not_a_checkpoint.pt": ("0" * 40, "checkpoints/nothing.pt")})
    with pytest.raises(common.UserError, match="cannot restore .*not_a_checkpoint.pt with 'git show 0+:checkpoints"):
        headline.ensure_checkpoint("not_a_checkpoint.pt")
    assert not os.path.exists(os.path.join(headline.ROOT, "not_a_checkpoint.pt"))
    assert headline.ROWS["r30_ema0.999"][1] == ["--ema", "0.999"] and headline.MAIN_EMA in headline.EMAS


def test_floors(tmp_path, capsys):
    import floors
    floors.main(["--n", "10,20", "--subsets", "2", "--data_dir", write_tiny_mnist(str(tmp_path / "data")),
                 "--json", str(tmp_path / "f.json")])
    r = common.read_json(tmp_path / "f.json")
    assert set(r["floors"]) == {"10", "20"} and len(r["floors"]["10"]["fid"]) == 2 and r["cpu"] == cpu_model()
    assert "| 20 | " in capsys.readouterr().out


@pytest.mark.parametrize("script, argv, match", [
    ("sampler_sweep", ["--nfe", "1,x"], "argument --nfe: expected comma-separated integers, got '1,x'"),
    ("sampler_sweep", ["--protocol", "report", "--digits", "3"], "--guidance_scale and --digits are for --cond"),
    ("sampler_sweep", ["--samplers", "ddpm"], "--samplers must name few-step samplers"),
    ("guidance_sweep", ["c.pt", "u.pt", "--scales", "1,x"], "argument --scales: expected comma-separated numbers"),
    ("recipe_trials", ["--trials", "base"], "--trials are NAME:SEED:FLAGS"),
    ("recipe_trials", ["--trials", "a:0:", "--baseline", "b"], "--baseline b is none of the --trials' names"),
    ("floors", ["--n", "5"], "--n values must be in 10..10000"),
    ("headline", ["--rows", "nope"], "--rows must name rows"),
    ("benchmark", ["--steps", "0"], "--batch_size and --steps must be >= 1"),
    ("gpu", ["--tiny", "--speed_steps", "4"], "--speed_steps > 4"),  # a step after the first logging point
    ("gpu", ["--budget", "0"], "--budget and --n_samples must be > 0"),
])
def test_bad_input(script, argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expect_user_error(capsys, importlib.import_module(script).main, argv, match)
