"""The docs as tests: README.md and docs/*.md read as a sequence of runnable blocks, run in a scratch
folder in the order a reader meets them, their output compared with what the page shows.

How a page is read:

- ```console: lines starting `$ ` are commands (a trailing `\\` continues one); the lines after a
  command, up to the next, are what it prints. A command ending in `# exit N` must exit N, any
  other must exit 0. A plain block whose lines start with `$ ` reads the same.
- ```sh / ```bash: a script, run whole with `bash -e`; an adjacent plain block is its output.
- ```python: a snippet, run on its own (a fresh namespace: it must import what it uses); an adjacent
  plain block is what it prints. A block of `>>>` lines runs as the interactive interpreter does.
- ```toml (or any block) after `<!-- docs-test: file=NAME -->`: written to NAME, not run.
- a plain block starting with `plgk `: a synopsis, not run; its options, like every option written
  after a command on the page, are checked by tests/test_docs.py.
- any other plain block (a formula, a file tree, a table of output not produced here) is prose.

Directives, in an HTML comment just before a block: `file=NAME`, `parse-only` (each command is
checked by parsing its arguments, not run: for work that cannot run inside the suite, say why after
` -- `), `no-compare` (run, output not compared: say why), `rtol=X` (this block's tolerance).

Comparing output: the text of each line must match, whitespace runs aside; `...` alone on a line
stands for any lines, `...` inside a line for any text; numbers are compared as numbers. Integers
must be equal; other numbers agree to the page's tolerance, stated on the page as "checked ... to
within X %" (or a block's rtol), or to one unit in their last printed digit, whichever is larger; a
number written `~X` is rounding noise and only its order of magnitude (within 10×) is checked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
DIRECTIVE = re.compile(r"<!--\s*docs-test:(?P<body>.*?)-->", re.S)
TOLERANCE = re.compile(r"check(?:s|ed)\b[^.]*?within (?P<pct>\d+(?:\.\d+)?) ?%")
NUMBER = r"~?[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?"
NUMBER_TOKEN = re.compile(rf"(?<![\w.]){NUMBER}(?![\w])")
PROGRESS_BAR = re.compile(r"^\s*[\w -]*:\s*\d+%\|[^|]*\|[^\]]*\]?")   # a tqdm bar, up to its closing ]
SHELL_SYNTAX = re.compile(r"[|&;<>()$`*?\[\]{}!]|^\w+=")
SHELL_LANGS = {"sh", "bash", "shell"}


@dataclass(frozen=True)
class Block:
    page: str
    line: int                      # 1-based line of the opening fence
    lang: str
    text: str
    directive: dict
    adjacent: bool                 # only blank lines (and a directive) since the previous block

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def parse_directive(body: str) -> dict:
    spec, _, reason = body.partition(" -- ")
    out: dict = {"reason": reason.strip()}
    for token in shlex.split(spec):
        key, eq, value = token.partition("=")
        out[key] = value if eq else True
    return out


def read_blocks(path: Path, root: Path = REPO) -> list[Block]:
    page = str(path.relative_to(root))
    lines = path.read_text().splitlines()
    blocks, i, since_block, directive = [], 0, [], {}
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            since_block.append(lines[i])
            i += 1
            continue
        indent, start, body = len(m["indent"]), i, []
        i += 1
        while i < len(lines) and not (FENCE.match(lines[i]) and not FENCE.match(lines[i])["lang"]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1                                             # the closing fence
        between = "\n".join(since_block)
        found = list(DIRECTIVE.finditer(between))
        directive = parse_directive(found[-1]["body"]) if found and not between[found[-1].end():].strip() else {}
        adjacent = bool(blocks) and not DIRECTIVE.sub("", between).strip()
        blocks.append(Block(page, start + 1, m["lang"], "\n".join(body), directive, adjacent))
        since_block = []
    return blocks


def page_tolerance(path: Path) -> float | None:
    m = TOLERANCE.search(" ".join(path.read_text().split()))
    return None if m is None else float(m["pct"]) / 100


# -- comparing output ------------------------------------------------------------------------------

def clean_output(text: str) -> list[str]:
    """Lines as a reader's terminal would leave them: progress bars dropped, trailing spaces cut."""
    lines = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        segment = raw.split("\r")[-1]
        bar = PROGRESS_BAR.match(segment)
        if bar:                             # what follows a bar on its line (an error) is kept
            segment = segment[bar.end():]
        if (bar or segment != raw) and not segment.strip():
            continue
        lines.append(segment.rstrip())
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return lines


def line_pattern(expected: str) -> tuple[re.Pattern, list[str]]:
    """A regex for one expected line: its numbers become groups, whitespace runs flexible."""
    parts, numbers, pos = [], [], 0
    for m in NUMBER_TOKEN.finditer(expected):
        parts.append(expected[pos:m.start()])
        numbers.append(m.group())
        pos = m.end()
    parts.append(expected[pos:])
    regex = ""
    for k, text in enumerate(parts):
        for j, piece in enumerate(text.split("...")):
            if j:
                regex += ".*?"
            regex += r"\s*".join(re.escape(w) for w in piece.split())
            if piece[:1].isspace() or piece[-1:].isspace():
                regex = regex if regex.endswith(r"\s*") else regex + r"\s*"
        if k < len(numbers):
            regex += rf"\s*({NUMBER.replace('~?', '')})\s*"
    return re.compile(rf"\s*{regex}\s*"), numbers


def last_digit_unit(token: str) -> float:
    mantissa, _, exponent = token.lower().lstrip("~").partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def number_agrees(expected: str, actual: str, rtol: float) -> bool:
    a = float(actual)
    if expected.startswith("~"):
        e = float(expected[1:])
        return e == a == 0 or (e * a > 0 and 0.1 <= a / e <= 10)
    e = float(expected)
    if re.fullmatch(r"[-+]?\d+", expected):
        return a == e
    return abs(a - e) <= max(rtol * abs(e), last_digit_unit(expected) * 1.0000001)


def line_mismatch(expected: str, actual: str, rtol: float) -> str | None:
    pattern, numbers = line_pattern(expected)
    m = pattern.fullmatch(actual)
    if m is None:
        return "text differs"
    for k, (e, a) in enumerate(zip(numbers, m.groups())):
        if not number_agrees(e, a, rtol):
            return f"number {k + 1}: shown {e}, got {a}"
    return None


def compare(expected_text: str, actual_text: str, rtol: float) -> str | None:
    """None if the output matches the page; otherwise where and how it differs."""
    expected = clean_output(expected_text)
    actual = clean_output(actual_text)
    failures: list[tuple[int, str]] = []

    def match(i: int, j: int) -> bool:
        if i == len(expected):
            return j == len(actual)
        if expected[i].strip() == "...":
            return any(match(i + 1, k) for k in range(j, len(actual) + 1))
        if j == len(actual):
            failures.append((i, "output ended"))
            return False
        why = line_mismatch(expected[i], actual[j], rtol)
        if why:
            failures.append((i, f"{why}\n    shown: {expected[i]}\n    got:   {actual[j]}"))
            return False
        return match(i + 1, j + 1)

    if match(0, 0):
        return None
    i, why = max(failures, key=lambda f: f[0]) if failures else (len(expected), "more output than shown")
    return f"line {i + 1} of the shown output: {why}\n--- got:\n" + "\n".join(actual)


# -- what a page asks to run -----------------------------------------------------------------------

@dataclass
class Command:
    text: str                      # one logical command line, continuations joined
    expected: str | None           # the output shown after it (console blocks), else None
    exit_code: int = 0


@dataclass
class Step:
    block: Block
    kind: str                      # console | script | python | repl | file
    commands: list[Command] = field(default_factory=list)
    expected: str | None = None    # output shown for a script or snippet
    rtol: float | None = None


def console_commands(text: str) -> list[Command]:
    commands: list[Command] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            if commands:
                commands[-1].expected = (commands[-1].expected or "") + line + "\n"
            i += 1
            continue
        command = line[2:]
        while command.endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command[:-1] + " " + lines[i].strip()
        m = re.search(r"#\s*exit (\d+)\b", command)
        commands.append(Command(command, "", int(m[1]) if m else 0))
        i += 1
    return commands


def script_commands(text: str) -> list[Command]:
    """A script's logical lines (for parse-only blocks); heredocs are not split."""
    commands, pending = [], ""
    for line in text.splitlines():
        pending += line.rstrip("\\").strip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            if pending.strip() and not pending.lstrip().startswith("#"):
                m = re.search(r"#\s*exit (\d+)\b", pending)
                commands.append(Command(pending.strip(), None, int(m[1]) if m else 0))
            pending = ""
    return commands


def plan(blocks: list[Block]) -> list[Step]:
    steps: list[Step] = []
    k = 0
    while k < len(blocks):
        b = blocks[k]
        following = blocks[k + 1] if k + 1 < len(blocks) else None
        output_follows = following is not None and following.adjacent and following.lang in ("", "text") \
            and not following.text.startswith("$ ") and "file" not in following.directive
        rtol = float(b.directive["rtol"]) if "rtol" in b.directive else None
        if "file" in b.directive:
            steps.append(Step(b, "file"))
        elif b.lang == "console" or (b.lang in ("", "text") and b.text.startswith("$ ")):
            steps.append(Step(b, "console", console_commands(b.text), rtol=rtol))
        elif b.lang in SHELL_LANGS:
            steps.append(Step(b, "script", script_commands(b.text), following.text if output_follows else None, rtol))
            k += output_follows
        elif b.lang == "python" and b.text.lstrip().startswith(">>>"):
            steps.append(Step(b, "repl", rtol=rtol))
        elif b.lang == "python":
            steps.append(Step(b, "python", expected=following.text if output_follows else None, rtol=rtol))
            k += output_follows
        k += 1
    return steps


def repl_pairs(text: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for line in text.splitlines():
        if line.startswith(">>> "):
            pairs.append((line[4:] + "\n", ""))
        elif line.startswith("... ") or line == "...":
            pairs[-1] = (pairs[-1][0] + line[4:] + "\n", pairs[-1][1])
        else:
            pairs[-1] = (pairs[-1][0], pairs[-1][1] + line + "\n")
    return pairs


# -- running ---------------------------------------------------------------------------------------

def scratch_folder(root: Path) -> Path:
    """What a reader has at the repository's root: configs, scripts, tests, the Makefile, and the
    environment as `.venv` (the interpreter running the tests)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("configs", "scripts", "tests"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    (root / ".venv").symlink_to(Path(sys.prefix))
    return root


class Worker:
    """The long-lived process of tests/docs_worker.py."""

    def __init__(self, env: dict):
        self.process = subprocess.Popen([sys.executable, str(REPO / "tests" / "docs_worker.py")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)

    def request(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the docs worker died (exit {self.process.wait()}) on {request}")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def reader_environment() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name in ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # a reader's fresh shell has none
        env.pop(name, None)
    env["COLUMNS"] = "120"
    return env


class PageRunner:
    """Runs one page's steps in its own scratch folder. `run` returns what stops the page (a
    command that failed, a snippet that raised) or None; output that differs from the page is
    collected in `mismatches` and the page goes on, so one run lists every stale output."""

    def __init__(self, path: Path, scratch: Path, worker: Worker, timeout: float = 600):
        self.path, self.scratch, self.worker, self.timeout = path, scratch, worker, timeout
        self.env = reader_environment()
        self.rtol = page_tolerance(path)
        self.mismatches: list[str] = []

    def tolerance(self, step: Step) -> float:
        return step.rtol if step.rtol is not None else (self.rtol or 0.0)

    def bash(self, script: str) -> tuple[int, str]:
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=self.scratch, env=self.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=self.timeout)
        # a command killed by signal N: what a shell reports for it, 128 + N
        return (128 - done.returncode if done.returncode < 0 else done.returncode), done.stdout

    def command(self, text: str, parse_only: bool) -> tuple[int, str]:
        words = shlex.split(text, comments=True)
        if parse_only:
            return self.parse_only(words, text)
        unquoted = re.sub(r"'[^']*'|\"[^\"]*\"", "", text).partition("#")[0]
        if words and words[0] == "plgk" and not SHELL_SYNTAX.search(unquoted):
            reply = self.worker.request(kind="plgk", argv=words[1:], cwd=str(self.scratch))
            return (1, reply["output"] + reply["error"]) if reply["error"] else (reply["exit"], reply["output"])
        return self.bash(text)

    def parse_only(self, words: list[str], text: str) -> tuple[int, str]:
        """Check that a command would start: its options exist and parse."""
        env = {}
        while words and re.fullmatch(r"\w+=.*", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if not words:
            return 0, ""
        program = words[0]
        if program == "plgk" or (program == "torchrun" and "plgk_cli" in words):
            argv = words[1:] if program == "plgk" else words[words.index("plgk_cli") + 1:]
            reply = self.worker.request(kind="plgk", argv=argv, cwd=str(self.scratch), parse_only=True, env=env)
            return (1, reply["error"]) if reply["error"] else (reply["exit"], reply["output"])
        if program.endswith("python") and len(words) > 1 and words[1].endswith(".py"):
            reply = self.worker.request(kind="script", path=words[1], argv=words[2:], cwd=str(self.scratch))
            return (1, reply["error"]) if reply["error"] else (reply["exit"], reply["output"])
        if program == "make":
            return self.bash(f"make -n {shlex.join(words[1:])} >/dev/null")
        if program == "pip" and "-e" in words:
            import tomllib

            extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
            spec = words[words.index("-e") + 1]
            wanted = set(re.findall(r"\[(.*)\]", spec)[0].split(",")) if "[" in spec else set()
            missing = wanted - extras
            return (1, f"no extra {sorted(missing)} in pyproject.toml") if missing else (0, "")
        if program.endswith("python") and words[1:3] == ["-m", "pytest"]:
            files = [w for w in words[3:] if not w.startswith("-")]
            missing = [f for f in files if not (self.scratch / f.split("::")[0]).exists()]
            return (1, f"no test file {missing}") if missing else (0, "")
        return 1, f"parse-only does not know how to check {program!r}: {text}"

    def run(self, step: Step) -> str | None:
        b = step.block
        parse_only = bool(b.directive.get("parse-only"))
        compare_output = not b.directive.get("no-compare")
        if step.kind == "file":
            target = self.scratch / b.directive["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(b.text + "\n")
            return None
        if step.kind == "console" or (step.kind == "script" and parse_only):
            for c in step.commands:
                code, output = self.command(c.text, parse_only)
                if code != c.exit_code:
                    return f"{b.where}: `{c.text}` exited {code}, the page expects {c.exit_code}\n{output}"
                if compare_output and c.expected is not None and not parse_only:
                    why = compare(c.expected, output, self.tolerance(step))
                    if why:
                        self.mismatches.append(f"{b.where}: `{c.text}`: {why}")
            return None
        if step.kind == "script":
            code, output = self.bash(b.text)
            if code:
                return f"{b.where}: the script exited {code}\n{output}"
        elif step.kind == "python":
            reply = self.worker.request(kind="python", code=b.text, name=b.where, cwd=str(self.scratch))
            if reply["error"]:
                return f"{b.where}: the snippet raised\n{reply['output']}{reply['error']}"
            output = reply["output"]
        elif step.kind == "repl":
            pairs = repl_pairs(b.text)
            reply = self.worker.request(kind="repl", sources=[s for s, _ in pairs], name=b.where,
                                        cwd=str(self.scratch))
            if reply["error"]:
                return f"{b.where}: the snippet raised\n{reply['error']}"
            for (source, expected), output in zip(pairs, reply["outputs"]):
                why = compare(expected, output, self.tolerance(step)) if compare_output else None
                if why:
                    self.mismatches.append(f"{b.where}: `{source.strip()}`: {why}")
            return None
        if compare_output and step.expected is not None:
            why = compare(step.expected, output, self.tolerance(step))
            if why:
                self.mismatches.append(f"{b.where}: {why}")
        return None
