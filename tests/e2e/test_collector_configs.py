"""Every configuration shipped in collector-config/ is valid for the collector it names.

Each config names its build in a `# build: <manifest>` header line (builder.yaml, or
builder-extra.yaml for the components the main release lacks). The manifest is built (or taken from
the cache) by scripts/build-collector, and `otelcol validate` runs the config with it: validate
creates every component, so a component missing from that build fails here.

Validation runs as it would inside a pod: in a private mount namespace where a tmpfs over /run holds
a ServiceAccount directory (a CA certificate made by openssl, a token, a namespace), with
KUBERNETES_SERVICE_HOST/PORT set (the Kubernetes receivers read these when they are created) and the
environment the configs' headers require (K8S_NODE_NAME, K8S_CLUSTER_NAME). Nothing is contacted:
validate creates the components but does not start them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "collector-config"
MANIFESTS = sorted(p.name for p in CONFIG_DIR.glob("builder*.yaml"))
CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if p.name not in MANIFESTS)
BUILD_LINE = re.compile(r"^# build: (\S+)\s*$", re.M)
SA_DIR = "/run/secrets/kubernetes.io/serviceaccount"
# documented combinations (`--config a --config b`): the later file's pipelines win
MERGED = [("gateway.yaml", "loki.yaml")]


def build_of(config: Path) -> str:
    found = BUILD_LINE.findall(config.read_text())
    assert len(found) == 1, f"{config.name}: needs exactly one '# build: <manifest>' line, found {found}"
    assert found[0] in MANIFESTS, f"{config.name}: build {found[0]!r} is not one of {MANIFESTS}"
    return found[0]


def test_every_file_is_a_manifest_or_a_validated_config() -> None:
    assert "builder.yaml" in MANIFESTS and CONFIGS
    others = sorted(p.name for p in CONFIG_DIR.iterdir() if p.suffix != ".yaml")
    assert others == [], f"collector-config/ holds files this test does not validate: {others}"
    for c in CONFIGS:
        build_of(c)


def test_every_manifest_is_used() -> None:
    assert {build_of(c) for c in CONFIGS} == set(MANIFESTS)


@pytest.fixture(scope="session")
def collector_for() -> Callable[[str], str]:
    """manifest file name -> path of its collector binary (built once, cached outside the checkout)."""
    built: dict[str, str] = {}

    def get(manifest: str) -> str:
        if manifest not in built:
            p = subprocess.run(
                [str(ROOT / "scripts" / "build-collector"), str(CONFIG_DIR / manifest)],
                capture_output=True,
                text=True,
                timeout=3600,
            )
            path = p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else ""
            if not path or not os.access(path, os.X_OK):
                msg = f"collector for {manifest} not built: {p.stderr.strip()[-500:]}"
                if os.environ.get("OFL_REQUIRE_KERNEL_TESTS") == "1":
                    pytest.fail(msg)
                pytest.skip(msg)
            built[manifest] = path
        return built[manifest]

    return get


@pytest.fixture(scope="session")
def service_account(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ServiceAccount directory's files: a self-signed CA made by openssl, a token, a namespace."""
    d = tmp_path_factory.mktemp("serviceaccount")
    p = subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"), "-days", "1",
            "-subj", "/CN=otelflow-test-ca",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    (d / "token").write_text("otelflow-test-token\n")
    (d / "namespace").write_text("otelflow\n")
    return d


def validate(binary: str, configs: list[Path], sa: Path) -> subprocess.CompletedProcess[str]:
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed"
    args = " ".join(f"--config {c}" for c in configs)
    script = (
        "set -e; mount -t tmpfs otelflow-test /run; "
        f"mkdir -p {SA_DIR}; cp {sa}/ca.crt {sa}/token {sa}/namespace {SA_DIR}/; "
        f'exec "$0" validate {args}'
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": "6443",
        "K8S_NODE_NAME": "node-a",
        "K8S_CLUSTER_NAME": "ofl-test",
    }
    return subprocess.run(
        [unshare, "--mount", "--propagation", "private", "sh", "-c", script, binary],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_validates(collector_for: Callable[[str], str], service_account: Path, config: Path) -> None:
    p = validate(collector_for(build_of(config)), [config], service_account)
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.parametrize("pair", MERGED, ids=lambda p: "+".join(p))
def test_merged_configs_validate(
    collector_for: Callable[[str], str], service_account: Path, pair: tuple[str, str]
) -> None:
    configs = [CONFIG_DIR / n for n in pair]
    (build,) = {build_of(c) for c in configs}
    p = validate(collector_for(build), configs, service_account)
    assert p.returncode == 0, p.stderr[-2000:]


def test_validate_fails_on_a_component_the_build_lacks(
    collector_for: Callable[[str], str], service_account: Path, tmp_path: Path
) -> None:
    """The check can fail: the extra build has no prometheus exporter."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (CONFIG_DIR / "gateway.yaml")
        .read_text()
        .replace("# build: builder.yaml", "# build: builder-extra.yaml")
    )
    p = validate(collector_for("builder-extra.yaml"), [bad], service_account)
    assert p.returncode != 0
    assert "prometheus" in p.stderr
