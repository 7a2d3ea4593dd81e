"""Diagnosis of jobs that wait: a PENDING driver, or training workers whose placement group cannot be placed."""

from __future__ import annotations

import json
import time
from typing import Any


def cluster_resources(address: str) -> dict[str, float]:
    """Total resources of the alive nodes, read over the dashboard's state API (no ray.init needed)."""
    from ray.util.state import list_nodes

    total: dict[str, float] = {}
    for node in list_nodes(address=address, filters=[("state", "=", "ALIVE")], detail=True, timeout=10):
        for k, v in (node.resources_total or {}).items():
            if not k.startswith("node:") and k not in ("object_store_memory", "memory"):
                total[k] = total.get(k, 0.0) + float(v)
    return total


def _short(res: dict[str, float]) -> str:
    return ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) or "nothing"


def diagnose(address: str, info: Any, pending_timeout_s: float) -> str:
    """Why a PENDING job has not started after ``pending_timeout_s``: its driver's request against what the
    cluster's alive nodes have. "" when it has waited less (a RUNNING job's workers: see pending_workers)."""
    status = str(getattr(info.status, "value", info.status))
    now = time.time()
    started = (info.start_time or now * 1000) / 1000
    if status != "PENDING" or now - started < pending_timeout_s:
        return ""
    have = cluster_resources(address)
    # JobDetails does not carry the entrypoint request: `submit` records it in the job's metadata.
    want = json.loads((info.metadata or {}).get("vitpipe.entrypoint", "{}") or "{}")
    want = {k: v for k, v in want.items() if v}
    short = {k: v for k, v in want.items() if have.get(k, 0.0) < v}
    if short:
        return (f"job PENDING for {now - started:.0f}s: its driver asks for {_short(want)} but the cluster's "
                f"alive nodes have {_short(have)} in total (it can never be placed; lower --entrypoint-cpus/"
                f"--entrypoint-gpus or add nodes)")
    return (f"job PENDING for {now - started:.0f}s: driver request {_short(want)} fits the cluster "
            f"({_short(have)}) but is not placed yet: other jobs hold the resources, or its runtime_env is "
            f"still being set up ({(info.message or '').strip() or 'no message'})")


def pending_workers(address: str, info: Any) -> dict[str, str]:
    """Placement groups of a RUNNING job that wait for resources: {placement group id: diagnosis}.

    Ray Train asks for its workers as one placement group; one that stays PENDING means the cluster cannot
    (or not now) host the worker group. The caller decides how long is too long (see `vitpipe status --wait`)."""
    from ray.util.state import list_placement_groups

    pgs = [pg for pg in list_placement_groups(address=address, detail=True, timeout=10)
           if pg.state == "PENDING" and (not info.job_id or pg.creator_job_id == info.job_id)]
    if not pgs:
        return {}
    have = cluster_resources(address)
    request = json.loads((info.metadata or {}).get("vitpipe.request", "{}") or "{}")
    strategy = next((r.get("strategy") for r in request.values()), None)
    out = {}
    for pg in pgs:
        bundles = [b.get("unit_resources", {}) for b in (pg.bundles or [])]
        need: dict[str, float] = {}
        for b in bundles:
            for k, v in b.items():
                need[k] = need.get(k, 0.0) + float(v)
        short = [k for k, v in need.items() if have.get(k, 0.0) < v]
        what = f"{len(bundles)} worker bundles of {_short(bundles[0]) if bundles else '?'}"
        if short:
            msg = (f"training workers wait for {what}: needs {_short(need)} but the cluster's alive nodes have "
                   f"{_short(have)} (short of {', '.join(short)}); use --set pretrain.use_gpu=false / fewer "
                   f"workers, or add nodes")
        elif strategy == "STRICT_SPREAD":
            msg = (f"training workers wait for {what} with STRICT_SPREAD: needs {len(bundles)} distinct nodes with "
                   f"room; the cluster has {_short(have)}")
        else:
            msg = f"training workers wait for {what}; the cluster has {_short(have)} but other work holds it"
        out[pg.placement_group_id] = msg
    return out
