"""The checkpoint format, in one place: what a checkpoint holds, how it is written and read, and
how a model is rebuilt from it. No other module calls torch.save or torch.load.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts (so that
torch.load(weights_only=True) reads it and no pickled code can run):

    format          FORMAT ("ddpm-mnist/1")
    model_args      UNet(**model_args) rebuilds the network
    diffusion_args  GaussianDiffusion(**diffusion_args) rebuilds the schedule
    model           the raw weights (state dict); in an exported checkpoint the EMA weights
    ema             the EMA weights (training checkpoints; sampling uses them by default), of decay
                    train_config["ema_decay"]
    ema_extra       {"0.999": state dict, ...}: the EMAs of --ema_decays, one per decay, keyed by
                    ema_key(decay) (training checkpoints; {} without --ema_decays, absent in older files)
    weights         "ema" in an exported checkpoint: `model` holds the EMA weights
    ema_decay       in an exported checkpoint: the decay of the EMA in `model` (absent in older files:
                    train_config["ema_decay"]'s)
    train_config    the TrainConfig of the run, as a dict; meta: e.g. {"preset": "cpu"}
    optimizer, scaler, rng, step, epoch, steps_per_epoch, total_steps, device_type, loss_history
                    what --resume needs (training checkpoints only)
    sessions        the ledger of the sessions that trained the run (kept by export): per session its
                    cpu, device, processes, torch, commit, from_step, to_step, seconds (wall, from the
                    start of its training loop) and eval_seconds (absent in older files)

Kinds: a training checkpoint can be resumed (it has the optimizer and random-number state); an
exported one (export.py) holds only one EMA's weights, the arguments and the loss history. A bare
UNet state dict is accepted too, with the paper's default arguments.
"""
import hashlib
import os
import random

import numpy as np
import torch

from diffusion import GaussianDiffusion
from model import UNet
from utils import UserError, atomic_write, check_writable

FORMAT = "ddpm-mnist/1"
KNOWN_FORMATS = (FORMAT,)  # a later format adds its name here and keeps reading these


# ---- safe file I/O -------------------------------------------------------------------------------
def save(path, obj):
    """Atomically write obj (tensors and plain data) to path: readers see the old or the new file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def check_publish_target(path, overwrite):
    """A published file and its .sha256 replace nothing that exists unless `overwrite` (--overwrite)."""
    for p in (path, path + ".sha256"):
        if os.path.exists(p) and not overwrite:
            raise UserError(f"{p} exists; choose another --out, or add --overwrite to replace it")
        check_writable(p)


def sha256_file(path):
    """The SHA-256 of a file, as hex (what `sha256sum` prints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_published(path, obj):
    """save(), then a .sha256 beside it ("<hex>  NAME", the format `sha256sum -c` reads).
    Returns (the number of bytes written, the hex digest)."""
    save(path, obj)
    digest = sha256_file(path)
    atomic_write(path + ".sha256", lambda f: f.write(f"{digest}  {os.path.basename(path)}\n".encode()))
    return os.path.getsize(path), digest


def load_file(path, map_location="cpu", missing=None):
    """torch.load with weights_only=True (tensors and plain data only: no pickled code runs),
    every failure turned into a one-line UserError (`missing`: the message for a missing file)."""
    if not os.path.exists(path):
        raise UserError(missing or f"{path} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure here is the file's fault
        if "unsupported global" in str(e).lower():  # a pickled class or function: code could run
            raise UserError(f"{path} holds pickled Python objects, not only tensors; refusing to load it "
                            f"(it could run code). Only load checkpoints you trust") from None
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {msg}") from None


def load(path, map_location="cpu", missing=None):
    """Read a DDPM checkpoint: a dict with at least model_args, diffusion_args and model.
    A bare UNet state dict is given the paper's default arguments. An unknown format is refused."""
    ckpt = load_file(path, map_location, missing or f"checkpoint {path} does not exist; train one with "
                     "'python run.py' or pass --checkpoint PATH")
    if isinstance(ckpt, dict) and "model" in ckpt and "model_args" in ckpt:
        fmt = ckpt.get("format", FORMAT)  # files written before the field existed are format 1
        if fmt not in KNOWN_FORMATS:
            raise UserError(f"{path} has checkpoint format {fmt!r}, which this code does not know (it reads "
                            f"{', '.join(KNOWN_FORMATS)}); update the repo or re-export the checkpoint")
        return ckpt
    if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        return {"model_args": UNet().model_args, "diffusion_args": GaussianDiffusion().args, "model": ckpt}
    raise UserError(f"{path} is not a DDPM checkpoint (no model weights and arguments found)")


# ---- what a checkpoint is ------------------------------------------------------------------------
def is_exported(ckpt):
    """True for a published checkpoint: `model` holds the EMA weights, nothing else is there."""
    return ckpt.get("weights") == "ema"


def is_resumable(ckpt):
    """True if --resume can continue it: it has the optimizer and random-number state."""
    return not is_exported(ckpt) and all(k in ckpt for k in ("optimizer", "rng", "step", "train_config"))


def is_unfinished(ckpt):
    """True for a resumable run that stopped before its last step (interrupted or killed)."""
    return is_resumable(ckpt) and "total_steps" in ckpt and ckpt["step"] < ckpt["total_steps"]


def weights_kind(ckpt, use_ema=True):
    """Which weights build_model(ckpt, use_ema) loads: "EMA" or "raw"."""
    if is_exported(ckpt):
        if not use_ema:
            raise UserError("this checkpoint was exported with the EMA weights only; drop --no_ema "
                            "(the raw weights are in the training checkpoint it came from)")
        return "EMA"
    return "EMA" if use_ema and ckpt.get("ema") is not None else "raw"


def ema_key(decay):
    """The key of an --ema_decays average in a checkpoint's ema_extra: 0.999 -> "0.999"."""
    return str(float(decay))


def held_emas(ckpt):
    """{decay: state dict} of every EMA a checkpoint holds, the main one first (its decay None if unknown)."""
    main = (ckpt.get("train_config") or {}).get("ema_decay")
    if is_exported(ckpt):
        return {ckpt.get("ema_decay", main): ckpt["model"]}
    held = {} if ckpt.get("ema") is None else {main: ckpt["ema"]}
    return {**held, **{float(k): v for k, v in (ckpt.get("ema_extra") or {}).items()}}


def ema_weights(ckpt, decay=None):
    """The EMA state dict of a training or an exported checkpoint: the main one, or (decay) the stored
    average of that decay (--ema), refused in one line that lists the ones it holds if there is none."""
    if decay is None:
        if is_exported(ckpt):
            return ckpt["model"]
        if ckpt.get("ema") is None:
            raise UserError("this checkpoint has no EMA weights")
        return ckpt["ema"]
    held = held_emas(ckpt)
    if float(decay) not in held:
        names = ", ".join(f"{d if d is not None else 'unknown'}{' (the main one)' if i == 0 and len(held) > 1 else ''}"
                          for i, d in enumerate(held))
        if is_exported(ckpt):
            has = f"this exported checkpoint holds only the EMA of decay {names}"
        elif held:
            has = f"this checkpoint holds the EMAs of decays {names} (train with --ema_decays to store more)"
        else:
            has = "this checkpoint holds no EMA weights"
        raise UserError(f"--ema {decay}: no EMA of that decay here; {has}")
    return held[float(decay)]


# ---- building a model from a checkpoint ----------------------------------------------------------
def load_weights(model, state_dict, source):
    """load_state_dict that names the mismatching keys and shapes in a one-line UserError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    parts = [f"{name} ({len(items)}): " + ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")
             for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("shape mismatches", shapes)) if items]
    if parts:
        raise UserError(f"{source} does not match the model architecture: " + "; ".join(parts))
    model.load_state_dict(state_dict)


def check_finite(state_dict, source):
    """Refuse weights with NaN or inf (a diverged run, a corrupt file): they sample garbage."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{source} has weights that are not finite (NaN or inf) in {len(bad)} tensor(s), first "
                        f"{bad[0]}: the run diverged or the file is corrupt; use an earlier checkpoint or retrain")


def build_model(ckpt, use_ema=True, device="cpu", source="the checkpoint", ema=None):
    """(UNet in eval mode, GaussianDiffusion) rebuilt from a checkpoint, with its EMA weights
    unless use_ema is False (then the raw weights; an exported checkpoint has only EMA); ema: the
    decay of the stored average to load (ema_weights), None for the main one.
    Weights that are not all finite are refused."""
    try:
        model = UNet(**ckpt["model_args"])
        diffusion = GaussianDiffusion(**ckpt["diffusion_args"])
    except (TypeError, ValueError) as e:
        raise UserError(f"checkpoint arguments are invalid: {e}") from None
    use = ema is not None or weights_kind(ckpt, use_ema) == "EMA"  # a decay asked for is there, or refused
    weights = ema_weights(ckpt, ema) if use else ckpt["model"]
    load_weights(model, weights, source)
    check_finite(weights, source)
    return model.to(device).eval(), diffusion


EXPORTED_KEYS = ("model_args", "diffusion_args", "train_config", "meta", "step", "epoch", "steps_per_epoch",
                 "total_steps", "device_type", "loss_history", "eval_history", "sessions")


def training_time(ckpt):
    """One line from the checkpoint's ledger: the training's wall time in all and where it ran, or None
    for a file without one."""
    sessions = ckpt.get("sessions")
    if not sessions:
        return None
    seconds = sum(s["seconds"] for s in sessions)
    where = "; ".join(f"steps {s['from_step']:,}-{s['to_step']:,} on {s['cpu']} ({s['device']}"
                      + (f", {s['processes']} processes" if s["processes"] > 1 else "") + f", {s['seconds']:,.0f} s)"
                      for s in sessions)
    return (f"trained {seconds:,.0f} s ({seconds / 3600:.2f} h) in {len(sessions)} session"
            f"{'s' if len(sessions) > 1 else ''}: {where}")


EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export(ckpt, dtype="float32", ema=None):
    """The published form of a checkpoint: the EMA weights under "model" (weights="ema"; ema: the decay
    of a stored average, None for the main EMA; "ema_decay" records which), in fp32 unless `dtype` says
    otherwise (float16 halves the file; meta["weights_dtype"] records it, and loading casts back to the
    model's fp32), the arguments that rebuild the model and the diffusion, the training settings and the
    loss history; no raw weights, optimizer or random-number state (it cannot be resumed)."""
    out = {"format": ckpt.get("format", FORMAT), "weights": "ema",
           "model": {k: v.to(EXPORT_DTYPES[dtype]).contiguous() if v.is_floating_point() else v
                     for k, v in ema_weights(ckpt, ema).items()}}
    out.update({k: ckpt[k] for k in EXPORTED_KEYS if k in ckpt})
    decay = next(iter(held_emas(ckpt))) if ema is None else float(ema)
    if decay is not None:
        out["ema_decay"] = decay
    if dtype != "float32":
        out["meta"] = dict(out.get("meta") or {}, weights_dtype=dtype)
    return out


# ---- random-number state, in a form weights_only accepts -----------------------------------------
def rng_state():
    """The global torch, numpy and Python random states (and CUDA's, where present)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
             "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
