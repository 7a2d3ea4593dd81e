"""The demo against the yardstick over several pretraining seeds: for each seed, the demo run timed from a fresh
store (``benchmarks/demo_time.py --set pretrain.seed=S``), then the yardstick for the demo's measured training
seconds (``benchmarks/yardstick.py --budget <train_s>``), then one table of test numbers per pair and the
demo-minus-yardstick difference per cell: its mean over the pairs, its smallest value and how many pairs are ahead.
One pair is one noisy draw (hymenoptera's 153 test images: ~4 points of binomial error); a per-cell claim needs
several.

    python benchmarks/yardstick_pairs.py --seeds 0,1,2          # ~16 min per pair on a 2-core VM
    python benchmarks/yardstick_pairs.py --seeds 0,1,2 --summary-only   # the table from what <root> holds

Layout (a pair already there is reused, so an interrupted call resumes): ``<root>/seed<S>/demo_time.json``,
``<root>/seed<S>/store`` (the demo's store), ``<root>/seed<S>/yardstick/yardstick.json``. The yardstick script
seeds itself (0); what varies between its runs is the step count its time budget buys.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASKS = ("cifar10", "digits", "hymenoptera", "hymenoptera_64px")
# cell suffix -> (the demo's fewshot-stage metric, the yardstick's evaluation metric), after "<task>/"
CELLS = {"10shot": ("10shot", "10shot/mean"), "25shot": ("25shot", "25shot/mean"),
         "knn": ("knn_k20", "knn/k20"), "linear": ("linear_test_acc", "linear/test_acc")}


def run_pair(seed: int, root: Path) -> None:
    """Run the seed's demo (unless its timing exists), then the yardstick for its training seconds (same)."""
    d = root / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    timing = d / "demo_time.json"
    if not timing.exists():
        if (d / "store").exists():
            raise SystemExit(f"{d / 'store'} exists without {timing}: an interrupted demo run; remove the store "
                             "to rerun this seed")
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "demo_time.py"), "--set", f"pretrain.seed={seed}",
                        "--store", str(d / "store"), "--json", str(timing)], check=True)
    if not (d / "yardstick" / "yardstick.json").exists():
        budget = json.loads(timing.read_text())["pretrain_timing"]["train_s"]
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "yardstick.py"), "--budget", f"{budget:.0f}",
                        "--out", str(d / "yardstick")], check=True, stdout=subprocess.DEVNULL)


def demo_metrics(store_dir: Path) -> dict[str, dict]:
    """Metrics of the fewshot and finetune stages of the one run in the demo's store (through its run record)."""
    from vitpipe.jobs.core.store import Store

    store = Store(str(store_dir))
    runs = store.list_runs()
    if len(runs) != 1:
        raise SystemExit(f"expected one run in {store_dir}, found {len(runs)}")
    return {name: store.load_result(name, runs[0]["stages"][name]["key"]).metrics for name in ("fewshot", "finetune")}


def load_pair(d: Path) -> dict:
    """The test numbers of one pair, in %: keys ``<task>/<cell>`` (CELLS), ``transfer (val)`` and the CIFAR-10
    fine-tune against the yardstick's joint head; plus the run's timing."""
    demo_m = demo_metrics(d / "store")
    fs, ft = demo_m["fewshot"], demo_m["finetune"]
    ys = json.loads((d / "yardstick" / "yardstick.json").read_text())
    ym = ys["evaluation"]["metrics"]
    demo, yard = {}, {}
    for task in TASKS:
        for cell, (ours, theirs) in CELLS.items():
            demo[f"{task}/{cell}"] = 100 * fs[f"eval/{task}/{ours}"]
            yard[f"{task}/{cell}"] = 100 * ym[f"{task}/{theirs}"]
    demo["transfer (val)"] = 100 * fs["eval/transfer_score"]
    yard["transfer (val)"] = 100 * ys["evaluation"]["transfer_score"]
    demo["CIFAR-10 fine-tune / joint head"] = 100 * ft["eval/cifar10/finetune"]
    yard["CIFAR-10 fine-tune / joint head"] = 100 * ys["yardstick"]["joint_head_test_acc"]
    timing = json.loads((d / "demo_time.json").read_text())
    return {"demo": demo, "yardstick": yard, "train_s": timing["pretrain_timing"]["train_s"],
            "bare_img_s": timing["bare_loop_images_per_s"], "demo_img_s": timing.get("pretrain_images_per_s"),
            "yardstick_images": ys["yardstick"]["images"]}


def summary(pairs: dict[int, dict]) -> dict:
    """Per cell: each pair's demo / yardstick, the differences, their mean and minimum, pairs ahead."""
    cells = list(next(iter(pairs.values()))["demo"])
    out = {}
    for c in cells:
        diffs = [p["demo"][c] - p["yardstick"][c] for p in pairs.values()]
        out[c] = {"pairs": {s: (round(p["demo"][c], 1), round(p["yardstick"][c], 1)) for s, p in pairs.items()},
                  "mean_diff": round(statistics.fmean(diffs), 2), "min_diff": round(min(diffs), 2),
                  "ahead": sum(x > 0 for x in diffs), "n": len(diffs)}
    return out


def markdown(pairs: dict[int, dict], table: dict) -> str:
    seeds = list(pairs)
    head = "| cell (test, %) | " + " | ".join(f"seed {s}: demo / yardstick" for s in seeds) + \
           " | demo − yardstick: mean (min) | pairs ahead |"
    lines = [head, "|" + "---|" * (len(seeds) + 3)]
    for c, r in table.items():
        cols = " | ".join(f"{r['pairs'][s][0]:.1f} / {r['pairs'][s][1]:.1f}" for s in seeds)
        lines.append(f"| {c} | {cols} | {r['mean_diff']:+.1f} ({r['min_diff']:+.1f}) | {r['ahead']}/{r['n']} |")
    lines.append("| training s; demo img/s; yardstick images | " + " | ".join(
        f"{p['train_s']:.0f}; {p['demo_img_s']:.0f}; {p['yardstick_images']:,.0f}" for p in pairs.values()) + " | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", type=lambda v: [int(s) for s in v.split(",")])
    ap.add_argument("--root", default=str(REPO / "runs" / "pairs"))
    ap.add_argument("--summary-only", action="store_true", help="no runs: the table from what --root holds")
    ap.add_argument("--json", help="also write the pairs and the table to this file")
    args = ap.parse_args()
    root = Path(args.root)
    if not args.summary_only:
        for s in args.seeds:
            run_pair(s, root)
    pairs = {s: load_pair(root / f"seed{s}") for s in args.seeds}
    table = summary(pairs)
    print(markdown(pairs, table))
    if args.json:
        Path(args.json).write_text(json.dumps({"pairs": pairs, "table": table}, indent=2))


if __name__ == "__main__":
    main()
