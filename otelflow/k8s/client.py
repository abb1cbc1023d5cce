"""A light Kubernetes API client on the standard library (``http.client`` + ``ssl``).

Only what the metadata cache needs: GET/POST-style requests, paginated lists and watches::

    client = KubeClient(in_cluster_config())          # or kubeconfig_config(path)
    page = client.list("/api/v1/pods", limit=500)      # follows "continue"; .items, .resource_version
    for kind, obj in client.watch("/api/v1/pods", page.resource_version):
        ...                                            # ("ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK", obj)

Configuration comes from the pod's environment (``KUBERNETES_SERVICE_HOST``/``_PORT`` and the
mounted ServiceAccount token and CA; the token file is re-read whenever it changes, since projected
tokens rotate) or from a kubeconfig file (server, certificate-authority(-data), token/tokenFile or
client-certificate/key(-data), current-context).

Every failure raises :class:`KubeError` (``.status`` is the HTTP status, ``None`` when the server
could not be reached) with a one-line message such as::

    kubernetes API https://10.96.0.1:443: 403 Forbidden: pods is forbidden: User "..." cannot list ...

:class:`Gone` (a ``KubeError``) is 410: a watch or list continuation whose resourceVersion is too
old; the caller must list again.

Timeouts: ``connect_timeout`` bounds the TCP+TLS handshake; ``read_timeout`` bounds each wait for
data (for a watch, pass one longer than the server's bookmark interval, one minute).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import socket
import ssl
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

__all__ = [
    "DEFAULT_SA_DIR",
    "ClientConfig",
    "Gone",
    "KubeClient",
    "KubeConfigError",
    "KubeError",
    "ListResult",
    "Watch",
    "in_cluster_available",
    "in_cluster_config",
    "kubeconfig_config",
]

DEFAULT_SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def _version() -> str:
    from otelflow import __version__

    return __version__


class KubeConfigError(ValueError):
    """No usable API server configuration; ``str(e)`` is one line naming the file and the problem."""


class KubeError(Exception):
    """A request to the API server failed. ``status`` is the HTTP status (None: not reached)."""

    def __init__(self, server: str, problem: str, status: int | None = None, reason: str = "") -> None:
        self.server = server
        self.status = status
        self.reason = reason  # the Status object's reason (Forbidden, Expired, ...) when there is one
        text = f"kubernetes API {server}: {problem}"
        super().__init__(" ".join(text.split()))


class Gone(KubeError):
    """410 Gone: the resourceVersion (or continue token) is too old; list again."""


# ---- configuration --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientConfig:
    server: str  # https://host:port[/prefix]
    ca_file: str = ""
    ca_data: str = ""  # PEM
    token: str = ""
    token_file: str = ""  # re-read when it changes (wins over token)
    cert_file: str = ""
    key_file: str = ""
    cert_data: str = ""  # PEM
    key_data: str = ""  # PEM
    insecure: bool = False  # insecure-skip-tls-verify
    source: str = ""  # where it came from, for messages: "in-cluster" or the kubeconfig path

    def __repr__(self) -> str:  # never print credentials
        return f"ClientConfig(server={self.server!r}, source={self.source!r})"


def in_cluster_available(env: Mapping[str, str] | None = None, sa_dir: str = DEFAULT_SA_DIR) -> bool:
    """True when this process runs in a pod with a ServiceAccount token mounted."""
    env = os.environ if env is None else env
    return bool(env.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(os.path.join(sa_dir, "token"))


def in_cluster_config(env: Mapping[str, str] | None = None, sa_dir: str = DEFAULT_SA_DIR) -> ClientConfig:
    """The pod's own API server and ServiceAccount (token re-read on change, ca.crt)."""
    env = os.environ if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "") or "443"
    if not host:
        raise KubeConfigError("in-cluster: KUBERNETES_SERVICE_HOST is not set (not running in a pod?)")
    token_file, ca_file = os.path.join(sa_dir, "token"), os.path.join(sa_dir, "ca.crt")
    if not os.path.exists(token_file):
        raise KubeConfigError(f"in-cluster: {token_file} is missing (automountServiceAccountToken: false?)")
    if ":" in host:
        host = f"[{host}]"
    return ClientConfig(
        server=f"https://{host}:{port}",
        ca_file=ca_file if os.path.exists(ca_file) else "",
        token_file=token_file,
        source="in-cluster",
    )


def _named(entries: Any, name: str, what: str, where: str) -> dict[str, Any]:
    for e in entries or []:
        if isinstance(e, dict) and e.get("name") == name:
            body = e.get(what)
            return body if isinstance(body, dict) else {}
    raise KubeConfigError(f"{where}: no {what} named {name!r}")


def _b64(where: str, key: str, value: Any) -> str:
    try:
        return base64.b64decode(str(value), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise KubeConfigError(f"{where}: {key}: not valid base64 PEM") from None


def kubeconfig_config(path: str, context: str = "") -> ClientConfig:
    """Server and credentials of ``context`` (default: current-context) in a kubeconfig file."""
    where = f"kubeconfig {path}"
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise KubeConfigError(f"{where}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise KubeConfigError(f"{where}: malformed YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise KubeConfigError(f"{where}: expected a mapping at the top level")
    name = context or data.get("current-context") or ""
    if not name:
        raise KubeConfigError(f"{where}: no current-context")
    ctx = _named(data.get("contexts"), name, "context", where)
    cluster = _named(data.get("clusters"), str(ctx.get("cluster", "")), "cluster", where)
    user = _named(data.get("users"), str(ctx.get("user", "")), "user", where) if ctx.get("user") else {}
    server = str(cluster.get("server") or "")
    if not server.startswith(("https://", "http://")):
        raise KubeConfigError(f"{where}: cluster {ctx.get('cluster')!r}: server must be an http(s) URL")
    for unsupported in ("exec", "auth-provider", "username"):
        if user.get(unsupported):
            raise KubeConfigError(
                f"{where}: user {ctx.get('user')!r}: {unsupported} is not supported "
                "(use a token, tokenFile or a client certificate)"
            )
    base = os.path.dirname(os.path.abspath(path))

    def rel(v: Any) -> str:
        return os.path.join(base, str(v)) if v else ""

    return ClientConfig(
        server=server.rstrip("/"),
        ca_file=rel(cluster.get("certificate-authority")),
        ca_data=_b64(where, "certificate-authority-data", cluster["certificate-authority-data"])
        if cluster.get("certificate-authority-data")
        else "",
        token=str(user.get("token") or ""),
        token_file=rel(user.get("tokenFile")),
        cert_file=rel(user.get("client-certificate")),
        key_file=rel(user.get("client-key")),
        cert_data=_b64(where, "client-certificate-data", user["client-certificate-data"])
        if user.get("client-certificate-data")
        else "",
        key_data=_b64(where, "client-key-data", user["client-key-data"])
        if user.get("client-key-data")
        else "",
        insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
        source=path,
    )


class _TokenFile:
    """A token file re-read whenever its inode, size or mtime changes (projected tokens rotate)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sig: tuple[int, int, int] | None = None
        self._token = ""
        self._lock = threading.Lock()

    def get(self) -> str:
        try:
            st = os.stat(self.path)
        except OSError:
            return self._token  # mid-rotation (the kubelet swaps a symlink): keep the last one
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if sig != self._sig:
                try:
                    with open(self.path, encoding="utf-8") as f:
                        self._token = f.read().strip()
                    self._sig = sig
                except OSError:
                    pass
            return self._token


def _ssl_context(cfg: ClientConfig) -> ssl.SSLContext:
    where = f"kubernetes config ({cfg.source or cfg.server})"
    try:
        ctx = ssl.create_default_context(cafile=cfg.ca_file or None, cadata=cfg.ca_data or None)
    except (OSError, ssl.SSLError) as e:
        raise KubeConfigError(f"{where}: CA: {e}") from None
    if cfg.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    try:
        if cfg.cert_file or cfg.key_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
        elif cfg.cert_data:
            tmp = tempfile.mkdtemp(prefix="otelflow-kube-")  # ssl loads key pairs from files only
            try:
                cert, key = os.path.join(tmp, "tls.crt"), os.path.join(tmp, "tls.key")
                for p, text in ((cert, cfg.cert_data), (key, cfg.key_data)):
                    with open(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                        f.write(text)
                ctx.load_cert_chain(cert, key if cfg.key_data else None)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (OSError, ssl.SSLError) as e:
        raise KubeConfigError(f"{where}: client certificate: {e}") from None
    return ctx


# ---- requests -------------------------------------------------------------------------------------


def _decoder(drop_keys: Collection[str]) -> Callable[[bytes], Any]:
    """json.loads, leaving out every member named in ``drop_keys`` (at any depth) as it parses.

    Each dropped subtree is freed as soon as its parent object is built, so a page of big objects
    (managedFields, env, volumes, ...) never exists in memory whole: less peak memory, and less of
    it pinned afterwards by the long-lived records made from it.
    """
    if not drop_keys:
        return json.loads
    drop = frozenset(drop_keys)

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        return {k: v for k, v in pairs if k not in drop}

    def loads(raw: bytes) -> Any:
        return json.loads(raw, object_pairs_hook=hook)

    return loads


@dataclass(slots=True)
class ListResult:
    items: list[dict[str, Any]]
    resource_version: str


def _status_message(raw: bytes) -> tuple[str, str]:
    """(message, reason) from a Status body, else the body's first line."""
    try:
        obj = json.loads(raw)
        if isinstance(obj, dict):
            return str(obj.get("message") or ""), str(obj.get("reason") or "")
    except ValueError:
        pass
    text = raw.decode(errors="replace").strip()
    return (text.splitlines()[0][:300] if text else ""), ""


class KubeClient:
    """Requests to one API server. Thread-safe: each thread keeps its own keep-alive connection;
    every watch has a connection of its own."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        user_agent: str = "",
    ) -> None:
        self.config = config
        url = urllib.parse.urlsplit(config.server)
        if url.scheme not in ("https", "http") or not url.hostname:
            raise KubeConfigError(f"kubernetes config ({config.source}): bad server URL {config.server!r}")
        self.server = config.server
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if self._https else 80)
        self._prefix = url.path.rstrip("/")
        self._ssl = _ssl_context(config) if self._https else None
        self._token_file = _TokenFile(config.token_file) if config.token_file else None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.user_agent = user_agent or f"otelflow/{_version()}"
        self._local = threading.local()
        self._conns: set[http.client.HTTPConnection] = set()
        self._watches: set[Watch] = set()
        self._lock = threading.Lock()
        self._closed = False

    # -- plumbing --------------------------------------------------------------------------------

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        h = {"Accept": "application/json", "User-Agent": self.user_agent}
        token = self._token_file.get() if self._token_file else self.config.token
        if token:
            h["Authorization"] = f"Bearer {token}"
        if content_type:
            h["Content-Type"] = content_type
        return h

    def _connect(self, read_timeout: float) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.connect_timeout, context=self._ssl
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.connect_timeout)
        try:
            conn.connect()
        except TimeoutError:
            conn.close()
            raise KubeError(
                self.server, f"cannot connect: timed out after {self.connect_timeout:g}s"
            ) from None
        except ssl.SSLError as e:
            conn.close()
            raise KubeError(self.server, f"TLS handshake failed: {e}") from None
        except OSError as e:
            conn.close()
            raise KubeError(self.server, f"cannot connect: {e.strerror or e}") from None
        assert conn.sock is not None
        conn.sock.settimeout(read_timeout)
        return conn

    def _pooled(self) -> tuple[http.client.HTTPConnection, bool]:
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None:
            return conn, True
        conn = self._connect(self.read_timeout)
        self._local.conn = conn
        with self._lock:
            self._conns.add(conn)
        return conn, False

    def _drop_pooled(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()
            with self._lock:
                self._conns.discard(conn)

    def _error(self, status: int, http_reason: str, raw: bytes) -> KubeError:
        message, reason = _status_message(raw)
        problem = f"{status} {http_reason}" + (f": {message}" if message else "")
        cls = Gone if status == 410 else KubeError
        return cls(self.server, problem, status, reason)

    def request_raw(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> tuple[int, bytes]:
        """(status, body) of one request on this thread's keep-alive connection (transport errors raise)."""
        if self._closed:
            raise KubeError(self.server, "client closed")
        for attempt in (0, 1):
            conn, reused = self._pooled()
            try:
                conn.request(method, self._prefix + path, body=body, headers=self._headers(content_type))
                resp = conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self._drop_pooled()
                return resp.status, data
            except TimeoutError:
                self._drop_pooled()
                raise KubeError(
                    self.server, f"{method} {path}: no answer within {self.read_timeout:g}s"
                ) from None
            except (OSError, http.client.HTTPException) as e:
                # RemoteDisconnected, a reset, or (TLS) an EOF: on a reused keep-alive connection
                # that is the server having closed it while idle (or having restarted): once
                # more, on a fresh connection
                self._drop_pooled()
                if reused and attempt == 0:
                    continue
                raise KubeError(self.server, f"{method} {path}: {e}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str | None = None,
        drop_keys: Collection[str] = (),
    ) -> Any:
        """Decoded JSON answer of one request; a non-2xx status raises KubeError (410: Gone).

        A body is sent as JSON (a PATCH as a JSON merge patch unless content_type says otherwise).
        Members named in ``drop_keys`` are left out of the answer, at any depth.
        """
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            content_type = content_type or (
                "application/merge-patch+json" if method == "PATCH" else "application/json"
            )
        status, raw = self.request_raw(method, path, data, content_type)
        if not 200 <= status < 300:
            raise self._error(status, http.client.responses.get(status, ""), raw)
        try:
            return _decoder(drop_keys)(raw) if raw else None
        except ValueError:
            raise KubeError(self.server, f"{method} {path}: answer is not JSON") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    # -- list ------------------------------------------------------------------------------------

    def list_pages(
        self,
        path: str,
        limit: int = 500,
        params: Mapping[str, str] | None = None,
        drop_keys: Collection[str] = (),
    ) -> Iterator[ListResult]:
        """One ListResult per page, following ``continue`` tokens (every page carries the list's
        resourceVersion). An expired continue token raises Gone: list again from the start.
        Members named in ``drop_keys`` are left out of the items, at any depth."""
        cont = ""
        while True:
            q = dict(params or {})
            if limit:
                q["limit"] = str(limit)
            if cont:
                q["continue"] = cont
            sep = "&" if "?" in path else "?"
            url = f"{path}{sep}{urllib.parse.urlencode(q)}" if q else path
            out = self.request("GET", url, drop_keys=drop_keys) or {}
            meta = out.get("metadata") or {}
            items = out.pop("items", None) or []  # the caller holds the only reference: it may drop them
            del out
            yield ListResult(items, str(meta.get("resourceVersion") or ""))
            del items
            cont = meta.get("continue") or ""
            if not cont:
                return

    def list(self, path: str, limit: int = 500, params: Mapping[str, str] | None = None) -> ListResult:
        """All items of a collection (paginated by ``limit``) and the list's resourceVersion."""
        items: list[dict[str, Any]] = []
        rv = ""
        for page in self.list_pages(path, limit, params):
            items += page.items
            rv = page.resource_version or rv
        return ListResult(items, rv)

    # -- watch -----------------------------------------------------------------------------------

    def watch(
        self,
        path: str,
        resource_version: str = "",
        *,
        allow_bookmarks: bool = True,
        timeout_seconds: int = 300,
        read_timeout: float | None = None,
        drop_keys: Collection[str] = (),
    ) -> Watch:
        """Open a watch (raises KubeError/Gone at once when refused); iterate it for (type, object).

        The server ends the stream after ``timeout_seconds``; the iteration then simply stops.
        An ERROR event raises (410: Gone). ``Watch.close()`` may be called from another thread.
        Members named in ``drop_keys`` are left out of the objects, at any depth.
        """
        q = {"watch": "1", "timeoutSeconds": str(int(timeout_seconds))}
        if resource_version:
            q["resourceVersion"] = resource_version
        if allow_bookmarks:
            q["allowWatchBookmarks"] = "true"
        full = f"{path}{'&' if '?' in path else '?'}{urllib.parse.urlencode(q)}"
        rt = read_timeout if read_timeout is not None else max(self.read_timeout, 90.0)
        conn = self._connect(rt)
        w = Watch(self, conn, path, rt, _decoder(drop_keys))
        with self._lock:
            if self._closed:
                conn.close()
                raise KubeError(self.server, "client closed")
            self._watches.add(w)
        try:
            conn.request("GET", self._prefix + full, headers=self._headers())
            resp = conn.getresponse()
        except TimeoutError:
            w.close()
            raise KubeError(self.server, f"watch {path}: no answer within {rt:g}s") from None
        except (OSError, http.client.HTTPException) as e:
            w.close()
            raise KubeError(self.server, f"watch {path}: {e}") from None
        if resp.status != 200:
            try:
                raw = resp.read()
            except (OSError, http.client.HTTPException):
                raw = b""
            w.close()
            raise self._error(resp.status, resp.reason, raw)
        w._resp = resp
        return w

    def _forget(self, w: Watch) -> None:
        with self._lock:
            self._watches.discard(w)

    def close(self) -> None:
        """Close every pooled connection and abort every open watch (from any thread)."""
        with self._lock:
            self._closed = True
            conns, watches = list(self._conns), list(self._watches)
            self._conns.clear()
        for w in watches:
            w.close()
        for c in conns:
            _wake(c)  # its thread sees the error, drops the connection and closes it


def _wake(conn: http.client.HTTPConnection) -> None:
    """Shut a connection's socket down: a thread blocked reading it returns at once. (Closing it
    from another thread would pull the file object from under that thread's read.)"""
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class Watch:
    """An open watch stream: iterate for (type, object); close() from any thread aborts it."""

    def __init__(
        self,
        client: KubeClient,
        conn: http.client.HTTPConnection,
        path: str,
        read_timeout: float,
        loads: Callable[[bytes], Any] = json.loads,
    ) -> None:
        self._client = client
        self._conn = conn
        self._resp: http.client.HTTPResponse | None = None
        self.path = path
        self.read_timeout = read_timeout
        self._loads = loads
        self.closed = False
        self._iterating = False

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        server = self._client.server
        buf = b""
        self._iterating = True
        try:
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    if self.closed or self._resp is None:
                        return
                    try:
                        chunk = self._resp.read1(65536)
                    except TimeoutError:
                        raise KubeError(
                            server, f"watch {self.path}: nothing heard for {self.read_timeout:g}s"
                        ) from None
                    except (OSError, http.client.HTTPException, ValueError, AttributeError) as e:
                        if self.closed:
                            return
                        raise KubeError(server, f"watch {self.path}: stream broken: {e!r}") from None
                    if not chunk:
                        if buf.strip():
                            raise KubeError(server, f"watch {self.path}: stream ended mid-event")
                        return  # the server ended the watch (timeoutSeconds): a normal end
                    buf += chunk
                    continue
                line, buf = buf[:nl], buf[nl + 1 :]
                if not line.strip():
                    continue
                try:
                    ev = self._loads(line)
                    kind, obj = str(ev["type"]), ev["object"]
                except (ValueError, KeyError, TypeError):
                    raise KubeError(server, f"watch {self.path}: malformed event {line[:120]!r}") from None
                if kind == "ERROR":
                    code = int(obj.get("code") or 0) if isinstance(obj, dict) else 0
                    msg = str(obj.get("message") or "") if isinstance(obj, dict) else str(obj)
                    reason = str(obj.get("reason") or "") if isinstance(obj, dict) else ""
                    cls = Gone if code == 410 else KubeError
                    raise cls(server, f"watch {self.path}: {code} {reason}: {msg}", code or None, reason)
                yield kind, obj
        finally:
            self._iterating = False
            self.close()
            self._conn.close()

    def close(self) -> None:
        """Abort the stream; safe from another thread (the reading thread releases the socket)."""
        if not self.closed:
            self.closed = True
            _wake(self._conn)
            self._client._forget(self)
            if not self._iterating:
                self._conn.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
