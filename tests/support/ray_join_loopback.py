"""``ray start`` for a node joining a loopback head on this same machine (the multi-node tests):
``python ray_join_loopback.py --address=127.0.0.1:PORT ...`` takes every ``ray start`` flag.

Ray replaces 127.0.0.1 in ``--address`` by the machine's outward IP (``services.resolve_ip_for_localhost``), where a
vitpipe head does not listen (all its ports are on 127.0.0.1, raytools). Its single-machine switch, which keeps
loopback for a head, refuses to join nodes at all. So this keeps a loopback address literal, for this process only;
the node then derives its own IP (127.0.0.1) from the head's address and binds its ports there. Real clusters span
machines and never need this.
"""

import sys

from ray._common.network_utils import is_localhost
from ray._private import services

_resolve = services.resolve_ip_for_localhost
services.resolve_ip_for_localhost = lambda host: host if is_localhost(host) else _resolve(host)

if __name__ == "__main__":
    from ray.scripts.scripts import main

    sys.argv[0] = "ray"
    sys.exit(main())
