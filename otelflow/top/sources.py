"""Where `otelflow top` reads from: the agents' `/api/v1/top` JSON, over one of three paths.

- ``HttpAgent``: a URL (the local agent's ``api.listen``, or any agent given with ``--agent``);
- ``NetnsAgent``: an agent listening inside a network namespace, reached by a socket opened in that
  namespace (the demo's agents in its lab nodes; nothing is routed from the machine's own network);
- ``PodProxyAgent``: an agent pod read through the API server's pod proxy
  (``/api/v1/namespaces/NS/pods/NAME:PORT/proxy/api/v1/top``), found by ``PodDiscovery`` with a
  namespace and a label selector: one API server connection reaches every node, no port-forward.

Every failure becomes a one-line reason on the agent's status; nothing here raises to the screen.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Protocol

from otelflow.k8s.client import KubeClient, KubeError
from otelflow.live import API_PATH, API_VERSION

FETCH_TIMEOUT = 5.0


class FetchError(Exception):
    """One agent could not be read; the message is one line, for the status bar."""


class Agent(Protocol):
    name: str

    def fetch(self, limit: int) -> dict[str, Any]: ...


def check_answer(name: str, status: int, raw: bytes) -> dict[str, Any]:
    """The decoded answer, or FetchError saying in one line what is wrong with it."""
    if status == 404:
        raise FetchError(f"{name}: no {API_PATH} here (404): an otelflow agent with api.listen set?")
    if status != 200:
        text = raw.decode("utf-8", "replace").strip().splitlines()
        raise FetchError(f"{name}: HTTP {status}" + (f": {text[0][:160]}" if text else ""))
    try:
        data = json.loads(raw)
    except ValueError:
        raise FetchError(f"{name}: the answer is not JSON") from None
    if not isinstance(data, dict) or data.get("version") != API_VERSION:
        got = data.get("version") if isinstance(data, dict) else None
        raise FetchError(f"{name}: API version {got!r}, this top reads version {API_VERSION}")
    return data


def _get(conn: http.client.HTTPConnection, name: str, path: str) -> dict[str, Any]:
    try:
        conn.request("GET", path, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    except TimeoutError:
        raise FetchError(f"{name}: no answer within {FETCH_TIMEOUT:g} s") from None
    except (OSError, http.client.HTTPException) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise FetchError(f"{name}: {reason}") from None
    finally:
        conn.close()
    return check_answer(name, resp.status, raw)


class HttpAgent:
    def __init__(self, url: str) -> None:
        if "://" not in url:
            url = "http://" + url
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"agent URL {url!r}: want http://HOST:PORT")
        try:
            port = u.port or (443 if u.scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"agent URL {url!r}: bad port") from None
        self.name = u.netloc
        self.https = u.scheme == "https"
        self.host, self.port = u.hostname, port
        self.prefix = u.path.rstrip("/")

    def fetch(self, limit: int) -> dict[str, Any]:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=FETCH_TIMEOUT)
        return _get(conn, self.name, f"{self.prefix}{API_PATH}?limit={limit}")


class NetnsAgent:
    """An agent on host:port inside the network namespace `netns` (root only)."""

    def __init__(self, netns: str, host: str, port: int, name: str = "") -> None:
        self.netns, self.host, self.port = netns, host, port
        self.name = name or f"{netns}/{host}:{port}"

    def fetch(self, limit: int) -> dict[str, Any]:
        from otelflow.netlab import ns as nsu

        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = nsu.socket_in(self.netns, fam, socket.SOCK_STREAM)
            sock.settimeout(FETCH_TIMEOUT)
            sock.connect((self.host, self.port))
        except OSError as e:
            raise FetchError(f"{self.name}: {e.strerror or e}") from None
        conn = http.client.HTTPConnection(self.host, self.port, timeout=FETCH_TIMEOUT)
        conn.sock = sock
        return _get(conn, self.name, f"{API_PATH}?limit={limit}")


class PodProxyAgent:
    """One agent pod, read through the API server's pod proxy."""

    def __init__(self, client: KubeClient, namespace: str, pod: str, port: int, node: str = "") -> None:
        self.client, self.namespace, self.pod, self.port = client, namespace, pod, port
        self.name = f"{pod}" + (f" ({node})" if node else "")

    def fetch(self, limit: int) -> dict[str, Any]:
        q = urllib.parse.quote
        path = (
            f"/api/v1/namespaces/{q(self.namespace)}/pods/{q(self.pod)}:{self.port}"
            f"/proxy{API_PATH}?limit={limit}"
        )
        try:
            status, raw = self.client.request_raw("GET", path)
        except KubeError as e:
            raise FetchError(f"{self.name}: {e}") from None
        if status != 200 and raw.startswith(b"{"):  # the API server's own Status object
            try:
                msg = str(json.loads(raw).get("message", ""))
            except ValueError:
                msg = ""
            if msg:
                raise FetchError(f"{self.name}: HTTP {status} from the API server: {msg[:200]}")
        return check_answer(self.name, status, raw)


@dataclass
class PodDiscovery:
    """The agent pods: Running pods matching a label selector in a namespace, re-listed every
    ``every`` seconds (pods come and go with nodes)."""

    client: KubeClient
    namespace: str
    selector: str
    port: int
    every: float = 15.0

    def __post_init__(self) -> None:
        self._agents: list[Agent] = []
        self._at = float("-inf")
        self.error = ""

    def agents(self) -> list[Agent]:
        if time.monotonic() - self._at < self.every:
            return self._agents
        q = urllib.parse.urlencode({"labelSelector": self.selector}) if self.selector else ""
        try:
            pods = self.client.get(f"/api/v1/namespaces/{self.namespace}/pods" + (f"?{q}" if q else ""))
        except KubeError as e:
            self.error = f"listing agent pods: {e}"
            return self._agents  # keep reading the pods we know
        self.error = ""
        found: list[Agent] = []
        for p in pods.get("items") or []:
            meta, spec, st = p.get("metadata", {}), p.get("spec", {}), p.get("status", {})
            if st.get("phase") == "Running" and st.get("podIP"):
                found.append(
                    PodProxyAgent(
                        self.client, self.namespace, meta["name"], self.port, spec.get("nodeName", "")
                    )
                )
        if not found:
            sel = f" with labels {self.selector}" if self.selector else ""
            self.error = f"no running agent pods in namespace {self.namespace}{sel}"
        self._agents = sorted(found, key=lambda a: a.name)
        self._at = time.monotonic()
        return self._agents


@dataclass
class AgentResult:
    name: str
    data: dict[str, Any] | None
    error: str


class Fetcher:
    """Reads every agent in parallel; one result per agent, an error string instead of data when
    it failed. A refresh waits at most ``wait`` seconds: an agent still answering after that is
    reported as such (its request keeps running, bounded by FETCH_TIMEOUT, and is not sent again
    until it ends), so one hung agent never holds up the others."""

    def __init__(
        self,
        agents: list[Agent] | None = None,
        discovery: PodDiscovery | None = None,
        wait: float = FETCH_TIMEOUT + 1.0,
    ) -> None:
        self.static = agents or []
        self.discovery = discovery
        self.wait = wait
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="top-fetch")
        self.inflight: dict[str, tuple[concurrent.futures.Future[AgentResult], float]] = {}

    def fetch(self, limit: int) -> tuple[list[AgentResult], str]:
        """(per-agent results, a source-wide problem or "")."""
        agents = list(self.static)
        problem = ""
        if self.discovery:
            agents += self.discovery.agents()
            problem = self.discovery.error

        def one(a: Agent) -> AgentResult:
            try:
                return AgentResult(a.name, a.fetch(limit), "")
            except FetchError as e:
                return AgentResult(a.name, None, str(e))
            except Exception as e:  # never a traceback on the screen: say what it was
                return AgentResult(a.name, None, f"{a.name}: {type(e).__name__}: {e}")

        for a in agents:
            if a.name not in self.inflight:
                self.inflight[a.name] = (self.pool.submit(one, a), time.monotonic())
        futs = [self.inflight[a.name][0] for a in agents]
        concurrent.futures.wait(futs, timeout=self.wait)
        out = []
        for a in agents:
            fut, since = self.inflight[a.name]
            if fut.done():
                del self.inflight[a.name]
                out.append(fut.result())
            else:
                waited = time.monotonic() - since
                out.append(
                    AgentResult(a.name, None, f"{a.name}: no answer for {waited:.0f} s, still waiting")
                )
        return out, problem

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
