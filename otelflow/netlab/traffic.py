"""Traffic generator for netlab: TCP and UDP flows between any two endpoints, with exact byte counts.

One Python process drives every flow with asyncio; each socket is opened inside its endpoint's
network namespace (setns), so the kernel routes, NATs and tracks it exactly as it would a pod's.

For every flow the generator returns what it sent and received (payload bytes, per direction) and an
independent kernel count of the flow's L3 bytes and packets: set counters in the client's own
namespace (table ``inet netlab_truth``, see lab.py), keyed by the client's source port, counted at
the output hook (client -> server) and the input hook (server -> client). Those counters see every
IP packet of the flow: SYN/FIN/ACK-only packets, retransmissions, IP and transport headers.

Client source ports are chosen by the generator (so the counters exist before the first packet) and
identify the flow on the server side too (DNAT keeps them; the lab's masquerade keeps them while no
other connection holds the same port).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import resource
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from otelflow.netlab import ns as nsu
from otelflow.netlab.lab import TRUTH_TABLE, Endpoint, Lab

SERVICE_PREFIX = "svc/"
_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class FlowSpec:
    """One conversation. ``server`` is an endpoint name, or ``svc/<name>`` to go through a ClusterIP."""

    client: str
    server: str
    proto: Literal["tcp", "udp"] = "tcp"
    family: Literal[4, 6] = 4
    up: int = 10_000  # payload bytes client -> server
    down: int = 10_000  # payload bytes server -> client
    duration: float = 0.0  # spread the sending over this many seconds (long flows)
    delay: float = 0.0  # start this many seconds after the run starts
    port: int = 0  # server port for direct flows (0: one is chosen); a Service uses its target port
    datagram: int = 1200  # UDP payload size

    def __post_init__(self) -> None:
        if self.up < 0 or self.down < 0:
            raise ValueError("byte counts must be >= 0")
        if self.proto == "udp" and self.down and not self.up:
            raise ValueError("a UDP flow needs up > 0: the server learns the client from its first datagram")
        if not 1 <= self.datagram <= 65000:
            raise ValueError("datagram must be 1..65000 bytes")


@dataclass(slots=True)
class FlowResult:
    spec: FlowSpec
    client_ip: str
    client_port: int
    dialed_ip: str  # the address the client addressed (a ClusterIP for Service flows)
    dialed_port: int
    server_endpoint: str = ""  # the endpoint whose socket answered (the backend pod for a Service)
    server_ip: str = ""
    server_port: int = 0
    up_sent: int = 0
    up_received: int = 0
    down_sent: int = 0
    down_received: int = 0
    # independent kernel counters (L3: IP header + transport header + payload, every packet)
    up_l3_bytes: int = 0
    up_l3_packets: int = 0
    down_l3_bytes: int = 0
    down_l3_packets: int = 0
    # TCP segments each side's socket retransmitted (TCP_INFO tcpi_total_retrans at close)
    up_retransmits: int = 0
    down_retransmits: int = 0
    # each side's smoothed RTT at close, microseconds (TCP_INFO tcpi_rtt; 0: unreadable or not TCP)
    up_rtt_us: int = 0  # the client's socket (it sends the up bytes)
    down_rtt_us: int = 0  # the server's socket
    started: float = 0.0
    finished: float = 0.0
    error: str | None = None
    _done: asyncio.Event | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        s = self.spec
        complete = self.up_received == s.up == self.up_sent and self.down_received == s.down == self.down_sent
        return self.error is None and complete


def total_retrans(sock: socket.socket) -> int:
    """tcpi_total_retrans of a TCP socket (0 if unreadable): struct tcp_info's u32 at offset 100."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return 0
    return int.from_bytes(raw[100:104], sys.byteorder) if len(raw) >= 104 else 0


def tcp_rtt_us(sock: socket.socket) -> int:
    """tcpi_rtt of a TCP socket in microseconds (0 if unreadable): struct tcp_info's u32 at offset 68."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return 0
    return int.from_bytes(raw[68:72], sys.byteorder) if len(raw) >= 72 else 0


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(need, soft), hard), hard))


def _sockaddr(ip: str, port: int, family: int) -> tuple[str, int] | tuple[str, int, int, int]:
    return (ip, port) if family == 4 else (ip, port, 0, 0)


class _Listener:
    def __init__(self, ep: Endpoint, family: int, proto: str, port: int) -> None:
        self.ep, self.family, self.proto, self.port = ep, family, proto, port
        self.ip = str(ep.ip(family))
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        st = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        self.sock = nsu.socket_in(ep.netns, af, st)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if proto == "udp":
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(_sockaddr(self.ip, port, family))
        if proto == "tcp":
            self.sock.listen(4096)
        self.sock.setblocking(False)


class TrafficGenerator:
    """Run FlowSpecs in a lab; ``run`` blocks, ``start`` returns a Future of the results."""

    def __init__(self, lab: Lab, settle: float = 0.3, timeout: float = 120.0) -> None:
        self.lab = lab
        self.settle = settle
        self.timeout = timeout

    # ---- public ------------------------------------------------------------------------------
    def run(self, flows: Sequence[FlowSpec]) -> list[FlowResult]:
        return asyncio.run(self._run(list(flows)))

    def start(self, flows: Sequence[FlowSpec]) -> concurrent.futures.Future[list[FlowResult]]:
        fut: concurrent.futures.Future[list[FlowResult]] = concurrent.futures.Future()

        def work() -> None:
            try:
                fut.set_result(self.run(flows))
            except BaseException as e:  # handed to the caller through the future
                fut.set_exception(e)

        threading.Thread(target=work, name="netlab-traffic", daemon=True).start()
        return fut

    # ---- plan -----------------------------------------------------------------------------------
    def _resolve(self, spec: FlowSpec) -> tuple[Endpoint, list[Endpoint], str, int]:
        """client endpoint, server endpoints that may answer, dialed ip, dialed/listen port."""
        lab = self.lab
        client = lab.endpoint(spec.client)
        if spec.server.startswith(SERVICE_PREFIX):
            svc = lab.topology.service(spec.server[len(SERVICE_PREFIX) :])
            if svc.protocol != spec.proto:
                raise nsu.NetlabError(f"service {svc.name} is {svc.protocol}, flow is {spec.proto}")
            backends = [lab.endpoint(b) for b in svc.backends]
            return client, backends, str(lab.topology.service_ip(svc.name, spec.family)), svc.port
        server = lab.endpoint(spec.server)
        return client, [server], str(server.ip(spec.family)), spec.port

    async def _run(self, specs: list[FlowSpec]) -> list[FlowResult]:
        _raise_nofile(4 * len(specs) + 256)
        alloc = self.lab.ports
        listeners: dict[tuple[str, int, str, int], _Listener] = {}
        results: list[FlowResult] = []
        by_client_port: dict[tuple[str, int, int], FlowResult] = {}
        plans: list[tuple[FlowResult, Endpoint, int]] = []
        next_server_port = 7000 + (alloc.take() % 1000)
        try:
            for spec in specs:
                client, servers, dialed_ip, port = self._resolve(spec)
                if port == 0:
                    port = next_server_port
                    next_server_port += 1
                for srv in servers:
                    lport = port
                    if spec.server.startswith(SERVICE_PREFIX):
                        lport = self.lab.topology.service(spec.server[len(SERVICE_PREFIX) :]).target_port
                    key = (srv.netns + "/" + str(srv.ip(spec.family)), spec.family, spec.proto, lport)
                    if key not in listeners:
                        listeners[key] = _Listener(srv, spec.family, spec.proto, lport)
                cport = alloc.take()
                r = FlowResult(spec, str(client.ip(spec.family)), cport, dialed_ip, port)
                r._done = asyncio.Event()
                results.append(r)
                by_client_port[(spec.proto, spec.family, cport)] = r
                plans.append((r, client, port))
            self._truth_install(plans)
            serve = [asyncio.create_task(self._serve(lst, by_client_port)) for lst in listeners.values()]
            clients = [asyncio.create_task(self._client(r, ep)) for r, ep, _ in plans]
            try:
                await asyncio.wait_for(asyncio.gather(*clients), self.timeout)
                # the server side of each flow finishes after its client: wait for it too
                await asyncio.wait_for(asyncio.gather(*(r._done.wait() for r in results if r._done)), 10)
            except TimeoutError:
                for r in results:
                    if r.error is None and not r.ok:
                        r.error = "timeout"
            finally:
                for t in serve + clients:
                    t.cancel()
                await asyncio.gather(*serve, *clients, return_exceptions=True)
            await asyncio.sleep(self.settle)
            self._truth_read(plans)
        finally:
            for lst in listeners.values():
                lst.sock.close()
        return results

    # ---- client side --------------------------------------------------------------------------
    async def _client(self, r: FlowResult, ep: Endpoint) -> None:
        spec = r.spec
        loop = asyncio.get_running_loop()
        if spec.delay:
            await asyncio.sleep(spec.delay)
        af = socket.AF_INET if spec.family == 4 else socket.AF_INET6
        st = socket.SOCK_STREAM if spec.proto == "tcp" else socket.SOCK_DGRAM
        sock = nsu.socket_in(ep.netns, af, st)
        try:
            sock.setblocking(False)
            if spec.proto == "udp":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind(_sockaddr(r.client_ip, r.client_port, spec.family))
            r.started = time.time()
            await loop.sock_connect(sock, _sockaddr(r.dialed_ip, r.dialed_port, spec.family))
            if spec.proto == "tcp":
                await self._tcp_client(sock, r)
            else:
                await self._udp_client(sock, r)
        except (OSError, asyncio.IncompleteReadError) as e:
            r.error = f"client: {e}"
            if r._done:
                r._done.set()
        finally:
            r.finished = time.time()
            if spec.proto == "tcp":
                r.up_retransmits = total_retrans(sock)
                r.up_rtt_us = tcp_rtt_us(sock)
            sock.close()

    async def _tcp_client(self, sock: socket.socket, r: FlowResult) -> None:
        loop = asyncio.get_running_loop()

        async def reader() -> None:
            while True:
                data = await loop.sock_recv(sock, _CHUNK)
                if not data:
                    return
                r.down_received += len(data)

        rd = asyncio.create_task(reader())
        try:
            r.up_sent = await _paced_send(sock, r.spec.up, r.spec.duration)
            sock.shutdown(socket.SHUT_WR)
            await rd
        finally:
            rd.cancel()

    async def _udp_client(self, sock: socket.socket, r: FlowResult) -> None:
        loop = asyncio.get_running_loop()
        spec = r.spec

        async def reader() -> None:
            while r.down_received < spec.down:
                data = await loop.sock_recv(sock, 65535)
                r.down_received += len(data)

        rd = asyncio.create_task(reader())
        try:
            r.up_sent = await _paced_datagrams(sock, None, spec.up, spec.datagram, spec.duration)
            # replies may still be on their way: give them the flow's duration plus a margin
            await asyncio.wait_for(rd, spec.duration + 5.0)
        except TimeoutError:
            r.error = f"udp: received {r.down_received} of {spec.down} reply bytes"
        finally:
            rd.cancel()

    # ---- server side --------------------------------------------------------------------------
    async def _serve(self, lst: _Listener, flows: dict[tuple[str, int, int], FlowResult]) -> None:
        loop = asyncio.get_running_loop()
        if lst.proto == "tcp":
            conns: set[asyncio.Task[None]] = set()
            try:
                while True:
                    conn, peer = await loop.sock_accept(lst.sock)
                    t = asyncio.create_task(self._tcp_conn(lst, conn, peer, flows))
                    conns.add(t)
                    t.add_done_callback(conns.discard)
            finally:
                for t in conns:
                    t.cancel()
        else:
            await self._udp_serve(lst, flows)

    async def _tcp_conn(
        self, lst: _Listener, conn: socket.socket, peer: tuple, flows: dict[tuple[str, int, int], FlowResult]
    ) -> None:
        loop = asyncio.get_running_loop()
        r = flows.get(("tcp", lst.family, peer[1]))
        conn.setblocking(False)
        try:
            if r is None:  # not ours (or the source port was rewritten): refuse politely
                return
            r.server_endpoint, r.server_ip, r.server_port = lst.ep.name, lst.ip, lst.port

            async def reader() -> None:
                while True:
                    data = await loop.sock_recv(conn, _CHUNK)
                    if not data:
                        return
                    r.up_received += len(data)

            rd = asyncio.create_task(reader())
            try:
                r.down_sent = await _paced_send(conn, r.spec.down, r.spec.duration)
                await rd
            finally:
                rd.cancel()
        except OSError as e:
            if r is not None:
                r.error = f"server: {e}"
        finally:
            if r is not None:
                r.down_retransmits = total_retrans(conn)
                r.down_rtt_us = tcp_rtt_us(conn)
            conn.close()
            if r is not None and r._done:
                r._done.set()

    async def _udp_serve(self, lst: _Listener, flows: dict[tuple[str, int, int], FlowResult]) -> None:
        loop = asyncio.get_running_loop()
        senders: set[asyncio.Task[None]] = set()

        async def reply(r: FlowResult, peer: tuple) -> None:
            try:
                r.down_sent = await _paced_datagrams(
                    lst.sock, peer, r.spec.down, r.spec.datagram, r.spec.duration
                )
            except OSError as e:
                r.error = f"server: {e}"
            finally:
                if r._done:
                    r._done.set()

        try:
            while True:
                data, peer = await loop.sock_recvfrom(lst.sock, 65535)
                r = flows.get(("udp", lst.family, peer[1]))
                if r is None:
                    continue
                if not r.server_endpoint:
                    r.server_endpoint, r.server_ip, r.server_port = lst.ep.name, lst.ip, lst.port
                    t = asyncio.create_task(reply(r, peer))
                    senders.add(t)
                    t.add_done_callback(senders.discard)
                r.up_received += len(data)
        finally:
            for t in senders:
                t.cancel()

    # ---- truth counters -------------------------------------------------------------------------
    def _elements(self, plans: list[tuple[FlowResult, Endpoint, int]]) -> dict[str, list[str]]:
        per_ns: dict[str, list[str]] = {}
        for r, ep, _ in plans:
            per_ns.setdefault(ep.netns, []).append(f"{r.spec.proto} . {r.client_port}")
        return per_ns

    def _truth_install(self, plans: list[tuple[FlowResult, Endpoint, int]]) -> None:
        for netns, elems in self._elements(plans).items():
            body = ", ".join(elems)
            nsu.nft_apply(
                netns, "".join(f"add element inet {TRUTH_TABLE} {s} {{ {body} }}\n" for s in ("tx", "rx"))
            )

    def _truth_read(self, plans: list[tuple[FlowResult, Endpoint, int]]) -> None:
        by_key = {(ep.netns, r.spec.proto, r.client_port): r for r, ep, _ in plans}
        for netns, elems in self._elements(plans).items():
            for set_name in ("tx", "rx"):
                counts = read_set_counters(netns, set_name)
                for (proto, port), (pkts, nbytes) in counts.items():
                    r = by_key.get((netns, proto, port))
                    if r is None:
                        continue
                    if set_name == "tx":
                        r.up_l3_packets, r.up_l3_bytes = pkts, nbytes
                    else:
                        r.down_l3_packets, r.down_l3_bytes = pkts, nbytes
            body = ", ".join(elems)
            nsu.nft_apply(
                netns,
                f"delete element inet {TRUTH_TABLE} tx {{ {body} }}\n"
                f"delete element inet {TRUTH_TABLE} rx {{ {body} }}\n",
            )


def read_set_counters(netns: str, set_name: str) -> dict[tuple[str, int], tuple[int, int]]:
    """(proto, port) -> (packets, bytes) of one truth set in a namespace."""
    out = nsu.ns_run(netns, ["nft", "-j", "list", "set", "inet", TRUTH_TABLE, set_name])
    doc = json.loads(out)
    res: dict[tuple[str, int], tuple[int, int]] = {}
    for item in doc.get("nftables", []):
        s = item.get("set")
        if not s:
            continue
        for e in s.get("elem", []):
            el = e.get("elem", {})
            proto, port = el["val"]["concat"]
            c = el.get("counter", {"packets": 0, "bytes": 0})
            res[(str(proto), int(port))] = (int(c["packets"]), int(c["bytes"]))
    return res


async def _paced_send(sock: socket.socket, total: int, duration: float) -> int:
    """Send `total` bytes on a stream socket, spread evenly over `duration` seconds."""
    loop = asyncio.get_running_loop()
    buf = memoryview(b"x" * _CHUNK)
    chunk = _CHUNK if duration <= 0 else max(512, min(_CHUNK, int(total / (duration * 20)) or 512))
    sent = 0
    t0 = time.monotonic()
    while sent < total:
        if duration > 0:
            due = t0 + duration * sent / total
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        n = min(chunk, total - sent)
        await loop.sock_sendall(sock, buf[:n])
        sent += n
    return sent


async def _paced_datagrams(
    sock: socket.socket, peer: tuple | None, total: int, size: int, duration: float
) -> int:
    """Send `total` payload bytes as datagrams of `size` (the last one smaller), paced over `duration`."""
    payload = b"y" * size
    count = (total + size - 1) // size
    sent = 0
    t0 = time.monotonic()
    for i in range(count):
        n = min(size, total - sent)
        if duration > 0:
            delay = t0 + duration * i / count - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        elif i % 32 == 31:
            await asyncio.sleep(0.001)  # let the receiver drain: a veth queue can overflow
        while True:
            try:
                if peer is None:
                    sock.send(payload[:n])
                else:
                    sock.sendto(payload[:n], peer)
                break
            except BlockingIOError:
                await asyncio.sleep(0.001)
        sent += n
    return sent
