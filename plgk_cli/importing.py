"""User code named in a run: ``package.module:function`` for model builders and ``py:`` datasets."""

from __future__ import annotations

import importlib
import os
import sys


def import_object(spec: str):
    """The object ``attribute`` of ``package.module:attribute``; raises ImportError/AttributeError.

    The working directory is importable, as under ``python -m``: the `plgk` console script puts
    its own bin directory first on sys.path instead, and a run recorded next to the user's code
    must replay from that same directory.
    """
    module_name, _, attribute = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return getattr(importlib.import_module(module_name), attribute)
