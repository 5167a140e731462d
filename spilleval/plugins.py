"""`--plugin`: import the user's module that registers custom metrics, by module name or by file path.

A console script does not put the current directory on `sys.path` (`python -m` does), so `--plugin mymetrics`
next to `mymetrics.py` would not import; the current directory is searched first, as `python -m` would.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType


class PluginError(ImportError):
    """A `--plugin` that names no importable module or file."""


def load_plugin(name: str) -> ModuleType:
    """Import `name`: a path to a `.py` file, or a module importable from the current directory or `sys.path`."""
    if name.endswith(".py") or os.sep in name or (os.altsep and os.altsep in name):
        return _load_file(Path(name))
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
            raise  # the plugin itself imports something missing: its own error, with its traceback
        raise PluginError(
            f"--plugin {name}: no module named {e.name} in the current directory ({cwd}) or on the Python path. "
            f"Pass a module name (mymetrics for ./mymetrics.py) or a file path (path/to/mymetrics.py)"
        ) from None


def _load_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise PluginError(f"--plugin {path}: no such file. Pass a .py file or a module name (mymetrics)")
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not name.isidentifier():
        raise PluginError(f"--plugin {path}: not an importable Python file (its name must be a valid module name)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.resolve().parent))  # so the plugin can import its sibling modules
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
