"""Starting or joining Ray: a local loopback head on a laptop / CI, the job's cluster inside ``vitpipe submit``."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# glibc returns freed activation memory to the OS and page-faults it back every step (40-50% of a CPU B/16 step in
# a profile); keeping it mapped costs nothing on a training worker.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS`` if given, else start a local head bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    # Auth mode is always explicit. A local head started here listens on loopback only; clusters reached by
    # address set their own mode (token auth for shared clusters, see infra/README.md).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning", "RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"],
                        "TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        # The dashboard (on 127.0.0.1) serves the state API that Ray Train's placement-group cleaner polls.
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1",
                 runtime_env=env, log_to_driver=True, configure_logging=True, logging_level=logging.WARNING)
    log.info("ray: %s", ray.cluster_resources())
