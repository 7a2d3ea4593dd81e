"""What a test needs (a dataset folder, a test dependency) and what happens without it: a skip with the reason on a
developer machine, a failure in CI (``CI=true``), where a missing layer must never pass as a green run.

    from needs import need_dir, need_module
    s3fs = need_module("s3fs")                      # instead of pytest.importorskip
    root = need_dir(CIFAR10 / "train", "CIFAR-10 JPEG folders")

GPU tests are not covered: a CPU CI machine skips them by design (``gpu`` marker, ``skipif(not cuda)``).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """True when the environment says CI (``CI=true``/``1``/``yes``, as GitHub Actions, GitLab and most runners)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> NoReturn:
    """``pytest.skip(reason)`` locally; ``pytest.fail`` (no traceback) in CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing dataset or test dependency fails instead of skipping)",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=True)  # also at import time, as pytest.importorskip


def need_module(name: str, reason: str | None = None) -> ModuleType:
    """The imported module ``name``, as ``pytest.importorskip`` but failing in CI. Only a missing module counts
    as missing; a module that is installed but fails to import raises as usual."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
            raise  # the module exists but one of its own imports is broken: a real error
        skip_or_fail(f"{reason or 'needs ' + name}: module {e.name!r} is not installed")


def need_dir(path: str | Path, what: str) -> Path:
    """``path`` if it is a folder, else skip (locally) or fail (CI) naming ``what`` and where it was expected."""
    path = Path(path)
    if not path.is_dir():
        skip_or_fail(f"{what} not found at {path.resolve()}")
    return path
