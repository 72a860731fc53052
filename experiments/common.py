"""What the experiments share: the repo's modules on sys.path (so that `python experiments/x.py` runs from
the repo root), the provenance stamp of a result, a result row made once, running a repo script as a
subprocess, the machine's description, and the small pieces of their command lines, tables and plots."""
import contextlib
import glob
import json
import os
import subprocess
import sys
import threading

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
    the commit, the CPU and the torch version. Returns it."""
    if checkpoint_path is not None:
        record["checkpoint_sha256"] = sha256_file(checkpoint_path)
    record.update(commit=git_commit(), cpu=cpu_model(), torch=torch.__version__)
    return record


def make_row(path, measure, checkpoint_path=None):
    """The result row PATH (a .json), unless it exists (then it is skipped, and said so): measure(tmp) writes
    evaluate.py's metrics to the file tmp and returns a dict of more fields (or anything falsy: none); the row
    is both, stamped."""
    if os.path.exists(path):
        return print(f"{os.path.basename(path)[:-5]}: done before, skipped")
    more = measure(path + ".tmp") or {}
    write_json(path, stamp({**read_json(path + ".tmp"), **more}, checkpoint_path))
    os.remove(path + ".tmp")


def run_script(script, *args, log=None, show=None, stop_after=None, check=True, cwd=None):
    """Run `python SCRIPT ARGS` (a .py SCRIPT is the repo's; else, say, "-m") and return its exit code.
    Its output (stderr too) is appended to the file `log` if one is given, and printed line by line where
    show(line) is true (default: every line when there is no log). After `stop_after` seconds it gets
    SIGTERM (run.py then saves its checkpoint and stops). With `check`, a failure is a UserError."""
    path = os.path.join(ROOT, script) if script.endswith(".py") else script
    p = subprocess.Popen([sys.executable, "-u", path, *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=cwd)
    timer = threading.Timer(stop_after, p.terminate) if stop_after is not None else None
    if timer:
        timer.start()
    with open(log, "a") if log else contextlib.nullcontext() as f:
        for line in p.stdout:
            if f:
                f.write(line)
            if show(line) if show else not log:
                print(line, end="", flush=True)
    rc = p.wait()
    if timer:
        timer.cancel()
    if check and rc != 0:
        where = f"in {log}" if log else "above"
        raise UserError(f"{script} {' '.join(map(str, args))} exited {rc} (its output is {where})")
    return rc


def machine():
    """Print the GPU (by nvidia-smi, where there is one), the versions of torch, torchvision and CUDA, the commit."""
    import torchvision

    with contextlib.suppress(OSError):
        subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"])
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"torch {torch.__version__} torchvision {torchvision.__version__} cuda {torch.version.cuda} {gpu}; "
          f"commit {stamp({})['commit']}", flush=True)


def without_config(line):
    """For run_script's show: run.py's lines without its printed configuration (indented lines and braces)."""
    return not line.startswith((" ", "{", "}"))


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


def split_list(text, flag, kind=int, what="integers"):
    """'1,2' -> [1, 2] (each a `kind`), or a one-line UserError naming the flag."""
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated {what}, got {text!r}") from None


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
    """A matplotlib figure whose axes the block draws on; then its axes set (`axes`), a grid and a legend,
    saved to path."""
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
    print(f"wrote {path}")
