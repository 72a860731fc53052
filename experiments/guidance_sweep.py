"""Classifier-free guidance against quality: the class-conditional checkpoint at guidance scales
w = 0, 0.5, 1, 2, 4 (digits 0-9 in turn), beside an unconditional checkpoint, N samples each
(same seed, same sampler).

    python experiments/guidance_sweep.py COND_CKPT UNCOND_CKPT [N] [--scales 0,0.5,1,2,4] [evaluate.py flags]

Writes guidance/<setting>.json (--dir; a setting whose file exists is skipped, so a rerun continues where it
stopped) and prints the table. N = 1000 with the default 1000-step sampler: about 7.5 hours on 2 CPU cores
(estimate: about 95 min per guided w, 31 unguided, on an AMD EPYC with AVX-512); with --sampler ddim
--sampling_steps 50, 1,471 s there.
"""
import os

import common  # first: the repo's modules onto sys.path

# isort: split
import config


def table(rows):
    rows.sort(key=lambda r: (r.get("conditional_accuracy") is None, r.get("guidance_scale", 0)))
    r0 = rows[0]
    print(f"N = {r0['n_samples']}, feature-FID floor {r0['fid_floor']:.2f}, sampler {r0['sampler']}, "
          f"device {r0['device']}")
    print(f"{'model':<14}{'w':>5}{'FID':>9}{common.QUALITY}{'cond. acc':>11}{'s / 100':>9}")
    for r in rows:
        cond = r.get("conditional_accuracy")
        name, w, acc = ("conditional", f"{r['guidance_scale']:g}", f"{cond:.3f}") if cond is not None else (
            "unconditional", "-", "-")
        print(f"{name:<14}{w:>5}{common.quality(r, 9)}{acc:>11}{100 * r['sampling_seconds'] / r['n_samples']:>9.1f}")


def main(argv=None):
    p = common.parser(__doc__, passes_on=True)
    p.add_argument("cond", metavar="COND_CKPT")
    p.add_argument("uncond", metavar="UNCOND_CKPT")
    p.add_argument("n", nargs="?", type=int, default=1000, help="samples per setting (default 1000)")
    p.add_argument("--scales", type=config.float_list, default="0,0.5,1,2,4",
                   help="guidance scales w, comma-separated")
    p.add_argument("--dir", default="guidance", help="where the settings go (default guidance)")
    args, extra = p.parse_known_args(argv)
    settings = [(f"cond_w{w:g}", args.cond, ["--digits", "all", "--guidance_scale", w]) for w in args.scales]
    settings.append(("uncond", args.uncond, []))

    def measure(row, tmp):
        name, ckpt, flags = row
        common.evaluate("--checkpoint", ckpt, "--metrics", "--n_samples", args.n, "--bpd_images", 0, "--no_progress",
                        "--nrow", 20, *flags, "--out", os.path.join(args.dir, name + ".png"), "--metrics_out", tmp,
                        *extra)
    common.run_rows([(os.path.join(args.dir, s[0] + ".json"), s[1], s) for s in settings], measure)
    table(common.read_rows(args.dir))


if __name__ == "__main__":
    common.run_main(main)
