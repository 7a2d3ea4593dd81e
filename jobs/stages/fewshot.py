"""Stage ``fewshot``: frozen pre-logit features + closed-form ridge probe at k shots, pretrained vs random init."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from vitpipe.jobs.configtools import to_dict
from vitpipe.jobs.evals.features import FeatureCache, make_embed_fn
from vitpipe.jobs.evals.fewshot import FewshotConfig, fewshot_eval, summarize
from vitpipe.jobs.graph import StageContext
from vitpipe.jobs.store import StageResult, join
from vitpipe.jobs.tasks import make_task, parse_task
from vitpipe.jobs.train.checkpoint import load_consolidated
from vitpipe.models import ViTConfig, create

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class FewshotStageConfig:
    """Which tasks to probe, at which resolution, and the probe itself."""

    tasks: tuple[str, ...] = ("cifar10=../shared/data/cifar10", "digits")
    """Task specs: name=<image folder with train/test splits>, or digits (scikit-learn's bundled set)."""
    img_size: int | None = None
    """Probe resolution; None: the model's pretraining resolution (digits are upsampled to it)."""
    random_init_baseline: bool = True
    """Also probe the same architecture at random init (pretraining should beat it clearly)."""
    threads: int = 2
    """torch threads for feature extraction."""
    probe: FewshotConfig = field(default_factory=FewshotConfig)


def load_model(pretrain_url: str) -> tuple[torch.nn.Module, ViTConfig]:
    sd, meta = load_consolidated(pretrain_url)
    mcfg = ViTConfig.from_dict(meta["config"])
    model = create(mcfg)
    model.load_state_dict(sd)
    return model.eval(), mcfg


class FewshotStage:
    name = "fewshot"
    version = "1"

    def inputs(self, cfg: Any) -> list[str]:
        return ["pretrain"]

    def config(self, cfg: Any) -> dict:
        return {k: v for k, v in to_dict(cfg.fewshot).items() if k != "threads"}

    def run(self, cfg: Any, ctx: StageContext) -> StageResult:
        fc: FewshotStageConfig = cfg.fewshot
        torch.set_num_threads(fc.threads)
        pre = ctx.inputs["pretrain"]
        model, mcfg = load_model(pre.url)
        models = {"pretrained": (model, pre.key)}
        if fc.random_init_baseline:
            torch.manual_seed(cfg.pretrain.seed)
            models["random_init"] = (create(mcfg).eval(), f"random-{ctx.inputs['pretrain'].key}-s{cfg.pretrain.seed}")
        size = fc.img_size or mcfg.img_hw[0]
        # Shared across runs (not under this stage's key): a rerun with other shots reuses the features.
        cache = FeatureCache(join(ctx.store.root, "cache", "features"))
        metrics: dict[str, float] = {}
        curves: dict[str, dict] = {}
        for spec in fc.tasks:
            task = make_task(spec)
            for label, (m, key) in models.items():
                embed = make_embed_fn(m, task, img_size=size, batch_size=fc.probe.batch_size,
                                      representation=fc.probe.representation)
                with tqdm(desc=f"fewshot {task.name} {label}", unit="img", disable=not ctx.progress) as bar:
                    res = fewshot_eval(_counted(embed, bar), task, fc.probe, cache, model_key=key, resolution=size)
                metrics.update({f"{label}/{k}": v for k, v in res.items()})
                curves.setdefault(task.name, {})[label] = {k: list(v) for k, v in summarize(res, task.name).items()}
                log.info("fewshot %s %s: %s", task.name, label, {k: round(v[0], 4)
                                                                 for k, v in summarize(res, task.name).items()})
        return StageResult(stage=self.name, key=ctx.key, metrics=metrics,
                           info={"curves": curves, "img_size": size,
                                 "tasks": [parse_task(t)[0] for t in fc.tasks]})


def _counted(embed, bar):
    """Embedding function that advances a progress bar by the images it embeds (cache hits embed nothing)."""
    def fn(split, indices):
        out = embed(split, indices)
        bar.update(len(indices))
        return out
    return fn
