"""``loratune.train`` and ``loratune.evaluate`` are both submodules and the package's public functions.

Importing a submodule binds the package attribute of its name to the module, so after ``import
loratune.train`` (the CLI does it) ``loratune.train(cfg)`` would call a module. Such a module is made callable:
calling it calls the function of the same name, whatever was imported first.
"""

from __future__ import annotations

import sys
import types


def make_callable(module_name: str, function_name: str) -> None:
    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(self, function_name)(*args, **kwargs)

    sys.modules[module_name].__class__ = CallableModule
