"""A loopback TCP proxy that injects network faults between a client and a real server (e.g. moto_server).

Every ``drop_every``-th connection is reset after a random part of its traffic, every ``stall_every``-th goes silent
for ``stall_s`` seconds and is then closed, and :meth:`outage` cuts all traffic (open connections and new ones)
for a while. Faults are only injected while ``enabled`` is True.
"""

from __future__ import annotations

import random
import socket
import threading
import time


class FaultyProxy:
    def __init__(self, target_port: int, *, drop_every: int = 0, stall_every: int = 0, stall_s: float = 4.0,
                 seed: int = 0):
        self.target = ("127.0.0.1", target_port)
        self.drop_every, self.stall_every, self.stall_s = drop_every, stall_every, stall_s
        self.enabled = False
        self.connections = self.dropped = self.stalled = self.refused = 0
        self._rng = random.Random(seed)
        self._outage_until = 0.0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(128)
        self.port = self._srv.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def outage(self, seconds: float) -> None:
        """Cut every open connection and refuse traffic for ``seconds``."""
        with self._lock:
            self._outage_until = time.monotonic() + seconds
            socks = list(self._open)
        for s in socks:
            _close(s)

    def close(self) -> None:
        self._closed = True
        _close(self._srv)
        self.outage(0)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            n = self.connections
            outage = time.monotonic() < self._outage_until
            budget = self._rng.randint(200, 300_000)
        if self.enabled and outage:
            self.refused += 1
            _close(client)
            return
        fault = None
        if self.enabled and self.drop_every and n % self.drop_every == 0:
            fault = "drop"
        elif self.enabled and self.stall_every and n % self.stall_every == 0:
            fault = "stall"
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            _close(client)
            return
        with self._lock:
            self._open.update((client, upstream))
        state = {"sent": 0, "fault": fault}
        threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
        self._pump(upstream, client, (state, budget))
        with self._lock:
            self._open.discard(client)
            self._open.discard(upstream)

    def _pump(self, src: socket.socket, dst: socket.socket, fault: tuple[dict, int] | None) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if fault is not None and fault[0]["fault"] and fault[0]["sent"] + len(data) > fault[1]:
                    kind = fault[0]["fault"]
                    dst.sendall(data[: max(0, fault[1] - fault[0]["sent"])])
                    if kind == "stall":
                        self.stalled += 1
                        time.sleep(self.stall_s)
                    else:
                        self.dropped += 1
                    break
                dst.sendall(data)
                if fault is not None:
                    fault[0]["sent"] += len(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
