"""What the experiments share: the repo's modules on sys.path (so that `python experiments/x.py` runs from
the repo root), the provenance stamp of a result, and running a repo script as a subprocess."""
import contextlib
import json
import os
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from checkpoint import sha256_file  # noqa: E402
from utils import UserError, atomic_write, cpu_model  # noqa: E402


def stamp(record, checkpoint_path=None):
    """Add to the dict `record` what it was measured with: the checkpoint's SHA-256 (if a path is given),
    the commit, the CPU and the torch version. Returns it."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if checkpoint_path is not None:
        record["checkpoint_sha256"] = sha256_file(checkpoint_path)
    record.update(commit=commit.stdout.strip() or None, cpu=cpu_model(), torch=torch.__version__)
    return record


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


def without_config(line):
    """For run_script's show: run.py's lines without its printed configuration (indented lines and braces)."""
    return not line.startswith((" ", "{", "}"))


def evaluate(*args, **kw):
    """evaluate.py with these flags (run_script's keywords)."""
    return run_script("evaluate.py", *args, **kw)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, record):
    """Write a dict as indented JSON, atomically (a row file exists only when complete)."""
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()))
