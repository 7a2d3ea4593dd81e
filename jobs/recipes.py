"""Named recipes: Python functions returning a whole :class:`PipelineConfig` (torchtitan / big_vision style)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable

from vitpipe.jobs.config import PipelineConfig
from vitpipe.jobs.configtools import ConfigError
from vitpipe.jobs.evals.fewshot import FewshotConfig
from vitpipe.jobs.stages.analysis import AnalysisConfig
from vitpipe.jobs.stages.fewshot import FewshotStageConfig
from vitpipe.jobs.train.config import FinetuneConfig, PretrainConfig
from vitpipe.models import ViTConfig
from vitpipe.pipeline import IngestConfig, StreamConfig

RECIPES: dict[str, Callable[[], PipelineConfig]] = {}


def recipe(fn: Callable[[], PipelineConfig]) -> Callable[[], PipelineConfig]:
    RECIPES[fn.__name__.replace("_", "-")] = fn
    return fn


def get_recipe(name: str) -> PipelineConfig:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe '{name}' (recipes: {', '.join(sorted(RECIPES))})")
    return RECIPES[name]()


@recipe
def demo() -> PipelineConfig:
    """CIFAR-10 on 2 CPU cores in under 10 minutes: a 6-block width-192 ViT, patch 4, 32 px, ~4 min pretraining
    over 2 Ray Train workers with DeepSpeed ZeRO-2, then few-shot (CIFAR-10 + digits), 40 px fine-tune, figures."""
    return PipelineConfig(
        name="demo",
        ingest=IngestConfig(split="train", shard_max_samples=2500, num_workers=2),
        model=ViTConfig.from_name("Ti/4", img_size=32, num_classes=10, depth=6),
        pretrain=PretrainConfig(steps=290, global_batch=128, micro_batch=64, lr=8e-4, warmup_steps=20,
                                weight_decay=0.1, zero_stage=2, num_workers=2, checkpoint_every=100, log_every=10,
                                # Under one epoch (33k of 50k images): every image is seen once, so crop
                                # augmentation only slows learning (measured: +3 points 10-shot without it).
                                stream=StreamConfig(img_size=32, rrc_scale=(1.0, 1.0), shuffle_buffer=2000)),
        fewshot=FewshotStageConfig(probe=FewshotConfig(shots=(1, 5, 10, 25), seeds=(0, 1, 2), l2_reg=1024.0)),
        # 40 px (10x10 patches, position embeddings interpolated from 8x8); short, to keep the demo under 10 min
        finetune=FinetuneConfig(img_size=40, steps=60, batch_size=128, lr_grid=(0.01,), warmup_steps=6,
                                test_limit=None),
        analysis=AnalysisConfig(num_images=64),
    )


@recipe
def tiny() -> PipelineConfig:
    """Smoke test of every stage with real Ray/DeepSpeed/MLflow in about a minute: 300 images, a 2-block model."""
    cfg = demo()
    return replace(
        cfg, name="tiny",
        data=replace(cfg.data, dedup_tasks=("digits",)),
        ingest=replace(cfg.ingest, limit_per_class=30, shard_max_samples=64),
        model=ViTConfig.from_name("mu/4", img_size=32, num_classes=10),
        pretrain=replace(cfg.pretrain, steps=6, global_batch=32, micro_batch=16, warmup_steps=2, checkpoint_every=3,
                         log_every=2, stream=replace(cfg.pretrain.stream, shuffle_buffer=64)),
        fewshot=replace(cfg.fewshot, probe=replace(cfg.fewshot.probe, shots=(1, 5), seeds=(0,), test_limit=200,
                                                   batch_size=128)),
        finetune=replace(cfg.finetune, img_size=40, steps=4, batch_size=16, warmup_steps=1, train_limit=200,
                         test_limit=100, log_every=2, eval_batch_size=64),
        analysis=replace(cfg.analysis, num_images=8),
    )


def _jft(variant: str, lr: float, epochs: int) -> PipelineConfig:
    """The paper's JFT-300M pretraining recipe (§4.1, Appendix B.1) for one variant, on a GPU cluster."""
    images, batch = 303_000_000, 4096
    model = ViTConfig.from_name(variant, img_size=224, num_classes=18_291, classifier_bias_init=-10.0,
                                representation_size=ViTConfig.from_name(variant).width)
    return PipelineConfig(
        name=f"jft-{variant.replace('/', '')}",
        store=os.environ.get("VITPIPE_STORE", "s3://vitpipe-runs"),
        data=replace(PipelineConfig().data, root="s3://vitpipe-data/jft300m-list.tsv",
                     dedup_tasks=("imagenet=s3://vitpipe-data/imagenet", "cifar10=s3://vitpipe-data/cifar10")),
        ingest=IngestConfig(split=None, shard_max_bytes=1 << 30, shard_max_samples=None, resize_short=256,
                            num_workers=16, multi_label=True),
        model=model,
        pretrain=PretrainConfig(steps=epochs * images // batch, global_batch=batch, micro_batch=64, lr=lr,
                                warmup_steps=10_000, schedule="linear", weight_decay=0.1, loss="sigmoid",
                                use_gpu=True, num_workers=64, cpus_per_worker=8, precision="bf16",
                                checkpoint_every=2000, keep_checkpoints=3, peak_tflops=989.0,
                                stream=StreamConfig(img_size=224, num_workers=8, pin_memory=True,
                                                    shuffle_buffer=10_000)),
        finetune=FinetuneConfig(task="imagenet=s3://vitpipe-data/imagenet",
                                img_size=384 if 384 % model.patch_size == 0 else 392, steps=20_000,
                                batch_size=512, lr_grid=(0.001, 0.003, 0.01, 0.03), warmup_steps=500,
                                ema_decay=0.9999, num_workers=8, cpus_per_worker=8),
    )


@recipe
def jft_b16() -> PipelineConfig:
    """ViT-B/16 on JFT-300M: base LR 8e-4, 7 epochs (paper Table 2 / Appendix B.1)."""
    return _jft("B/16", 8e-4, 7)


@recipe
def jft_l16() -> PipelineConfig:
    """ViT-L/16 on JFT-300M: base LR 4e-4, 7 epochs."""
    return _jft("L/16", 4e-4, 7)


@recipe
def jft_h14() -> PipelineConfig:
    """ViT-H/14 on JFT-300M: base LR 3e-4, 14 epochs (2.5k TPUv3-core-days in the paper)."""
    return _jft("H/14", 3e-4, 14)


@recipe
def mpp_demo() -> PipelineConfig:
    """The demo with self-supervised masked patch prediction (paper §4.6) instead of labels, same eval stages."""
    cfg = demo()
    return replace(cfg, name="mpp-demo", pretrain=replace(cfg.pretrain, objective="mpp", lr=2e-3))
