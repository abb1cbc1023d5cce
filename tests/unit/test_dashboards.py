"""The Grafana dashboards in dashboards/ query only what otelflow exports.

Every panel query (and every template-variable query) may name only metrics from
otelflow/schema.py under their Prometheus names (METRICS with histogram _bucket/_sum/_count, and
SELF_METRICS), and only labels those metrics carry: attributes with dots turned into underscores
(the collector's Prometheus exporter does that), the agent's resource attributes (gateway.yaml copies
them onto every series), job/instance, `le` on buckets, plus labels the query itself creates with
label_replace/label_join. Every expression must parse with the real promtool (Debian's prometheus
package). The committed JSON must equal what dashboards/generate.py writes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from otelflow import schema

ROOT = Path(__file__).resolve().parents[2]
DASH_DIR = ROOT / "dashboards"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("otelflow_dashboards_generate", DASH_DIR / "generate.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


GEN = load_generator()
FILES = sorted(DASH_DIR.glob("*.json"))


def prom_label(attr: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", attr)


# ---- what the schema allows -------------------------------------------------------------------------

FLOW_METRICS: set[str] = set()
for _m in schema.METRICS:
    if _m.kind == "histogram":
        FLOW_METRICS |= {f"{_m.prometheus}_bucket", f"{_m.prometheus}_sum", f"{_m.prometheus}_count"}
    else:
        FLOW_METRICS.add(_m.prometheus)
SELF_LABELS: dict[str, set[str]] = {m.name: set(m.labels) for m in schema.SELF_METRICS}
FLOW_LABELS = {prom_label(a) for a in schema.metric_attribute_names("flow")} | {"otel_metric_overflow"}
COMMON_LABELS = {prom_label(a.name) for a in schema.RESOURCE_ATTRIBUTES} | {"job", "instance"}


# ---- a small PromQL scanner: which metric names and label names an expression uses -----------------

TOKEN = re.compile(
    r"""(?P<ws>\s+)
    |(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<dur>\d+(?:ms|s|m|h|d|w|y)(?:\d+(?:ms|s|m|h|d|w|y))*(?![A-Za-z0-9_]))
    |(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=(){}\[\],@:])""",
    re.X,
)
AGGREGATORS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile",
}  # fmt: skip
FUNCTIONS = AGGREGATORS | {
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "days_in_month", "delta", "deriv", "exp", "floor",
    "histogram_quantile", "holt_winters", "hour", "idelta", "increase", "irate", "label_join",
    "label_replace", "ln", "log2", "log10", "minute", "month", "predict_linear", "rate", "resets",
    "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "time", "timestamp", "vector", "year",
    "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
    "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time",
    "present_over_time",
}  # fmt: skip
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
MATCH_OPS = {"=", "!=", "=~", "!~"}


@dataclass
class Usage:
    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)  # read: matchers, grouping, label_* sources
    created: set[str] = field(default_factory=set)  # written by label_replace / label_join
    errors: list[str] = field(default_factory=list)


def tokenize(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot scan {expr[pos : pos + 20]!r}")
        pos = m.end()
        kind = m.lastgroup or ""
        if kind != "ws":
            out.append((kind, m.group()))
    return out


def unquote(s: str) -> str:
    return s[1:-1]


def scan(expr: str) -> Usage:
    """Metric names and label names used by a PromQL expression."""
    u = Usage()
    toks = tokenize(expr)
    # stack entries: ("brace",) | ("labels",) | ("call", name, args) | ("paren",) | ("range",)
    stack: list[list[Any]] = []
    i = 0
    while i < len(toks):
        kind, val = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        top = stack[-1] if stack else None
        if kind == "ident":
            if top and top[0] == "labels":
                u.labels.add(val)
            elif top and top[0] == "brace":
                if nxt in MATCH_OPS:
                    u.labels.add(val)
                else:
                    u.errors.append(f"unexpected {val!r} in a selector")
            elif val in GROUPING and nxt == "(":
                stack.append(["labels"])
                i += 2
                continue
            elif nxt == "(":
                if val not in FUNCTIONS:
                    u.errors.append(f"unknown function {val!r}")
                stack.append(["call", val, [[]]])
                i += 2
                continue
            elif val in AGGREGATORS or val in KEYWORDS:
                pass
            else:
                u.metrics.add(val)
        elif kind == "str" and top and top[0] == "call":
            top[2][-1].append(unquote(val))
        elif kind == "op":
            if val == "{":
                stack.append(["brace"])
            elif val == "[":
                stack.append(["range"])
            elif val == "(":
                stack.append(["paren"])
            elif val == "," and top and top[0] == "call":
                top[2].append([])
            elif val in ")}]":
                if not stack:
                    u.errors.append(f"unbalanced {val!r}")
                    break
                closed = stack.pop()
                if closed[0] == "call" and closed[1] in ("label_replace", "label_join"):
                    args = [a[0] if len(a) == 1 else None for a in closed[2]]
                    if len(args) < 4 or any(a is None for a in args[1:]):
                        u.errors.append(f"{closed[1]} needs string arguments")
                    else:
                        u.created.add(str(args[1]))
                        srcs = [args[3]] if closed[1] == "label_replace" else args[3:]
                        u.labels |= {str(s) for s in srcs if s}
        i += 1
    if stack:
        u.errors.append("unbalanced brackets")
    return u


def allowed_labels(metrics: set[str]) -> set[str]:
    out = set(COMMON_LABELS)
    for m in metrics:
        if m in FLOW_METRICS:
            out |= FLOW_LABELS
            if m.endswith("_bucket"):
                out.add("le")
        out |= SELF_LABELS.get(m, set())
    return out


def problems(expr: str, legend: str = "") -> list[str]:
    """Everything wrong with one query: unknown metrics, unknown labels (also in the legend)."""
    try:
        u = scan(expr)
    except ValueError as e:
        return [str(e)]
    out = list(u.errors)
    known = FLOW_METRICS | set(SELF_LABELS)
    out += [f"metric {m!r} is not in otelflow/schema.py" for m in sorted(u.metrics - known)]
    if not u.metrics:
        out.append("no metric")
    ok = allowed_labels(u.metrics) | u.created
    out += [f"label {lab!r} is not an attribute of {sorted(u.metrics)}" for lab in sorted(u.labels - ok)]
    for lab in re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", legend):
        if lab not in ok:
            out.append(f"legend label {lab!r} is not an attribute of {sorted(u.metrics)}")
    return out


# ---- the dashboards' queries, with Grafana's variables filled in -------------------------------------

BUILTIN = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}


def substitute(expr: str, variables: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise KeyError(f"undefined dashboard variable ${name}")
        return variables[name]

    return re.sub(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)", one, expr)


def variables_of(dash: dict[str, Any]) -> dict[str, str]:
    out = dict(BUILTIN)
    for v in dash["templating"]["list"]:
        if v["type"] == "custom":
            out[v["name"]] = v["current"]["value"]
        elif v["type"] == "query":
            out[v["name"]] = ".*"
    return out


@dataclass(frozen=True)
class Query:
    where: str
    expr: str
    legend: str


def queries(path: Path) -> list[Query]:
    dash = json.loads(path.read_text())
    env = variables_of(dash)
    out = []
    for p in dash["panels"]:
        for t in p["targets"]:
            where = f"{path.name}: panel {p['title']!r} target {t['refId']}"
            out.append(Query(where, substitute(t["expr"], env), t.get("legendFormat", "")))
    return out


def variable_queries(path: Path) -> list[Query]:
    """label_values(selector, label) of each query variable, as the selector plus `sum by (label)`."""
    dash = json.loads(path.read_text())
    env = variables_of(dash)
    out = []
    for v in dash["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*),\s*([A-Za-z_]\w*)\)", v["definition"])
        assert m, f"{path.name}: variable {v['name']}: only label_values(selector, label) is used"
        expr = f"sum by ({m.group(2)}) ({substitute(m.group(1), env)})"
        out.append(Query(f"{path.name}: variable {v['name']}", expr, ""))
    return out


ALL = [q for f in FILES for q in queries(f) + variable_queries(f)]


# ---- tests ------------------------------------------------------------------------------------------


def test_the_generator_wrote_every_committed_dashboard() -> None:
    assert sorted(GEN.DASHBOARDS) == [f.name for f in FILES]
    for name in GEN.DASHBOARDS:
        assert (DASH_DIR / name).read_text() == GEN.render(name), (
            f"dashboards/{name} differs from dashboards/generate.py: run python dashboards/generate.py"
        )


def test_there_are_queries() -> None:
    assert len(ALL) >= 40


@pytest.mark.parametrize("q", ALL, ids=lambda q: q.where)
def test_query_uses_only_schema_metrics_and_labels(q: Query) -> None:
    assert problems(q.expr, q.legend) == [], q.expr


def test_the_check_catches_misspellings() -> None:
    # the same expression as a real panel, with one name misspelled at a time
    good = 'sum by (source_k8s_workload_name) (rate(otelflow_flow_bytes_total{server_port="80"}[1m]))'
    assert problems(good, "{{source_k8s_workload_name}}") == []
    assert problems(good.replace("flow_bytes", "flow_byte"), "") == [
        "metric 'otelflow_flow_byte_total' is not in otelflow/schema.py",
        "label 'server_port' is not an attribute of ['otelflow_flow_byte_total']",
        "label 'source_k8s_workload_name' is not an attribute of ['otelflow_flow_byte_total']",
    ]
    assert problems(good.replace("source_k8s_workload", "source_k8s_wrkload"), "") == [
        "label 'source_k8s_wrkload_name' is not an attribute of ['otelflow_flow_bytes_total']"
    ]
    assert problems(good, "{{source.k8s.workload.name}}") == []  # not a {{label}} pattern: ignored
    assert problems(good, "{{destination_pod}}") == [
        "legend label 'destination_pod' is not an attribute of ['otelflow_flow_bytes_total']"
    ]
    # a self-metric's label is not a flow metric's label, and `le` only exists on buckets
    assert problems('sum by (reason) (otelflow_flow_bytes_total{le="1"})') == [
        "label 'le' is not an attribute of ['otelflow_flow_bytes_total']",
        "label 'reason' is not an attribute of ['otelflow_flow_bytes_total']",
    ]
    assert problems("sum by (reason) (otelflow_agent_export_dropped_items_total)") == []
    assert problems("histogram_quantile(0.9, sum by (le) (rate(otelflow_tcp_rtt_seconds_bucket[1m])))") == []
    assert problems("histogram_quantile(0.9, sum by (le) (rate(otelflow_tcp_rtt_bucket[1m])))") == [
        "metric 'otelflow_tcp_rtt_bucket' is not in otelflow/schema.py",
        "label 'le' is not an attribute of ['otelflow_tcp_rtt_bucket']",
    ]
    # labels made by label_replace exist afterwards; their sources must exist before
    made = 'sum by (x) (label_replace(otelflow_flow_bytes_total, "x", "$1", "source_k8s_pod_name", "(.*)"))'
    assert problems(made) == []
    assert problems(made.replace("source_k8s_pod_name", "source_pod")) == [
        "label 'source_pod' is not an attribute of ['otelflow_flow_bytes_total']"
    ]
    assert problems("sum(rat(otelflow_flow_bytes_total[1m]))") == ["unknown function 'rat'"]


def test_variables_are_defined_and_substituted() -> None:
    assert substitute("rate(x[$__rate_interval]) $1", BUILTIN) == "rate(x[1m]) $1"
    with pytest.raises(KeyError, match=r"\$nmespace"):
        substitute('x{a=~"$nmespace"}', BUILTIN)


def test_every_metric_is_on_some_dashboard() -> None:
    used = set().union(*(scan(q.expr).metrics for q in ALL))
    assert {m.prometheus for m in schema.METRICS if m.kind != "histogram"} <= used
    assert {m.name for m in schema.SELF_METRICS} <= used


def test_datasource_is_a_prometheus_variable() -> None:
    for f in FILES:
        dash = json.loads(f.read_text())
        ds = [v for v in dash["templating"]["list"] if v["name"] == "datasource"]
        assert ds and ds[0]["type"] == "datasource" and ds[0]["query"] == "prometheus", f.name
        for p in dash["panels"]:
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (f.name, p["title"])
            for t in p["targets"]:
                assert t["datasource"] == p["datasource"], (f.name, p["title"])


def test_panels_do_not_overlap_and_ids_are_unique() -> None:
    for f in FILES:
        panels = json.loads(f.read_text())["panels"]
        assert len({p["id"] for p in panels}) == len(panels), f.name
        cells: set[tuple[int, int]] = set()
        for p in panels:
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24, (f.name, p["title"])
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & mine, (f.name, p["title"])
            cells |= mine


def test_service_map_frames_have_the_node_graph_fields() -> None:
    """Grafana's node graph takes the frame with refId `nodes` (fields id, mainstat) as nodes and the
    one with refId `edges` (id, source, target, mainstat) as edges. The instant table queries make
    each `by` label a field; the transformations drop Time and rename the value to mainstat."""
    dash = json.loads((DASH_DIR / "service-map.json").read_text())
    (graph,) = [p for p in dash["panels"] if p["type"] == "nodeGraph"]
    t = {x["refId"]: x for x in graph["targets"]}
    assert set(t) == {"nodes", "edges"}
    for x in t.values():
        assert x["instant"] is True and x["format"] == "table"
    assert t["nodes"]["expr"].startswith("sum by (id) (")
    assert t["edges"]["expr"].startswith("sum by (id, source, target) (")
    env = variables_of(dash)
    assert scan(substitute(t["nodes"]["expr"], env)).created == {"id", "id_workload", "dir"}
    assert scan(substitute(t["edges"]["expr"], env)).created == {
        "id",
        "source",
        "source_workload",
        "target",
        "target_workload",
    }
    assert graph["transformations"] == [
        {"id": "organize", "options": {"excludeByName": {"Time": True}}},
        {"id": "renameByRegex", "options": {"regex": "^Value.*$", "renamePattern": "mainstat"}},
    ]


def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        msg = "promtool not found (Debian package prometheus; ./scripts/setup installs it)"
        if os.environ.get("OFL_REQUIRE_KERNEL_TESTS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def check_rules(tmp_path: Path, exprs: list[str]) -> subprocess.CompletedProcess[str]:
    rules = {
        "groups": [
            {
                "name": "otelflow-dashboards",
                "rules": [
                    {"record": f"otelflow_dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    f = tmp_path / "rules.yaml"
    f.write_text(yaml.safe_dump(rules, width=1 << 20))
    return subprocess.run([promtool(), "check", "rules", str(f)], capture_output=True, text=True, timeout=60)


def test_promtool_parses_every_query(tmp_path: Path) -> None:
    p = check_rules(tmp_path, [q.expr for q in ALL])
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {len(ALL)} rules found" in p.stdout


def test_promtool_rejects_a_broken_query(tmp_path: Path) -> None:
    # a range selector on an expression: the mistake a hand-edited panel makes most
    p = check_rules(tmp_path, ["rate((otelflow_flow_bytes_total or otelflow_flow_packets_total)[1m])"])
    assert p.returncode != 0
