"""DeepSpeed checkpoints loaded safely, and the consolidated fp32 export the evaluation stages read.

DeepSpeed reads its files with ``torch.load(weights_only=False)``, i.e. full unpickling of whatever a file holds:
anyone who can write the checkpoint store would run code on every worker. Here every read DeepSpeed does while we
load a checkpoint (normal or universal) or convert one to the universal format is weights-only, with an explicit
allowlist of the few non-tensor classes DeepSpeed writes (``torch.serialization.add_safe_globals``): the engine's
checkpoint engine gets a weights-only loader, and ``weights_only_loads()`` swaps ``torch.load`` itself for the
duration (DeepSpeed's conversion and universal loader call ``torch.load`` directly). A file the allowlist refuses
raises ``UnsafeCheckpointError``; there is no fallback to unsafe loading.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import threading
from types import TracebackType
from typing import Any

import fsspec
import torch

from vitpipe.pipeline.manifest import url_to_fs, write_atomic

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


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds objects outside the weights-only allowlist: it is refused, never unpickled."""


_TORCH_LOAD = torch.serialization.load  # the genuine loader, whatever is patched over torch.load later
_REASON = re.compile(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)")


def _refused(f: Any, why: str) -> UnsafeCheckpointError:
    with _scope_lock:
        _refusals.append(f"refusing to load {f}: {why}")
        return UnsafeCheckpointError(_refusals[-1])


def weights_only_load(f: Any, map_location: Any = None, pickle_module: Any = None, *, weights_only: Any = None,
                      mmap: bool | None = None, **pickle_load_args: Any) -> Any:
    """``torch.load`` with its signature, always weights-only with the DeepSpeed allowlist whatever ``weights_only``
    the caller asks for (DeepSpeed passes False); UnsafeCheckpointError for anything the allowlist refuses."""
    allow_deepspeed_globals()
    if pickle_module is not None:
        raise _refused(f, f"the caller asked for full unpickling (pickle_module="
                          f"{getattr(pickle_module, '__name__', pickle_module)})")
    try:
        return _TORCH_LOAD(f, map_location=map_location, weights_only=True, mmap=mmap, **pickle_load_args)
    except pickle.UnpicklingError as e:
        m = _REASON.search(str(e))
        raise _refused(f, f"it holds objects outside the weights-only allowlist ({m.group(1) if m else e}): a "
                          "tampered or foreign file, never unpickled") from None


_scope_lock = threading.Lock()
_scope = {"depth": 0, "saved": []}
_refusals: list[str] = []


class weights_only_loads:  # noqa: N801 (used like a function: ``with weights_only_loads():``)
    """Within the block every ``torch.load`` / ``torch.serialization.load`` call in this process (DeepSpeed's
    ``ds_to_universal`` and universal loader call them directly, with ``weights_only=False``) is
    ``weights_only_load``. Reentrant and thread-safe (a depth count: the last block to leave restores the originals).
    A refusal inside the block that the callee swallowed is raised again on leaving it."""

    def __enter__(self) -> weights_only_loads:
        allow_deepspeed_globals()
        with _scope_lock:
            if _scope["depth"] == 0:
                _scope["saved"] = [(mod, mod.load) for mod in (torch, torch.serialization)]
                for mod, _ in _scope["saved"]:
                    mod.load = weights_only_load
            _scope["depth"] += 1
            self._seen = len(_refusals)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with _scope_lock:
            _scope["depth"] -= 1
            if _scope["depth"] == 0:
                for mod, fn in _scope["saved"]:
                    mod.load = fn
                _scope["saved"] = []
            swallowed = _refusals[self._seen:]
        if exc_type is None and swallowed:
            raise UnsafeCheckpointError(swallowed[0])


META = "vitpipe_meta.json"


def write_meta(directory: str, meta: dict) -> None:
    """Rank 0 records how a checkpoint was cut (world size, tag, step) next to DeepSpeed's files."""
    with open(f"{directory}/{META}", "w") as f:
        json.dump(meta, f)


def read_meta(directory: str) -> dict:
    with open(f"{directory}/{META}") as f:
        return json.load(f)


def _use_safe_loader(engine: Any) -> None:
    ce = engine.checkpoint_engine
    if getattr(ce, "_vitpipe_safe", False):
        return
    allow_deepspeed_globals()
    ce.load = weights_only_load
    ce._vitpipe_safe = True


def save(engine: Any, directory: str, step: int, client: dict) -> None:
    """Every rank writes its shard of the model/optimizer state (plus rank 0's client state) into ``directory``."""
    engine.save_checkpoint(directory, tag=f"step{step}", client_state=client)


def load(engine: Any, directory: str) -> dict:
    """Load the newest tag in ``directory`` into ``engine`` (weights, optimizer, LR schedule); returns client state.
    A universal checkpoint (``to_universal``) needs the engine built with ``checkpoint.load_universal``. Every file
    is read weights-only (UnsafeCheckpointError otherwise)."""
    _use_safe_loader(engine)
    # The engine keeps `checkpoint.load_universal` for its whole life: after an elastic resume (universal), a later
    # rollback reads an ordinary checkpoint of this world size. The folder decides how it is read.
    engine._config.load_universal_checkpoint = os.path.exists(f"{directory}/latest_universal")
    with weights_only_loads():
        path, client = engine.load_checkpoint(directory, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint found in {directory}")
    _restore_zero3_universal_groups(engine, directory)
    return client


def _restore_zero3_universal_groups(engine: Any, directory: str) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal loader (0.19.8, ``load_hp_checkpoint_state_from_checkpoint_dir_
    stage3``): it gives every optimizer group the first group's hyperparameters (so the no-decay group of biases,
    norms and embeddings would decay), and one shared ``step`` tensor to every group (so torch's Adam, which counts
    it up in place, would advance it once per group and step: wrong bias corrections). Each group gets back its own
    hyperparameters, from the file DeepSpeed read them from, and its own step counter."""
    if not (engine.load_universal_checkpoint() and engine.zero_optimization_stage() == 3):
        return
    with open(f"{directory}/latest_universal") as f:
        tag = f.read().strip()
    saved = weights_only_load(f"{directory}/{tag}/zero/optimizer_state.pt", map_location="cpu")["param_groups"]
    groups = engine.optimizer.optimizer.param_groups
    if len(saved) != len(groups):
        raise RuntimeError(f"universal checkpoint {directory}/{tag} has {len(saved)} optimizer groups, the engine "
                           f"{len(groups)}")
    for group, hyper in zip(groups, saved):
        group.update({k: v for k, v in hyper.items() if k != "params"})
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


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
                        vit: Any = None, prefix: str = "", normalisation: tuple | None = None) -> None:
    """Write ``model.pt`` (fp32 state_dict of the ViT) and ``model.json`` (ViTConfig + grid + prefix tokens) from
    rank 0. With an objective wrapper (MPP), ``prefix`` selects the encoder's entries and ``vit`` is the encoder.
    ``normalisation``: the (mean, std) the model trained on; other than 0.5 it is folded into the patch embedding
    (``vitpipe.models.normalisation``) so the exported model takes every consumer's (u - 0.5) / 0.5, and recorded
    in model.json as ``input_normalisation``."""
    sd = full_fp32_state_dict(engine)
    if rank != 0:
        return
    vit = vit if vit is not None else engine.module
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    meta = {"config": model_cfg.to_dict(), "grid_size": list(vit.grid_size),
            "num_prefix_tokens": vit.num_prefix_tokens, **(extra or {})}
    sd, folded = fold_for_export(sd, normalisation)
    if folded:
        meta["input_normalisation"] = folded
    write_consolidated(sd, meta, out_url)


def fold_for_export(sd: dict[str, torch.Tensor], normalisation: tuple | None) -> tuple[dict, dict | None]:
    """``sd`` rewritten to take (u - 0.5) / 0.5 inputs when it trained on another ``normalisation`` (mean, std),
    and the record of it (None: nothing to fold)."""
    from vitpipe.models import fold_input_normalisation, is_default_normalisation
    from vitpipe.models.normalisation import DEFAULT_MEAN, DEFAULT_STD

    if normalisation is None or is_default_normalisation(*normalisation):
        return sd, None
    mean, std = (list(map(float, v)) for v in normalisation)
    return fold_input_normalisation(sd, mean, std), {
        "trained_on": {"mean": mean, "std": std},
        "folded_to": {"mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)}}


def write_consolidated(state_dict: dict[str, torch.Tensor], meta: dict, out_url: str) -> None:
    """Write ``model.pt`` then ``model.json`` (``meta`` plus ``weights_sha256``, the digest of model.pt's bytes), each
    atomically: a reader never finds a partial file under either name, and model.json (what readers look for)
    comes last; a model.pt left from a newer, interrupted export no longer matches model.json's digest."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    data = buf.getvalue()
    fs, root = url_to_fs(out_url)
    root = root.rstrip("/")
    write_atomic(fs, f"{root}/model.pt", data)
    meta = {**meta, "weights_sha256": hashlib.sha256(data).hexdigest()}
    write_atomic(fs, f"{root}/model.json", json.dumps(meta, indent=2).encode())


def load_consolidated(url: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read ``model.pt`` + ``model.json`` from a pretrain stage folder (``weights_only=True``); ValueError if model.pt
    is not the one model.json was written for (its ``weights_sha256``, where recorded)."""
    with fsspec.open(f"{url}/model.json", "r") as f:
        meta = json.load(f)
    with fsspec.open(f"{url}/model.pt", "rb") as f:
        data = f.read()
    want = meta.get("weights_sha256")
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise ValueError(f"{url}/model.pt does not match model.json's weights_sha256 (an interrupted export?)")
    sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return sd, meta


def to_universal(directory: str, tag: str, out_dir: str) -> str:
    """Convert the sharded checkpoint ``directory/tag`` to DeepSpeed's universal format under ``out_dir``, so it can be
    loaded at another world size (config ``checkpoint.load_universal``); returns the folder to load from. Every
    file the conversion reads is read weights-only (UnsafeCheckpointError otherwise)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    target = f"{out_dir}/{tag}_universal"
    # One worker each: with more, ds_to_universal reads the shards in a process pool, outside this process's
    # weights-only torch.load.
    args = argparse.Namespace(input_folder=f"{directory}/{tag}", output_folder=target, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with weights_only_loads():
        ds_to_universal.main(args)
    with open(f"{out_dir}/latest_universal", "w") as f:
        f.write(f"{tag}_universal")
    # client state (trainer step, stream position, RNG) lives in the model-states file, which the conversion keeps
    return out_dir
