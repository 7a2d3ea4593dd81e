"""Stage ``analysis``: the paper's Figure 7 views of the pretrained model, plus few-shot and fine-tune curves."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vitpipe.jobs.configtools import to_dict
from vitpipe.jobs.graph import StageContext
from vitpipe.jobs.store import StageResult, join


@dataclass(kw_only=True)
class AnalysisConfig:
    """Figures made from the pretrained model and the evaluation results."""

    task: str = "cifar10=../shared/data/cifar10"
    """Test images for the attention figures come from this task's test split."""
    num_images: int = 64
    """Images averaged for the mean attention distance (the first 8 also get rollout maps)."""
    num_filters: int = 28
    """Principal components of the patch-embedding filters shown."""


class AnalysisStage:
    name = "analysis"
    version = "1"

    def inputs(self, cfg: Any) -> list[str]:
        return [s for s in ("pretrain", "fewshot", "finetune") if s in cfg.stages]

    def config(self, cfg: Any) -> dict:
        return to_dict(cfg.analysis)

    def run(self, cfg: Any, ctx: StageContext) -> StageResult:
        import fsspec

        from vitpipe.jobs.evals import analysis
        from vitpipe.jobs.stages.fewshot import load_model
        from vitpipe.jobs.tasks import make_task
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
            few = ctx.inputs.get("fewshot")
            if few:
                for tname, curves in few.info.get("curves", {}).items():
                    data = {m: {int(k): tuple(v) for k, v in c.items()} for m, c in curves.items()}
                    figs[f"fewshot_{tname}"] = analysis.fewshot_curve(data, os.path.join(tmp, f"fewshot_{tname}.png"),
                                                                      tname)
            ft = ctx.inputs.get("finetune")
            if ft and ft.info.get("curve"):
                figs["finetune_curve"] = analysis.finetune_curves({"train loss": [tuple(p) for p in ft.info["curve"]]},
                                                                  os.path.join(tmp, "finetune_curve.png"))
            for name, res in figs.items():
                path = res.path
                for k, v in res.metrics.items():
                    if isinstance(v, (int, float)):
                        metrics[f"{name}/{k}"] = float(v)
                rel = f"figures/{os.path.basename(path)}"
                with open(path, "rb") as src, fsspec.open(join(ctx.url, rel), "wb") as dst:
                    dst.write(src.read())
                files[name] = rel
                ctx.tracker.artifact(path, "figures")
        return StageResult(stage=self.name, key=ctx.key, metrics=metrics, artifacts=files)
