"""One long-lived process that runs the docs' Python snippets and `plgk` commands for
tests/test_docs.py, so that each does not pay torch's import (3 s a process on the 2-core CI
machine; the docs hold about a hundred of them).

Protocol: one JSON request per line on stdin, one JSON reply per line on the file descriptor that
was stdout at start. While a request runs, file descriptors 1 and 2 (and sys.stdout/sys.stderr)
point at one capture file, so output of C code and of child processes is captured too, in order.
Each request runs in a fresh namespace; after it, the torch settings, signal handlers and user
modules (files under the scratch folder) it may have changed are put back, as a new process would
have them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import runpy
import signal
import sys
import tempfile
import traceback


class ParsedOnly(Exception):
    """Raised in place of running a command whose arguments parsed (a parse-only docs block)."""


@contextlib.contextmanager
def captured_output():
    """fd 1 and 2 and sys.stdout/sys.stderr into one file; yields a list that receives its text."""
    text: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(1), os.dup(2)
        saved_streams = sys.stdout, sys.stderr
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        stream = io.TextIOWrapper(os.fdopen(os.dup(sink.fileno()), "wb"), encoding="utf-8",
                                  errors="replace", write_through=True)
        sys.stdout = sys.stderr = stream
        try:
            yield text
        finally:
            stream.flush()
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            stream.close()
            sink.seek(0)
            text.append(sink.read().decode("utf-8", errors="replace"))


@contextlib.contextmanager
def fresh_process_state(cwd: str, on_path: bool):
    """Run in ``cwd``, with it first on sys.path if ``on_path`` (as `python -c` has it; a console
    script has not: plgk adds the working directory itself); undo what a command or snippet
    changed that a new process would not have inherited."""
    import torch

    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    environ = dict(os.environ)
    path = list(sys.path)
    os.chdir(cwd)
    if on_path:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        for s, h in handlers.items():
            signal.signal(s, h)
        os.environ.clear()
        os.environ.update(environ)
        sys.path[:] = path
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None) or ""
            if file.startswith(cwd):
                del sys.modules[name]


def run_python(code: str, name: str) -> str | None:
    """Exec one snippet in a fresh namespace; its traceback (snippet frames only) if it raised."""
    try:
        exec(compile(code, name, "exec"), {"__name__": "__main__"})
    except SystemExit as exc:
        if exc.code not in (None, 0):
            return f"SystemExit: {exc.code}"
    except BaseException:
        return traceback.format_exc()
    return None


def run_repl(sources: list[str], name: str) -> tuple[list[str], str | None]:
    """`>>>` blocks: each statement as the interactive interpreter runs it (values echoed)."""
    namespace = {"__name__": "__main__"}
    outputs = []
    for source in sources:
        with captured_output() as text:
            try:
                exec(compile(source, name, "single"), namespace)
                error = None
            except BaseException:
                error = traceback.format_exc()
        outputs.append(text[0])
        if error:
            return outputs, error
    return outputs, None


def run_plgk(argv: list[str], parse_only: bool) -> int:
    """`plgk ARGS` in this process: click's parsing and the command, or only the parsing."""
    from plgk_cli.cli import main

    saved = {name: cmd.callback for name, cmd in main.commands.items()}
    if parse_only:
        for cmd in main.commands.values():
            cmd.callback = lambda **_: None
    try:
        main.main(args=argv, prog_name="plgk", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        for name, callback in saved.items():
            main.commands[name].callback = callback
    return 0


def parse_script(path: str, argv: list[str]) -> int:
    """A scripts/*.py command line through the script's own argparse parser, without running it."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise ParsedOnly

    argparse.ArgumentParser.parse_args = parse_then_stop
    sys.argv = [path, *argv]
    try:
        runpy.run_path(path, run_name="__main__")
    except ParsedOnly:
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        argparse.ArgumentParser.parse_args = original
    raise RuntimeError(f"{path} ran past its argument parsing without calling parse_args")


def handle(request: dict) -> dict:
    kind, cwd = request["kind"], request["cwd"]
    error = None
    code = 0
    with fresh_process_state(cwd, on_path=kind in ("python", "repl")):
        os.environ.update(request.get("env", {}))
        if kind == "repl":
            outputs, error = run_repl(request["sources"], request["name"])
            return {"outputs": outputs, "error": error}
        with captured_output() as text:
            try:
                if kind == "python":
                    error = run_python(request["code"], request["name"])
                elif kind == "plgk":
                    code = run_plgk(request["argv"], request.get("parse_only", False))
                elif kind == "script":
                    code = parse_script(request["path"], request["argv"])
                else:
                    raise ValueError(f"unknown request kind {kind!r}")
            except BaseException:
                error = traceback.format_exc()
    return {"output": text[0], "exit": code, "error": error}


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    import torch  # noqa: F401  (imported once, before the first request)
    import plgk_cli.cli  # noqa: F401

    for line in sys.stdin:
        reply = handle(json.loads(line))
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
