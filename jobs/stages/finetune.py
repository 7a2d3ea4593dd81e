"""Stage ``finetune``: fine-tune the pretrained ViT at a higher resolution with a new zero head (Ray Train, DDP)."""

from __future__ import annotations

from typing import Any

from vitpipe.jobs.configtools import to_dict
from vitpipe.jobs.graph import StageContext
from vitpipe.jobs.raytools import MALLOC_ENV, ensure_ray
from vitpipe.jobs.store import StageResult, join, local_path, read_json
from vitpipe.jobs.train.finetune_loop import finetune_worker

_NOT_IN_KEY = ("log_every", "eval_batch_size")


class FinetuneStage:
    name = "finetune"
    version = "3"

    def inputs(self, cfg: Any) -> list[str]:
        return ["pretrain"]

    def config(self, cfg: Any) -> dict:
        return {k: v for k, v in to_dict(cfg.finetune).items() if k not in _NOT_IN_KEY}

    def run(self, cfg: Any, ctx: StageContext) -> StageResult:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        f = cfg.finetune
        ensure_ray()
        spec = {"finetune": to_dict(f), "pretrain_url": ctx.inputs["pretrain"].url, "out_url": ctx.url,
                "tracking_uri": getattr(ctx.tracker, "uri", None), "mlflow_run_id": ctx.tracker.run_id}
        trainer = TorchTrainer(
            finetune_worker, train_loop_config=spec,
            scaling_config=ScalingConfig(num_workers=f.num_workers, resources_per_worker={"CPU": f.cpus_per_worker}),
            run_config=RunConfig(name="ray", storage_path=local_path(ctx.url) or ctx.url,
                                 worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(f.cpus_per_worker),
                                                                  **MALLOC_ENV}}))
        result = trainer.fit()
        if result.error:
            raise result.error
        out = read_json(join(ctx.url, "finetune.json"))  # written by rank 0 once the test split is scored
        return StageResult(stage=self.name, key=ctx.key, metrics=out["metrics"], artifacts={"result": "finetune.json"},
                           info={"curve": out["curve"], "task": f.task, "img_size": f.img_size})
