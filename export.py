"""Publish a trained checkpoint: its EMA weights (fp32, or `--dtype float16` for half the size; `--ema D`:
the stored average of decay D, from a run with --ema_decays) with the arguments that rebuild the model,
and a SHA-256 file beside it that load_and_eval.sh checks. The file records the EMA's decay (ema_decay).

    python export.py                                   # ddpm_trained.pt -> ddpm_exported.pt (+ .sha256)
    python export.py --out checkpoints/ddpm_trained.pt --overwrite     # replace the published checkpoint

writes the export and OUT.sha256 ("<hex>  NAME", the format `sha256sum -c` reads). An existing
file (the published checkpoints above all) is never replaced without --overwrite. The exported
file loads in evaluate.py like any checkpoint but cannot be resumed (no optimizer state).
"""
import os

import checkpoint
import config
from utils import OneLineArgumentParser, UserError, run_main


def main(argv=None):
    p = OneLineArgumentParser(description="Export the EMA weights of a checkpoint for publication, with a SHA-256.")
    config.add_checkpoint_flag(p, "training checkpoint to export")
    p.add_argument("--out", default="ddpm_exported.pt",
                   help="exported checkpoint (a .sha256 file goes beside it); an existing file needs --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out and its .sha256 (say, to publish over checkpoints/ddpm_trained.pt)")
    p.add_argument("--dtype", default="float32", choices=sorted(checkpoint.EXPORT_DTYPES),
                   help="precision of the stored weights (float16 halves the file; loading casts back to fp32)")
    config.add_ema_flag(p, "export")
    args = p.parse_args(argv)
    if os.path.abspath(args.out) == os.path.abspath(args.checkpoint):
        raise UserError("--out must differ from --checkpoint (the training checkpoint is kept)")
    checkpoint.check_publish_target(args.out, args.overwrite)
    ckpt = checkpoint.load(args.checkpoint)
    checkpoint.check_finite(checkpoint.ema_weights(ckpt, args.ema), args.checkpoint)
    out = checkpoint.export(ckpt, args.dtype, args.ema)
    if checkpoint.is_unfinished(ckpt):
        print(f"note: {args.checkpoint} is an unfinished run (step {ckpt['step']} of {ckpt['total_steps']})")
    size, digest = checkpoint.save_published(args.out, out)
    decay = f" {out['ema_decay']}" if "ema_decay" in out else ""
    print(f"wrote {args.out} ({size / 1e6:.1f} MB, step {out.get('step', '?')}, EMA{decay} weights in {args.dtype}) "
          f"and {args.out}.sha256 ({digest[:16]}...)")


if __name__ == "__main__":
    run_main(main)
