"""Stage ``report``: the run's numbers as markdown (evaluation table with every column labelled validation or test,
transfer score, splits, in-training curves: ``report_eval``; fine-tune, pretraining, stage times), printed and logged
to the parent run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vitpipe.jobs.core.store import StageResult
from vitpipe.jobs.stages.base import StageContext
from vitpipe.jobs.stages.report_eval import evaluation_sections
from vitpipe.pipeline.fsio import join_url

if TYPE_CHECKING:
    from vitpipe.jobs.config import PipelineConfig


def report_markdown(results: dict[str, StageResult]) -> str:
    """The run's headline numbers as a markdown table; accuracies in %."""
    lines = ["# vitpipe report", ""]
    ft = results.get("finetune")
    lines += evaluation_sections(results)
    if ft:
        lines += ["", f"Fine-tune (test): {ft.info.get('task')} at {ft.info.get('img_size')} px, lr "
                      f"{ft.metrics.get('train/chosen_lr')}, test accuracy {100 * _finetune_acc(ft):.2f}%"]
    pre = results.get("pretrain")
    final = pre.info.get("final", {}) if pre else {}
    if "train/loss" in final:
        lines += [f"Pretrain: final loss {final['train/loss']:.3f}, {final.get('train/images_per_s', 0):.0f} img/s "
                  f"over {int(final.get('step', 0))} steps"]
    timing = ", ".join(f"{name} {r.seconds:.0f}s" for name, r in results.items() if name != "report")
    lines += ["", f"Stage time (when run): {timing}"]
    return "\n".join(lines) + "\n"


def _finetune_acc(ft: StageResult) -> float:
    """The fine-tuned model's test accuracy (``eval/<task>/finetune``)."""
    return ft.metrics[f"eval/{ft.info['task_name']}/finetune"]


class ReportStage:
    name = "report"
    version = "4"  # 3: no metrics of its own (the parent run shows each stage's results once); 4: val/test table

    def inputs(self, cfg: PipelineConfig) -> list[str]:
        return [s for s in ("pretrain", "fewshot", "finetune", "analysis") if s in cfg.stages]

    def reads(self, cfg: PipelineConfig) -> dict[str, Any]:
        return {}

    def resources(self, cfg: PipelineConfig) -> dict[str, float] | None:
        return None  # reads every other result: last, on the driver

    def run(self, cfg: PipelineConfig, ctx: StageContext) -> StageResult:
        import fsspec

        text = report_markdown(ctx.inputs)
        with fsspec.open(join_url(ctx.url, "report.md"), "w") as f:
            f.write(text)
        ctx.tracker.text(text, "report.md")
        info = {"markdown": text}
        pre = ctx.inputs.get("pretrain")
        if pre and ctx.tracker.uri and cfg.tracking.register_model:
            from vitpipe.jobs.core.model_registry import register_model

            info["registered_model"] = register_model(ctx.tracker.uri, ctx.tracker.run_id, pre.url,
                                                      f"vitpipe-{cfg.name}", pre.info.get("classes"))
        return StageResult(stage=self.name, key=ctx.key, artifacts={"report": "report.md"},
                           info=info)
