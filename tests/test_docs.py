"""The documentation agrees with the code: commands, links and the commands it says to run.

Model-free and fast. What is checked (the conventions are in docs/index.md):

* every `pocketembed` command of the CLI's parser is named in docs/cli.md;
* every relative link of README.md and docs/*.md leads to an existing file, and a
  ``#fragment`` into a Markdown file to one of its headings;
* every docs/ page is listed in docs/index.md;
* the fenced ``bash`` blocks marked ``<!-- checked -->`` run: each line starting with
  ``pocketembed`` exits 0 in an empty data directory, with no daemon;
* the README's first code block holds the two set-up commands `.ci/run` follows.

(That every op of ipc/ops.py is documented in ipc/PROTOCOL.md is tests/test_protocol_doc.py.)
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pocketembed import cli

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CHECKED = "<!-- checked -->"
SETUP = "bash scripts/setup.sh && .venv/bin/pocketembed demo"
TESTS = ".venv/bin/python -m pytest -q"


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code spans removed."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, re.sub(r"`[^`]*`", "", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link's text only
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser: ("models",), ("models", "list"), ...; a positional
    argument with fixed choices (``collections list|drop``) counts as subcommands too."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((*prefix, name))
                out.extend(command_paths(sub, (*prefix, name)))
        elif prefix and not action.option_strings and action.choices and action.dest == "action":
            out.extend((*prefix, str(choice)) for choice in action.choices)
    return out


COMMANDS = sorted(set(command_paths(cli.build_parser())))


def test_the_parser_has_commands():
    assert ("models", "list") in COMMANDS and ("jobs", "pause") in COMMANDS and len(COMMANDS) > 20


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_is_in_cli_md(command):
    text = (DOCS / "cli.md").read_text()
    assert re.search(r"pocketembed " + re.escape(" ".join(command)) + r"(?![\w-])", text), \
        f"docs/cli.md never mentions `pocketembed {' '.join(command)}`"


def links() -> list[tuple[Path, int, str]]:
    return [(page, n, target) for page in PAGES for n, line in prose_lines(page.read_text())
            for target in LINK.findall(line)]


def test_pages_have_links():
    assert len(links()) > 50


@pytest.mark.parametrize("page,line,target", links(),
                         ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_relative_links_lead_somewhere(page, line, target):
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto: ...
        return
    path, _, fragment = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    where = f"{page.relative_to(REPO)}:{line}: {target}"
    assert dest.exists(), f"{where}: no such file"
    assert dest == REPO or REPO in dest.parents, f"{where}: outside the repository"
    if fragment and dest.suffix == ".md":
        assert fragment in anchors(dest), f"{where}: {dest.relative_to(REPO)} has no heading #{fragment}"


def test_every_page_is_in_the_index():
    index = (DOCS / "index.md").read_text()
    for page in DOCS.glob("*.md"):
        if page.name != "index.md":
            assert f"]({page.name})" in index, f"docs/index.md does not list {page.name}"


def checked_commands() -> list[tuple[str, int, str]]:
    """(page, line number, command) of the `pocketembed` lines of every checked block."""
    out = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for n, line in enumerate(lines):
            if line.strip() != CHECKED:
                continue
            fence = n + 1
            assert fence < len(lines) and lines[fence].strip() == "```bash", \
                f"{page.name}:{n + 1}: {CHECKED} must be right before a ```bash block"
            for m in range(fence + 1, len(lines)):
                if lines[m].strip().startswith("```"):
                    break
                if lines[m].strip().startswith("pocketembed"):
                    out.append((str(page.relative_to(REPO)), m + 1, lines[m].strip()))
    return out


def pocketembed_command() -> list[str]:
    """The console script next to this Python (pyproject.toml: pocketembed = pocketembed.cli:main)."""
    script = Path(sys.executable).with_name("pocketembed")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from pocketembed.cli import main; sys.exit(main())"]


def test_some_blocks_are_checked():
    assert len(checked_commands()) >= 5


@pytest.mark.parametrize("page,line,command", checked_commands(),
                         ids=[f"{p}:{n}" for p, n, _ in checked_commands()])
def test_checked_commands_run(page, line, command, tmp_path):
    args = shlex.split(command, comments=True)
    assert args[0] == "pocketembed"
    env = {**os.environ, "POCKETEMBED_HOME": str(tmp_path / "home"), "POCKETEMBED_SOCKET": str(tmp_path / "no-daemon.sock")}
    for name in ("POCKETEMBED_TOKEN", "POCKETEMBED_CONFIG"):
        env.pop(name, None)
    done = subprocess.run([*pocketembed_command(), *args[1:]], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{page}:{line}: `{command}` exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), f"{page}:{line}: `{command}` printed nothing"


def test_readme_starts_with_the_setup_commands():
    text = (REPO / "README.md").read_text()
    block = re.search(r"^```bash\n(.*?)^```", text, re.S | re.M)
    assert block, "README.md has no bash block"
    first = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert first[:2] == [SETUP, TESTS]
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh" in ci and TESTS in ci
