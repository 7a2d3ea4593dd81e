"""The bare-loop yardstick (``../shared/tools/bare_loop_baseline.py``) run on this machine and then evaluated with
vitpipe's own evaluation code, so the demo's transfer numbers have a same-machine, same-evaluator comparison.

    python benchmarks/yardstick.py --budget 240 [--out runs/yardstick]

1. runs the yardstick for ``--budget`` seconds of training (one process, 2 threads, pre-decoded CIFAR-10, pad-crop +
   flip, AdamW 1e-3, wd 0.05) and keeps its printed throughput, joint-head test accuracy and 10-shot;
2. converts its saved weights into a vitpipe ``VisionTransformer`` (exact GELU; its per-channel input normalisation
   folded into the patch embedding, so vitpipe's (u - 0.5) / 0.5 input gives the same features; checked against the
   yardstick's own module, max abs difference printed) and writes ``model.pt`` + ``model.json`` like a pretrain stage;
3. runs the demo recipe's fewshot evaluation (same tasks, views, evaluators, seeds) on it and prints the metrics
   as JSON (validation and test), plus the transfer score.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BASELINE = (REPO / ".." / "shared" / "tools" / "bare_loop_baseline.py").resolve()


def _bare_module():
    spec = importlib.util.spec_from_file_location("bare_loop_baseline", BASELINE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def convert(sd: dict) -> tuple[dict, object]:
    """The yardstick's state_dict as a vitpipe ``Ti/4`` (depth 6, exact GELU) state_dict, and its config."""
    from vitpipe.models import ViTConfig

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    cfg = ViTConfig.from_name("Ti/4", img_size=32, num_classes=sd["head.weight"].shape[0], depth=depth, gelu="exact")
    names = {"cls": "cls_token", "pos": "pos_embed", "pe.weight": "patch_embed.proj.weight",
             "pe.bias": "patch_embed.proj.bias", "norm.weight": "norm.weight", "norm.bias": "norm.bias",
             "head.weight": "head.weight", "head.bias": "head.bias"}
    block = {"n1": "norm1", "qkv": "attn.qkv", "o": "attn.proj", "n2": "norm2", "f1": "mlp.fc1", "f2": "mlp.fc2"}
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, mod, param = k.split(".")
            out[f"blocks.{i}.{block[mod]}.{param}"] = v
        else:
            out[names[k]] = v
    return out, cfg


def run_yardstick(budget: float, save: str) -> dict:
    env = {**os.environ, "BUDGET": str(budget), "SAVE": save}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(BASELINE)], env=env, capture_output=True, text=True, check=True)
    out = res.stdout
    ips = [float(m) for m in re.findall(r"(\d+) img/s", out)]
    found = {"wall_s": time.perf_counter() - t0, "budget_s": budget, "log": out.strip().splitlines()[-6:]}
    if ips:
        found["img_per_s"] = ips[-1]
    for key, pat in (("joint_head_test_acc", r"joint head\) ([0-9.]+)"), ("own_10shot", r"pretrained 10-shot ([0-9.]+)"),
                     ("own_random_10shot", r"random-init 10-shot ([0-9.]+)"), ("images", r"images (\d+)")):
        m = re.search(pat, out)
        if m:
            found[key] = float(m.group(1))
    return found


def export(save: str, out_dir: Path) -> dict:
    """model.pt + model.json of the converted yardstick; returns the parity check."""
    from vitpipe.models import create, fold_input_normalisation

    blob = torch.load(save, map_location="cpu", weights_only=False)  # our own file, written just now
    sd, cfg = convert(blob["model"])
    mean, std = [float(v) for v in blob["mean"]], [float(v) for v in blob["std"]]
    model = create(cfg).eval()
    model.load_state_dict(fold_input_normalisation(sd, mean, std))
    bare = _bare_module().ViT(nc=cfg.num_classes).eval()
    bare.load_state_dict(blob["model"])
    u = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # pixels in [0, 1]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():  # each model with its own input normalisation
        diff = float((model.pre_logits((u - 0.5) / 0.5) - bare.feats((u - m) / s)).abs().max())
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    (out_dir / "model.pt").write_bytes(buf.getvalue())
    meta = {"config": cfg.to_dict(), "grid_size": list(model.grid_size), "num_prefix_tokens": model.num_prefix_tokens,
            "normalisation_folded_from": {"mean": mean, "std": std}}
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2))
    return {"feature_max_abs_diff": diff, "mean": mean, "std": std}


def evaluate(model_dir: Path, recipe: str, threads: int) -> dict:
    """The recipe's fewshot stage evaluation (tasks, views, evaluators, seeds) of the exported model."""
    from vitpipe.jobs.config.recipes import build_config
    from vitpipe.jobs.stages.fewshot_eval import evaluate_task, transfer_scores
    from vitpipe.jobs.train.consolidated import load_model

    torch.set_num_threads(threads)
    fc = build_config(recipe).fewshot
    model, mcfg = load_model(str(model_dir))
    tests, vals = fc.evaluator_lists(baseline=False)
    raw: dict[str, float] = {}
    for spec in fc.tasks:
        res = evaluate_task(spec, {"pretrained": (model, "yardstick")}, mcfg, evaluators={"pretrained": tests},
                            validation={"pretrained": vals}, img_size=fc.img_size,
                            validation_fraction=fc.validation_fraction, validation_seed=fc.validation_seed,
                            batch_size=fc.probe.batch_size, representation=fc.probe.representation)
        raw.update(res.raw["pretrained"])
    score = transfer_scores({"pretrained": raw}, fc.out_of_domain).get("pretrained")
    keep = {k: round(v, 4) for k, v in sorted(raw.items())
            if k.endswith(("shot/mean", "shot/std", "/test_acc", "/val_acc")) or "/knn/" in k}
    return {"transfer_score": score, "metrics": keep}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds of yardstick training")
    ap.add_argument("--out", default=str(REPO / "runs" / "yardstick"))
    ap.add_argument("--skip-train", action="store_true", help="reuse <out>/bare.pt")
    ap.add_argument("--recipe", default="demo", help="whose fewshot evaluation to run on the yardstick's model")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save = str(out / "bare.pt")
    report: dict = {"cpu": _cpu_name(), "load_avg": os.getloadavg()}
    if not args.skip_train:
        report["yardstick"] = run_yardstick(args.budget, save)
    report["export"] = export(save, out / "model")
    t0 = time.perf_counter()
    report["evaluation"] = evaluate(out / "model", args.recipe, args.threads)
    report["evaluation"]["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "yardstick.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
