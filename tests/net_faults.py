"""A loopback TCP proxy that injects network faults between a client and a real server (e.g. moto_server).

Every ``drop_every``-th connection is reset after a random part of its traffic, every ``stall_every``-th goes silent
for ``stall_s`` seconds and is then closed, and :meth:`outage` cuts all traffic (open connections and new ones)
for a while. :meth:`corrupt` flips one byte in the bodies of the next HTTP responses, their length unchanged (what
a faulty NIC, proxy or memory would do, and TCP's 16-bit checksum can miss). Faults are only injected while
``enabled`` is True.

It can also behave like a distant object store, always: ``first_byte_s`` holds back each response's first byte
until that long after its request arrived, and ``bandwidth`` (bytes/s) caps each connection's download rate. It
counts the ``GET`` requests it forwards (``gets``), the bytes it sends back (``bytes_out``) and the most ranged GETs
in flight at once (``max_in_flight``: forwarded, their 206 body not yet all sent back). The benchmarks use it too
(``bench/node_cache.py``).
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable


class FaultyProxy:
    def __init__(self, target_port: int, *, drop_every: int = 0, stall_every: int = 0, stall_s: float = 4.0,
                 seed: int = 0, first_byte_s: float = 0.0, bandwidth: float = 0.0):
        self.target = ("127.0.0.1", target_port)
        self.first_byte_s, self.bandwidth = first_byte_s, bandwidth
        self.gets = self.bytes_out = 0
        self.in_flight = self.max_in_flight = 0
        self.drop_every, self.stall_every, self.stall_s = drop_every, stall_every, stall_s
        self.enabled = False
        self.connections = self.dropped = self.stalled = self.refused = self.flipped = 0
        self._flips_left, self._flip_at = 0, 0
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

    def corrupt(self, responses: int, at: int = 300) -> None:
        """Flip the byte at ``at`` of the body of each of the next ``responses`` responses whose body is longer."""
        with self._lock:
            self._flips_left, self._flip_at = responses, at

    def _take_flip(self, body_len: int) -> bool:
        with self._lock:
            if not self.enabled or self._flips_left <= 0 or body_len <= self._flip_at:
                return False
            self._flips_left -= 1
            self.flipped += 1
            return True

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
        state = {"sent": 0, "fault": fault, "asked": None, "free_at": 0.0, "gets": 0}
        threading.Thread(target=self._pump, args=(client, upstream, None, state), daemon=True).start()
        self._pump(upstream, client, (state, budget), state)
        with self._lock:
            self._open.discard(client)
            self._open.discard(upstream)
            self.in_flight -= state["gets"]  # GETs this connection left unanswered (or not followed: not 206)
            state["gets"] = 0

    def reset_max_in_flight(self) -> None:
        with self._lock:
            self.max_in_flight = self.in_flight

    def _answered(self, conn: dict) -> None:
        """A ranged GET's body has been sent back in full."""
        with self._lock:
            if conn["gets"] > 0:
                conn["gets"] -= 1
                self.in_flight -= 1

    def _pump(self, src: socket.socket, dst: socket.socket, fault: tuple[dict, int] | None, conn: dict) -> None:
        """Copy ``src`` to ``dst``: requests (``fault`` None) or responses, which are delayed and paced."""
        responses = _Responses(self) if fault is not None else None
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if responses is None:
                    if conn["asked"] is None:
                        conn["asked"] = time.monotonic()
                    if data.startswith(b"GET "):
                        with self._lock:
                            self.gets += 1
                            conn["gets"] += 1
                            self.in_flight += 1
                            self.max_in_flight = max(self.max_in_flight, self.in_flight)
                else:
                    data = responses.feed(data, lambda: self._answered(conn))
                    self._shape(conn, len(data))
                    with self._lock:
                        self.bytes_out += len(data)
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


    def _shape(self, conn: dict, nbytes: int) -> None:
        """Wait for the first byte of a response, then at most ``bandwidth`` bytes/s on this connection."""
        asked, conn["asked"] = conn["asked"], None
        now = time.monotonic()
        if asked is not None and self.first_byte_s:
            time.sleep(max(0.0, asked + self.first_byte_s - now))
            now = time.monotonic()
            conn["free_at"] = now
        if self.bandwidth:
            conn["free_at"] = max(conn["free_at"], now) + nbytes / self.bandwidth  # when a link of that rate
            time.sleep(max(0.0, conn["free_at"] - now))  # would have delivered these bytes


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


class _Responses:
    """Follows the HTTP responses of one connection (headers, then ``Content-Length`` bytes of body) to flip a byte
    of a body where the proxy asks for it. Only ranged reads (206) are followed: a response to HEAD has a length but
    no body, so after any other response the connection's bytes pass untouched."""

    def __init__(self, proxy: FaultyProxy):
        self.proxy = proxy
        self.lost = False
        self.head = b""
        self.body_left = 0  # bytes of the current body still to come
        self.flip: int | None = None  # position of the byte to flip, counted from here in the body

    def feed(self, data: bytes, answered: Callable[[], None] | None = None) -> bytes:
        """Pass ``data`` on (a byte flipped where asked); ``answered()`` is called as each 206 body ends."""
        out = bytearray()
        while data and not self.lost:
            if self.body_left:
                n = min(self.body_left, len(data))
                chunk = bytearray(data[:n])
                if self.flip is not None and self.flip < n:
                    chunk[self.flip] ^= 0x5A
                    self.flip = None
                elif self.flip is not None:
                    self.flip -= n
                out += chunk
                self.body_left -= n
                data = data[n:]
                if not self.body_left and answered is not None:
                    answered()
                continue
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return bytes(out)
            head, data = self.head[:end + 4], self.head[end + 4:]
            self.head = b""
            out += head
            if head.split(b" ", 2)[1:2] != [b"206"]:
                self.lost = True
                break
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            self.body_left = length
            self.flip = self.proxy._flip_at if length and self.proxy._take_flip(length) else None
        return bytes(out) + data
