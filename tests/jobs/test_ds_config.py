import pytest

from vitpipe.jobs.train.config import PretrainConfig
from vitpipe.jobs.train.ds_config import accumulation_steps, deepspeed_config, default_zero_stage


def test_accumulation_reaches_global_batch():
    assert accumulation_steps(4096, 64, 16) == 4
    assert accumulation_steps(128, 64, 2) == 1
    with pytest.raises(ValueError, match="global_batch=100 is not a multiple"):
        accumulation_steps(100, 64, 2)


def test_config_reflects_typed_config():
    p = PretrainConfig(steps=1000, global_batch=4096, micro_batch=32, lr=8e-4, lr_base_batch=None,
                       warmup_steps=100, schedule="cosine", zero_stage=3, grad_clip=1.0, weight_decay=0.1)
    ds = deepspeed_config(p, world_size=32, device="cuda", num_params=86_000_000)
    assert ds["train_batch_size"] == 4096
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 32 == 4096
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["lr"] == 8e-4 and ds["optimizer"]["params"]["betas"] == [0.9, 0.999]
    assert ds["optimizer"]["params"]["torch_adam"] is False
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert ds["scheduler"]["params"]["total_num_steps"] == 1000
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["contiguous_gradients"] is True and ds["zero_optimization"]["overlap_comm"] is True


def test_cpu_defaults_and_lr_scaling():
    p = PretrainConfig(lr=1e-3, lr_base_batch=256, global_batch=128, micro_batch=64, zero_stage=None)
    ds = deepspeed_config(p, world_size=2, device="cpu", num_params=5_000_000)
    assert ds["bf16"]["enabled"] is False  # fp32 on CPU
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["zero_optimization"]["stage"] == 2
    # GPU-only measures: on CPU they are copies and threads with nothing to gain
    assert ds["zero_optimization"]["contiguous_gradients"] is False and ds["zero_optimization"]["overlap_comm"] is False
    assert ds["scheduler"]["type"] == "WarmupDecayLR"
    assert ds["scheduler"]["params"]["warmup_max_lr"] == pytest.approx(5e-4)
    assert default_zero_stage(2_000_000_000) == 3
