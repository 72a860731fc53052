"""Feature-FID against network evaluations (NFE) for every sampler, from one checkpoint, N samples a row:

    python experiments/sampler_sweep.py [CHECKPOINT] [N] [sweep flags] [extra evaluate.py flags, e.g. --device cuda]

Rows are labelled by a target NFE: each sampler takes the solver steps whose NFE (samplers.SAMPLERS' `nfe`)
is nearest to it, fewer on a tie (edm: two a step and one on the last, so 19 for a target of 20; the
others one a step); each row records the NFE it took. Two sweeps, both from the registry:

The NFE grid (default; docs/sampling.md's table, measured on the linear-schedule checkpoint published
until 8179394: git show 8179394:checkpoints/ddpm_trained.pt > ddpm_linear.pt): each few-step sampler at
its own spacing at --nfe's targets (default 10, 20, 50, 100), the other spacings at 20, seed 0, and the
paper's 1000-step sampler (31-72 minutes for N = 1000 on 2 cores of an AMD EPYC): --no_ddpm skips it,
--ddpm_npz FILE.npz scores 1000-step samples drawn elsewhere (say, on a GPU with evaluate.py
--save_samples) instead.

The selection protocol (--protocol select, then --protocol report), for the stochastic samplers
(--samplers, default ddpm-respaced, ddim with eta 1, dpm++2m-sde, restart and edm):
  select  every setting of the grid at --select_nfe (default 50) on sampling seeds 10, 11, 12
          (--select_seeds): each --eps_scales value (default 1, 1.003, 1.006) times, for edm, each
          --churns value (default 2, 5, 30: gamma = churn / 25 steps = 0.08, 0.2 and the cap sqrt(2) - 1
          at 50 NFE), for ddpm-respaced each of the uniform and logsnr spacings; the other samplers at
          their own spacing. Rows in DIR/select/.
  report  the selection's rows not yet done first (so this one command runs the whole protocol), then
          the rule, fixed before this run: each sampler's setting with the lowest mean FID over the
          selection seeds; at --nfe's targets (default 20, 50, 100) on seeds 0, 1, 2 (--report_seeds),
          each row's mean and spread over the seeds; the 1000-step sampler drawn once, on the first
          report seed (--ddpm_npz FILE.npz scores samples drawn elsewhere instead, with evaluate.py
          --from_samples; --no_ddpm leaves it out); and with --cond CKPT the winner (the lowest mean
          FID of the whole selection) on that class-conditional checkpoint at its --select_nfe steps
          and --guidance_scale (--digits as evaluate.py takes them; NFE doubles under guidance), on
          the report seeds. Rows in DIR/report/.
Rows are judged by evaluate.py --metrics, whose judge is the published checkpoints/mnist_judge.pt unless
an extra --judge says otherwise (the table marks such rows).

Before sampling, each sweep prints its rows (done or to do), their NFE per sample and the NFE left
and its time (at the speed of the rows done so far on this CPU, else at about 4.5 s per NFE per 1000
digits, 2 cores of an AMD EPYC); --plan prints only that. Each row goes to DIR/<row>.json as soon as it
is done, with the checkpoint's SHA-256, the commit, the torch version and the CPU; a row whose file
exists is skipped, so an interrupted sweep resumes where it stopped. Speeds compare only rows timed on
one machine. Then the table of the rows in DIR (the NFE grid also DIR/fid_vs_nfe.png; the report
DIR/report/fid_vs_nfe.png, each sampler's mean FID over the seeds against NFE).
"""
import os
import statistics
from collections import namedtuple

import common  # first: the repo's modules onto sys.path

# isort: split
import config
import rules
import samplers
from utils import UserError

SECONDS_PER_NFE = 4.5  # per 1000 digits: the cosine checkpoint on 2 cores of an AMD EPYC
STOCHASTIC = "ddpm-respaced,ddim,dpm++2m-sde,restart,edm"
# A row: its file DIR/<name>.json; the evaluate.py flags (--from_samples: scored, not drawn); its NFE per
# sample; the checkpoint it samples (None: the sweep's); the fields it adds to evaluate.py's metrics.
Row = namedtuple("Row", "name flags nfe checkpoint record", defaults=(None, None))


def steps_for_nfe(name, nfe):
    """The solver steps of sampler `name` whose NFE is nearest to `nfe` (on a tie, fewer)."""
    s = samplers.SAMPLERS[name]
    return min(range(1, max(nfe, 1) + 1), key=lambda steps: (abs(s.nfe(steps) - nfe), steps))


def rows(nfe, ddpm):
    """[(row name, evaluate.py sampler flags)] of the NFE grid in its order, from the registry."""
    few = [s for s in samplers.SAMPLERS.values() if s.spacing is not None]

    def flags(s, n):
        return ["--sampler", s.name, "--sampling_steps", str(steps_for_nfe(s.name, n))]
    out = [(f"{s.name}-{n}", flags(s, n)) for n in nfe for s in few]
    out += [(f"{s.name}-20-{sp}", [*flags(s, 20), "--spacing", sp])
            for sp in samplers.SPACINGS for s in few if not (sp == s.spacing and 20 in nfe)]
    return out + ([("ddpm-1000", ["--sampler", "ddpm"])] if ddpm else [])


def grid_rows(args, nfe):
    """The NFE grid's Rows."""
    out = []
    for name, flags in rows(nfe, ddpm=bool(args.ddpm_npz) or not args.no_ddpm):
        s = samplers.SAMPLERS[flags[1]]
        n = s.nfe(int(flags[3])) if s.spacing else 1000
        out.append(Row(name, ["--from_samples", args.ddpm_npz] if name == "ddpm-1000" and args.ddpm_npz else flags,
                       0 if name == "ddpm-1000" and args.ddpm_npz else n))
    return out


# ---- the selection protocol ---------------------------------------------------------------------------------
def settings(args):
    """The selection grid: {sampler: [setting]}, a setting being the evaluate.py sampler flags but the steps,
    as a dict {flag: value} (eps_scale last)."""
    out = {}
    for name in args.samplers:
        base = {"ddim": [{"eta": 1.0}], "edm": [{"churn": c} for c in args.churns],
                "ddpm-respaced": [{"spacing": "uniform"}, {"spacing": "logsnr"}]}.get(name, [{}])
        out[name] = [{"sampler": name, **b, "eps_scale": e} for b in base for e in args.eps_scales]
    return out


def label(setting):
    """A setting's name: edm_churn5_eps1.003."""
    return "_".join([setting["sampler"]] + [f"{k.replace('_scale', '')}{v:g}" if isinstance(v, float) else f"{v}"
                                            for k, v in setting.items() if k != "sampler"])


def setting_flags(setting, nfe):
    """evaluate.py's flags for a setting at the steps nearest to `nfe` NFE."""
    flags = ["--sampling_steps", str(steps_for_nfe(setting["sampler"], nfe))]
    return flags + [x for k, v in setting.items() for x in (f"--{k}", str(v))]


def setting_row(name, st, nfe, seed, extra=(), checkpoint=None, record=None):
    """The Row of setting `st` at the steps nearest to `nfe` NFE and sampling seed `seed` (extra: more flags;
    record: more fields, over the setting, seed and target NFE)."""
    steps = steps_for_nfe(st["sampler"], nfe)
    return Row(name, [*setting_flags(st, nfe), *extra, "--seed", str(seed)], samplers.SAMPLERS[st["sampler"]].nfe(
        steps), checkpoint, {"setting": label(st), "seed": seed, "target_nfe": nfe, **(record or {})})


def select_rows(args):
    return [setting_row(f"select/{label(st)}-s{seed}", st, args.select_nfe, seed)
            for sts in settings(args).values() for st in sts for seed in args.select_seeds]


def chosen(args, done):
    """{sampler: (setting, its rows)}: each sampler's setting of the lowest mean FID over the selection seeds
    (rules.lowest_mean_fid); a setting counts once all its seeds are done. None for a sampler with no complete
    setting."""
    groups, out = {}, {}
    for r in done:
        groups.setdefault(r.get("setting"), []).append(r)
    for name, sts in settings(args).items():
        full = {label(st): st for st in sts
                if set(args.select_seeds) <= {r["seed"] for r in groups.get(label(st), [])}}
        pick = rules.lowest_mean_fid({key: groups[key] for key in full})
        out[name] = (full[pick[0]], groups[pick[0]]) if pick else None
    return out


def report_rows(args, picks):
    """The reporting Rows: each sampler's chosen setting at every target NFE and report seed; the 1000-step
    reference from --ddpm_npz; the winner on --cond. A sampler not yet chosen is planned by its NFE alone."""
    out = []
    for n in args.nfe:  # every sampler at one NFE before the next NFE: a partial report compares them
        for name, pick in picks.items():
            st = pick[0] if pick else {"sampler": name}
            out += [setting_row(f"report/{name}-nfe{n}-s{seed}", st, n, seed) for seed in args.report_seeds]
    if args.ddpm_npz:
        out.append(Row("report/ddpm-1000", ["--from_samples", args.ddpm_npz], 0, None, {"setting": "ddpm-1000"}))
    elif not args.no_ddpm:  # drawn once, on the first report seed
        seed = args.report_seeds[0]
        out.append(Row("report/ddpm-1000", ["--sampler", "ddpm", "--seed", str(seed)], 1000, None,
                       {"setting": "ddpm-1000", "seed": seed}))
    if args.cond:
        done = {label(p[0]): p for p in picks.values() if p}
        winner = rules.lowest_mean_fid({key: rows for key, (_, rows) in done.items()})  # of the whole selection
        st = done[winner[0]][0] if len(done) == len(picks) else {"sampler": args.samplers[0]}
        w = args.guidance_scale or 0.0
        label_flags = ["--guidance_scale", str(w)] + (["--digits", args.digits] if args.digits else [])
        for seed in args.report_seeds:
            row = setting_row(f"report/cond-{label(st)}-w{w:g}-s{seed}", st, args.select_nfe, seed, label_flags,
                              args.cond, {"setting": f"cond {label(st)} w {w:g}"})
            out.append(row._replace(nfe=row.nfe * (2 if w else 1)))  # guidance: two network evaluations a step
    return out


def is_select(row):
    return row.name.startswith("select/")


def row_path(args, row):
    """Where a row's result goes (DIR/<name>.json); a row whose file exists is done."""
    return os.path.join(args.dir, row.name + ".json")


def protocol_rows(args):
    """The Rows of --protocol select or report: the report's rows after the selection's rows not yet done, its
    samplers planned by their NFE alone until the selection has chosen their settings."""
    if args.protocol == "select":
        return select_rows(args)
    pending = [r for r in select_rows(args) if not os.path.exists(row_path(args, r))]
    return pending + report_rows(args, chosen(args, rows_in(os.path.join(args.dir, "select"))))


# ---- running and printing ----------------------------------------------------------------------------------
def rows_in(folder):
    return common.read_rows(folder) if os.path.isdir(folder) and os.listdir(folder) else []


def print_plan(args, plan):
    """Each row (done or to do) with its NFE per sample, and the NFE left and its time: at the median seconds
    per NFE of the rows already done on this CPU (their sampling time, pauses included), else SECONDS_PER_NFE."""
    left = [r for r in plan if not os.path.exists(row_path(args, r))]
    for r in plan:
        print(f"  {'to do' if r in left else 'done '}  {r.name:<48} NFE {r.nfe:>4}  {' '.join(r.flags)}")
    cpu = common.cpu_model()
    timed = [1000 * d["sampling_seconds"] / d["nfe"] / d["n_samples"]
             for d in rows_in(os.path.join(args.dir, "select")) + rows_in(os.path.join(args.dir, "report"))
             if d.get("cpu") == cpu and d.get("nfe") and d.get("sampling_seconds")]
    per_nfe, source = ((statistics.median(timed), f"the median of {len(timed)} rows done on this CPU, {cpu}")
                       if timed else (SECONDS_PER_NFE, "2 cores of an AMD EPYC"))
    nfe = sum(r.nfe for r in left)
    hours = nfe * args.n / 1000 * per_nfe / 3600
    print(f"{len(plan)} rows, {len(left)} to do: {sum(r.nfe for r in plan)} NFE per sample in all, {nfe} left = "
          f"{nfe * args.n} network evaluations for N = {args.n}, about {hours:.1f} h at {per_nfe:.1f} s per NFE "
          f"per 1000 digits ({source})", flush=True)


def run(args, extra, plan):
    """The plan's rows through the sweep runner (common.run_rows): each into DIR/<name>.json, stamped with the
    checkpoint it samples; a row whose file exists is skipped."""
    def measure(row, tmp):
        path = row_path(args, row)
        flags = [*row.flags, *extra] if row.flags[0] == "--from_samples" else [
            "--checkpoint", row.checkpoint or args.checkpoint, "--n_samples", args.n, "--bpd_images", 0,
            "--out", path[:-5] + ".png", "--nrow", 25, *row.flags, *extra]
        common.evaluate("--metrics", "--no_progress", "--metrics_out", tmp, *flags, in_process=args.in_process)
        return row.record
    common.run_rows([(row_path(args, r), r.checkpoint or args.checkpoint, r) for r in plan], measure)


def setting_of(r):
    """A row's setting: its own (the protocol's rows), or its sampler and spacing (the NFE grid's)."""
    s = r.get("sampler") or {"sampler": "ddpm"}  # samples scored from an npz without their settings: ddpm-1000
    return r.get("setting") or ("ddpm-1000" if s["sampler"] == "ddpm" else f"{s['sampler']}_{s.get('spacing')}")


def table(rows, picked=(), grid=False):
    """Each setting's (at each target NFE) mean and spread over its seeds, the `picked` settings marked *; for
    the NFE grid, which row is the cheapest within 10% of the 1000-step sampler's FID (rules.fewest_nfe_within)."""
    groups = {}
    for r in rows:
        groups.setdefault((setting_of(r), r.get("target_nfe", r.get("nfe", 1000))), []).append(r)
    floors = sorted({round(r["fid_floor"], 2) for r in rows})  # one per seed: the real subsets follow the seed
    floor = f"{floors[0]:.2f}" if len(floors) == 1 else f"{floors[0]:.2f}-{floors[-1]:.2f} by seed"
    print(f"n = {rows[0]['n_samples']}, feature-FID floor {floor}; the mean over the seeds, "
          f"their std and range; rows at the nearest NFE; * = chosen")
    print(f"{'setting':<36}{'NFE':>5}{'seeds':>6}{'FID':>8}{'std':>7}{'min-max':>16}{common.QUALITY}{'s/100':>7}")
    for (name, _), rs in sorted(groups.items()):
        mean = {k: common.mean_std([r[k] for r in rs])[0] for k in ("fid", "precision", "recall", "confidence")}
        fids, sec = [r["fid"] for r in rs], [100 * r["sampling_seconds"] / r["n_samples"] for r in rs
                                             if r.get("sampling_seconds") is not None]
        print(f"{'*' if name in picked else ' '}{name:<35}{rs[0].get('nfe', 1000):>5}{len(rs):>6}{mean['fid']:>8.2f}"
              f"{common.mean_std(fids)[1]:>7.2f}{f'{min(fids):.2f}-{max(fids):.2f}':>16}{mean['precision']:>7.3f}"
              f"{mean['recall']:>8.3f}{mean['confidence']:>7.3f}{f'{statistics.fmean(sec):.1f}' if sec else '-':>7}")
    local = sorted({setting_of(r) for r in rows if not r.get("judge_published", True)})
    if local:
        print(f"not judged by the published judge: {', '.join(local)}")
    ref = next((r for r in rows if setting_of(r) == "ddpm-1000"), None)
    if grid and ref:
        best = rules.fewest_nfe_within(rows, ref)
        print("fewest NFE within 10% of the 1000-step sampler's FID: " +
              (f"{setting_of(best)}, NFE {best['nfe']}" if best else "none"))


def plot(rows, path):
    """Feature-FID against NFE: each setting's mean over its seeds, the bars their range (the NFE grid: each
    sampler at its own spacing); the 1000-step sampler and the real-data floor as lines."""
    groups = {}
    for r in rows:
        s, name = r.get("sampler") or {}, setting_of(r)
        if name != "ddpm-1000" and not name.startswith("cond ") and (
                "setting" in r or s.get("spacing") == samplers.SAMPLERS[s["sampler"]].spacing):
            groups.setdefault(name, {}).setdefault(r["nfe"], []).append(r["fid"])
    with common.figure(path, (6, 4), legend=7, xscale="log", xlabel="network evaluations per sample (NFE)",
                       ylabel="feature-FID, mean of the seeds (lower is better)") as ax:
        for name, by_nfe in sorted(groups.items()):
            nfe = sorted(by_nfe)
            mean = [statistics.fmean(by_nfe[n]) for n in nfe]
            err = [[m - min(by_nfe[n]) for n, m in zip(nfe, mean)], [max(by_nfe[n]) - m for n, m in zip(nfe, mean)]]
            ax.errorbar(nfe, mean, yerr=err, fmt="o-", capsize=3, label=name)
        for r in rows:
            if setting_of(r) == "ddpm-1000":
                ax.axhline(r["fid"], color="k", lw=0.8, ls=":", label="ddpm, Algorithm 2 (1000 steps, one draw)")
        floors = {r.get("real_subsets_seed"): r["fid_floor"] for r in rows}  # one per seed
        ax.axhline(statistics.fmean(floors.values()), color="gray", lw=0.8, ls="--",
                   label=f"real-data floor, mean of {len(floors)} seeds' (n = {rows[0]['n_samples']})")


def get_args(argv):
    p = common.parser(__doc__, passes_on=True)
    p.add_argument("checkpoint", nargs="?", default="checkpoints/ddpm_trained.pt")
    p.add_argument("n", nargs="?", type=int, default=1000, help="samples per row (default 1000)")
    p.add_argument("--protocol", choices=("select", "report"), help="the selection protocol (default: the NFE grid)")
    p.add_argument("--nfe", type=config.int_list,
                   help="target NFE of the rows (default 10,20,50,100; --protocol report 20,50,100)")
    p.add_argument("--no_ddpm", action="store_true", help="the NFE grid or the report without the 1000-step row")
    p.add_argument("--ddpm_npz", metavar="FILE.npz", help="score the 1000-step row from samples drawn elsewhere")
    p.add_argument("--dir", default="sweep", help="where the rows go (default sweep)")
    p.add_argument("--plan", action="store_true", help="print the rows and their NFE, and stop")
    p.add_argument("--in_process", action="store_true", help="run evaluate.py in this process (one start for all "
                   "rows: for a GPU, where a process's start costs more than a row's sampling)")
    p.add_argument("--samplers", default=STOCHASTIC, help=f"the protocol's samplers (default {STOCHASTIC})")
    p.add_argument("--eps_scales", type=config.float_list, default="1.0,1.003,1.006",
                   help="selection: --eps_scale values (default 1.0,1.003,1.006)")
    p.add_argument("--churns", type=config.float_list, default="2,5,30",
                   help="selection: edm's churn values (default 2,5,30)")
    p.add_argument("--select_nfe", type=int, default=50, help="selection (and --cond): target NFE (default 50)")
    p.add_argument("--select_seeds", type=config.int_list, default="10,11,12",
                   help="selection: sampling seeds (default 10,11,12)")
    p.add_argument("--report_seeds", type=config.int_list, default="0,1,2",
                   help="report: sampling seeds (default 0,1,2)")
    p.add_argument("--cond", metavar="CKPT", help="report: also the winner on this class-conditional checkpoint")
    p.add_argument("--guidance_scale", type=float, help="with --cond: evaluate.py's --guidance_scale")
    p.add_argument("--digits", help="with --cond: evaluate.py's --digits")
    args, extra = p.parse_known_args(argv)
    args.nfe = args.nfe or ((20, 50, 100) if args.protocol else (10, 20, 50, 100))
    args.samplers = [n.strip() for n in args.samplers.split(",") if n.strip()]
    bad = [n for n in args.samplers if n not in samplers.SAMPLERS or samplers.SAMPLERS[n].spacing is None]
    if bad:
        raise UserError(f"--samplers must name few-step samplers of {', '.join(samplers.SAMPLERS)}, got {bad[0]}")
    if (args.guidance_scale is not None or args.digits) and not args.cond:
        raise UserError("--guidance_scale and --digits are for --cond")
    return args, extra


def main(argv=None):
    args, extra = get_args(argv)
    plan = protocol_rows(args) if args.protocol else grid_rows(args, args.nfe)
    print_plan(args, plan)
    if args.plan:
        return
    os.makedirs(args.dir, exist_ok=True)
    run(args, extra, list(filter(is_select, plan)))
    if args.protocol == "report" and any(map(is_select, plan)):
        plan = protocol_rows(args)  # the report's rows with the settings the selection has now chosen
        print_plan(args, plan)
    run(args, extra, [r for r in plan if not is_select(r)])
    if not args.protocol:
        done = common.read_rows(args.dir)
        table(done, grid=True)
        return plot(done, os.path.join(args.dir, "fid_vs_nfe.png"))
    picks = chosen(args, rows_in(os.path.join(args.dir, "select")))
    done = rows_in(os.path.join(args.dir, args.protocol))
    table(done, {label(p[0]) for p in picks.values() if p})
    if args.protocol == "report":
        plot(done, os.path.join(args.dir, "report", "fid_vs_nfe.png"))


if __name__ == "__main__":
    common.run_main(main)
