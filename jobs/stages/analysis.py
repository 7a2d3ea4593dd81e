"""Stage ``analysis``: the paper's Figure 7 views of the pretrained model, plus few-shot (per task and view, and vs the
pretraining step from the pretrain stage's in-training evaluation) and fine-tune curves."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vitpipe.jobs.core.store import StageResult
from vitpipe.jobs.stages.base import StageContext
from vitpipe.pipeline.fsio import join_url

if TYPE_CHECKING:
    from vitpipe.jobs.config import PipelineConfig


@dataclass(kw_only=True, frozen=True)
class AnalysisConfig:
    """Figures made from the pretrained model and the evaluation results."""

    task: str = "cifar10=../shared/data/cifar10"
    """Test images for the attention figures come from this task's test split."""
    num_images: int = 64
    """Images averaged for the mean attention distance (the first 8 also get rollout maps)."""
    num_filters: int = 28
    """Principal components of the patch-embedding filters shown."""


def split_of(view: str) -> str:
    """``validation`` for a validation view's name (``cifar10.val``), else ``test``."""
    from vitpipe.pipeline.tasks import VAL_SUFFIX

    return "validation" if view.endswith(VAL_SUFFIX) else "test"


class AnalysisStage:
    name = "analysis"
    version = "3"  # 2: metric names analysis/<view>/<m>, none copied from other stages; 3: fewshot_vs_step

    def inputs(self, cfg: PipelineConfig) -> list[str]:
        return [s for s in ("pretrain", "fewshot", "finetune") if s in cfg.stages]

    def reads(self, cfg: PipelineConfig) -> dict[str, Any]:
        return {"analysis": cfg.analysis}

    def resources(self, cfg: PipelineConfig) -> dict[str, float] | None:
        return {"CPU": 1.0}

    def run(self, cfg: PipelineConfig, ctx: StageContext) -> StageResult:
        import fsspec

        from vitpipe.jobs.evals import analysis
        from vitpipe.jobs.evals.taskspec import make_task
        from vitpipe.jobs.train.consolidated import load_model
        from vitpipe.jobs.train.evaluation import curves as eval_curves
        from vitpipe.jobs.train.evaluation import read_evals
        from vitpipe.pipeline import ImageTransform

        a: AnalysisConfig = cfg.analysis
        model, mcfg = load_model(ctx.inputs["pretrain"].url)
        task = make_task(a.task)
        tf = ImageTransform(img_size=mcfg.img_hw[0], train=False)
        idx = np.linspace(0, len(task.test_labels) - 1, a.num_images).astype(int)
        images = torch.stack([tf(im) for im in task.load("test", idx)])
        metrics: dict[str, float] = {}
        files: dict[str, str] = {}
        with tempfile.TemporaryDirectory() as tmp:
            figs = {
                "embedding_filters": analysis.embedding_filters(model, os.path.join(tmp, "embedding_filters.png"),
                                                                n=a.num_filters),
                "posemb_similarity": analysis.posemb_similarity(model, os.path.join(tmp, "posemb_similarity.png")),
                "attention_distance": analysis.attention_distance(model, images,
                                                                  os.path.join(tmp, "attention_distance.png")),
                "attention_rollout": analysis.attention_rollout(model, images[:8],
                                                                os.path.join(tmp, "attention_rollout.png")),
            }
            views = set(figs)  # the model's own views; the curves below re-plot other stages' results
            few = ctx.inputs.get("fewshot")
            if few:
                for tname, curves in few.info.get("curves", {}).items():
                    data = {m: {int(k): tuple(v) for k, v in c.items()} for m, c in curves.items()}
                    figs[f"fewshot_{tname}"] = analysis.fewshot_curve(data, os.path.join(tmp, f"fewshot_{tname}.png"),
                                                                      tname, split=split_of(tname))
            record = read_evals(ctx.inputs["pretrain"].url) if "evals" in ctx.inputs["pretrain"].artifacts else None
            if record and record.get("points"):  # in-training few-shot curves vs step, seed spread as error bars
                figs["fewshot_vs_step"] = analysis.fewshot_vs_step(
                    eval_curves(record), os.path.join(tmp, "fewshot_vs_step.png"),
                    split=record.get("settings", {}).get("split", "validation"))
            ft = ctx.inputs.get("finetune")
            if ft and ft.info.get("curve"):
                figs["finetune_curve"] = analysis.finetune_curves({"train loss": [tuple(p) for p in ft.info["curve"]]},
                                                                  os.path.join(tmp, "finetune_curve.png"))
            for name, res in figs.items():
                path = res.path
                for k, v in res.metrics.items():
                    if name in views and isinstance(v, (int, float)):
                        metrics[f"analysis/{k}"] = float(v)  # e.g. analysis/attn_dist/layer1
                rel = f"figures/{os.path.basename(path)}"
                with open(path, "rb") as src, fsspec.open(join_url(ctx.url, rel), "wb") as dst:
                    dst.write(src.read())
                files[name] = rel
                ctx.tracker.artifact(path, "figures")
        return StageResult(stage=self.name, key=ctx.key, metrics=metrics, artifacts=files)
