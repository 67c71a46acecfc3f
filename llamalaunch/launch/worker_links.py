"""Whether llama-server still holds its connection to each RPC worker of its plan.

llama-server keeps a TCP connection to a worker while the model's buffers live there. When the worker's process
ends, its kernel closes that connection: llama-server's end turns CLOSE_WAIT (or leaves the table on a reset),
while its /health still says ok until the next request aborts. Reading the child's own sockets leaves the worker
alone: a connection of ours would wait in its accept queue (it serves one client at a time) and, the queue
full, make every other probe of the worker time out as if it were down.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from llamalaunch.probe.rpc import resolve_endpoint


@dataclass
class WorkerLinks:
    """llama-server's (`pid`) connections to `endpoints`; an endpoint once seen connected and now not is lost."""

    pid: int
    endpoints: Sequence[str]
    seen: set[str] = field(default_factory=set)
    by_address: dict[tuple[str, int], str] = field(init=False)

    def __post_init__(self) -> None:
        self.by_address = {address: endpoint for endpoint in self.endpoints
                           if (address := resolve_endpoint(endpoint)) is not None}

    def lost(self) -> str | None:
        """The first endpoint whose connection llama-server lost since the last look, or None."""
        connected = self._connected()
        if connected is None:  # the child is gone or unreadable: its exit is reported elsewhere
            return None
        lost = next((endpoint for endpoint in self.endpoints if endpoint in self.seen and endpoint not in connected),
                    None)
        self.seen |= connected
        return lost

    def _connected(self) -> set[str] | None:
        import psutil  # only while serving through workers

        try:
            connections = psutil.Process(self.pid).net_connections(kind="tcp")
        except psutil.Error:
            return None
        return {self.by_address[(c.raddr.ip, c.raddr.port)] for c in connections
                if c.status == psutil.CONN_ESTABLISHED and c.raddr and (c.raddr.ip, c.raddr.port) in self.by_address}

