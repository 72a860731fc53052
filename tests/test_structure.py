"""The repo's structural promises, checked on the source itself: one owner of the checkpoint
format, short functions, a short front page, and checkpoints that say what format they are."""
import ast
import glob
import hashlib
import json
import os
import re
import sys

import pytest
import torch

import checkpoint
from conftest import ROOT, TINY
from model import UNet
from utils import UserError

SOURCES = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "experiments", "*.py")))


def _calls(tree, names):
    """(line, 'torch.save') for each call of torch.save / torch.load in a parsed module."""
    return [(n.lineno, f"torch.{n.func.attr}") for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in names
            and isinstance(n.func.value, ast.Name) and n.func.value.id == "torch"]


def test_only_checkpoint_py_calls_torch_save_or_load():
    found = {}
    for path in SOURCES:
        if os.path.basename(path) != "checkpoint.py":
            found[os.path.basename(path)] = _calls(ast.parse(open(path).read()), ("save", "load"))
    nb = json.load(open(os.path.join(ROOT, "train_model.ipynb")))
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    found["train_model.ipynb"] = _calls(ast.parse(code), ("save", "load"))
    assert not {k: v for k, v in found.items() if v}
    assert _calls(ast.parse(open(os.path.join(ROOT, "checkpoint.py")).read()), ("save", "load"))  # the check sees calls


def test_no_function_longer_than_80_lines():
    """80: the training loop (train._train) reads straight down in one function rather than in methods that share
    state (STYLE.md); everything else stays far shorter."""
    long = [(os.path.basename(path), n.name, n.end_lineno - n.lineno + 1) for path in SOURCES
            for n in ast.walk(ast.parse(open(path).read()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long


def _anchors(path):
    """The #anchors GitHub makes of a markdown page's headings."""
    heads = re.findall(r"^#+ (.+)$", open(path, encoding="utf-8").read(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_front_page_is_at_most_120_lines_and_its_links_resolve():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(text.splitlines()) <= 120
    links = re.findall(r"\]\(<?([^)>]+)>?\)", text)
    for link in links:
        if link.startswith("http"):
            continue
        page, _, anchor = link.partition("#")
        path = os.path.join(ROOT, page) if page else os.path.join(ROOT, "README.md")
        assert os.path.exists(path), link
        assert not anchor or anchor in _anchors(path), link
    pages = {link.partition("#")[0] for link in links}
    docs = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))}
    assert docs <= pages, docs - pages  # every page of docs/ is linked from the front page
    assert {"LICENSE", "CITATION.cff", "pics/generated samples.png"} <= pages
    assert "bash .ci/run" in text and "python run.py --preset cpu" in text


@pytest.mark.parametrize("name", ["ddpm_trained.pt", "ddpm_cond.pt", "ddpm_paper.pt"])
def test_published_checkpoints_load_and_match_their_checksums(name):
    path = os.path.join(ROOT, "checkpoints", name)
    digest, fname = open(path + ".sha256").read().split()
    assert fname == name and digest == hashlib.sha256(open(path, "rb").read()).hexdigest()
    ckpt = checkpoint.load(path)
    assert ckpt["format"] == checkpoint.FORMAT and checkpoint.is_exported(ckpt)
    assert not checkpoint.is_resumable(ckpt) and not checkpoint.is_unfinished(ckpt)  # an export is no run to resume
    # ddpm_paper.pt: 13,089 of the 100-epoch run's 46,800 steps, float16 weights (docs/gpu.md)
    assert (ckpt["step"] < ckpt["total_steps"]) == (name == "ddpm_paper.pt")
    assert ckpt["meta"].get("weights_dtype", "float32") == ("float16" if name == "ddpm_paper.pt" else "float32")
    model, diffusion = checkpoint.build_model(ckpt)
    own = model.state_dict()
    assert all(own[k].dtype == torch.float32 and torch.equal(own[k], v.float()) for k, v in ckpt["model"].items())
    assert diffusion.T == 1000 and (model.num_classes is not None) == (name == "ddpm_cond.pt")


def _tiny_checkpoint(**extra):
    net = UNet(**TINY)
    return {"model_args": net.model_args, "diffusion_args": {"T": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                                                             "var_type": "fixed_large"},
            "model": net.state_dict(), "ema": net.state_dict(), **extra}


def test_unknown_format_is_refused_and_a_file_without_one_is_format_1(tmp_path):
    path = str(tmp_path / "x.pt")
    checkpoint.save(path, _tiny_checkpoint(format="ddpm-mnist/99"))
    with pytest.raises(UserError, match="format 'ddpm-mnist/99', which this code does not know"):
        checkpoint.load(path)
    checkpoint.save(path, _tiny_checkpoint())  # written before the field existed
    assert checkpoint.build_model(checkpoint.load(path))[0].model_args == UNet(**TINY).model_args


def test_predicates_tell_training_exported_and_unfinished_apart():
    run = _tiny_checkpoint(optimizer={}, rng={}, train_config={}, step=5, total_steps=10)
    assert checkpoint.is_resumable(run) and checkpoint.is_unfinished(run)
    assert not checkpoint.is_unfinished(dict(run, step=10))
    pub = checkpoint.export(run)
    assert checkpoint.is_exported(pub) and not checkpoint.is_resumable(pub) and not checkpoint.is_unfinished(pub)
    assert checkpoint.weights_kind(run) == "EMA" and checkpoint.weights_kind(run, use_ema=False) == "raw"
    with pytest.raises(UserError, match="EMA weights only"):
        checkpoint.weights_kind(pub, use_ema=False)


def test_flags_md_run_table_is_up_to_date():
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import flags_doc
    old, new = flags_doc.flags_doc()
    assert old == new, "docs/flags.md's run.py table is out of date: run 'python experiments/flags_doc.py'"
