"""Load an App from "module:attribute", the way `offload worker myapp:app` names it."""

from __future__ import annotations

import importlib
import os
import sys

from offload.app import App
from offload.errors import ConfigurationError


def load_app(path: str) -> App:
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(f"{path!r} is not MODULE:ATTRIBUTE (for example myapp:app)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`, find modules in the current directory
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigurationError(
                f"cannot import module {module_name!r} (from {path!r}); run from the directory "
                "that holds it or add it to PYTHONPATH"
            ) from exc
        raise
    try:
        app = getattr(module, attribute)
    except AttributeError:
        raise ConfigurationError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(app, App):
        raise ConfigurationError(f"{path!r} is a {type(app).__name__}, not an offload App")
    app.import_path = path
    return app
