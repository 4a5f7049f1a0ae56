"""The Grafana dashboard (deploy/grafana/dashboards/pipeline.json) holds together as Grafana
loads it from the provisioning files, with no Grafana here: panels on the grid without
overlaps, unique ids, every query on the provisioned Prometheus, valid PromQL (promtool parses
each one), naming only series the processes serve or the rules record (`SERIES` in
tests/test_alerts.py), and a panel for each thing issue #18 asks to see.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_alerts import BUILTIN_SERIES, SERIES, promql_names, promtool, recorded
from tests.test_deploy import bind_mounts

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "pipeline.json"
GRID_COLUMNS = 24
# what Grafana puts in place of its variables before a query goes to Prometheus
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL as Prometheus receives it) for every target."""
    found = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append((panel["title"], expr))
    return found


def provisioned_datasource() -> dict[str, Any]:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [source] = doc["datasources"]
    return dict(source)


def test_dashboard_has_what_grafana_needs_to_provision_it(dashboard: dict[str, Any]) -> None:
    assert re.fullmatch(r"[\w-]{1,40}", dashboard["uid"])
    assert dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    assert dashboard["schemaVersion"] >= 36  # Grafana migrates older ones on load
    assert "id" not in dashboard or dashboard["id"] is None  # Grafana assigns it
    ids = [p["id"] for p in panels(dashboard)]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), ids


def test_panels_sit_on_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    taken: set[tuple[int, int]] = set()
    for panel in panels(dashboard):
        pos = panel["gridPos"]
        x, y, w, h = (pos[k] for k in ("x", "y", "w", "h"))
        assert all(isinstance(v, int) for v in (x, y, w, h)), panel["title"]
        assert x >= 0 and x + w <= GRID_COLUMNS and w > 0 and h > 0 and y >= 0, panel["title"]
        cells = {(col, row) for col in range(x, x + w) for row in range(y, y + h)}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_every_query_goes_to_the_provisioned_prometheus(dashboard: dict[str, Any]) -> None:
    source = provisioned_datasource()
    assert source["type"] == "prometheus"
    expected = {"type": "prometheus", "uid": source["uid"]}
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target.get("datasource", expected) == expected, panel["title"]
            assert target["expr"].strip(), panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_every_query_is_promql_that_promtool_parses(
    dashboard: dict[str, Any], tmp_path: Path,
) -> None:
    """Each query as a recording rule: `promtool check rules` parses it as Prometheus would."""
    rules = [{"record": f"dashboard:query_{i}", "expr": expr}
             for i, (_, expr) in enumerate(queries(dashboard))]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_query_names_only_served_or_recorded_series(dashboard: dict[str, Any]) -> None:
    known = SERIES | BUILTIN_SERIES | recorded()
    used: set[str] = set()
    for title, expr in queries(dashboard):
        names = promql_names(expr)
        assert names, f"{title}: {expr} selects no series"
        assert not names - known, f"{title}: {sorted(names - known)}"
        used |= names
    assert "pipeline:view_age_limit_seconds" in used  # the limits drawn next to the ages


# What issue #18 asks the dashboard to show: a panel whose query has each of these.
WANTED = {
    "frames/s per family": ("pipeline_frames_logged_total", "by (key)"),
    "gaps": ("pipeline_gaps_total",),
    "reconnects": ("pipeline_reconnects_total", "reason"),
    "Redis write latency": ("pipeline_redis_write_seconds_bucket", "histogram_quantile"),
    "projector lag": ("pipeline_consumer_lag",),
    "events/s per projection": ("pipeline_events_projected_total", "by (projection)"),
    "view ages": ("pipeline_view_age_seconds",),
    "REST weight": ("pipeline_rest_weight_used_1m",),
    "order events/s": ("pipeline_events_projected_total", 'projection="orders"'),
}


@pytest.mark.parametrize("what", WANTED)
def test_the_dashboard_shows(dashboard: dict[str, Any], what: str) -> None:
    assert any(all(part in expr for part in WANTED[what]) for _, expr in queries(dashboard)), \
        f"no panel shows {what}"


def test_grafana_provisions_this_dashboard_and_the_compose_prometheus() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = bind_mounts(grafana)
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    mounted = mounts["./deploy/grafana/dashboards"]
    doc = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "pipeline.yml").read_text())
    [provider] = doc["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == mounted
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{mounted}/{DASHBOARD.name}"
    # the datasource is the compose service `prometheus`, on the port it listens on, on a
    # network both share
    url = re.fullmatch(r"http://([\w-]+):(\d+)/?", provisioned_datasource()["url"])
    assert url, provisioned_datasource()["url"]
    prometheus = compose["services"][url[1]]
    assert f"--web.listen-address=:{url[2]}" in prometheus["command"]
    assert set(grafana["networks"]) & set(prometheus["networks"])
