"""The docs are checked against the code and the results files: every ``python -m ...`` command line that README.md,
docs/*.md and store/FORMAT.md show parses with that command's own parser (its flags included); every figure of the
README's headline table and of docs/performance.md's tables is what ``benchmarks table`` generates from the
results files; docs/architecture.md names every module of the five packages. Each check is shown to fail once on
a page broken on purpose."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "store" / "FORMAT.md"]
PACKAGES = ("prep", "store", "train", "evaluate", "benchmarks")
PLACEHOLDER = re.compile(r"^(\.\.\.|[A-Z][A-Z0-9_]*(\.\.\.)?)$")  # RUN, DIR, N, MM, STAGE, ...


def command_lines(text: str) -> list[str]:
    """Every ``python -m PKG ...`` a page shows for one of this project's packages: inline code spans (which may
    wrap lines) and the lines of fenced code blocks (after ``cd X &&``, before a ``#`` comment)."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" # ")[0].split("  #")[0]
            if (i := line.find("python -m ")) >= 0:
                found.append(line[i:])
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [" ".join(span.split()) for span in re.findall(r"`(python -m [^`]+)`", outside)]
    return [c.strip() for c in found if c.split()[2].split(".")[0] in PACKAGES]


class _Parsed(Exception):
    """Raised by the patched parse_args once a command line has parsed: the command does no work."""


def _argv(tokens: list[str]) -> list[str]:
    """A shown command line's words as argv: optional groups opened ([--ensemble] -> --ensemble), the first of
    alternatives taken (onnx|torchscript -> onnx; [--workers N | --scheduler ADDRESS] -> --workers N)."""
    out, skipping = [], False
    for t in tokens:
        if skipping:  # the other side of an alternative, to the end of its group
            skipping = not t.endswith("]")
            continue
        if t == "|":
            skipping = True
            continue
        t = t.strip("[]")
        if t:
            out.append(t.split("|")[0] if "|" in t else t)
    return out


def _sample(action: argparse.Action, token: str) -> str:
    """A placeholder (RUN, MM, STAGE, ...) replaced by a value the action takes; any other token kept."""
    if not PLACEHOLDER.match(token):
        return token
    for candidate in [*(str(c) for c in (action.choices or [])), "1", "1.0", token]:
        try:
            (action.type or str)(candidate)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            continue
        if not action.choices or candidate in map(str, action.choices):
            return candidate
    return token


def _filled(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with each placeholder given a value its option or positional accepts."""
    positionals = [a for a in parser._actions if not a.option_strings]
    out, action = [], None
    for t in argv:
        if t == "..." and action is None:  # "python -m benchmarks ...": the rest of the command, unshown
            continue
        if t.startswith("-"):
            action = parser._option_string_actions.get(t.split("=")[0])
            out.append(t)
            if action is not None and action.nargs == 0:
                action = None
            continue
        if action is None and positionals:
            action = positionals.pop(0)
            out.append(_sample(action, t))
            if action.nargs not in ("+", "*"):
                action = None
            continue
        out.append(_sample(action, t) if action is not None else t)
        if action is not None and action.nargs in (None, 1):
            action = None
    return out


def parse_problem(command: str, monkeypatch) -> str | None:
    """None where ``command`` parses with its package's own ``main`` (its parser as the user meets it, the
    subcommand dispatch included); else what the parser said."""
    tokens = _argv(shlex.split(command))
    package = tokens[2]
    original, known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    def filled(self, args=None, namespace=None):  # subcommands' parsers are called through this one
        return known(self, _filled(self, list(args or [])), namespace)

    def error(self, message):
        raise ValueError(f"{self.prog}: {message}")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", filled)
    monkeypatch.setattr(argparse.ArgumentParser, "error", error)
    try:
        importlib.import_module(f"{package}.cli").main(tokens[3:])
    except _Parsed:
        return None
    except SystemExit as e:  # --help
        return None if e.code in (0, None) else f"exit {e.code}"
    except ValueError as e:
        return str(e)
    finally:
        monkeypatch.undo()
    return "ran without parsing"


def test_every_command_line_shown_parses(monkeypatch):
    problems, seen = [], 0
    for page in PAGES:
        for command in command_lines(page.read_text()):
            seen += 1
            if (problem := parse_problem(command, monkeypatch)) is not None:
                problems.append(f"{page.relative_to(ROOT)}: `{command}`: {problem}")
    assert seen > 40
    assert not problems, "\n".join(problems)


def test_the_command_check_fails_on_a_flag_that_does_not_exist_or_a_bare_command(monkeypatch):
    text = ("Run `python -m evaluate predict --run-dir RUN --source C --out P --fast`, then\n```\n"
            "python -m benchmarks          # every stage\npython -m train --spacing-mm 2\n```\n")
    commands = command_lines(text)
    assert len(commands) == 3
    problems = [parse_problem(c, monkeypatch) for c in commands]
    assert all(problems), problems
    assert any("--fast" in p for p in problems) and any("--spacing-mm" in p for p in problems)
    assert parse_problem("python -m benchmarks loader --out DIR", monkeypatch) is None
    assert parse_problem("python -m benchmarks nnunet --spacing MM", monkeypatch) is None


def architecture_omissions(text: str) -> list[str]:
    """The modules of the five packages (``pkg/name.py``, ``__init__`` and ``__main__`` aside) that
    docs/architecture.md does not name, by file name or path."""
    missing = []
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            if f.name in ("__init__.py", "__main__.py"):
                continue
            rel = f.relative_to(ROOT).as_posix()
            if f.name not in text and rel not in text and f.relative_to(ROOT / pkg).as_posix() not in text:
                missing.append(rel)
    return missing


def test_architecture_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert architecture_omissions(text) == []
    assert architecture_omissions(text.replace("readers_bench.py", "readers.py")) == ["benchmarks/readers_bench.py"]


def _between(text: str, start: str, end: str) -> str:
    return text[text.index(start) + len(start): text.index(end)].strip()


def test_the_performance_tables_are_the_results_files():
    from benchmarks.table import END, GPU_END, GPU_START, START, render

    page = (ROOT / "docs" / "performance.md").read_text()
    results = ROOT / "benchmarks" / "results"
    assert _between(page, START, END) == render(results).strip()
    assert _between(page, GPU_START, GPU_END) == render(results / "gpu").strip()
    # a page whose figure was typed over fails
    assert _between(page.replace("| 1.85 |", "| 1.58 |"), START, END) != render(results).strip()


def test_the_readme_headline_and_demo_tables_are_the_results_files(tmp_path):
    from benchmarks.table import DEMO_END, DEMO_START, HEADLINE_END, HEADLINE_START, demo_table, headline

    readme = (ROOT / "README.md").read_text()
    results = ROOT / "benchmarks" / "results"
    assert _between(readme, HEADLINE_START, HEADLINE_END) == headline(results).strip()
    assert _between(readme, DEMO_START, DEMO_END) == demo_table(results).strip()
    # a figure changed in a results file changes the table, so a stale README fails
    import json
    import shutil

    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    loader = json.loads((copy / "loader.json").read_text())
    loader["variants"]["ram+aug"]["samples_per_s"] *= 2
    (copy / "loader.json").write_text(json.dumps(loader))
    assert headline(copy).strip() != _between(readme, HEADLINE_START, HEADLINE_END)
