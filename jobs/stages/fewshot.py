"""Stage ``fewshot``: probes on frozen features (few-shot ridge at k shots, weighted kNN, full-data linear probe) on
each task's test split and validation view, at each task's resolution, pretrained vs random init; the transfer
score over the out-of-domain tasks (validation numbers only). The per-task loop is ``fewshot_eval``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vitpipe.jobs.core.configtools import runtime_field
from vitpipe.jobs.core.metric_names import eval_metrics
from vitpipe.jobs.core.store import StageResult
from vitpipe.jobs.evals.features import FeatureCache, model_fingerprint
from vitpipe.jobs.evals.fewshot import FewshotConfig
from vitpipe.jobs.evals.knn import KnnConfig
from vitpipe.jobs.evals.linear_probe import LinearProbeConfig
from vitpipe.jobs.stages.base import StageContext
from vitpipe.jobs.stages.fewshot_eval import check_evaluators, evaluate_task, transfer_scores
from vitpipe.jobs.evals.taskspec import parse_task
from vitpipe.jobs.train.consolidated import load_model
from vitpipe.jobs.train.progress import StageProgress
from vitpipe.models import create
from vitpipe.pipeline.fsio import join_url

if TYPE_CHECKING:
    from vitpipe.jobs.config import PipelineConfig

log = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class FewshotStageConfig:
    """Which tasks to probe, at which resolution, and the probe itself."""

    tasks: tuple[str, ...] = ("cifar10=../shared/data/cifar10", "digits")
    """Task specs: name=<image folder with train/test splits>, or digits (scikit-learn's bundled set)."""
    img_size: int | None = None
    """Probe resolution; None: the model's pretraining resolution (digits are upsampled to it)."""
    random_init_baseline: bool = True
    """Also probe the same architecture at random init (pretraining should beat it clearly)."""
    threads: int = runtime_field(2)
    """torch threads for feature extraction."""
    probe: FewshotConfig = field(default_factory=FewshotConfig)
    """The few-shot ridge probe (its batch_size and representation serve every evaluator)."""
    evaluators: tuple[str, ...] = ("fewshot", "knn", "linear")
    """Evaluators (``vitpipe.jobs.evals.registry``) run on each task's test split: reported, never used to choose."""
    validation_evaluators: tuple[str, ...] = ("fewshot", "knn")
    """Evaluators run on each task's validation view (``<task>.val``: held-out slice of train; the numbers to
    compare recipes by); empty: no validation view. The linear probe's own held-out ``val_acc`` is one too."""
    baseline_evaluators: tuple[str, ...] = ("fewshot",)
    """Evaluators of the random-init baseline (on the views ``baseline_views`` names, as far as the lists above
    have them)."""
    baseline_views: str = "both"
    """Where the random-init baseline is probed: ``both`` (test splits and validation views) or ``validation``
    (validation views only: where pretraining is compared with it, the transfer score included; half its cost)."""
    knn: KnnConfig = field(default_factory=KnnConfig)
    """Weighted kNN probe (DINO): k, temperature, limits."""
    linear: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    """Full-data logistic-regression probe: L2 grid chosen on a held-out slice of train, limits."""
    validation_fraction: float | None = None
    """Held-out share of train in each validation view; None: the paper's 2% (>= 20k images) / 10% rule."""
    validation_seed: int = 0
    """Seed of the validation views' stratified held-out slices."""
    out_of_domain: tuple[str, ...] = ()
    """Task labels (``digits``, ``hymenoptera_64px``) whose 10- and 25-shot validation accuracies make the transfer
    score (``eval/transfer_score``); they need the fewshot evaluator in validation_evaluators."""

    def __post_init__(self) -> None:
        for name in ("evaluators", "validation_evaluators", "baseline_evaluators", "out_of_domain"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        check_evaluators(self.evaluators, "fewshot.evaluators")
        check_evaluators(self.validation_evaluators, "fewshot.validation_evaluators")
        check_evaluators(self.baseline_evaluators, "fewshot.baseline_evaluators")
        if self.baseline_views not in ("both", "validation"):
            raise ValueError(f"fewshot.baseline_views must be 'both' or 'validation', got {self.baseline_views!r}")
        if self.validation_fraction is not None and not 0 < self.validation_fraction < 1:
            raise ValueError(f"fewshot.validation_fraction must be in (0, 1) or none, got {self.validation_fraction}")
        if self.out_of_domain and "fewshot" not in self.validation_evaluators:
            raise ValueError("fewshot.out_of_domain needs 'fewshot' in fewshot.validation_evaluators (the transfer "
                             "score is few-shot validation accuracy)")

    def evaluator_lists(self, baseline: bool) -> tuple[tuple[tuple[str, Any], ...], tuple[tuple[str, Any], ...]]:
        """``((type, config), ...)`` for the test split and for the validation view."""
        confs = {"fewshot": self.probe, "knn": self.knn, "linear": self.linear}
        keep = (lambda t: t in self.baseline_evaluators) if baseline else (lambda t: True)
        on_test = not baseline or self.baseline_views == "both"
        return (tuple((t, confs[t]) for t in self.evaluators if keep(t) and on_test),
                tuple((t, confs[t]) for t in self.validation_evaluators if keep(t)))


class FewshotStage:
    name = "fewshot"
    version = "3"  # 2: metric names eval/<task>/... (jobs.core.metric_names); 3: kNN/linear, validation views

    def inputs(self, cfg: PipelineConfig) -> list[str]:
        return ["pretrain"]

    def reads(self, cfg: PipelineConfig) -> dict[str, Any]:
        return {"fewshot": cfg.fewshot}

    def resources(self, cfg: PipelineConfig) -> dict[str, float] | None:
        return {"CPU": float(cfg.fewshot.threads)}  # its feature-extraction threads

    def run(self, cfg: PipelineConfig, ctx: StageContext) -> StageResult:
        fc: FewshotStageConfig = cfg.fewshot
        torch.set_num_threads(fc.threads)
        pre = ctx.inputs["pretrain"]
        model, mcfg = load_model(pre.url)
        models = {"pretrained": (model, pre.key)}
        if fc.random_init_baseline:
            torch.manual_seed(cfg.pretrain.seed)
            baseline = create(mcfg).eval()
            # Keyed by its weights, not by the pretrain key: every run with this architecture and seed shares the
            # baseline's features (the demo embeds them once per machine, not once per pretraining recipe).
            models["random_init"] = (baseline, f"random-{model_fingerprint(baseline)}")
        # Shared across runs (not under this stage's key): a rerun with other shots reuses the features.
        cache = FeatureCache(join_url(ctx.store.root, "cache", "features"))
        lists = {label: fc.evaluator_lists(baseline=label != "pretrained") for label in models}
        metrics: dict[str, float] = {}
        raw: dict[str, dict[str, float]] = {}  # every evaluator value (per seed too), by model
        curves: dict[str, dict] = {}
        splits: dict[str, dict] = {}
        sizes: dict[str, int] = {}
        counter = _Embedded(ctx.report, batch=fc.probe.batch_size)
        for spec in fc.tasks:
            res = evaluate_task(spec, models, mcfg, evaluators={k: v[0] for k, v in lists.items()},
                                validation={k: v[1] for k, v in lists.items()}, img_size=fc.img_size,
                                validation_fraction=fc.validation_fraction, validation_seed=fc.validation_seed,
                                batch_size=fc.probe.batch_size, representation=fc.probe.representation,
                                cache=cache, wrap=counter.wrap)
            for label, values in res.raw.items():
                metrics.update(eval_metrics(values, None if label == "pretrained" else label))
                raw.setdefault(label, {}).update(values)
            for view, by_model in res.curves.items():
                curves[view] = {m: {k: list(v) for k, v in c.items()} for m, c in by_model.items()}
            splits.update(res.splits)
            sizes[res.name] = res.size
        transfer = transfer_scores(raw, fc.out_of_domain) if fc.out_of_domain else {}
        for label, score in transfer.items():
            metrics["eval/transfer_score" if label == "pretrained" else f"eval/{label}/transfer_score"] = score
        return StageResult(stage=self.name, key=ctx.key, metrics=metrics,
                           info={"curves": curves, "img_size": fc.img_size or mcfg.img_hw[0], "sizes": sizes,
                                 "raw": raw, "splits": splits, "out_of_domain": list(fc.out_of_domain),
                                 "transfer_score": transfer, "tasks": [parse_task(t)[0] for t in fc.tasks]})


class _Embedded:
    """The stage's progress: images embedded so far (cache hits embed nothing), what is being embedded, at what
    rate. Each embedding call is cut into chunks of whole batches, so the count moves while a split embeds and the
    batches (hence the features) are the ones one call would make."""

    def __init__(self, progress: StageProgress, batch: int, batches_per_chunk: int = 4):
        self.progress, self.chunk = progress, max(1, batch * batches_per_chunk)
        self.done, self.seconds = 0, 0.0

    def wrap(self, embed, desc: str):
        def fn(split, indices):
            indices = np.asarray(indices)
            if len(indices) <= self.chunk:
                return self._timed(embed, split, indices, desc)
            outs = []
            for i in range(0, len(indices), self.chunk):
                outs.append(self._timed(embed, split, indices[i:i + self.chunk], desc))
            return np.concatenate(outs, axis=0)
        return fn

    def _timed(self, embed, split: str, part: np.ndarray, desc: str) -> np.ndarray:
        t0 = time.perf_counter()
        out = embed(split, part)
        self.seconds += time.perf_counter() - t0
        self.done += len(part)
        rate = f" · {self.done / self.seconds:.0f} img/s" if self.seconds > 0 else ""
        self.progress.update(completed=self.done, unit="images", info=f"{desc} {split}{rate}")
        return out
