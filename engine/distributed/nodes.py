"""Where a parallel model's ranks run when it spans several machines (`nnodes` > 1), and how they find each other.

The layout, the same rule on every node: a model of world size W (tensor x pipeline) puts ranks
[ceil(r * W / N), ceil((r + 1) * W / N)) on node r of N, so rank 0 (the engine process, with the API and the
scheduler) is always on node 0, and a model smaller than the node count stays on the first nodes. On a node its
ranks take the local devices in order (`worker_device`), within the model's `gpu_ids` when the config names them.
Every rank rendezvouses at the master address (node 0) on its own port: master_port + the model replica's slot
(models in config order, each replica of a data-parallel model a slot), so several models never collide.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from urllib.parse import urlsplit

_SIOCGIFADDR = 0x8915  # Linux's ioctl: an interface's IPv4 address


def node_ranks(world_size: int, nnodes: int, node_rank: int) -> range:
    return range(-(-node_rank * world_size // nnodes), -(-(node_rank + 1) * world_size // nnodes))


def rendezvous_address(master_addr: str, master_port: int) -> str:
    host = f"[{master_addr}]" if ":" in master_addr else master_addr
    return f"tcp://{host}:{master_port}"


def pin_socket_interface(init_method: str) -> None:
    """Gloo (and NCCL's bootstrap) pick the interface the machine's hostname resolves to, which the other nodes may
    not reach (a container's or a network namespace's hostname is the host's); across machines they use the one
    that routes to the master instead, unless the operator chose (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)."""
    parts = urlsplit(init_method)
    if parts.hostname is None or parts.hostname in ("127.0.0.1", "localhost", "::1"):
        return  # one machine: nothing to choose
    interface = _interface_toward(parts.hostname, parts.port or 1)
    if interface is not None:
        for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(variable, interface)


def _interface_toward(host: str, port: int) -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port))  # UDP: picks the route, sends nothing
            local = probe.getsockname()[0]
        for _, name in socket.if_nameindex():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                except OSError:
                    continue  # no IPv4 address
                if socket.inet_ntoa(packed[20:24]) == local:
                    return name
    except OSError:
        pass  # IPv6 or no route yet: the default choice stands
    return None
