"""User code named in a run: ``package.module:function`` for model builders, ``py:`` datasets and
tasks, and the one boundary where its exceptions become plgk's.

Everything plgk calls of the user's (importing the module, a builder, a data function, a custom
model's forward) runs inside :func:`user_code`: an exception it raises becomes a UserCodeError
whose one line names the user's file and line, chained (``from``) to the original so that
``plgk --debug`` and a Python caller still see the whole traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import sysconfig
import traceback
from pathlib import Path

from plgk_cli.errors import PlgkError, UserCodeError

_PLGK_DIR = Path(__file__).resolve().parent
# Where no user's code lives: the interpreter's own library and the installed packages (torch,
# numpy, transformers, ...). Their frames are skipped when looking for the user's line.
_LIBRARY_DIRS = tuple(dict.fromkeys(
    Path(p).resolve() for key in ("stdlib", "platstdlib", "purelib", "platlib")
    if (p := sysconfig.get_paths().get(key))))


def _is_user_file(filename: str) -> bool:
    if not filename or filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>
        return False
    path = Path(filename).resolve()
    if {"site-packages", "dist-packages"} & set(path.parts):
        return False
    return not any(path.is_relative_to(d) for d in (_PLGK_DIR, *_LIBRARY_DIRS))


def _shown(filename: str) -> str:
    """A path as the user would write it: relative to the working directory when under it."""
    try:
        return os.path.relpath(filename) if Path(filename).resolve().is_relative_to(Path.cwd()) else filename
    except ValueError:  # another drive (Windows)
        return filename


def user_location(exc: BaseException) -> str | None:
    """``file:line`` of the user's code where ``exc`` arose: for a SyntaxError the line that does
    not parse, else the innermost traceback frame in a file of the user's (not plgk's, not the
    standard library's, not an installed package's); None when no frame is the user's."""
    if isinstance(exc, SyntaxError) and exc.filename and _is_user_file(exc.filename):
        return f"{_shown(exc.filename)}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _is_user_file(f.filename)]
    return f"{_shown(frames[-1].filename)}:{frames[-1].lineno}" if frames else None


def user_code_error(what: str, exc: BaseException) -> UserCodeError:
    """The UserCodeError for ``exc`` raised by the user's code while doing ``what``."""
    where = user_location(exc)
    detail = str(exc.msg if isinstance(exc, SyntaxError) else exc)
    return UserCodeError(f"{what}{f' ({where})' if where else ''}: {type(exc).__name__}"
                         f"{f': {detail}' if detail else ''}; fix it, or run `plgk --debug ...` to see "
                         "the traceback")


class user_code:
    """A context that runs the user's code: an exception it raises (other than a PlgkError it
    passed on, and KeyboardInterrupt / SystemExit, which are not Exceptions) becomes a
    UserCodeError saying ``what`` was being done, e.g. "[model] name: mymod:build raised".
    Reusable: `plgk train` enters one around every forward of the user's model."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> "user_code":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and isinstance(exc, Exception) and not isinstance(exc, PlgkError):
            raise user_code_error(self.what, exc) from exc
        return False


def _is_missing(exc: ModuleNotFoundError, module_name: str) -> bool:
    """The module asked for (or a package above it) does not exist, as opposed to the module's own
    code importing something that does not."""
    return bool(exc.name) and (module_name == exc.name or module_name.startswith(exc.name + "."))


def import_object(spec: str, what: str):
    """The object ``attribute`` of ``package.module:attribute``. A module or attribute that does
    not exist raises ImportError / AttributeError, for the caller to say what it expected; the
    module's own code raising while it is imported (a SyntaxError, an import of a missing package)
    is a UserCodeError about ``what`` (e.g. "[model] name mymod:build").

    The working directory is importable, as under ``python -m``: the `plgk` console script puts
    its own bin directory first on sys.path instead, and a run recorded next to the user's code
    must replay from that same directory.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or module_name.startswith("."):  # import_module would take it for a relative name
        raise ImportError(f"no module named in {spec!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if _is_missing(exc, module_name):
            raise
        raise user_code_error(f"{what}: importing {module_name} raised", exc) from exc
    except PlgkError:
        raise
    except Exception as exc:
        raise user_code_error(f"{what}: importing {module_name} raised", exc) from exc
    return getattr(module, attribute)
