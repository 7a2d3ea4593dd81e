"""DeepSpeed checkpoints loaded safely, and the consolidated fp32 export the evaluation stages read.

DeepSpeed's own loader calls ``torch.load(weights_only=False)``, i.e. full unpickling of whatever the file holds.
We give each engine a loader that uses ``weights_only=True`` with an explicit allowlist of the few non-tensor
classes DeepSpeed writes (``torch.serialization.add_safe_globals``), and never fall back to unsafe loading.
"""

from __future__ import annotations

import io
import json
from typing import Any

import fsspec
import torch

_ALLOWED: list[Any] | None = None


def allow_deepspeed_globals() -> list[Any]:
    """Register the non-tensor classes found in DeepSpeed checkpoints as safe for ``weights_only`` loading."""
    global _ALLOWED
    if _ALLOWED is None:
        import argparse
        import collections

        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        _ALLOWED = [ZeroStageEnum, LossScaler, fragment_address, argparse.Namespace, collections.OrderedDict,
                    set]
        torch.serialization.add_safe_globals(_ALLOWED)
    return _ALLOWED


META = "vitpipe_meta.json"


def write_meta(directory: str, meta: dict) -> None:
    """Rank 0 records how a checkpoint was cut (world size, tag, step) next to DeepSpeed's files."""
    with open(f"{directory}/{META}", "w") as f:
        json.dump(meta, f)


def read_meta(directory: str) -> dict:
    with open(f"{directory}/{META}") as f:
        return json.load(f)


def _safe_load(path: str, map_location: Any = None) -> Any:
    return torch.load(path, map_location=map_location, weights_only=True)


def _use_safe_loader(engine: Any) -> None:
    ce = engine.checkpoint_engine
    if getattr(ce, "_vitpipe_safe", False):
        return
    allow_deepspeed_globals()
    ce.load = _safe_load
    ce._vitpipe_safe = True


def save(engine: Any, directory: str, step: int, client: dict) -> None:
    """Every rank writes its shard of the model/optimizer state (plus rank 0's client state) into ``directory``."""
    engine.save_checkpoint(directory, tag=f"step{step}", client_state=client)


def load(engine: Any, directory: str) -> dict:
    """Load the newest tag in ``directory`` into ``engine`` (weights, optimizer, LR schedule); returns client state."""
    _use_safe_loader(engine)
    path, client = engine.load_checkpoint(directory, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint found in {directory}")
    return client


def full_fp32_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """Gather every parameter's full fp32 (master) value on all ranks; collective, so call it on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # ZeRO 1-3 and bf16: the fp32 master copy, assembled
        out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    for name, b in engine.module.named_buffers():
        out[name] = b.detach().cpu().clone()
    return out


def export_consolidated(engine: Any, model_cfg: Any, out_url: str, rank: int, extra: dict | None = None,
                        vit: Any = None, prefix: str = "") -> None:
    """Write ``model.pt`` (fp32 state_dict of the ViT) and ``model.json`` (ViTConfig + grid + prefix tokens) from
    rank 0. With an objective wrapper (MPP), ``prefix`` selects the encoder's entries and ``vit`` is the encoder."""
    sd = full_fp32_state_dict(engine)
    if rank != 0:
        return
    vit = vit if vit is not None else engine.module
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    buf = io.BytesIO()
    torch.save(sd, buf)
    with fsspec.open(f"{out_url}/model.pt", "wb") as f:
        f.write(buf.getvalue())
    meta = {"config": model_cfg.to_dict(), "grid_size": list(vit.grid_size),
            "num_prefix_tokens": vit.num_prefix_tokens, **(extra or {})}
    with fsspec.open(f"{out_url}/model.json", "w") as f:
        json.dump(meta, f, indent=2)


def load_consolidated(url: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read ``model.pt`` + ``model.json`` from a pretrain stage folder (``weights_only=True``)."""
    with fsspec.open(f"{url}/model.json", "r") as f:
        meta = json.load(f)
    with fsspec.open(f"{url}/model.pt", "rb") as f:
        sd = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    return sd, meta


def to_universal(directory: str, tag: str, out_dir: str) -> str:
    """Convert the sharded checkpoint ``directory/tag`` to DeepSpeed's universal format under ``out_dir``, so it can be
    loaded at another world size (config ``checkpoint.load_universal``); returns the folder to load from."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    target = f"{out_dir}/{tag}_universal"
    args = argparse.Namespace(input_folder=f"{directory}/{tag}", output_folder=target, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
    with open(f"{out_dir}/latest_universal", "w") as f:
        f.write(f"{tag}_universal")
    # client state (trainer step, stream position, RNG) lives in the model-states file, which the conversion keeps
    return out_dir
