"""The command lines in README.md and docs/ are ones the CLI accepts: every flag exists, every value parses."""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```")
INLINE = re.compile(r"`([^`]*\bloratune [a-z]+\b[^`]*)`")
COMMAND = re.compile(r"(?:^|\s)(?:python -m |-m )?loratune ([a-z]+)\b(.*)")


def commands():
    import typer

    from loratune.cli import app

    return typer.main.get_command(app).commands


def doc_command_lines() -> list[tuple[str, bool, str, list[str]]]:
    """(where, whole line, subcommand, arguments) of every loratune command line in the docs.

    In code blocks (whole line): the full command, `$ ` prompts and environment assignments stripped. In
    running text: inline code spans, which may describe a choice (`--format merged|gguf [--quant ...]`).
    """
    found = []
    for path in DOCS:
        in_code = False
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            if FENCE.match(line):
                in_code = not in_code
                continue
            spans = [(line.removeprefix("$ "), True)] if in_code else [(span, False) for span in INLINE.findall(line)]
            for text, whole in spans:
                match = COMMAND.search(text)
                if match and match.group(1) in commands():
                    args = shlex.split(match.group(2).split(" | ")[0], comments=True)
                    found.append((where, whole, match.group(1), args))
    return found


def test_the_docs_have_command_lines_to_check():
    lines = doc_command_lines()
    assert len([x for x in lines if x[1]]) >= 20 and {x[2] for x in lines} >= {"train", "predict", "evaluate", "compare", "serve"}


@pytest.mark.parametrize("where, whole, name, args", doc_command_lines(), ids=lambda v: v if isinstance(v, str) and ":" in v else "")
def test_doc_command_line_is_accepted(where, whole, name, args):
    import click

    command = commands()[name]
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    flags = [a.split("=", 1)[0] for a in args if a.startswith("-") and a not in ("-", "-h")]
    assert [f for f in flags if f.strip("[]") not in options] == [], f"{where}: loratune {name} has no such option"
    if whole and not any(c in " ".join(args) for c in "[]|"):  # a concrete command: it must parse as written
        try:
            command.make_context(name, list(args))
        except click.UsageError as exc:
            pytest.fail(f"{where}: loratune {name} {' '.join(args)}: {exc.format_message()}")


def test_the_readmes_list_of_shared_flags_exists():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    paragraph = text[text.index("Every command takes the same flags") :].split("\n\n")[0]
    listed = set(re.findall(r"--[a-z][a-z-]*", paragraph))
    known = {opt for command in commands().values() for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    assert len(listed) >= 15 and listed - known == set()
