import pytest

from vitpipe.jobs.train.config import PretrainConfig
from vitpipe.jobs.train.ds_config import (
    ZERO3_PERSIST_BYTES, accumulation_steps, deepspeed_config, default_zero_stage, optimizer_clips)


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
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert ds["scheduler"]["params"]["total_num_steps"] == 1000
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["contiguous_gradients"] is True and ds["zero_optimization"]["overlap_comm"] is True


def test_gpu_run_gets_the_fast_settings():
    """What a CUDA run's engine gets (client_optimizer=True, as engine.build_engine asks): no throughput timer,
    no optimizer section (vitpipe's fused AdamW is passed in), clipping moved into that optimizer for ZeRO-1/2,
    comm overlap only with more than one rank, the non-finite check on, ZeRO-1 below 1B parameters."""
    p = PretrainConfig(global_batch=256, micro_batch=128, grad_clip=1.0)
    one = deepspeed_config(p, world_size=1, device="cuda", num_params=632_000_000, client_optimizer=True)
    assert one["timers"] == {"throughput": {"enabled": False, "synchronized": False}}
    assert one["wall_clock_breakdown"] is False
    assert "optimizer" not in one
    assert one["zero_optimization"] == {"stage": 1, "overlap_comm": False, "contiguous_gradients": False}
    assert one["gradient_clipping"] == 0.0  # the client optimizer clips (ZeRO-1/2)
    assert one["bf16"] == {"enabled": True, "check_grad_overflow": True}
    two = deepspeed_config(PretrainConfig(global_batch=256, micro_batch=128, zero_stage=2), world_size=2,
                           device="cuda", num_params=632_000_000, client_optimizer=True)
    assert two["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True}
    # ZeRO-1 would pay a hook per parameter for contiguous gradients; it overlaps without them
    z1 = deepspeed_config(p, world_size=2, device="cuda", num_params=632_000_000, client_optimizer=True)
    assert z1["zero_optimization"] == {"stage": 1, "overlap_comm": True, "contiguous_gradients": False}
    # ZeRO-3 clips on the device itself: DeepSpeed keeps the clipping
    z3 = deepspeed_config(PretrainConfig(zero_stage=3, grad_clip=1.0), world_size=1, device="cuda",
                          num_params=632_000_000, client_optimizer=True)
    assert z3["gradient_clipping"] == 1.0
    assert "compile" not in one
    dc = deepspeed_config(PretrainConfig(compile="deepcompile"), world_size=1, device="cuda", num_params=1,
                          client_optimizer=True)
    assert dc["compile"] == {"deepcompile": True}


def test_zero3_keeps_parameters_whole_when_they_fit():
    p = PretrainConfig(zero_stage=3, precision="bf16", global_batch=4096, micro_batch=64)
    # one rank: everything whole, nothing to prefetch
    z = deepspeed_config(p, world_size=1, device="cuda", num_params=632_000_000)["zero_optimization"]
    assert z["stage3_param_persistence_threshold"] == z["stage3_model_persistence_threshold"] == 632_000_000
    assert z["stage3_prefetch_bucket_size"] == 0 and z["memory_efficient_linear"] is False
    # many ranks, 16-bit weights under the budget: still whole
    z = deepspeed_config(p, world_size=64, device="cuda", num_params=1_800_000_000)["zero_optimization"]
    assert z["stage3_model_persistence_threshold"] == 1_800_000_000 and z["stage3_prefetch_bucket_size"] == 0
    assert z["memory_efficient_linear"] is False
    # over the budget: the first ZERO3_PERSIST_BYTES of weights whole, the rest gathered per block (prefetched)
    z = deepspeed_config(p, world_size=64, device="cuda", num_params=4_000_000_000)["zero_optimization"]
    assert z["stage3_model_persistence_threshold"] == ZERO3_PERSIST_BYTES // 2
    assert "stage3_prefetch_bucket_size" not in z
    # partitioned weights: DeepSpeed's linear re-gathers them in backward
    assert z["memory_efficient_linear"] is True


def test_cpu_defaults_and_lr_scaling():
    p = PretrainConfig(lr=1e-3, lr_base_batch=256, global_batch=128, micro_batch=64, zero_stage=None)
    ds = deepspeed_config(p, world_size=2, device="cpu", num_params=5_000_000)
    assert ds["bf16"]["enabled"] is False  # fp32 on CPU
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["zero_optimization"]["stage"] == 1
    # GPU-only measures: on CPU they are copies and threads with nothing to gain
    assert ds["zero_optimization"]["contiguous_gradients"] is False and ds["zero_optimization"]["overlap_comm"] is False
    assert ds["scheduler"]["type"] == "WarmupDecayLR"
    assert ds["scheduler"]["params"]["warmup_max_lr"] == pytest.approx(5e-4)
    assert default_zero_stage(999_000_000) == 1 and default_zero_stage(2_000_000_000) == 3


def test_bf16_at_zero0_fails_in_one_line_where_the_device_is_known():
    """DeepSpeed's ZeRO-0 bf16 optimizer reads every gradient's overflow flag to the host: refused with a way out,
    at config time where the config says GPU (or bf16), else when the DeepSpeed config is made for a CUDA device."""
    msg = r"pretrain.zero_stage=0 with bf16 precision: .* use pretrain.zero_stage=1 .* or pretrain.precision=fp32"
    with pytest.raises(ValueError, match=msg):
        PretrainConfig(zero_stage=0, precision="bf16")
    with pytest.raises(ValueError, match=msg):
        PretrainConfig(zero_stage=0, use_gpu=True)  # precision auto: bf16 on GPU
    cpu = PretrainConfig(zero_stage=0)  # auto on CPU is fp32
    assert deepspeed_config(cpu, world_size=1, device="cpu", num_params=1)["zero_optimization"]["stage"] == 0
    with pytest.raises(ValueError, match=msg):
        deepspeed_config(cpu, world_size=1, device="cuda", num_params=1)
    PretrainConfig(zero_stage=1, precision="bf16")
    PretrainConfig(zero_stage=0, precision="fp32", use_gpu=True)


def test_clipping_goes_where_it_costs_no_host_read():
    assert [optimizer_clips(s, "bf16") for s in (0, 1, 2, 3)] == [False, True, True, False]
    assert [optimizer_clips(s, "fp32") for s in (0, 1, 2, 3)] == [True, True, True, False]


def test_compile_choice_is_validated():
    with pytest.raises(ValueError, match="pretrain.compile must be none, inductor or deepcompile, got 'jit'"):
        PretrainConfig(compile="jit")
