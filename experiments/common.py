"""What the experiments share: the repo's modules on sys.path (so that `python experiments/x.py` runs from
the repo root), the provenance stamp of a result, the sweep runner (`run_rows`), running a repo script as a
subprocess, the machine's description, the device's clock, random images standing in for MNIST, and the
small pieces of their command lines, tables and plots. Lists on a command line are parsed by config.int_list
and config.float_list (argparse types), the repo's one list parser."""
import contextlib
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The batch the judged experiments sample at: about 25% faster on 2 CPU cores than 250 (docs/sampling.md),
# and the same digits at any batch (per-sample noise streams)
SAMPLE_BATCH = 100
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from checkpoint import sha256_file  # noqa: E402
from utils import OneLineArgumentParser, UserError, atomic_write, cpu_model, git_commit, run_main  # noqa: E402, F401


def stamp(record, checkpoint_path=None):
    """Add to the dict `record` what it was measured with: the checkpoint's SHA-256 (if a path is given),
    the commit, the CPU and the torch version, each unless the record has it already (samples scored here
    keep the CPU and torch that drew them, from their .npz). Returns it. Every result of experiments/ is
    stamped here."""
    if checkpoint_path is not None:
        record["checkpoint_sha256"] = sha256_file(checkpoint_path)
    for key, value in (("commit", git_commit()), ("cpu", cpu_model()), ("torch", torch.__version__)):
        record.setdefault(key, value)
    return record


def run_rows(rows, measure, done=os.path.exists, skip=None):
    """The sweep runner: each row of `rows`, (path of its .json, checkpoint path or None, row), in order.
    A row is skipped when done(path) (said so), or when skip(row) gives a reason (printed; asked only when
    the row's turn comes, so it may read the rows done before it). Else measure(row, tmp) writes evaluate.py's
    metrics to the file tmp and returns a dict of more fields (or None), and the row's JSON is both, stamped
    with the checkpoint, written atomically (a row file exists only when complete, so an interrupted sweep
    resumes where it stopped). Returns the paths of the rows measured now."""
    measured = []
    for path, checkpoint_path, row in rows:
        if done(path):
            print(f"{os.path.basename(path)[:-5]}: done before, skipped")
            continue
        why = skip(row) if skip else None
        if why:
            print(why)
            continue
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        more = measure(row, tmp) or {}
        write_json(path, stamp({**read_json(tmp), **more}, checkpoint_path))
        os.remove(tmp)
        measured.append(path)
    return measured


def run_script(script, *args, log=None, show=None, check=True, cwd=None):
    """Run `python SCRIPT ARGS` (a .py SCRIPT is the repo's; else, say, "-m") and return its exit code.
    Its output (stderr too) is appended to the file `log` if one is given, and printed line by line where
    show(line) is true (default: every line when there is no log). With `check`, a failure is a UserError."""
    path = os.path.join(ROOT, script) if script.endswith(".py") else script
    p = subprocess.Popen([sys.executable, "-u", path, *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=cwd)
    with open(log, "a") if log else contextlib.nullcontext() as f:
        for line in p.stdout:
            if f:
                f.write(line)
            if show(line) if show else not log:
                print(line, end="", flush=True)
    rc = p.wait()
    if check and rc != 0:
        where = f"in {log}" if log else "above"
        raise UserError(f"{script} {' '.join(map(str, args))} exited {rc} (its output is {where})")
    return rc


def machine():
    """Print the GPU (by nvidia-smi, where there is one), the versions of torch, torchvision and CUDA, the
    CPU and the commit."""
    from importlib.metadata import version  # torchvision's, without the seconds of importing it

    with contextlib.suppress(OSError):
        subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"])
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    s = stamp({})
    print(f"torch {s['torch']} torchvision {version('torchvision')} cuda {torch.version.cuda} {gpu}; "
          f"{s['cpu']}; commit {s['commit']}", flush=True)


def sync(device):
    """Wait for the device's queued work (a no-op on a CPU): what a timing needs before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def random_images(n=60000):
    """Random uint8 (n, 28, 28) images, MNIST's shape: the stand-in where only the speed is measured (it
    does not depend on the pixels)."""
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)


def evaluate(*args, in_process=False, **kw):
    """evaluate.py with these flags (run_script's keywords); in_process: its main() in this process instead
    (one torch import and one CUDA start for many calls, which on a GPU cost more than the sampling)."""
    if in_process:
        import evaluate as script

        script.main([str(a) for a in args])
        return 0
    return run_script("evaluate.py", *args, **kw)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, record):
    """Write a dict as indented JSON, atomically (a row file exists only when complete)."""
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()))


def read_rows(folder, what="rows"):
    """Every row (.json) in a folder, by name; none is a UserError."""
    rows = [read_json(f) for f in sorted(glob.glob(os.path.join(folder, "*.json")))]
    if not rows:
        raise UserError(f"no {what} in {folder}")
    return rows


def parser(doc, passes_on=False):
    """The command line of a script whose docstring is `doc`; with passes_on, unknown flags go to evaluate.py."""
    return OneLineArgumentParser(description=doc.split("\n")[0], allow_abbrev=not passes_on,
                                 epilog="other flags go to evaluate.py" if passes_on else None)


def mean_std(values):
    """(mean, standard deviation) of a list of numbers; the deviation of one number is nan."""
    v = torch.tensor(values, dtype=torch.float64)
    return v.mean().item(), (v.std().item() if len(v) > 1 else float("nan"))


def quality(r, fid_width=8):
    """A row's feature-FID, precision, recall and confident share as table cells (QUALITY is their header)."""
    return f"{r['fid']:>{fid_width}.2f}{r['precision']:>7.3f}{r['recall']:>8.3f}{r['confidence']:>7.3f}"


QUALITY = f"{'prec':>7}{'recall':>8}{'conf':>7}"


@contextlib.contextmanager
def figure(path, size, dpi=100, legend=None, **axes):
    """The experiments' one figure helper: a matplotlib figure whose axes the block draws on; then its axes
    set (`axes`), a grid and a legend, saved to path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=size)
    yield ax
    ax.set(**axes)
    ax.legend(fontsize=legend)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    print(f"wrote {path}")
