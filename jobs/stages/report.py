"""Stage ``report``: one markdown table (task x {few-shot k, fine-tune}), printed and logged to the parent run."""

from __future__ import annotations

from typing import Any

from vitpipe.jobs.graph import StageContext
from vitpipe.jobs.store import StageResult, join


def report_markdown(results: dict[str, StageResult]) -> str:
    """The run's headline numbers as a markdown table; accuracies in %."""
    lines = ["# vitpipe report", ""]
    few = results.get("fewshot")
    ft = results.get("finetune")
    if few:
        curves = few.info.get("curves", {})
        shots = sorted({int(k) for t in curves.values() for m in t.values() for k in m})
        head = ["task", "model", *[f"{k}-shot" for k in shots]]
        if ft:
            head.append("fine-tune")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        ft_task = ft.info.get("task", "").partition("=")[0] if ft else None
        for task, by_model in curves.items():
            for model, curve in by_model.items():
                row = [task, model]
                for k in shots:
                    mean, std = curve.get(str(k), curve.get(k, (float("nan"), 0.0)))
                    row.append(f"{100 * mean:.1f} ± {100 * std:.1f}")
                if ft:
                    row.append(f"{100 * ft.metrics['test_acc']:.1f}" if task == ft_task and model == "pretrained"
                               else "")
                lines.append("| " + " | ".join(row) + " |")
    if ft:
        lines += ["", f"Fine-tune: {ft.info.get('task')} at {ft.info.get('img_size')} px, lr {ft.metrics.get('lr')}, "
                      f"test accuracy {100 * ft.metrics['test_acc']:.2f}%"]
    pre = results.get("pretrain")
    if pre and "final_loss" in pre.metrics:
        m = pre.metrics
        lines += [f"Pretrain: final loss {m['final_loss']:.3f}, {m.get('final_images_per_s', 0):.0f} img/s "
                  f"over {int(m.get('final_step', 0))} steps"]
    timing = ", ".join(f"{name} {r.seconds:.0f}s" for name, r in results.items() if name != "report")
    lines += ["", f"Stage time (when run): {timing}"]
    return "\n".join(lines) + "\n"


class ReportStage:
    name = "report"
    version = "2"

    def inputs(self, cfg: Any) -> list[str]:
        return [s for s in ("pretrain", "fewshot", "finetune", "analysis") if s in cfg.stages]

    def config(self, cfg: Any) -> dict:
        return {}

    def run(self, cfg: Any, ctx: StageContext) -> StageResult:
        import fsspec

        text = report_markdown(ctx.inputs)
        with fsspec.open(join(ctx.url, "report.md"), "w") as f:
            f.write(text)
        if hasattr(ctx.tracker, "text"):
            ctx.tracker.text(text, "report.md")
        headline = {}
        if "fewshot" in ctx.inputs:
            headline = {k: v for k, v in ctx.inputs["fewshot"].metrics.items() if k.endswith("shot/mean")}
        if "finetune" in ctx.inputs:
            headline["finetune/test_acc"] = ctx.inputs["finetune"].metrics["test_acc"]
        info = {"markdown": text}
        pre = ctx.inputs.get("pretrain")
        if pre and getattr(ctx.tracker, "uri", None) and cfg.tracking.register_model:
            from vitpipe.jobs.registry import register_model

            info["registered_model"] = register_model(ctx.tracker.uri, ctx.tracker.run_id, pre.url,
                                                      f"vitpipe-{cfg.name}", pre.info.get("classes"))
        return StageResult(stage=self.name, key=ctx.key, metrics=headline, artifacts={"report": "report.md"},
                           info=info)
