"""plgk: auditable training runs (path-integrated loss-gradient kernels and complete audits).

Public API (imports torch lazily so that ``plgk --help`` stays fast):

- ``load_run(run_dir)`` -> :class:`plgk_cli.run.Run`
- ``read_influences(path)`` -> :class:`plgk_cli.store.InfluenceFile`
- ``replay(ReplayArguments)`` and ``train(RunConfig, out_dir)``
"""

import sys
import types

__version__ = "0.1.0"


def _callable_module(module_name: str, function_name: str) -> None:
    """Make module ``plgk_cli.<function_name>`` call its function of that name. Importing the
    module binds the package's attribute of the same name to the module, hiding the public
    function (``import plgk_cli.replay`` then ``plgk_cli.replay(arguments)``); a callable module
    keeps the public name working whatever has been imported."""

    class PublicFunctionModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(self, function_name)(*args, **kwargs)

    sys.modules[module_name].__class__ = PublicFunctionModule


def load_run(run_dir):
    from plgk_cli.run import load_run as _load_run

    return _load_run(run_dir)


def read_influences(path):
    from plgk_cli.store import InfluenceFile

    return InfluenceFile(path)


def train(config, out_dir, **kwargs):
    from plgk_cli.train import train as _train

    return _train(config, out_dir, **kwargs)


def replay(arguments, **kwargs):
    from plgk_cli.replay import replay as _replay

    return _replay(arguments, **kwargs)
