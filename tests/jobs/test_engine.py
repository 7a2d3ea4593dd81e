"""The engine vitpipe trains with (jobs/train/engine.py, adamw.py): its fused, device-clipped AdamW and its
gradient norm compute what torch's clip_grad_norm_ + AdamW and DeepSpeed's own norm and clipping compute."""

from __future__ import annotations


import pytest
import torch

from vitpipe.jobs.train.adamw import ClippedAdamW
from vitpipe.jobs.train.config import PretrainConfig
from vitpipe.jobs.train.engine import attention_backend, build_engine, check_compile
from vitpipe.models import ViTConfig, create

MODEL = ViTConfig(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, img_size=16, num_classes=5)




def test_clipped_adamw_is_clip_grad_norm_then_adamw():
    """Own-norm mode (ZeRO-0): three steps with gradients far above max_norm match clip_grad_norm_ + torch's
    unfused AdamW; a non-finite gradient skips the step and leaves parameters and state alone."""
    torch.manual_seed(0)
    ref = [torch.randn(7, 5, requires_grad=True), torch.randn(5, requires_grad=True)]
    mine = [t.detach().clone().requires_grad_() for t in ref]
    def groups(ps):
        return [{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}]

    a = torch.optim.AdamW(groups(ref), lr=0.05, betas=(0.9, 0.99), eps=1e-8, foreach=False)
    b = ClippedAdamW(groups(mine), lr=0.05, betas=(0.9, 0.99), eps=1e-8, max_norm=1.0)
    for i in range(3):
        g = [torch.randn_like(t) * 10 for t in ref]
        for p, q, gg in zip(ref, mine, g):
            p.grad, q.grad = gg.clone(), gg.clone()
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        a.step()
        b.step()
        assert b.overflow is False
        for p, q in zip(ref, mine):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
    kept = [q.detach().clone() for q in mine]
    mine[0].grad = torch.full_like(mine[0], float("inf"))
    mine[1].grad = torch.zeros_like(mine[1])
    b.step()
    assert b.overflow is True
    assert all(torch.equal(k, q) for k, q in zip(kept, mine))
    assert all(float(b.state[q]["step"]) == 3.0 for q in mine)


def _engine(zero: int, client: bool, seed: int = 0, clip: float = 0.05):
    import deepspeed

    from vitpipe.jobs.train.ds_config import deepspeed_config
    from vitpipe.jobs.train.optim import param_groups

    torch.manual_seed(seed)
    model = create(MODEL)
    # eps=1: Adam's update then scales with the gradient (m / (sqrt(v) + eps) ~ m), so clipping shows in the weights
    p = PretrainConfig(steps=50, global_batch=4, micro_batch=4, zero_stage=zero, warmup_steps=1, lr=1e-2,
                       eps=1.0, grad_clip=clip, num_workers=1)
    if client:
        return build_engine(model, p, world_size=1, device=torch.device("cpu"), num_params=0)[0]
    cfg = deepspeed_config(p, world_size=1, device="cpu", num_params=0)  # DeepSpeed's own AdamW and clipping
    return deepspeed.initialize(model=model, model_parameters=param_groups(model, p.weight_decay), config=cfg)[0]


def _batch(i: int):
    g = torch.Generator().manual_seed(i)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)


@pytest.mark.parametrize("zero", [1, 2])
def test_foreach_norm_equals_deepspeeds_norm(process_group, zero):
    e = _engine(zero, client=True)
    x, y = _batch(0)
    e.backward(torch.nn.functional.cross_entropy(e(x), y))
    zero_opt = e.optimizer
    ours = zero_opt.scaled_global_norm()
    theirs = type(zero_opt).scaled_global_norm(zero_opt)
    assert float(ours) > 0
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=0)
    e.step()
    e.destroy()


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_vitpipe_engine_trains_as_deepspeeds_own_optimizer_and_clipping(process_group, zero):
    """Five steps with clipping active (grad_clip far below the norm): vitpipe's engine (fused AdamW clipping by
    DeepSpeed's norm on the device) ends at the weights DeepSpeed's own AdamW and clipping reach."""
    from vitpipe.jobs.train import checkpoint as ckpt

    engines = a, b, unclipped = _engine(zero, client=False), _engine(zero, client=True), _engine(zero, True, clip=0)
    for i in range(5):
        x, y = _batch(i)
        for e in engines:
            e.backward(torch.nn.functional.cross_entropy(e(x), y))
            e.step()
    assert float(b.get_global_grad_norm()) > 0.5  # ten times grad_clip: clipping was on at every step
    wa, wb, wu = (ckpt.full_fp32_state_dict(e) for e in engines)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-7)
    # the tolerance is far below what clipping changes
    assert max((wu[k] - wa[k]).abs().max() for k in wa) > 1e-3
    for e in engines:
        e.destroy()


def test_a_zero3_engine_with_whole_weights_leaves_torch_linear_alone(process_group):
    """DeepSpeed's memory-efficient linear would replace torch.nn.functional.linear for the whole process (every
    Linear, the evaluators' included, through a slower Python autograd Function): off when no weight is partitioned."""
    linear = torch.nn.functional.linear
    try:
        e = _engine(3, client=True)
        assert torch.nn.functional.linear is linear
        x, y = _batch(0)
        e.backward(torch.nn.functional.cross_entropy(e(x), y))
        e.step()
        e.destroy()
    finally:
        torch.nn.functional.linear = linear  # never leave a patched linear to the tests after this one


def test_compile_choices_the_device_cannot_run_fail_in_one_line():
    with pytest.raises(ValueError, match=r"^pretrain.compile=deepcompile needs a CUDA device .* not cpu; use "
                                         r"pretrain.compile=inductor or none$"):
        check_compile("deepcompile", torch.device("cpu"), 1)
    with pytest.raises(ValueError, match="pretrain.compile=deepcompile needs pretrain.zero_stage 1, 2 or 3, got 0"):
        check_compile("deepcompile", torch.device("cuda"), 0)
    check_compile("inductor", torch.device("cpu"), 3)


def test_attention_backend_is_observed_not_assumed():
    """On CPU in fp32 torch's SDPA runs its CPU flash kernel; with a mask-free model it is the only kernel."""
    vit = create(MODEL)
    assert attention_backend(vit, torch.float32, torch.device("cpu")) == "flash (CPU)"


def test_export_folds_the_stream_normalisation_into_the_patch_embedding(process_group, tmp_path):
    """A run trained on dataset statistics exports a model that takes (u - 0.5) / 0.5, as every consumer feeds it,
    and computes what the trained weights compute on the statistics-normalised image; model.json says so."""
    import json

    from vitpipe.jobs.train.consolidated import load_model
    from vitpipe.jobs.train.spec import PretrainSpec
    from vitpipe.jobs.train.synthetic import SyntheticStream
    from vitpipe.jobs.train.trainer import Trainer
    from vitpipe.pipeline import StreamConfig

    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    mcfg = ViTConfig.from_name("mu/4", img_size=16, num_classes=10)
    p = PretrainConfig(steps=2, global_batch=4, micro_batch=4, zero_stage=2, precision="fp32", warmup_steps=1,
                       num_workers=1, stream=StreamConfig(img_size=16, mean=mean, std=std))
    spec = PretrainSpec(model=mcfg, pretrain=p, manifest_url="", out_url=str(tmp_path))
    t = Trainer(spec, rank=0, world=1, device=torch.device("cpu"),
                stream=SyntheticStream(batch=4, img_size=16, num_classes=10, rank=0, fixed=True))
    try:
        t.step()
        t.export()
        model, _ = load_model(str(tmp_path))
        u = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        vit = t.vit.eval()
        with torch.no_grad():
            torch.testing.assert_close(model.eval().pre_logits((u - 0.5) / 0.5), vit.pre_logits((u - m) / s),
                                       atol=2e-5, rtol=1e-5)
    finally:
        t.close()
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["input_normalisation"] == {"trained_on": {"mean": list(mean), "std": list(std)},
                                           "folded_to": {"mean": [0.5] * 3, "std": [0.5] * 3}}
