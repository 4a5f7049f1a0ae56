"""The alerting rules (deploy/prometheus/alerts.yml) page on what they say, with the series the
processes really serve: promtool's unit tests of every rule, the rules' limits against the
ones `pipeline status` judges by, the docs of each alert, and one real Prometheus from the
Debian package scraping the simulator-fed pipeline, whose PipelineViewStale goes pending, then
firing, when the feed is silenced, and clears when it comes back.

`SERIES` is the one list of every series the rules and the dashboard
(tests/test_dashboard.py) use: a series renamed in pipeline/metrics.py fails
`test_every_series_the_rules_and_dashboard_use_is_served`, and one used but not listed fails
the test of the file that uses it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import demo, health, status, weight
from pipeline.localredis import LocalRedis, free_port
from projections.shell import registry
from tests.conftest import ROOT
from tests.test_metrics import base_env, get, start, wait_for

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "alerts.test.yml"
ALERTS_DOC = ROOT / "docs" / "alerts.md"
JOBS = ("ingest-market", "ingest-user", "projector")

# Every series of pipeline/metrics.py that the rules or the dashboard name, as exposed.
SERIES = frozenset({
    "pipeline_frames_received_total", "pipeline_frames_logged_total",
    "pipeline_frames_dropped_total", "pipeline_gaps_total", "pipeline_reconnects_total",
    "pipeline_redis_write_seconds_bucket", "pipeline_batch_size_bucket",
    "pipeline_buffer_fill", "pipeline_connections", "pipeline_consumer_lag",
    "pipeline_view_age_seconds", "pipeline_events_projected_total",
    "pipeline_dead_letters_total", "pipeline_unknown_events_total",
    "pipeline_rest_weight_used_1m", "pipeline_healthy", "pipeline_redis_outage_seconds",
})
# Prometheus's own: the scrape's `up` and the alerts' `ALERTS`.
BUILTIN_SERIES = frozenset({"up", "ALERTS"})

# The view family (pipeline/health.py VIEW_LIMITS) whose limit each market projection's
# views have; the event-driven ones have none.
PROJECTION_FAMILY = {"mark_price": "mark_price", "orderbook": "orderbook",
                     "depth_book": "orderbook", "book_ticker": "book_ticker",
                     "kline": "kline", "last_price": "last_price"}

PROMQL_WORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right",
                          "bool", "and", "or", "unless", "offset", "inf", "nan"})


def promql_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a tokenizer, not a parser: promtool
    checks the syntax)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, regexes
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for m in re.finditer(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if not call and word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def load_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in load_rules() if "alert" in r}


def recorded() -> set[str]:
    return {r["record"] for r in load_rules() if "record" in r}


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, input=stdin,
                          timeout=120, cwd=ROOT)


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d)", duration))


def served_series() -> set[str]:
    """Every series name pipeline/metrics.py can expose, with the suffixes Prometheus sees."""
    from prometheus_client import REGISTRY

    import pipeline.metrics  # noqa: F401  (defines the series)

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",), "summary": ("_sum", "_count")}
    return {family.name + suffix for family in REGISTRY.collect()
            for suffix in suffixes.get(family.type, ("",))}


# --- the rules and their unit tests --------------------------------------------------------

def test_every_series_the_rules_and_dashboard_use_is_served() -> None:
    missing = SERIES - served_series()
    assert not missing, f"pipeline/metrics.py no longer serves {sorted(missing)}"


def test_the_rules_select_only_series_that_are_served_or_recorded() -> None:
    known = SERIES | BUILTIN_SERIES | recorded()
    for rule in load_rules():
        unknown = promql_names(str(rule["expr"])) - known
        assert not unknown, f"{rule.get('alert') or rule['record']}: {sorted(unknown)}"


def test_the_tokenizer_finds_the_series_and_nothing_else() -> None:
    expr = ('sum by (job, key) (increase(pipeline_gaps_total{key=~"raw:.*"}[10m])) > 0 or '
            'label_replace(up offset 10m, "p", "$1", "group", "(.*)") > on (p) group_left '
            "pipeline:view_age_limit_seconds and histogram_quantile(0.99, rate(x_bucket[1m]))")
    assert promql_names(expr) == {"pipeline_gaps_total", "up",
                                  "pipeline:view_age_limit_seconds", "x_bucket"}


def test_promtool_finds_the_configs_and_rules_valid() -> None:
    for config in ("prometheus.yml", "demo.yml"):
        done = promtool("check", "config", str(PROMETHEUS_DIR / config))
        assert done.returncode == 0, done.stdout + done.stderr
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_of_every_rule_pass() -> None:
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_does_not() -> None:
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    for name in alerts():
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name}: no case where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{name}: no case where it is quiet"


def test_every_alert_waits_before_firing_and_says_what_to_do() -> None:
    for name, rule in alerts().items():
        assert re.fullmatch(r"Pipeline[A-Z]\w+", name), name
        assert seconds(rule.get("for", "0s")) >= 30, f"{name}: no `for:` against flapping"
        assert rule["labels"]["severity"] in ("page", "ticket"), name
        notes = rule["annotations"]
        assert notes["summary"] and len(notes["description"]) > 120, name
        assert notes["runbook"] == f"docs/alerts.md#{name.lower()}", name


def doc_sections() -> dict[str, str]:
    """`## PipelineName` -> the text under it, from docs/alerts.md."""
    parts = re.split(r"^## (.+?)\s*$", ALERTS_DOC.read_text(), flags=re.M)
    return {title: text for title, text in zip(parts[1::2], parts[2::2], strict=True)
            if title.startswith("Pipeline")}


def test_every_alert_is_documented_with_its_threshold_and_what_the_operator_does() -> None:
    sections = doc_sections()
    assert set(sections) == set(alerts()), "docs/alerts.md and alerts.yml name other alerts"
    for name, text in sections.items():
        for part in ("**Fires when**", "**Why this threshold**", "**What to do**"):
            assert part in text, f"{name}: {part} missing in docs/alerts.md"


def test_view_freshness_limits_are_the_ones_pipeline_status_judges_by() -> None:
    assert set(PROJECTION_FAMILY) == set(registry._MARKET), "a market projection was added"
    limits = {r["labels"]["projection"]: float(re.fullmatch(r"vector\((\d+)\)", r["expr"])[1])
              for r in load_rules() if r.get("record") == "pipeline:view_age_limit_seconds"}
    expected = {p: health.VIEW_LIMITS[f] for p, f in PROJECTION_FAMILY.items()}
    assert limits == expected


def test_lag_and_rest_weight_thresholds_are_the_codes_own() -> None:
    parser = argparse.ArgumentParser()
    status.add_arguments(parser)
    max_lag = parser.parse_args([]).max_lag
    rules = alerts()
    assert f"> {max_lag}" in rules["PipelineProjectorLagHigh"]["expr"]
    assert f">= {weight.WeightBudget().ceiling}" in rules["PipelineRestWeightHigh"]["expr"]
    assert f">= {weight.LIMIT_PER_MINUTE}" in rules["PipelineRestBackoff"]["expr"]


def scrape_jobs(config: str) -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS_DIR / config).read_text())
    assert doc["rule_files"] == ["alerts.yml"]
    return {job["job_name"]: job for job in doc["scrape_configs"]}


def test_the_scrape_configs_have_a_job_per_role_and_the_demo_its_ports() -> None:
    compose_jobs = scrape_jobs("prometheus.yml")
    assert tuple(compose_jobs) == JOBS
    demo_jobs = scrape_jobs("demo.yml")
    assert tuple(demo_jobs) == JOBS
    job_of = {"ingest-market": "ingest-market", "ingest-user": "ingest-user",
              "project": "projector"}
    base = 9100
    for i, child in enumerate(demo.METRICS_CHILDREN):
        [static] = demo_jobs[job_of[child]]["static_configs"]
        assert static["targets"] == [f"127.0.0.1:{base + i}"], child


# --- one real Prometheus against the simulator-fed pipeline --------------------------------

def prometheus_api(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
        return json.loads(resp.read())


def poll(what: str, check: Any, timeout: float, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, urllib.error.URLError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:g} s (last: {last!r})")


def config_for_the_test(ports: dict[str, int], rules: Path) -> dict[str, Any]:
    """prometheus.yml with the compose discovery swapped for the test's ports, second-long
    intervals, and `rules` for the rule file."""
    doc = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    doc["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    doc["rule_files"] = [str(rules)]
    jobs = []
    for job in doc["scrape_configs"]:
        if job["job_name"] in ports:
            del job["dns_sd_configs"]
            job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
            jobs.append(job)
    doc["scrape_configs"] = jobs
    return doc


# The test copy's `for:` of PipelineViewStale, so the test takes seconds; the production rule
# (30 s) is otherwise unchanged here, and its own `for:` is covered by alerts.test.yml.
STALE_FOR = "4s"


def rules_with_a_short_for(path: Path) -> Path:
    """alerts.yml with PipelineViewStale's `for:` set to STALE_FOR, written to `path`."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "PipelineViewStale":
                rule["for"] = STALE_FOR
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def pipeline_under_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """redis-server, the simulator, `ingest market` and `project` with metrics ports, and a
    Prometheus scraping them with the rules."""
    tmp = tmp_path_factory.mktemp("alerts")
    redis_server = LocalRedis(tmp / "redis").start()
    procs: list[subprocess.Popen[str]] = []
    try:
        sim = start(["simulate", "--ws-port", "0", "--rest-port", "0", "--symbols", "BTCUSDT"],
                    base_env(), tmp / "sim.log", stdout=subprocess.PIPE)
        procs.append(sim)
        assert sim.stdout is not None
        ws, rest = re.findall(r"(?:ws|rest)=(\S+)", sim.stdout.readline())
        # no silence rule within the test: the feed comes back on the same connection
        env = {**base_env(), "REDIS_URL": redis_server.url, "BINANCE_WS_URL": ws,
               "BINANCE_REST_URL": rest, "PIPELINE_SYMBOLS": "BTCUSDT",
               "PIPELINE_SILENCE_TIMEOUT": "600"}
        ports = {"ingest-market": free_port(), "projector": free_port()}
        procs.append(start(["ingest", "market", "--metrics-port", str(ports["ingest-market"])],
                           env, tmp / "ingest.log"))
        procs.append(start(["project", "--metrics-port", str(ports["projector"])], env,
                           tmp / "project.log"))
        config = config_for_the_test(ports, rules_with_a_short_for(tmp / "alerts.yml"))
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        web = free_port()
        with open(tmp / "prometheus.log", "w") as log:
            procs.append(subprocess.Popen(
                ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web}",
                 "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=log, text=True))
        poll("prometheus ready", lambda: get(web, "/-/ready")[0] == 200, 30)
        yield {"web": web, "rest": rest, "ports": ports, "tmp": tmp}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()
        redis_server.stop()


def sim_control(rest: str, name: str, body: dict[str, Any]) -> None:
    req = urllib.request.Request(f"{rest}/sim/{name}", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3) as resp:
        assert resp.status == 200


def view_stale(web: int) -> list[dict[str, Any]]:
    found = prometheus_api(web, "/api/v1/alerts")["data"]["alerts"]
    return [a for a in found if a["labels"]["alertname"] == "PipelineViewStale"
            and a["labels"].get("projection") == "mark_price"]


def test_every_process_serves_metrics_promtool_finds_nothing_to_fix_in(
    pipeline_under_prometheus: dict[str, Any],
) -> None:
    # once data flows, so that the labelled series have samples to check
    flowing = {"ingest-market": r"^pipeline_frames_logged_total\{",
               "projector": r"^pipeline_view_age_seconds\{"}
    for job, port in pipeline_under_prometheus["ports"].items():
        body = wait_for(port, "/metrics", flowing[job])
        done = promtool("check", "metrics", stdin=body)
        assert done.returncode == 0 and not done.stdout.strip(), f"{job}: {done.stdout}"


@pytest.mark.slow
def test_a_silenced_feed_makes_mark_price_stale_pending_then_firing_then_clear(
    pipeline_under_prometheus: dict[str, Any],
) -> None:
    web, rest = pipeline_under_prometheus["web"], pipeline_under_prometheus["rest"]

    def scraped() -> bool:
        targets = prometheus_api(web, "/api/v1/targets")["data"]["activeTargets"]
        return len(targets) == 2 and all(t["health"] == "up" for t in targets)

    def fresh() -> bool:
        query = urllib.request.quote('pipeline_view_age_seconds{projection="mark_price"} < 10')
        return bool(prometheus_api(web, f"/api/v1/query?query={query}")["data"]["result"])

    poll("both jobs scraped", scraped, 20)
    poll("mark_price views fresh", fresh, 30)
    assert view_stale(web) == []

    sim_control(rest, "silence", {"on": True})
    try:
        pending = poll("PipelineViewStale pending", lambda: [
            a for a in view_stale(web) if a["state"] == "pending"], 30, every=0.1)
        firing = poll("PipelineViewStale firing", lambda: [
            a for a in view_stale(web) if a["state"] == "firing"], 20, every=0.1)
    finally:
        sim_control(rest, "silence", {"on": False})
    [alert] = firing
    assert alert["labels"]["severity"] == "page"
    assert float(alert["value"]) > 10  # the age: past mark_price's 10 s
    assert alert["annotations"]["runbook"] == "docs/alerts.md#pipelineviewstale"
    assert pending[0]["activeAt"] == alert["activeAt"]  # one episode: pending became firing
    poll("PipelineViewStale cleared", lambda: view_stale(web) == [], 30)
