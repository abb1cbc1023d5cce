"""A real etcd + kube-apiserver on 127.0.0.1, for tests.

    apiserver, etcd = find_binaries()          # or raises BinariesNotFound (a reason to skip)
    with KubeAPI(apiserver, etcd) as api:
        api.create_namespace("demo")           # also creates its "default" ServiceAccount
        status, pod = api.request("GET", "/api/v1/namespaces/demo/pods")
        api.stop(); ...; api.start()           # API server only: same port, same etcd data

Everything lives in a fresh temporary directory: a CA and serving certificate (SAN 127.0.0.1,
::1, localhost) made with the openssl CLI, a service-account signing key pair, a static token
file plus a client certificate for an admin in group system:masters, the etcd data, the logs and
an admin kubeconfig. Authorization is RBAC only. No controller-manager runs, so nothing creates a
namespace's "default" ServiceAccount (the ServiceAccount admission plugin needs it before a pod
can be created there): create_namespace() makes it. Pods never get scheduled or run; set their
status through the pods/status subresource.

Processes run in their own session with PR_SET_PDEATHSIG, and stop() / close() / __exit__ / an
atexit hook kill them, so nothing is left behind even when the test process dies. (The kernel ties
PDEATHSIG to the thread that started the process: call start() from a thread that outlives the
servers, e.g. the main thread, as pytest fixtures do.) Binaries come from scripts/build-kube (see
find_binaries()).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "BinariesNotFound",
    "KubeAPI",
    "KubeAPIError",
    "find_binaries",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-kube"

SERVICE_CIDR_DUAL = "10.96.0.0/16,fd00:96::/112"
SERVICE_CIDR_V4 = "10.96.0.0/16"
ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "otelflow-admin"

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
[dn]
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = IP:127.0.0.1,IP:::1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes,\
DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
[v3_client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def write_kubeconfig(api: KubeAPI, token: str, path: str | os.PathLike[str]) -> str:
    """A kubeconfig for `token` against `api` (its CA, its URL); returns the path."""
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "test", "cluster": {"server": api.url, "certificate-authority": str(api.ca_file)}}
        ],
        "users": [{"name": "agent", "user": {"token": token}}],
        "contexts": [{"name": "agent", "context": {"cluster": "test", "user": "agent"}}],
        "current-context": "agent",
    }
    Path(path).write_text(json.dumps(cfg))
    return str(path)


class KubeAPIError(RuntimeError):
    """etcd or kube-apiserver failed to start or answer; the message carries the log tail."""


class BinariesNotFound(RuntimeError):
    """No kube-apiserver/etcd to run; str(exc) says why (a test should skip with it)."""


def find_binaries(*, build: bool | None = None, timeout: float = 3600.0) -> tuple[Path, Path]:
    """(kube-apiserver, etcd) paths.

    1. OFL_KUBE_BIN_DIR (the directory holding kube-apiserver) together with OFL_ETCD_BIN
       (the etcd binary), when set;
    2. else scripts/build-kube: a full build (5-10 minutes cold on 2 cores, instant when cached)
       when `build` is true, which defaults to OFL_BUILD_KUBE=1; otherwise `--cached-only`,
       which only reports binaries that an earlier build left in the cache.
    Raises BinariesNotFound (a reason to skip) when there are none, and KubeAPIError when a build
    that was asked for fails (an error, not a skip).
    """
    bin_dir = os.environ.get("OFL_KUBE_BIN_DIR")
    etcd_bin = os.environ.get("OFL_ETCD_BIN")
    if bin_dir or etcd_bin:
        if not (bin_dir and etcd_bin):
            raise BinariesNotFound("set both OFL_KUBE_BIN_DIR and OFL_ETCD_BIN, or neither")
        apiserver, etcd = Path(bin_dir) / "kube-apiserver", Path(etcd_bin)
        for p in (apiserver, etcd):
            if not os.access(p, os.X_OK):
                raise BinariesNotFound(f"{p} is not an executable file")
        return apiserver.resolve(), etcd.resolve()
    if build is None:
        build = os.environ.get("OFL_BUILD_KUBE") == "1"
    if not BUILD_SCRIPT.exists():
        raise BinariesNotFound(f"{BUILD_SCRIPT} is missing")
    cmd = [str(BUILD_SCRIPT)] if build else [str(BUILD_SCRIPT), "--cached-only"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise KubeAPIError(f"scripts/build-kube took over {timeout:.0f}s") from e
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or len(lines) < 2:
        if not build:
            raise BinariesNotFound(
                "kube-apiserver/etcd not built: run scripts/build-kube (or set OFL_BUILD_KUBE=1, "
                "or OFL_KUBE_BIN_DIR + OFL_ETCD_BIN)"
            )
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise KubeAPIError(f"scripts/build-kube failed (exit {proc.returncode}):\n{tail}")
    return Path(lines[-2]), Path(lines[-1])


def _free_ports(n: int) -> list[int]:
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# Looked up once, here: the child must not dlopen between fork and exec (another thread may hold
# the loader's lock at fork time).
try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGKILL it when the parent (thread) goes away.
    if _prctl is not None:
        _prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _kill(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


WORKDIR_PREFIX = "otelflow-kubeapi-"


def _sweep_stale_workdirs() -> None:
    """Remove work directories whose owning process is gone (it was killed before close())."""
    for d in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        try:
            pid = int((d / "owner.pid").read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            continue  # no owner file yet, or not ours to judge


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class KubeAPI:
    """etcd + kube-apiserver on loopback; a context manager. See the module docstring."""

    def __init__(
        self,
        apiserver: str | os.PathLike[str],
        etcd: str | os.PathLike[str],
        *,
        workdir: str | os.PathLike[str] | None = None,
        service_cidr: str = SERVICE_CIDR_DUAL,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 90.0,
        keep_workdir: bool | None = None,
    ) -> None:
        self.apiserver_bin = Path(apiserver)
        self.etcd_bin = Path(etcd)
        self.service_cidr = service_cidr
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self._own_workdir = workdir is None
        if workdir is None:
            _sweep_stale_workdirs()
            self.dir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
            (self.dir / "owner.pid").write_text(f"{os.getpid()}\n")
        else:
            self.dir = Path(workdir)
            self.dir.mkdir(parents=True, exist_ok=True)
        self.keep_workdir = (
            keep_workdir if keep_workdir is not None else os.environ.get("OFL_KEEP_KUBEAPI") == "1"
        )
        self.port, self.etcd_port, self.etcd_peer_port = _free_ports(3)
        self.url = f"https://127.0.0.1:{self.port}"
        self.etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        self.pki = self.dir / "pki"
        self.ca_file = self.pki / "ca.crt"
        self.admin_cert = self.pki / "admin.crt"
        self.admin_key = self.pki / "admin.key"
        self.admin_token = secrets.token_hex(24)
        self.kubeconfig_path = self.dir / "admin.kubeconfig"
        self.apiserver_log = self.dir / "kube-apiserver.log"
        self.etcd_log = self.dir / "etcd.log"
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._ssl: ssl.SSLContext | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._prepared = False
        self._closed = False
        atexit.register(self.close)

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> KubeAPI:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start whatever is not running (etcd, then kube-apiserver) and wait until /readyz is ok."""
        if self._closed:
            raise KubeAPIError("this KubeAPI was closed")
        try:
            if not self._prepared:
                self._prepare()
            if self._etcd is None or self._etcd.poll() is not None:
                self._start_etcd()
            if self._apiserver is None or self._apiserver.poll() is not None:
                self._start_apiserver()
        except BaseException:
            self._kill_all()
            raise

    def stop(self) -> None:
        """Stop kube-apiserver only; etcd keeps the data. start() brings it back on the same port."""
        _kill(self._apiserver, grace=20)
        self._apiserver = None

    def close(self) -> None:
        """Stop everything and remove the work directory (unless keep_workdir)."""
        if self._closed:
            return
        self._closed = True
        self._kill_all()
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if self._own_workdir and not self.keep_workdir:
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._apiserver is not None and self._apiserver.poll() is None

    def _kill_all(self) -> None:
        _kill(self._apiserver, grace=20)
        self._apiserver = None
        _kill(self._etcd, grace=10)
        self._etcd = None

    # -- setup -----------------------------------------------------------------------------------

    def _openssl(self, *args: str) -> None:
        proc = subprocess.run(["openssl", *args], cwd=self.pki, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise KubeAPIError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")

    def _issue(self, name: str, subject: str, ext: str) -> None:
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        self._openssl("req", "-config", "openssl.cnf", "-new", *ec, "-keyout", f"{name}.key",
                      "-out", f"{name}.csr", "-subj", subject)  # fmt: skip
        self._openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                      "-set_serial", f"0x{secrets.token_hex(16)}", "-days", "3650", "-sha256",
                      "-extfile", "openssl.cnf", "-extensions", ext, "-out", f"{name}.crt")  # fmt: skip

    def _prepare(self) -> None:
        if shutil.which("openssl") is None:
            raise KubeAPIError("the openssl CLI is needed to make test certificates")
        for b in (self.apiserver_bin, self.etcd_bin):
            if not os.access(b, os.X_OK):
                raise KubeAPIError(f"{b} is not executable")
        self.pki.mkdir(parents=True, exist_ok=True)
        (self.pki / "openssl.cnf").write_text(_OPENSSL_CNF)
        self._openssl("req", "-config", "openssl.cnf", "-x509", "-new", "-newkey", "ec",
                      "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key",
                      "-out", "ca.crt", "-days", "3650", "-sha256", "-subj", "/CN=otelflow-test-ca",
                      "-extensions", "v3_ca")  # fmt: skip
        self._issue("server", "/CN=kube-apiserver", "v3_server")
        self._issue("admin", f"/O=system:masters/CN={ADMIN_USER}", "v3_client")
        self._openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key")
        self._openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        tokens = f'{self.admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n'
        (self.pki / "tokens.csv").write_text(tokens)
        for p in self.pki.iterdir():
            p.chmod(0o600)
        self._ssl = ssl.create_default_context(cafile=str(self.ca_file))
        self._write_kubeconfig()
        self._prepared = True

    def _write_kubeconfig(self) -> None:
        # JSON is valid YAML, and client-go/kubectl read either.
        cluster = {"server": self.url, "certificate-authority": str(self.ca_file)}
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "otelflow-test", "cluster": cluster}],
            "users": [
                {
                    "name": ADMIN_USER,
                    "user": {
                        "token": self.admin_token,
                        "client-certificate": str(self.admin_cert),
                        "client-key": str(self.admin_key),
                    },
                }
            ],
            "contexts": [
                {"name": "otelflow-test", "context": {"cluster": "otelflow-test", "user": ADMIN_USER}}
            ],
            "current-context": "otelflow-test",
        }
        self.kubeconfig_path.write_text(json.dumps(cfg, indent=2) + "\n")
        self.kubeconfig_path.chmod(0o600)

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            out.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
            out.flush()
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def _start_etcd(self) -> None:
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        argv = [
            str(self.etcd_bin),
            "--name=otelflow",
            f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=otelflow={peer}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync",  # test data: speed over durability
            "--log-level=warn",
        ]
        self._etcd = self._spawn(argv, self.etcd_log)
        deadline = time.monotonic() + 30
        while True:
            if self._etcd.poll() is not None:
                raise KubeAPIError(f"etcd exited with {self._etcd.returncode}:\n{_tail(self.etcd_log)}")
            with (
                contextlib.suppress(OSError, ValueError),
                self._opener.open(f"{self.etcd_url}/health", timeout=2) as r,
            ):
                if json.loads(r.read()).get("health") == "true":
                    return
            if time.monotonic() > deadline:
                raise KubeAPIError(f"etcd not healthy after 30s:\n{_tail(self.etcd_log)}")
            time.sleep(0.1)

    def apiserver_args(self) -> list[str]:
        p = self.pki
        return [
            str(self.apiserver_bin),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--tls-cert-file={p / 'server.crt'}",
            f"--tls-private-key-file={p / 'server.key'}",
            f"--client-ca-file={p / 'ca.crt'}",
            f"--token-auth-file={p / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--anonymous-auth=false",
            f"--service-account-key-file={p / 'sa.pub'}",
            f"--service-account-signing-key-file={p / 'sa.key'}",
            f"--service-account-issuer={ISSUER}",
            f"--service-cluster-ip-range={self.service_cidr}",
            "--allow-privileged=true",
            # A loopback address may not be an Endpoints address: skip the kubernetes
            # Service's endpoint reconciler (one server, nothing in-cluster to reach it).
            "--endpoint-reconciler-type=none",
            f"--cert-dir={self.dir / 'apiserver-certs'}",
            "--profiling=false",
            *self.extra_args,
        ]

    def _start_apiserver(self) -> None:
        self._apiserver = self._spawn(self.apiserver_args(), self.apiserver_log)
        deadline = time.monotonic() + self.startup_timeout
        last = ""
        while True:
            if self._apiserver.poll() is not None:
                code = self._apiserver.returncode
                self._apiserver = None
                raise KubeAPIError(f"kube-apiserver exited with {code}:\n{_tail(self.apiserver_log)}")
            try:
                status, body = self._raw("GET", "/readyz", None, None, None, timeout=3)
                if status == 200:
                    return
                last = f"/readyz {status}: {body!r}"[:400]
            except OSError as e:
                last = repr(e)
            if time.monotonic() > deadline:
                raise KubeAPIError(
                    f"kube-apiserver not ready after {self.startup_timeout:.0f}s ({last}):\n"
                    f"{_tail(self.apiserver_log)}"
                )
            time.sleep(0.25)

    # -- HTTP ------------------------------------------------------------------------------------

    def _open(
        self,
        method: str,
        path: str,
        data: bytes | None,
        token: str | None,
        content_type: str | None,
        timeout: float,
    ) -> Any:
        if self._ssl is None:
            raise KubeAPIError("not started")
        headers = {"Accept": "application/json", "Authorization": f"Bearer {token or self.admin_token}"}
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        https = urllib.request.HTTPSHandler(context=self._ssl)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), https)
        return opener.open(req, timeout=timeout)

    def _raw(
        self,
        method: str,
        path: str,
        data: bytes | None,
        token: str | None,
        content_type: str | None,
        timeout: float = 30,
    ) -> tuple[int, bytes]:
        try:
            with self._open(method, path, data, token, content_type, timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read()

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | list[Any] | None = None,
        token: str | None = None,
        *,
        content_type: str | None = None,
        timeout: float = 30,
    ) -> tuple[int, Any]:
        """(HTTP status, decoded JSON body or None) for one request.

        HTTP errors (4xx/5xx) are returned, not raised; a server that does not answer at all
        (stopped, refused) raises urllib.error.URLError.

        token defaults to the admin token. A PATCH body is sent as a JSON merge patch unless
        content_type says otherwise (e.g. application/strategic-merge-patch+json).
        """
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            if content_type is None:
                content_type = "application/merge-patch+json" if method == "PATCH" else "application/json"
        status, raw = self._raw(method, path, data, token, content_type, timeout)
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def watch(
        self,
        path: str,
        params: Mapping[str, str] | None = None,
        token: str | None = None,
        *,
        timeout: float = 30,
    ) -> Iterator[dict[str, Any]]:
        """Yield watch events ({"type": ..., "object": ...}) from `path` (a collection URL).

        `params` are added to ?watch=1 (resourceVersion, allowWatchBookmarks, ...). Ends when the
        server ends the stream (timeoutSeconds defaults to `timeout`) or the client-side read
        times out. A non-200 answer is yielded as one {"type": "HTTP_ERROR", "code": ...,
        "object": body} event. Close the generator to drop the connection early.
        """
        q = {"watch": "1", "timeoutSeconds": str(int(timeout)), **(params or {})}
        full = f"{path}{'&' if '?' in path else '?'}{urllib.parse.urlencode(q)}"
        try:
            resp = self._open("GET", full, None, token, None, timeout + 5)
        except urllib.error.HTTPError as e:
            with e:
                raw = e.read()
            try:
                obj = json.loads(raw)
            except ValueError:
                obj = raw.decode(errors="replace")
            yield {"type": "HTTP_ERROR", "code": e.code, "object": obj}
            return
        with resp:
            try:
                for line in resp:
                    if line.strip():
                        yield json.loads(line)
            except TimeoutError:
                return

    def ready(self) -> bool:
        try:
            return self._raw("GET", "/readyz", None, None, None, timeout=3)[0] == 200
        except OSError:
            return False

    # -- conveniences ----------------------------------------------------------------------------

    def create(self, path: str, obj: Mapping[str, Any], token: str | None = None) -> dict[str, Any]:
        """POST obj to a collection path; raises KubeAPIError unless 201/200."""
        status, out = self.request("POST", path, obj, token)
        if status not in (200, 201):
            raise KubeAPIError(f"POST {path}: {status} {out}")
        return dict(out)

    def create_namespace(self, name: str) -> None:
        """Create a Namespace (if missing) and its "default" ServiceAccount, which pod admission needs."""
        status, out = self.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
        if status not in (201, 409):
            raise KubeAPIError(f"create namespace {name}: {status} {out}")
        status, out = self.request(
            "POST", f"/api/v1/namespaces/{name}/serviceaccounts", {"metadata": {"name": "default"}}
        )
        if status not in (201, 409):
            raise KubeAPIError(f"create serviceaccount {name}/default: {status} {out}")

    def create_service_account_token(
        self, namespace: str, name: str, *, expiration_seconds: int = 3600, audiences: Sequence[str] = ()
    ) -> str:
        """A bound token for ServiceAccount namespace/name, from the TokenRequest API."""
        spec: dict[str, Any] = {"expirationSeconds": expiration_seconds}
        if audiences:
            spec["audiences"] = list(audiences)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        status, out = self.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", body
        )
        if status != 201:
            raise KubeAPIError(f"TokenRequest for {namespace}/{name}: {status} {out}")
        return str(out["status"]["token"])

    def _etcd_post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            self.etcd_url + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with self._opener.open(req, timeout=30) as r:
            return dict(json.loads(r.read()))

    def etcd_revision(self) -> int:
        """etcd's current revision (the newest resourceVersion of any object)."""
        out = self._etcd_post("/v3/kv/range", {"key": base64.b64encode(b"\0").decode(), "limit": 1})
        return int(out["header"]["revision"])

    def compact_etcd(self) -> int:
        """Compact etcd's history up to its current revision (physically); returns that revision.

        After this, a watch or list from an older resourceVersion that reaches etcd gets 410 Gone.
        """
        rev = self.etcd_revision()
        self._etcd_post("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        return rev

    def expire_history(self) -> int:
        """Make every resourceVersion up to now "too old": afterwards a watch from any of them
        gets 410 Gone (Expired), as after a real API server restart plus etcd compaction.

        Compacting etcd alone is not enough: the API server's watch cache keeps its own event
        window (filled from the list it made at start, which on a fresh etcd is revision ~1) and
        serves old watches from it. So this compacts etcd to its current revision and restarts
        the API server, whose caches then re-list at a newer revision. Returns that revision.
        """
        rev = self.compact_etcd()
        self.stop()
        self.start()
        return rev

    # -- for the metadata cache tests (tests/kernel/test_k8s_cache.py) -----------------------------

    def etcd_delete(self, key: str) -> int:
        """Delete one key straight from etcd, behind the API server's back (e.g. an object that
        vanishes while the API server is down, so a watcher can only learn it from a relist).
        Object keys look like /registry/pods/<namespace>/<name>. Returns how many keys went."""
        out = self._etcd_post("/v3/kv/deleterange", {"key": base64.b64encode(key.encode()).decode()})
        return int(out.get("deleted", 0))
