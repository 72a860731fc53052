"""Every command the docs quote is one the scripts accept: the script exists and its argument parser takes
the flags and values as written. Nothing is run: each command is parsed in-process, so the test is cheap.

What is read: README.md, docs/*.md and the markdown cells of train_model.ipynb; in them, fenced and indented
code blocks (a line, with its `\\` continuations) and inline code spans whose text starts with
`python X.py`, `python experiments/X.py`, `sh X.sh`, `bash X.sh` (or `bash .ci/run`) or `torchrun ... X.py`.
HTML comments are not read (they are not shown to a reader). Within a line, shell syntax is honoured: quotes,
`#` comments, `;`, `&&`, `|` and redirections split or end a command, and leading `VAR=value` assignments
(`DDPM_CHECKPOINT=ddpm_cond.pt sh load_and_eval.sh`) are dropped.

How a Python command is checked: `utils.OneLineArgumentParser` (the parser of every script) is patched so
that parsing raises a private exception once it has parsed; the script is imported as a module and its
`main(argv)` is called. A parse error is argparse's `error` (exit code 2), and fails the test with the
command and the parser's one line. Scripts that pass unknown flags on to evaluate.py (`parse_known_args`:
the sweeps) have those flags parsed by evaluate.py's parser. `--help` passes. The checks a script makes
after parsing (flag combinations, files) are not made.

Placeholders: a value written as a placeholder (`FILE.npz`, `CKPT`, `N`, `URL`, `<...>`: upper case, or
in angle brackets) is replaced by a value its flag accepts (the first of its choices, else a number or a
word that its type converts); a placeholder where no flag or positional argument takes it (say `FLAGS`)
and `...` are dropped. Shell variables (`$W`, `${W}`) become 1, so `--guidance_scale $W` is checked as a
number. Optional parts in brackets are checked when they hold flags (`[--device cuda]`) or a placeholder
(`[N]`); a bracket of prose (`[evaluate.py flags]`) is dropped.

torchrun: the launcher and its own options (everything before the first `.py`) are stripped; the rest is
the script's command line. Shell scripts: the file must exist, the `VAR=` names set before it must appear
in it, and for load_and_eval.sh the flags after `--` (which it passes to evaluate.py) must parse with
evaluate.py's parser.
"""
import argparse
import glob
import importlib.util
import json
import os
import re
import shlex
import sys

import pytest

import utils
from conftest import ROOT

LAUNCHERS = {"python", "python3", "sh", "bash", "torchrun"}
SPLIT = {";", "&&", "||", "|", "&"}
PLACEHOLDER = re.compile(r"^(<[^>]*>|[A-Z][A-Z0-9_]*(\.[a-z0-9]+)?)$")
ORIGINAL_PARSE = argparse.ArgumentParser.parse_known_args


def doc_sources():
    """(name, markdown text) of every page a reader is shown."""
    pages = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    out = [(os.path.relpath(p, ROOT), open(p, encoding="utf-8").read()) for p in pages]
    nb = json.load(open(os.path.join(ROOT, "train_model.ipynb"), encoding="utf-8"))
    out += [(f"train_model.ipynb cell {i}", "".join(c["source"])) for i, c in enumerate(nb["cells"])
            if c["cell_type"] == "markdown"]
    return out


def code_texts(markdown):
    """(line number, text) of each code line (fenced or indented, continuations joined) and code span."""
    lines = re.sub(r"<!--.*?-->", lambda m: "\n" * m.group().count("\n"), markdown, flags=re.S).splitlines()
    out, fence, i = [], False, 0
    while i < len(lines):
        line, start = lines[i], i + 1
        if line.lstrip().startswith("```"):
            fence = not fence
        elif fence or line.startswith("    "):
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            out.append((start, line.strip()))
        else:
            out += [(start, span.replace("\\|", "|")) for span in re.findall(r"`([^`\n]+)`", line)]
        i += 1
    return out


def shell_commands(text):
    """The commands of one line of shell: a list of words for each, env assignments dropped."""
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split, lex.commenters = True, "#"
    try:
        words = list(lex)
    except ValueError:  # an unclosed quote: not shell
        return []
    commands, current, skip = [], [], False
    for w in words:
        if skip:
            skip = False
        elif w in SPLIT:
            commands.append(current)
            current = []
        elif w and set(w) <= set("<>&"):
            skip = True  # a redirection and its target
        else:
            current.append(w)
    commands.append(current)
    for c in commands:
        while c and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", c[0]) and len(c) > 1:
            c.pop(0)
    return [c for c in commands if c]


def script_of(words):
    """(script path, its arguments, env names set) of a quoted command, or None if it runs no repo script."""
    if words[0] not in LAUNCHERS:
        return None
    rest = words[1:]
    if words[0] == "torchrun":
        k = next((j for j, w in enumerate(rest) if w.endswith(".py")), None)
        return None if k is None else (rest[k], rest[k + 1:])
    if not rest or not (rest[0].endswith((".py", ".sh")) or rest[0] == ".ci/run"):
        return None  # python -m ..., python -c ..., bash -c ...
    return rest[0], rest[1:]


def quoted_commands():
    found = []
    for name, text in doc_sources():
        for line, code in code_texts(text):
            envs = re.findall(r"(?:^|\s)([A-Z_][A-Z0-9_]*)=", code)
            for words in shell_commands(code):
                s = script_of(words)
                if s:
                    found.append(pytest.param(name, line, code, s[0], s[1], envs, id=f"{name}:{line}:{s[0]}"))
    return found


COMMANDS = quoted_commands()


def brackets(args):
    """Optional parts `[...]`: kept when they hold a flag or a placeholder, dropped when they hold prose."""
    out, group = [], None
    for a in args:
        if group is None and a.startswith("[") and a != "[":
            group, a = [], a[1:]
        if group is None:
            out.append(a)
            continue
        end = a.endswith("]")
        group.append(a[:-1] if end else a)
        if end:
            group = [g for g in group if g]
            if group and (group[0].startswith("-") or all(PLACEHOLDER.match(g) for g in group)):
                out += group
            group = None
    return out + (group or [])


def accepted_value(action):
    """A value the argument of `action` accepts, for a placeholder."""
    if action.choices:
        return str(next(iter(action.choices)))
    for v in ("1", "x", str(action.default)):
        try:
            (action.type or str)(v)
            return v
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            continue
    return "1"


def fill(parser, args):
    """The arguments with each placeholder replaced by a value its flag or positional argument accepts."""
    args = [re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "1", a) for a in brackets(args) if a != "..."]
    positionals = [a for a in parser._actions if not a.option_strings]
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and a != "-":
            out.append(a)
            action = None if "=" in a else parser._option_string_actions.get(a)
            if action is None and "=" not in a and parser.allow_abbrev:
                hits = [v for k, v in parser._option_string_actions.items() if k.startswith(a)]
                action = hits[0] if len({id(h) for h in hits}) == 1 else None
            takes = action is not None and action.nargs not in (0,) and not isinstance(
                action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction))
            while takes and i + 1 < len(args) and not args[i + 1].startswith("-"):
                i += 1
                out.append(accepted_value(action) if PLACEHOLDER.match(args[i]) else args[i])
                if action.nargs in (None, "?"):
                    break
        elif PLACEHOLDER.match(a):
            if positionals:
                out.append(accepted_value(positionals.pop(0)))
        else:
            out.append(a)
            if positionals:
                positionals.pop(0)
        i += 1
    return out


def strict_parse(parser, args):
    """Parse like parse_args (unknown arguments are an error), without the patched methods."""
    ns, extra = ORIGINAL_PARSE(parser, fill(parser, args))
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return ns


class Parsed(Exception):
    """Raised by the patched parser once a script's command line has parsed: nothing runs after it."""

    def __init__(self, parser, extra):
        super().__init__()
        self.parser, self.extra = parser, extra


@pytest.fixture
def parse_only(monkeypatch):
    def parse_args(self, args=None, namespace=None):
        strict_parse(self, args)
        raise Parsed(self, [])

    def parse_known_args(self, args=None, namespace=None):
        _, extra = ORIGINAL_PARSE(self, fill(self, args))
        raise Parsed(self, extra)

    monkeypatch.setattr(utils.OneLineArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(utils.OneLineArgumentParser, "parse_known_args", parse_known_args)
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))


_modules = {}


def script_module(path):
    """The script imported as a module (once), not as __main__: its main(argv) is not called on import."""
    if path not in _modules:
        spec = importlib.util.spec_from_file_location("docs_cmd_" + re.sub(r"\W", "_", path), os.path.join(ROOT, path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[path] = module
    return _modules[path]


def check_parses(path, args, capsys, where):
    """Call the script's main(argv) with the patched parser; a parse error fails with the command."""
    main = getattr(script_module(path), "main", None)
    assert main is not None, f"{where}: {path} has no main(argv) to parse a command line with"
    try:
        main(list(args))
    except Parsed as p:
        if p.extra:  # the sweeps pass them to evaluate.py
            check_evaluate_flags(p.extra, capsys, where)
        return
    except SystemExit as e:
        err = capsys.readouterr().err.strip()
        assert e.code in (0, None), f"{where}: the parser of {path} refuses the quoted command: {err}"
        return
    pytest.fail(f"{where}: {path}'s main(argv) returned without parsing with utils.OneLineArgumentParser")


def check_evaluate_flags(flags, capsys, where):
    try:
        strict_parse(script_module("evaluate.py").get_parser(), flags)
    except SystemExit:
        err = capsys.readouterr().err.strip()
        pytest.fail(f"{where}: evaluate.py refuses the flags passed to it, {flags}: {err}")


@pytest.mark.parametrize("name, line, code, path, args, envs", COMMANDS)
def test_quoted_command_parses(name, line, code, path, args, envs, parse_only, capsys, monkeypatch):
    where = f"{name}:{line}: `{code}`"
    if not os.path.exists(os.path.join(ROOT, path)):
        pytest.fail(f"{where}: {path} does not exist")
    if not path.endswith(".py"):
        text = open(os.path.join(ROOT, path)).read()
        assert all(v in text for v in envs), f"{where}: {path} reads none of {envs}"
        if path == "load_and_eval.sh" and "--" in args:
            check_evaluate_flags(args[args.index("--") + 1:], capsys, where)
        return
    monkeypatch.setattr(sys, "argv", [path])
    check_parses(path, args, capsys, where)


def test_the_front_page_commands_are_found():
    """The reader of the docs is not broken: the README's three commands are among those checked."""
    readme = {(p.values[3], " ".join(p.values[4])) for p in COMMANDS if p.values[0] == "README.md"}
    for expected in [("run.py", "--preset cpu"), ("evaluate.py", ""), ("load_and_eval.sh", ""), (".ci/run", "")]:
        assert expected in readme, (expected, sorted(readme))
    assert len(COMMANDS) > 50
