"""Production extension points of the pretraining loop: what runs alongside training without living inside it
(in-training evaluation, progress for the driver). Each callback sees the trainer (``vitpipe.jobs.train.trainer
.Trainer``: its state, engine, rank, tracker); the trainer calls every callback at the same points on every rank,
except ``on_log`` (rank 0 only), so collectives are allowed in the other methods."""

from __future__ import annotations

from typing import Any

Trainer = Any  # the trainer imports this module; callbacks only use its attributes


class TrainerCallback:
    """Every method does nothing; subclasses override what they need."""

    def on_setup(self, rank: int, phase: str) -> None:
        """A worker's setup milestones, before there is a trainer: ``entered`` (the train function started, its
        imports and process group done) and ``ready`` (the trainer is built: engine, stream, restored state)."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step of this attempt (after a resume: at the restored step)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After each finished optimizer step, once it is logged and checkpointed (every rank)."""

    def on_log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Rank 0, after a logging window's ``metrics`` went to the tracker."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last step, before the export (every rank)."""

