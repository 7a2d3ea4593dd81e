"""The yardstick's bare loop with one vitpipe choice switched at a time, for a fixed number of steps, each model
evaluated with the demo's own fewshot code on the validation views (README, "How the demo recipe was chosen").

    python benchmarks/yardstick_ablation.py --model bare                  # row 1: the yardstick's module
    python benchmarks/yardstick_ablation.py --model vit                   # vitpipe's ViT, original-code init
    python benchmarks/yardstick_ablation.py --model vit --norm half       # ... on (u - 0.5) / 0.5 inputs
    python benchmarks/yardstick_ablation.py --model vit --crop rrc        # ... with the Inception crop (0.35-1)
    python benchmarks/yardstick_ablation.py --model vit-torch             # vitpipe's ViT, init=torch
    python benchmarks/yardstick_ablation.py --model vit-torch --optim vitpipe   # ... vitpipe's old optimisation
    # round 4, the demo's depth at equal wall time (its per-image crop, its LR ramp; steps sized to ~155 s here):
    python benchmarks/yardstick_ablation.py --model vit-torch --crop pad-sample --optim ramp --depth 2 --steps 380

Everything else is the yardstick's (``../shared/tools/bare_loop_baseline.py``): pre-decoded CIFAR-10 train, batch
128 drawn with replacement, AdamW, one process; ``--optim yardstick`` is its LR ramp to 1e-3 over 200 steps with
wd 0.05 and no clipping, ``--optim vitpipe`` 20 warm-up steps to 8e-4 then linear decay to 0, wd 0.1, clip 1,
``--optim ramp`` the demo's (the LR ramped to ``--lr`` over all ``--steps``, wd 0.05, no clip). ``--depth`` and
``--batch`` size vitpipe's ViT (width 192, patch 4) and the step. Prints one JSON line: the settings, images seen,
training seconds and img/s, the validation few-shot means and the transfer score. ~5 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import yardstick  # noqa: E402  (this folder's module: the yardstick's export + evaluation)


def _rrc(xb: torch.Tensor, lo: float = 0.35) -> torch.Tensor:
    """Inception crop on pre-normalised tensors: area in [lo, 1], log-uniform aspect in [3/4, 4/3], bilinear."""
    out = torch.empty_like(xb)
    size = xb.shape[-1]
    for n in range(len(xb)):
        w = h = size
        for _ in range(10):
            area = np.random.uniform(lo, 1) * size * size
            ar = math.exp(np.random.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if 0 < cw <= size and 0 < ch <= size:
                w, h = cw, ch
                break
        i, j = np.random.randint(0, size + 1 - h), np.random.randint(0, size + 1 - w)
        out[n] = F.interpolate(xb[n:n + 1, :, i:i + h, j:j + w], size=(size, size), mode="bilinear",
                               align_corners=False)[0]
    return out


def _load_train(bare) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 train as uint8 arrays, decoded once per machine (a cache in the temp folder: rows take ~5 min)."""
    cache = Path(tempfile.gettempdir()) / "vitpipe_yardstick_cifar10_train.npz"
    if cache.exists():
        with np.load(cache) as z:
            return z["x"], z["y"]
    xtr, ytr = bare.load("train")
    np.savez(cache, x=xtr, y=ytr)
    return xtr, ytr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("bare", "vit", "vit-torch"), default="bare")
    ap.add_argument("--norm", choices=("stats", "half"), default="stats")
    ap.add_argument("--crop", choices=("pad", "pad-sample", "rrc", "none"), default="pad",
                    help="pad: one pad-4 crop offset per batch (the yardstick's); pad-sample: one per image "
                         "(vitpipe's stream); none: the image as it is (flip only)")
    ap.add_argument("--optim", choices=("yardstick", "vitpipe", "ramp"), default="yardstick",
                    help="ramp: the demo's, the LR ramped linearly to --lr over the whole run, wd 0.05, no clip")
    ap.add_argument("--lr", type=float, default=1.3e-3, help="peak LR of --optim ramp")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--steps", type=int, default=180)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipe", default="demo", help="whose fewshot evaluation to run")
    args = ap.parse_args()

    bare = yardstick._bare_module()
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(args.threads)
    xtr, ytr = _load_train(bare)
    mean, std = xtr.reshape(-1, 3).mean(0) / 255, xtr.reshape(-1, 3).std(0) / 255
    if args.norm == "half":
        mean, std = np.full(3, 0.5), np.full(3, 0.5)
    x = ((torch.from_numpy(xtr).float() / 255 - torch.tensor(mean).float()) / torch.tensor(std).float())
    x, y = x.permute(0, 3, 1, 2).contiguous(), torch.from_numpy(ytr)
    if args.model == "bare":
        model = bare.ViT()
    else:
        from vitpipe.models import ViTConfig, create

        model = create(ViTConfig.from_name("Ti/4", img_size=32, num_classes=10, gelu="exact",
                                           depth=args.depth, init="torch" if args.model == "vit-torch" else "jax"))
    vitpipe_optim = args.optim == "vitpipe"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1 if vitpipe_optim else 0.05)

    def lr_at(step: int) -> float:
        if args.optim == "ramp":
            return args.lr * (step + 1) / args.steps
        if not vitpipe_optim:
            return 1e-3 * min(1, (step + 1) / 200)
        warm = 20
        return 8e-4 * (step + 1) / warm if step < warm else 8e-4 * max(0.0, (args.steps - step) / (args.steps - warm))

    bsz = args.batch
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (bsz,))
        if args.crop == "pad":  # the yardstick's: one offset per batch
            xb = F.pad(x[idx], (4, 4, 4, 4), mode="reflect")
            i, j = np.random.randint(0, 9, 2)
            xb = xb[:, :, i:i + 32, j:j + 32].clone()
        elif args.crop == "pad-sample":
            padded = F.pad(x[idx], (4, 4, 4, 4), mode="reflect")
            ij = np.random.randint(0, 9, (bsz, 2))
            xb = torch.stack([padded[n, :, a:a + 32, b:b + 32] for n, (a, b) in enumerate(ij)])
        elif args.crop == "none":
            xb = x[idx].clone()
        else:
            xb = _rrc(x[idx])
        flip = torch.rand(bsz) < 0.5
        xb[flip] = xb[flip].flip(3)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        if vitpipe_optim:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    train_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if args.model == "bare":
            torch.save({"model": model.state_dict(), "mean": mean, "std": std}, out / "bare.pt")
            yardstick.export(str(out / "bare.pt"), out / "model")
        else:
            from vitpipe.models import fold_input_normalisation

            (out / "model").mkdir()
            torch.save(fold_input_normalisation(model.state_dict(), list(mean), list(std)), out / "model" / "model.pt")
            (out / "model" / "model.json").write_text(json.dumps({
                "config": model.cfg.to_dict(), "grid_size": list(model.grid_size),
                "num_prefix_tokens": model.num_prefix_tokens}))
        res = yardstick.evaluate(out / "model", args.recipe, args.threads)
    val = {k: round(100 * v, 1) for k, v in res["metrics"].items()
           if ".val/" in k and k.endswith(("10shot/mean", "25shot/mean"))}
    print(json.dumps({"settings": vars(args), "images": args.steps * bsz, "train_s": round(train_s, 1),
                      "img_per_s": round(args.steps * bsz / train_s, 1),
                      "transfer_score": round(100 * res["transfer_score"], 1), **val}))


if __name__ == "__main__":
    main()
