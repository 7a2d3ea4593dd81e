"""The trainer's test seam: a hook object whose methods the pretraining loop calls at fixed points. Production runs
use :class:`TrainerHooks` (every method does nothing); fault injection (NaN losses, damaged checkpoints, killed or
held ranks) and audit records live in the test tree (``tests/support/faults.py``) and are loaded only when the
test-only variable ``VITPIPE_TEST_HOOKS`` names them. No destructive code path exists in the package itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

TEST_HOOKS_ENV = "VITPIPE_TEST_HOOKS"
"""JSON settings for ``tests/support/faults.py``; set only by tests (forwarded to the workers by the stage)."""


class TrainerHooks:
    """Called by the pretraining loop; every method is a no-op here."""

    records_keys = False
    """True when the loop should collect each step's sample keys for :meth:`on_step_keys`."""

    def on_loss(self, loss: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        """The loss of ``micro`` of ``step`` (1-based), possibly replaced."""
        return loss

    def on_step_keys(self, who: int | str, step: int, keys: list[str]) -> None:
        """The sample keys a finished step trained on (``who``: the rank, or ``"resume"``)."""

    def after_save(self, engine: Any, step: int, resumed: bool) -> None:
        """A checkpoint of ``step`` was saved and reported (``resumed``: this attempt started from a checkpoint)."""

    def after_rollback(self, engine: Any, step: int) -> None:
        """The engine was rolled back to the checkpoint of ``step``."""

    def before_rollback_verify(self, checkpoints: list[Any]) -> None:
        """About to verify ``checkpoints`` (Ray Train checkpoints, oldest first) for a rollback. Collective."""


def load_hooks(rank: int, out_url: str) -> TrainerHooks:
    """:class:`TrainerHooks`, or the test tree's fault hooks when ``VITPIPE_TEST_HOOKS`` is set (a checkout only)."""
    raw = os.environ.get(TEST_HOOKS_ENV)
    if not raw:
        return TrainerHooks()
    path = Path(__file__).resolve().parents[2] / "tests" / "support" / "faults.py"
    if not path.is_file():
        raise RuntimeError(f"{TEST_HOOKS_ENV} is set but {path} does not exist: test hooks run only from a checkout")
    spec = importlib.util.spec_from_file_location("vitpipe_test_faults", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FaultHooks(json.loads(raw), rank, out_url)
