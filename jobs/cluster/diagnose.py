"""Diagnosis of jobs that wait: a PENDING driver, or training workers whose placement group cannot be placed."""

from __future__ import annotations

import json
import time
from typing import Any


def alive_nodes(address: str) -> list:
    """The cluster's alive nodes (``NodeState``), read over the dashboard's state API (no ray.init needed)."""
    from ray.util.state import list_nodes

    # By default the state API raises when its answer is partial, and a state filter makes it so as soon as one node
    # has died (the total counts dead nodes, the filtered list does not): `vitpipe status` crashed after a lost node.
    return list_nodes(address=address, filters=[("state", "=", "ALIVE")], detail=True, timeout=10,
                      raise_on_missing_output=False)


def cluster_resources(address: str, nodes: list | None = None) -> dict[str, float]:
    """Total resources of the alive nodes (``nodes``, else read from the cluster at ``address``)."""
    total: dict[str, float] = {}
    for node in alive_nodes(address) if nodes is None else nodes:
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

    pgs = [pg for pg in list_placement_groups(address=address, detail=True, timeout=10, raise_on_missing_output=False)
           if pg.state == "PENDING" and (not info.job_id or pg.creator_job_id == info.job_id)]
    if not pgs:
        return {}
    nodes = alive_nodes(address)
    have = cluster_resources(address, nodes)
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
                   f"room; the cluster has {len(nodes)} alive node(s) with {_short(have)}")
        else:
            msg = f"training workers wait for {what}; the cluster has {_short(have)} but other work holds it"
        out[pg.placement_group_id] = msg
    return out


class PendingClock:
    """How long a job's training workers have waited to be placed, across attempts.

    Ray Train gives up on a placement group after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) and asks again under
    a new id, so a wait timed per group never exceeds that and a longer ``--pending-timeout`` would never fire. The
    wait resets only after ``gap_s`` without any pending group (Ray re-asks within a poll or two)."""

    def __init__(self, gap_s: float = 15.0):
        self.gap_s = gap_s
        self._since: float | None = None
        self._last_seen = 0.0

    def waiting(self, now: float) -> float:
        """Record a poll at ``now`` (monotonic seconds) that found workers waiting; returns how long they have."""
        if self._since is None or now - self._last_seen > self.gap_s:
            self._since = now
        self._last_seen = now
        return now - self._since
