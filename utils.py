"""Small shared helpers: user-facing errors, device choice, atomic file writes, pictures."""
import argparse
import os
import platform
import subprocess
import sys
import tempfile

import torch

AMP_MODES = ("none", "bf16", "fp16")  # --amp: autocast off, bfloat16, float16 (with a GradScaler when training)


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file). Scripts print it on one line and exit 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line on stderr (and exit code 2), not the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_main(main):
    """Call main(); turn a UserError into a one-line message and exit code 2."""
    try:
        main()
    except UserError as e:
        rank = rank_world()[0]  # under torchrun: which process says it
        # One write of the whole line: under torchrun several processes share stderr, and a message
        # written in pieces (print writes the text, then the newline) can interleave with another's.
        sys.stderr.write(f"{'' if rank == 0 else f'[rank {rank}] '}error: {e}\n")
        sys.stderr.flush()
        sys.exit(2)


def rank_world():
    """(rank, world size) of this process: torchrun's RANK and WORLD_SIZE, (0, 1) without torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def cpu_model():
    """The CPU's model name as /proc/cpuinfo (Linux; with its family and model numbers, which tell apart
    machines sold under one name) or platform reports it, with the core count."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return f"{name}, {os.cpu_count()} cores"


def git_commit():
    """The repo's short commit hash (what a result was made by), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def resolve_device(name):
    """'auto' -> cuda, then mps, then cpu. Explicit names are checked, not silently replaced."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if not {"cpu": True, "cuda": torch.cuda.is_available(), "mps": has_mps}[device.type]:
        raise UserError(f"--device {name} asked for, but {device.type.upper()} is not available here; "
                        f"use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "cuda":  # TF32 matmuls and convolutions for fp32 work on Ampere and newer
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def setup_distributed(device_name):
    """Under torchrun (WORLD_SIZE > 1): join the process group, nccl on CUDA (process i of a node
    takes cuda:LOCAL_RANK) or gloo on the CPU. Returns (device, rank, world size); outside torchrun
    (device, 0, 1) with the device from resolve_device."""
    rank, world = rank_world()
    if world == 1:
        return resolve_device(device_name), 0, 1
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name not in ("auto", "cpu", "cuda"):
        raise UserError(f"under torchrun use --device auto, cuda or cpu (each process takes cuda:LOCAL_RANK), "
                        f"not {device_name!r}")
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    device = resolve_device("cuda" if use_cuda else "cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) on this "
                            f"node; lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return device, rank, world


def check_amp(device, amp):
    """Refuse, with a clear message, a mixed-precision mode (one of AMP_MODES) the device cannot run."""
    if amp == "none":
        return
    if device.type == "mps":
        raise UserError(f"--amp {amp} is not supported on MPS here; use --amp none")
    if device.type == "cpu" and amp == "fp16":
        raise UserError("--amp fp16 needs CUDA (float16 autocast with a GradScaler); on the CPU use --amp none or bf16")
    if device.type == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use --amp fp16")


def autocast(device, amp, cache=True):
    """The autocast context for `amp` (a no-op for "none"); cache=False inside a captured CUDA graph."""
    if amp == "none":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16, cache_enabled=cache)


def check_writable(path):
    """Fail early (before any training) if `path` cannot be written: a read-only or full folder, a file
    where a folder should be, or a folder at `path`. Missing folders are fine: atomic_write creates them."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"cannot write {path}: it is a folder")
    existing = folder
    while not os.path.isdir(existing):  # the nearest folder that exists, where the missing ones would go
        if os.path.exists(existing):
            raise UserError(f"cannot write {path}: {existing} is a file, not a folder")
        existing = os.path.dirname(existing)
    try:  # really try: os.access says yes to root on read-only mounts
        with tempfile.TemporaryFile(dir=existing) as f:
            f.write(b"x")
            f.flush()
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror} in {existing}") from None


def atomic_write(path, write_fn):
    """Write a file so that readers only ever see the old or the complete new version.

    write_fn(f) writes to an open binary file in the same folder; it is flushed and fsynced,
    then renamed over `path` with os.replace (atomic on POSIX and Windows). Missing folders are created.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def image_grid(images01, nrow, pad=2):
    """images01: (N, 1, H, W) floats in [0, 1] -> (H', W') grid, `nrow` images per row, white `pad` px borders
    (torchvision's make_grid(padding=2, pad_value=1), without importing torchvision)."""
    x = images01.float().cpu()[:, 0]
    n, h, w = x.shape
    cols = min(nrow, n)
    grid = torch.ones((n + cols - 1) // cols * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad):(r + 1) * (h + pad), pad + c * (w + pad):(c + 1) * (w + pad)] = x[i]
    return grid


IMAGE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


def image_format(path):
    """The picture format a file name asks for (by its extension), or a UserError for one that
    save_image_grid cannot write. Scripts call it on their arguments before any work starts."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_FORMATS:
        raise UserError(f"cannot write a picture as {path!r}: use a .png, .jpg or .jpeg file name")
    return IMAGE_FORMATS[ext]


def save_image_grid(images01, path, nrow=5):
    """images01: (N, 1, H, W) floats in [0, 1] -> a JPEG/PNG grid with `nrow` images per row."""
    from PIL import Image

    fmt = image_format(path)
    arr = (image_grid(images01, nrow) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    img = Image.fromarray(arr, mode="L")
    img = img.resize((img.width * 4, img.height * 4), Image.NEAREST)  # 28 px digits are too small to see
    atomic_write(path, lambda f: img.save(f, format=fmt, quality=95))


def plot_loss(loss_history, path, smooth=100, evals=None):
    """Per-step training loss (light) and its running mean over `smooth` steps, log scale; with `evals`
    (the --eval_every curve: dicts with step, fid, confidence) a second panel beside it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = torch.as_tensor(loss_history, dtype=torch.float64)
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(12 if evals else 7, 4), squeeze=False)
    ax = axes[0, 0]
    steps = torch.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.5, label="per step")
    if len(losses) >= smooth:
        kernel = torch.ones(smooth, dtype=torch.float64) / smooth
        ma = torch.nn.functional.conv1d(losses[None, None], kernel[None, None])[0, 0]
        ax.plot(steps[smooth - 1:], ma, color="tab:blue", label=f"mean of {smooth} steps")
    ax.set(yscale="log", xlabel="optimizer step", title="DDPM training loss",
           ylabel="training loss\n(MSE on eps or v; weighted if --loss_weight)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if evals:
        _plot_evals(axes[0, 1], evals)
    fig.tight_layout()
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=120))
    plt.close(fig)


def _plot_evals(ax, evals):
    steps = [e["step"] for e in evals]
    ax.plot(steps, [e["fid"] for e in evals], "o-", color="tab:red", label="feature-FID")
    ax.set(yscale="log", xlabel="optimizer step", title="quality while training (--eval_every)")
    ax.set_ylabel("feature-FID (EMA weights)", color="tab:red")
    from matplotlib.ticker import FuncFormatter
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 40, not 4 x 10^1: the curve rarely spans a decade
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.grid(True, which="both", alpha=0.3)
    twin = ax.twinx()
    twin.plot(steps, [e["confidence"] for e in evals], "s--", color="tab:green", label="confident")
    twin.set_ylabel("confident share", color="tab:green")
    twin.set_ylim(0, 1)
