"""The rules that pick winners, each fixed before the runs it judges (docs/experiments.md, docs/sampling.md).
A row is a result dict with at least "fid" and "precision" (evaluate.py --metrics' JSON)."""
import common  # first: the repo's modules onto sys.path

# Feature-FID: the standard deviation of the recommended sampler (dpm++2m-sde at 50 NFE) over sampling seeds
# 0-2 at n = 1000 (docs/sampling.md, "The report"): a gain smaller than this is within the sampling noise.
SPREAD = 1.11


def beats(row, baseline):
    """The recipe rule (experiments/recipe_trials.py): `row` beats every baseline row on feature-FID and on
    precision. An option wins if every seed of it beats every baseline seed."""
    return all(row["fid"] < b["fid"] and row["precision"] > b["precision"] for b in baseline)


def option_verdict(rows, baseline, n_seeds):
    """The recipe rule's verdict on an option from its done rows (of n_seeds seeds): "undecided" (no rows, or
    no baseline), "loses" (a seed does not beat every baseline seed), "wins" (every seed done beats them all),
    else "leads" (seeds still to run). Of several winners, the lowest mean feature-FID is the one to take."""
    if not rows or not baseline:
        return "undecided"
    if not all(beats(r, baseline) for r in rows):
        return "loses"
    return "wins" if len(rows) == n_seeds else "leads"


def ema_verdict(key, pairs, unit="trials"):
    """The EMA rule for the stored decay `key`, as one line: it replaces the main EMA if it beats it on
    feature-FID and on precision in every pair and its mean feature-FID is lower by more than SPREAD.
    pairs: (main EMA's row, that EMA's row) of each trial storing it (unit="seeds": of each sampling seed of
    one run: experiments/headline.py)."""
    change = common.mean_std([r["fid"] - m["fid"] for m, r in pairs])[0]
    better = all(r["fid"] < m["fid"] and r["precision"] > m["precision"] for m, r in pairs)
    verdict = "wins by the rule" if better and -change > SPREAD else \
        f"does not win by the rule (better on FID and precision in every one: {better}; gain above {SPREAD}: " \
        f"{-change > SPREAD})"
    return f"EMA {key}: feature-FID {change:+.2f} against the main EMA, mean of {len(pairs)} {unit}; {verdict}"


def lowest_mean_fid(groups):
    """The selection rule (experiments/sampler_sweep.py --protocol): of {setting: [its rows, one per seed]},
    (setting, mean FID) of the lowest mean feature-FID; None for no groups."""
    means = [(key, common.mean_std([r["fid"] for r in rows])[0]) for key, rows in groups.items()]
    return min(means, key=lambda m: m[1]) if means else None


def fewest_nfe_within(rows, ref, margin=0.1):
    """The NFE grid's summary (experiments/sampler_sweep.py): the row of fewest NFE whose feature-FID is within
    `margin` (10%) of the reference row's (the 1000-step sampler's), or None."""
    ok = [r for r in rows if r is not ref and r["fid"] <= (1 + margin) * ref["fid"]]
    return min(ok, key=lambda r: r.get("nfe", 1000)) if ok else None
