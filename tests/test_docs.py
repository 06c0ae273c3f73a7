"""README.md and every page of docs/ run as a reader would run them (tests/docs_pages.py says how a
page is read): each page in a scratch folder of its own, its blocks in order, the output each
command prints compared with what the page shows. The slow pages are marked `slow`: CI runs them,
`pytest -m 'not slow'` leaves them out locally."""

from __future__ import annotations

import re

from pathlib import Path

import click
import pytest

from docs_pages import (REPO, PageRunner, Worker, compare, plan, read_blocks, reader_environment,
                        scratch_folder)
from plgk_cli.cli import main

# In the order a reader meets them: the README, then its Documentation list.
README = REPO / "README.md"
LISTED = re.findall(r"^- \[docs/([\w-]+\.md)\]", README.read_text(), re.M)
PAGES = [README] + [REPO / "docs" / name for name in LISTED]
SLOW_PAGES = {"tutorial-lm.md", "cli.md", "hf.md", "recorder.md"}  # 10 s to 90 s each on 2 cores


@pytest.fixture(scope="module")
def worker():
    w = Worker(reader_environment())
    yield w
    w.close()


def test_every_docs_page_is_listed_in_the_readme():
    on_disk = {p.name for p in (REPO / "docs").glob("*.md")}
    assert on_disk == set(LISTED), f"not in README's Documentation list: {sorted(on_disk - set(LISTED))}"


@pytest.mark.parametrize("page", [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in SLOW_PAGES else [])
                                  for p in PAGES])
def test_page_runs_as_shown(page: Path, worker, tmp_path):
    steps = plan(read_blocks(page))
    shows_output = any(c.expected and c.expected.strip() for s in steps for c in s.commands) \
        or any(s.expected for s in steps)
    runner = PageRunner(page, scratch_folder(tmp_path / "repo"), worker)
    assert runner.rtol is not None or not shows_output, \
        f"{page.name} shows output but states no tolerance ('checked ... to within X %')"
    for step in steps:
        failure = runner.run(step)
        assert failure is None, "\n\n".join([failure, *runner.mismatches])
    assert not runner.mismatches, "\n\n".join(runner.mismatches)


# -- the options the docs name are the commands' options -----------------------------------------

def command_options(name: str) -> set[str]:
    command = main.commands[name]
    return {o for p in command.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts} \
        | {"-h", "--help"}


COMMAND_USE = re.compile(r"\bplgk\s+(?:--debug\s+)?(train|replay|check|inspect)\b(?P<rest>[^`\n]*)")


def documented_uses(text: str):
    """(command, option) for every `--option` written after `plgk COMMAND` on one line of a page."""
    for m in COMMAND_USE.finditer(text):
        rest = re.split(r"\bplgk\s", m["rest"])[0]
        for option in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
            yield m[1], option


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_option_written_after_a_command_is_one_of_its_options(page):
    wrong = sorted({f"plgk {c} {o}" for c, o in documented_uses(page.read_text()) if o not in command_options(c)})
    assert not wrong, f"{page.name} names options the commands do not have: {wrong}"


def test_cli_reference_tables_list_exactly_each_commands_options():
    """docs/cli.md: the table under `## plgk COMMAND` names every option of the command, and no other."""
    text = (REPO / "docs" / "cli.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    for name in main.commands:
        section = next(s for s in sections if s.startswith(f"plgk {name}"))
        section = section.split("\n### ")[0]
        rows = set(re.findall(r"^\| `(--[\w-]+)", section, re.M))
        rows |= {o for alias in re.findall(r"^\| `--[\w-]+[^|]*?(?:`, `(--[\w-]+))", section, re.M) for o in [alias]}
        options = {o for p in main.commands[name].params if isinstance(p, click.Option) for o in p.opts[:1]}
        assert rows >= options, f"cli.md's plgk {name} table lacks {sorted(options - rows)}"
        assert rows <= command_options(name), f"cli.md's plgk {name} table has {sorted(rows - command_options(name))}"


def test_readme_use_block_runs_what_make_demo_runs():
    """The README shows the demo's commands and what they print: they must be the Makefile's."""
    import subprocess

    made = subprocess.run(["make", "-n", "-s", "demo", "PLGK=plgk"], cwd=REPO, capture_output=True, text=True).stdout
    make_commands = [line.strip() for line in made.splitlines() if line.strip().startswith("plgk ")]
    use = next(s for s in plan(read_blocks(README)) if s.kind == "console")
    assert [c.text.partition("#")[0].strip() for c in use.commands] == make_commands


# -- the comparison itself can fail ---------------------------------------------------------------

SHOWN = """\
loss: MRE 1.978e-03  LC 0.999983
worst update error ~7.8e-08 over 115 steps; wrote runs/demo.h5
run ... cnn on digits
...
  rank  train_index label    influence
     1          212     9  -1.3929e-01
"""


@pytest.mark.parametrize("printed, agrees", [
    (SHOWN.replace("...", "fb01a420e5b6 ").replace("\n...\n", "\nextra line\nanother\n"), True),
    (SHOWN.replace("1.978e-03", "1.981e-03").replace("~7.8e-08", "2.1e-07"), True),   # within 1 %, and 10x
    (SHOWN.replace("1.978e-03", "2.100e-03"), False),                                  # 6 % off
    (SHOWN.replace("~7.8e-08", "9.9e-06"), False),                                     # two orders
    (SHOWN.replace("212", "213"), False),                                               # integers exact
    (SHOWN.replace("wrote", "kept"), False),                                            # words
    (SHOWN.replace("-1.3929e-01", "1.3929e-01"), False),                                # sign
    (SHOWN.rsplit("\n", 2)[0], False),                                                  # a line missing
])
def test_compare_fails_on_what_a_reader_would_call_different(printed, agrees):
    printed = printed.replace("~", "")
    assert (compare(SHOWN, printed, rtol=0.01) is None) is agrees


def test_reading_a_page(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Checked by the docs test to within 2 %.\n\n```console\n$ plgk --version\nplgk, version 0.1.0\n"
                    "$ plgk train --bogus  # exit 2\n```\n\n```python\nprint(1 + 1)\n```\n\n```\n2\n```\n\n"
                    "<!-- docs-test: file=a.toml -->\n```toml\nx = 1\n```\n")
    steps = plan(read_blocks(page, root=tmp_path))
    assert [s.kind for s in steps] == ["console", "python", "file"]
    assert [c.exit_code for c in steps[0].commands] == [0, 2]
    assert steps[1].expected == "2"
    assert steps[2].block.directive["file"] == "a.toml"
