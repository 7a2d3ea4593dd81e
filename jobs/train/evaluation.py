"""In-training evaluation (big_vision's ``evals``): the few-shot probe on every configured task from the current
weights, every ``pretrain.evals.every`` steps, at the start and at the end, as metric histories of the pretrain run
(``eval/<task>/<k>shot`` vs step, ``eval/<task>/<k>shot_std`` the spread over the few-shot seeds; names as
``jobs.core.metric_names``) and as ``evals.json`` in the stage folder (what the analysis stage plots).

Where it runs: on rank 0, between two optimizer steps (a :class:`TrainerCallback`). The other ranks go on to the
next step and wait for rank 0 at its first collective, so an evaluation stalls the whole group for its duration;
the cost is bounded by construction (only the few-shot samples and ``test_limit`` images are embedded, their decoded
pixels are kept across evaluations, so an evaluation is forward passes plus closed-form ridge solves) and by
``max_stall`` (an evaluation that would push evaluation time over that share of training time is postponed to the
next multiple of ``every``). The alternative, a Ray task on a snapshot of the weights with its own resources, stalls
nothing but needs spare resources the group does not use: a CPU or GPU per evaluation. On a GPU cluster that is
the better choice once evaluations are many or large; on the 2-core development machines every core is a training
worker's, so a separate task would only queue behind them (or steal their cores) and rank 0 between steps is it.

The snapshot: ZeRO 0-2 keep the full parameters on every rank, so rank 0 reads its own module (no collective);
ZeRO-3 partitions them, so every rank joins ``full_fp32_state_dict`` (a collective, with rank 0's decision to
evaluate broadcast first). Evaluation never changes training: it runs on a separate model, inside
``torch.random.fork_rng`` (building that model draws random init values), under ``inference_mode``.

Resume: rank 0 reads ``evals.json`` and the run's logged steps of ``train/eval_seconds`` at start, logs to the run
the recorded points it lacks (another attempt's child run, or a crash between the file and the log), and never
evaluates a step that is recorded or logged, so a resumed or restarted attempt continues the curves without a
step twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from typing import Any, Iterator

import torch

from vitpipe.jobs.core.configtools import to_dict
from vitpipe.jobs.core.store import exists, read_json
from vitpipe.jobs.evals.fewshot import FewshotConfig, fewshot_eval
from vitpipe.jobs.evals.image_bank import ImageBank
from vitpipe.jobs.evals.transfer import transfer_score
from vitpipe.jobs.train.callbacks import TrainerCallback
from vitpipe.jobs.train.config import TrainEvalConfig
from vitpipe.pipeline.fsio import join_url, url_to_fs, write_atomic

Trainer = Any  # the trainer imports this module; the callback only uses its attributes

log = logging.getLogger("vitpipe.pretrain")

SECONDS = "train/eval_seconds"
"""Logged with every point: its history is the set of steps already evaluated in a run."""
STALL = "train/eval_stall_frac"
"""Evaluation seconds over training seconds so far in this attempt (what the other ranks waited, relatively)."""
TRANSFER = "transfer_score"
EVALS_FILE = "evals.json"
EVALS_VERSION = 1

__all__ = ["EVALS_FILE", "InTrainingEval", "check_evals", "curves", "eval_tasks", "evaluate", "prepare_evals",
           "read_evals"]


# ------------------------------------------------------------------------------------------------ configuration
def check_evals(cfg: TrainEvalConfig) -> None:
    """One-line ValueError for settings that do not fit together (the pretrain stage calls it before starting)."""
    from vitpipe.jobs.evals.taskspec import parse_task_spec

    labels = [parse_task_spec(t).label for t in cfg.tasks]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"pretrain.evals.tasks has the task label {dup[0]!r} twice")
    missing = [t for t in cfg.transfer_tasks if t not in labels]
    if missing:
        raise ValueError(f"pretrain.evals.transfer_tasks names {missing[0]!r}, not a label of pretrain.evals.tasks "
                         f"({', '.join(labels) or 'none'})")
    if cfg.transfer_tasks and (cfg.split != "validation" or not {10, 25} <= set(cfg.shots)):
        raise ValueError("pretrain.evals.transfer_tasks needs pretrain.evals.split=validation and shots including "
                         f"10 and 25, got split={cfg.split}, shots={list(cfg.shots)}")


def prepare_evals(cfg: TrainEvalConfig, base: str | None = None) -> TrainEvalConfig:
    """``cfg`` checked (:func:`check_evals`) with relative task folders made absolute against ``base`` (default: the
    current directory), as the workers need them; a config whose paths are absolute already comes back unchanged."""
    import dataclasses

    check_evals(cfg)

    def absolute(spec: str) -> str:
        head, sep, where = spec.partition("=")
        if not sep or "://" in where or where.startswith("shards:") or os.path.isabs(where):
            return spec
        return f"{head}={os.path.normpath(os.path.join(base or os.getcwd(), where))}"

    return dataclasses.replace(cfg, tasks=tuple(absolute(t) for t in cfg.tasks))


def probe_config(cfg: TrainEvalConfig) -> FewshotConfig:
    return FewshotConfig(shots=cfg.shots, seeds=cfg.seeds, l2_reg=cfg.l2_reg, test_limit=cfg.test_limit,
                         batch_size=cfg.batch_size)


def eval_tasks(cfg: TrainEvalConfig, native: int) -> list[tuple[Any, int]]:
    """``(task, input size)`` per configured task: the task's validation view or the task itself (``cfg.split``),
    at its ``@<res>`` or the model's ``native`` size."""
    from vitpipe.jobs.evals.taskspec import make_task

    out = []
    for spec in cfg.tasks:
        task = make_task(spec)
        size = task.resolution or native
        out.append((task.validation() if cfg.split == "validation" else task, int(size)))
    return out


# ------------------------------------------------------------------------------------------------ evaluation
@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate(models: dict[int, torch.nn.Module], banks: list[tuple[Any, int, ImageBank]], cfg: TrainEvalConfig,
             device: torch.device) -> dict[str, float]:
    """The few-shot evaluator's metrics (its own names: ``<task>/<k>shot/{mean,std,seed<s>}``) of the weights now
    in ``models`` (input size -> model) on every ``(task, size, bank)``; with ``transfer_tasks`` also
    ``transfer_score`` (mean 10- and 25-shot validation accuracy over them)."""
    probe = probe_config(cfg)
    raw: dict[str, float] = {}
    for task, size, bank in banks:
        raw.update(fewshot_eval(bank.embed_fn(models[size], device, cfg.batch_size), task, probe))
    if cfg.transfer_tasks:
        raw[TRANSFER] = transfer_score(raw, cfg.transfer_tasks, (10, 25))
    return raw


def tracker_metrics(raw: dict[str, float]) -> dict[str, float]:
    """What the run's metric histories get of one point: ``eval/<task>/<k>shot`` (mean over seeds),
    ``eval/<task>/<k>shot_std`` and ``eval/transfer_score`` (``jobs.core.metric_names``); per-seed values stay in
    evals.json."""
    from vitpipe.jobs.core.metric_names import eval_metrics

    out = eval_metrics({k: v for k, v in raw.items() if k != TRANSFER})
    if TRANSFER in raw:
        out[f"eval/{TRANSFER}"] = raw[TRANSFER]
    return out


# ------------------------------------------------------------------------------------------------ the record
def read_evals(url: str) -> dict | None:
    """``evals.json`` under a pretrain stage folder, or None when the run had no in-training evaluation."""
    path = join_url(url, EVALS_FILE)
    return read_json(path) if exists(path) else None


def curves(record: dict) -> dict[str, dict[int, list[tuple[int, float, float]]]]:
    """``{task: {k: [(step, mean, std), ...]}}`` (steps ascending) from an ``evals.json`` record."""
    from vitpipe.jobs.evals.fewshot import summarize

    out: dict[str, dict[int, list[tuple[int, float, float]]]] = {}
    for point in sorted(record.get("points", []), key=lambda p: p["step"]):
        m = point["metrics"]
        for task in dict.fromkeys(name.split("/", 1)[0] for name in m if "/" in name):
            for k, (mean, std) in summarize(m, task).items():
                out.setdefault(task, {}).setdefault(k, []).append((int(point["step"]), float(mean), float(std)))
    return out


def _tracker_steps(tracker: Any, name: str) -> set[int]:
    """Steps at which ``name`` is logged in the tracker's run (empty for a tracker that records nothing)."""
    from vitpipe.jobs.core.tracking import MlflowTracker

    if not isinstance(tracker, MlflowTracker):
        return set()
    return {int(m.step) for m in tracker.client.get_metric_history(tracker.run_id, name)}


# ------------------------------------------------------------------------------------------------ the callback
class InTrainingEval(TrainerCallback):
    """The few-shot curves of a pretraining run (see the module docstring). Every rank holds one; only rank 0
    evaluates, the others join the weight gather under ZeRO-3."""

    def __init__(self, cfg: TrainEvalConfig, out_url: str, rank: int):
        self.cfg, self.out_url, self.rank = cfg, out_url, rank
        self.points: list[dict] = []
        self.done: set[int] = set()
        self.gather = False
        self.train_t0 = 0.0
        self.eval_s = 0.0      # evaluations after training started (the stall)
        self.last_s: float | None = None
        self.postponed = 0

    # ---------------------------------------------------------------- trainer hooks
    def on_train_start(self, trainer: Trainer) -> None:
        self.gather = trainer.engine.zero_optimization_stage() == 3
        if self.rank == 0:
            self._setup(trainer)
        step = trainer.state.step
        # a fresh run's initial weights; a resumed run's restored step when it is due (a kill between the checkpoint
        # and the evaluation of that step would otherwise leave it out)
        if (step == 0 and self.cfg.at_start) or (step > 0 and step % self.cfg.every == 0):
            self._maybe_evaluate(trainer, step, force=True)
        self.train_t0, self.eval_s = time.perf_counter(), 0.0

    def on_step_end(self, trainer: Trainer) -> None:
        step = trainer.state.step
        last = step >= trainer.p.steps
        if step % self.cfg.every == 0 or last:
            self._maybe_evaluate(trainer, step, force=last)

    def on_log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Nothing: evaluation has its own schedule."""

    def on_train_end(self, trainer: Trainer) -> None:
        self._maybe_evaluate(trainer, trainer.state.step, force=True)  # nothing when the last step is recorded
        if self.rank == 0:
            self._figure(trainer)
            self.banks, self.models = [], {}

    # ---------------------------------------------------------------- rank 0
    def _setup(self, trainer: Trainer) -> None:
        cfg, t0 = self.cfg, time.perf_counter()
        from vitpipe.models import create

        native = int(trainer.mcfg.img_hw[0])
        tasks = eval_tasks(cfg, native)
        self.models = {}
        with torch.random.fork_rng(devices=[]):  # init draws random numbers; training's generator stays untouched
            for size in sorted({s for _, s in tasks}):
                self.models[size] = create(trainer.mcfg.replace(img_size=size)).to(trainer.device).eval()
        budget = cfg.image_cache_mb << 20
        self.banks = []
        probe = probe_config(cfg)
        with _threads(cfg.threads):
            for task, size in tasks:
                bank = ImageBank(task, size, max(0, budget // len(tasks)), cfg.batch_size)
                bank.prime(probe)
                self.banks.append((task, size, bank))
        self.settings = {"tasks": list(cfg.tasks), "views": [t.name for t, _ in tasks], "split": cfg.split,
                         "shots": list(cfg.shots), "seeds": list(cfg.seeds), "l2_reg": cfg.l2_reg,
                         "test_limit": cfg.test_limit, "sizes": {t.name: s for t, s in tasks},
                         "split_info": {t.name: t.split_info() for t, _ in tasks}}
        self.tracker = trainer.tracker
        self._resume_record()
        log.info("in-training eval: %d task(s) %s at %s, every %d steps; %d image(s) decoded (%.0f MiB) in %.1fs",
                 len(tasks), [t.name for t, _ in tasks], sorted(self.models), cfg.every,
                 sum(len(b.rows) for _, _, b in self.banks), sum(b.used for _, _, b in self.banks) / 2**20,
                 time.perf_counter() - t0)

    def _resume_record(self) -> None:
        """Points of an earlier attempt: kept, and logged to this run where it lacks them."""
        old = read_evals(self.out_url)
        same = ("tasks", "split", "shots", "seeds", "l2_reg", "test_limit")
        if old and all(old.get("settings", {}).get(k) == self.settings[k] for k in same):
            self.points = list(old.get("points", []))
        elif old:
            log.warning("in-training eval: %s was written with other settings; starting a new record", EVALS_FILE)
        logged = _tracker_steps(self.tracker, SECONDS)
        for point in self.points:
            if point["step"] not in logged and self.tracker:
                self.tracker.metrics({**tracker_metrics(point["metrics"]), SECONDS: point["seconds"]},
                                     step=point["step"])
        self.done = logged | {int(p["step"]) for p in self.points}
        if self.done:
            log.info("in-training eval: steps %s already evaluated (resumed)", sorted(self.done))

    def _within_budget(self) -> bool:
        if self.cfg.max_stall is None or self.last_s is None:
            return True
        trained = time.perf_counter() - self.train_t0 - self.eval_s
        return (self.eval_s + self.last_s) <= self.cfg.max_stall * max(trained, 1e-9)

    def _decide(self, step: int, force: bool) -> bool:
        run = False
        if self.rank == 0:
            run = step not in self.done and (force or self._within_budget())
            if step not in self.done and not run:
                self.postponed += 1
                log.info("in-training eval at step %d postponed: it would take evaluation over %.0f%% of training "
                         "time (pretrain.evals.max_stall)", step, 100 * self.cfg.max_stall)
        if self.gather:  # every rank must know: the gather below is a collective
            from vitpipe.jobs.train.dist import gather_floats

            run = gather_floats(1.0 if run else 0.0)[0] > 0
        return run

    def _maybe_evaluate(self, trainer: Trainer, step: int, *, force: bool) -> None:
        if not self._decide(step, force):
            return
        t0 = time.perf_counter()
        sd = self._snapshot(trainer)
        if self.rank != 0:
            return
        with torch.random.fork_rng(devices=[]), _threads(self.cfg.threads):
            self._load(sd, trainer.mcfg, getattr(trainer, "input_normalisation", None))
            metrics = evaluate(self.models, self.banks, self.cfg, trainer.device)
        seconds = time.perf_counter() - t0
        if step > 0 and self.train_t0:
            self.eval_s += seconds
        self.last_s = seconds
        trained = time.perf_counter() - self.train_t0 - self.eval_s if self.train_t0 else 0.0
        stall = self.eval_s / trained if trained > 0 else 0.0
        self.points.append({"step": step, "seconds": round(seconds, 3), "metrics": metrics})
        self._save()  # the record first: a crash before the log is healed by the next attempt's back-fill
        if self.tracker:
            self.tracker.metrics({**tracker_metrics(metrics), SECONDS: seconds, STALL: stall}, step=step)
        self.done.add(step)
        k = 10 if 10 in self.cfg.shots else max(self.cfg.shots)
        head = {t.name: round(metrics[f"{t.name}/{k}shot/mean"], 4) for t, _, _ in self.banks}
        log.info("in-training eval step %d, %d-shot: %s (%.1fs; evaluation %.1f%% of training time so far)", step,
                 k, head, seconds, 100 * stall)

    def _snapshot(self, trainer: Trainer) -> dict[str, torch.Tensor] | None:
        """The full current weights of the ViT on rank 0 (None elsewhere); collective under ZeRO-3."""
        if self.gather:
            from vitpipe.jobs.train.checkpoint import full_fp32_state_dict

            sd = full_fp32_state_dict(trainer.engine)
            if self.rank != 0:
                return None
            prefix = "vit." if trainer.mpp else ""
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if self.rank != 0:
            return None
        return trainer.vit.state_dict()  # ZeRO 0-2: full parameters on every rank, updated in place

    def _load(self, sd: dict[str, torch.Tensor], mcfg: Any, normalisation: tuple | None = None) -> None:
        from vitpipe.jobs.train.checkpoint import fold_for_export
        from vitpipe.models import load_pretrained

        sd, _ = fold_for_export(sd, normalisation)  # evaluated as it will be exported: on (u - 0.5) / 0.5 images
        native = int(mcfg.img_hw[0])
        for size, model in self.models.items():
            if size == native:
                model.load_state_dict(sd)
            else:  # position embeddings resized to this task's grid (paper §3.2)
                info = load_pretrained(model, sd, mcfg, drop_head=False)
                if info["missing"] or info["unexpected"] or info["dropped"]:
                    raise RuntimeError(f"in-training eval: resizing the model to {size} px lost weights: {info}")

    def _save(self) -> None:
        import json

        fs, path = url_to_fs(join_url(self.out_url, EVALS_FILE))
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        rec = {"version": EVALS_VERSION, "settings": self.settings, "config": to_dict(self.cfg),
               "points": sorted(self.points, key=lambda p: p["step"])}
        write_atomic(fs, path, json.dumps(rec, indent=1).encode())

    def _figure(self, trainer: Trainer) -> None:
        """The curves as ``figures/fewshot_vs_step.png`` in the stage folder and the run (a failure is logged)."""
        if not self.points:
            return
        from vitpipe.jobs.evals.analysis import fewshot_vs_step

        try:
            with tempfile.TemporaryDirectory() as tmp:
                png = os.path.join(tmp, "fewshot_vs_step.png")
                fewshot_vs_step(curves({"points": self.points}), png, split=self.cfg.split)
                with open(png, "rb") as f:
                    fs, path = url_to_fs(join_url(self.out_url, "figures", "fewshot_vs_step.png"))
                    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                    write_atomic(fs, path, f.read())
                if self.tracker:
                    self.tracker.artifact(png, "figures")
        except Exception:  # a figure must not fail a finished pretraining; the curves are in evals.json
            log.exception("in-training eval: could not draw the few-shot curves")
