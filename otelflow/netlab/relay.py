"""A TCP relay from inside a lab namespace to an address reachable from this process's namespace.

`NamespaceRelay` listens on an address *inside* a lab namespace (a loopback address there, usually)
and forwards each accepted connection, both ways, to a target host and port connected from the
namespace this process runs in. Lab nodes cannot reach the machine's loopback or network; with a
relay, a process in a node namespace dials the same host and port it would on a real node (TLS goes
end to end: the relay only moves bytes). The API server in the Kubernetes tests and the collector the
demo exports to are reached this way. Connections the relay could not open to the target are counted
in `failed` (the dialing process sees them closed at once).
"""

from __future__ import annotations

import contextlib
import socket
import threading

from otelflow.netlab import ns as nsu


class NamespaceRelay:
    """`listen` (host, port) inside `netns` -> `target` (host, port) here (TCP, both ways, until closed).

    `target` defaults to 127.0.0.1 and the listening port."""

    def __init__(
        self,
        netns: str,
        port: int,
        *,
        listen_host: str = "127.0.0.1",
        target: tuple[str, int] | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.port = port
        self.target = target or ("127.0.0.1", port)
        self.connect_timeout = connect_timeout
        self.accepted = 0  # connections accepted inside the namespace
        self.failed = 0  # of those, how many could not be connected to the target
        self.last_error = ""
        family = socket.AF_INET6 if ":" in listen_host else socket.AF_INET
        self.lsock = nsu.socket_in(netns, family, socket.SOCK_STREAM)
        try:
            self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.lsock.bind((listen_host, port))
            self.lsock.listen(64)
        except OSError:
            self.lsock.close()
            raise
        self._stop = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, name=f"relay-{netns}", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.lsock.accept()
            except OSError:
                return
            self.accepted += 1
            try:
                up = socket.create_connection(self.target, timeout=self.connect_timeout)
                up.settimeout(None)
            except OSError as e:
                self.failed += 1
                self.last_error = f"{self.target[0]}:{self.target[1]}: {e.strerror or e}"
                conn.close()
                continue
            pair = [conn, up]
            with self._lock:
                self._socks += pair
            done = threading.Barrier(2, action=lambda pair=pair: self._drop(pair))
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b, done), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, done: threading.Barrier) -> None:
        try:
            pump(src, dst)
        finally:
            with contextlib.suppress(threading.BrokenBarrierError):
                done.wait()  # the second direction to finish closes both sockets

    def _drop(self, pair: list[socket.socket]) -> None:
        with self._lock:
            self._socks = [s for s in self._socks if s not in pair]
        for s in pair:
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.lsock.shutdown(socket.SHUT_RDWR)
        self.lsock.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()


def pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy one direction of a relayed connection until its end, then half-close the other side."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
