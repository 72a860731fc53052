"""Training recipes at equal cost: the cpu preset's model and number of optimizer steps, with and
without each recipe option, every trial judged on N samples with one fixed sampler.

    python experiments/recipe_trials.py [N]          # N = 1000 by default

A trial is NAME:SEED:FLAGS (FLAGS with + for spaces); --trials overrides the default list (the cpu
preset as it is, then Min-SNR and v-prediction on top of it, two seeds each). Each trial trains into
DIR/NAME-sSEED.pt with --eval_every (the curve is stored in it: the checkpoint's eval_history), then
writes DIR/NAME-sSEED.json (the judge's numbers, the training time, steps/s and the CPU). A trial whose
JSON exists is skipped, and an interrupted training is resumed from its last checkpoint (every 250 steps,
about 3 minutes), so rerunning continues where it stopped.
Run it alone: the times are part of the table (about 45 minutes a trial on 2 cores of an AMD EPYC;
docs/experiments.md). train_seconds is the training's wall time over all its sessions, evaluations
included, from the checkpoint's ledger (checkpoint.training_time; `sessions` in the JSON lists each
session's CPU and steps); steps_per_second is the last session's steps_per_s in that ledger (from its
first logging point: set-up, compilation and evaluations left out). run.py's output goes to
DIR/NAME-sSEED.log.

The rule (rules.beats), fixed before the runs: the trials named --baseline (default: the first trial's name) are the
baseline; an option wins if every seed of it beats every baseline seed on feature-FID and on precision;
of several winners, the one with the lowest mean feature-FID. An option's later seeds are not
trained once its first seed in the list has lost by that rule (it can no longer win). Then the table of
every trial in DIR with its --eval_every curve, each option's verdict, and DIR/recipe_curves.png.

The EMA length: every trial that stores more EMAs (--ema_decays) is judged again with each of them
(evaluate.py --ema D, the same sampler and noise: a paired comparison with its main EMA), rows in
DIR/ema/. The rule (rules.ema_verdict), fixed before any of them was scored: a stored EMA replaces the cpu preset's
--ema_decay if it beats the main EMA on feature-FID and on precision in every trial that stores it, and
its mean feature-FID is lower by more than rules.SPREAD (the recommended sampler's standard deviation over
sampling seeds at n = 1000, docs/sampling.md).
"""
import os

import common  # first: the repo's modules onto sys.path

# isort: split
import checkpoint
import rules
import samplers

# The baseline is the cpu preset as it is (the cosine schedule); the options go on top of it. The first
# seed of each option runs before any second one, so that a loser's second seed is never trained.
# The trials but cosine:0 (started before) also store two shorter EMAs (--ema_decays, which neither changes the
# training nor the judged main EMA), for the EMA length the cpu preset should sample with (docs/experiments.md).
# Shorter only: within 2,811 steps the warm-up min(decay, (1+n)/(10+n)) stays below 0.997, so every decay from
# there up (the preset's 0.999 too) gives the same average.
EMA = "+--ema_decays+0.99,0.995"
TRIALS = ["cosine:0:", "cosine:1:" + EMA, "min_snr:0:--loss_weight+min_snr" + EMA, "v:0:--prediction+v" + EMA,
          "min_snr:1:--loss_weight+min_snr" + EMA, "v:1:--prediction+v" + EMA]


def run_name(trial):
    """NAME-sSEED, the name of a trial NAME:SEED:FLAGS's files in DIR."""
    name, seed, _ = trial.split(":", 2)
    return f"{name}-s{seed}"


def seeds_of(args, name):
    """The seeds of trial `name`, in --trials order."""
    return [s for n, s, _ in (t.split(":", 2) for t in args.trials) if n == name]


def rows_of(args, name):
    """The done rows of trial `name`'s seeds, in --trials order."""
    paths = [os.path.join(args.dir, f"{name}-s{s}.json") for s in seeds_of(args, name)]
    return [common.read_json(p) for p in paths if os.path.exists(p)]


def lost_already(args, trial):
    """Why `trial` need not run (a later seed of an option whose first seed lost), or None."""
    name, seed, _ = trial.split(":", 2)
    first_seed = seeds_of(args, name)[0]
    first = os.path.join(args.dir, f"{name}-s{first_seed}.json")
    if name == args.baseline or first_seed == seed or not os.path.exists(first) or \
            len(rows_of(args, args.baseline)) < len(seeds_of(args, args.baseline)):
        return None
    if not rules.beats(common.read_json(first), rows_of(args, args.baseline)):
        return f"{name}-s{seed}: not trained, its seed {first_seed} already lost to {args.baseline} by the rule"
    return None


def judge(args, pt, out, tmp, *extra):
    """Score the checkpoint pt (its main EMA, or extra: --ema D) with N samples of the judge's sampler: the metrics
    to the file tmp, the digits to OUT/samples.png. Every trial and every stored EMA is judged by this one call."""
    os.makedirs(out, exist_ok=True)
    common.evaluate("--checkpoint", pt, *extra, "--metrics", "--n_samples", args.n, "--batch_size",
                    common.SAMPLE_BATCH, "--bpd_images", 0, "--data_dir", args.data_dir, "--no_progress", "--out",
                    os.path.join(out, "samples.png"), "--nrow", 25, "--metrics_out", tmp, *args.sampler_flags.split())


# run.py's lines a trial prints (the rest goes to its log): the evaluations, the speed, the training's summary
SHOWN = ("eval at", "average speed", "evaluations", "trained")


def run_trials(args, trials):
    """Train (or resume) each trial, judge it, and write DIR/NAME-sSEED.json, by the sweep runner: a trial is
    skipped when that file exists or when its option already lost."""
    def measure(trial, tmp):
        _, seed, flags = trial.split(":", 2)
        run = os.path.join(args.dir, run_name(trial))
        resume = ["--resume"] if os.path.exists(run + ".pt") else []
        os.makedirs(run, exist_ok=True)
        log = run + ".log"
        if common.run_script("run.py", "--preset", "cpu", "--seed", seed, *flags.replace("+", " ").split(),
                             "--eval_every", 937, "--save_every", 250, "--checkpoint", run + ".pt", "--out_dir", run,
                             "--n_samples", 10, *args.sampler_flags.split(), "--no_progress", "--data_dir",
                             args.data_dir, *resume, log=log, show=lambda line: line.startswith(SHOWN), check=False):
            print("".join(open(log).readlines()[-3:]), end="")
            raise common.UserError(f"trial {trial}: run.py failed (the end of {log} is above)")
        sessions = checkpoint.load(run + ".pt")["sessions"]  # the ledger
        judge(args, run + ".pt", run, tmp)
        return dict(trial=trial, train_seconds=round(sum(s["seconds"] for s in sessions)), sessions=sessions,
                    steps_per_second=sessions[-1]["steps_per_s"])
    paths = {t: os.path.join(args.dir, run_name(t)) for t in trials}
    common.run_rows([(p + ".json", p + ".pt", t) for t, p in paths.items()], measure,
                    skip=lambda trial: lost_already(args, trial))


def trial_paths(args):
    """(NAME-sSEED, checkpoint path, row) of every judged trial, in --trials order."""
    names = [run_name(t) for t in args.trials]
    return [(r, os.path.join(args.dir, r + ".pt"), common.read_json(os.path.join(args.dir, r + ".json")))
            for r in names if os.path.exists(os.path.join(args.dir, r + ".json"))]


def judge_emas(args):
    """Judge every stored extra EMA of each judged trial (evaluate.py --ema D) like its main EMA: DIR/ema/."""
    rows = [(os.path.join(args.dir, "ema", f"{run}-ema{key}.json"), pt, (pt, key, f"{run}-ema{key}"))
            for run, pt, _ in trial_paths(args) for key in checkpoint.load(pt).get("ema_extra", {})]
    common.run_rows(rows, lambda row, tmp: judge(args, row[0], os.path.join(args.dir, "ema", row[2]), tmp,
                                                 "--ema", row[1]))


def ema_table(args):
    """Each trial's main EMA beside its extra ones, and the EMA rule's verdict for each extra decay."""
    by_decay = {}
    for run, pt, main in trial_paths(args):
        ckpt = checkpoint.load(pt)
        for key in ckpt.get("ema_extra", {}):
            path = os.path.join(args.dir, "ema", f"{run}-ema{key}.json")
            if os.path.exists(path):
                by_decay.setdefault(key, []).append((run, ckpt["train_config"]["ema_decay"], main,
                                                     common.read_json(path)))
    if by_decay:
        print("\nEMA lengths: each trial's main EMA, then a stored one (the same sampling seed: paired)")
        print(f"{'trial':<16}{'EMA':>8}{'FID':>8}{common.QUALITY}")
    for key, rows in by_decay.items():
        for run, ema, main, row in rows:
            print(f"{run:<16}{ema:>8}{common.quality(main)}\n{'':<16}{key:>8}{common.quality(row)}")
        print(rules.ema_verdict(key, [(main, row) for _, _, main, row in rows]))


def cpus(row):
    """The CPUs that trained a trial (its ledger's, in order), or the judge's CPU for a row without one."""
    return " + ".join(dict.fromkeys(s["cpu"] for s in row.get("sessions", []))) or row["cpu"]


def verdicts(args):
    """Each option's verdict by the rule (rules.option_verdict), one line each."""
    base, lines = rows_of(args, args.baseline), []
    for name in dict.fromkeys(t.split(":", 1)[0] for t in args.trials if t.split(":", 1)[0] != args.baseline):
        done = rows_of(args, name)
        verdict = rules.option_verdict(done, base, len(seeds_of(args, name)))
        if verdict == "undecided":
            lines.append(f"{name}: undecided (no rows yet)")
        elif verdict == "loses":
            lines.append(f"{name}: loses (a seed does not beat every {args.baseline} seed on FID and precision)")
        else:
            change = common.mean_std([r["fid"] for r in done])[0] / common.mean_std([b["fid"] for b in base])[0] - 1
            lines.append(f"{name}: {'wins' if verdict == 'wins' else 'leads, seeds still to run'} "
                         f"(mean feature-FID {change:+.0%} against {args.baseline}'s)")
    return lines


def table(args):
    """Print every trial in DIR with its --eval_every curve (from its checkpoint) and each option's verdict;
    plot the curves."""
    out = args.dir
    rows = common.read_rows(out, "trials")
    print(f"n = {rows[0]['n_samples']}, sampler {rows[0]['sampler']}, feature-FID floor {rows[0]['fid_floor']:.2f}")
    print(f"{'trial':<34}{'FID':>8}{common.QUALITY}{'train s':>9}  CPU")
    with common.figure(os.path.join(out, "recipe_curves.png"), (7, 4), dpi=120, xlabel="optimizer step",
                       ylabel="feature-FID of --eval_every's digits", yscale="log",
                       title="recipe trials: quality while training") as ax:
        for r in rows:
            print(f"{r['trial']:<34}{common.quality(r)}{r['train_seconds']:>9}  {cpus(r)}")
            name, seed = r["trial"].split(":")[:2]
            ckpt = checkpoint.load(os.path.join(out, f"{name}-s{seed}.pt"))
            curve = {e["step"]: e["fid"] for e in ckpt.get("eval_history", [])}  # a step evaluated twice: the last
            steps = sorted(curve)
            print(f"{'':<4}--eval_every curve (feature-FID, n = {ckpt['train_config'].get('eval_samples', '?')}): "
                  + ", ".join(f"{curve[s]:.2f} at {s}" for s in steps))
            ax.plot(steps, [curve[s] for s in steps], "o-" if seed == "0" else "s--", label=f"{name} seed {seed}")
    lines = verdicts(args)
    if lines:
        print("\n".join([f"the rule's verdicts (baseline {args.baseline}):", *lines]))


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("n", nargs="?", type=int, default=1000, help="samples to judge each trial with (default 1000)")
    p.add_argument("--trials", nargs="+", default=TRIALS, metavar="NAME:SEED:FLAGS",
                   help="FLAGS with + for spaces (default: " + " ".join(TRIALS) + ")")
    p.add_argument("--sampler_flags", default=" ".join(samplers.as_flags(samplers.RECOMMENDED)),
                   help="the judge's sampler flags, also run.py's for its final digits (default: the recommended "
                        "sampler, samplers.RECOMMENDED: %(default)s)")
    p.add_argument("--data_dir", default="./data", help="the MNIST folder")
    p.add_argument("--dir", default="trials", help="the output folder")
    p.add_argument("--baseline", help="the trials every option is compared with (default: the first trial's name)")
    args = p.parse_args(argv)
    if any(t.count(":") < 2 for t in args.trials):
        raise common.UserError(f"--trials are NAME:SEED:FLAGS, got {' '.join(args.trials)}")
    args.baseline = args.baseline or args.trials[0].split(":", 1)[0]
    if not seeds_of(args, args.baseline):
        raise common.UserError(f"--baseline {args.baseline} is none of the --trials' names")
    os.makedirs(args.dir, exist_ok=True)
    run_trials(args, args.trials)
    judge_emas(args)
    table(args)
    ema_table(args)


if __name__ == "__main__":
    common.run_main(main)
