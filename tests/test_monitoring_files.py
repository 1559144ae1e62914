"""deploy/monitoring (issue 17), checked without Docker: Prometheus's config and alert
rules through promtool (check config, check rules, the unit tests of
deploy/monitoring/alerts_test.yml), Grafana's provisioning and dashboard, and every
series a rule or a panel names against what the web's and the prediction server's real
GET /metrics export, and a real Prometheus scraping a live web with the token file and
evaluating every rule and dashboard query. A query naming a series nobody exports is an
empty chart or an alert that can never fire, and nothing else would say so.

promtool and prometheus come from Debian's `prometheus` package (scripts/test.sh
installs it without starting its service); TRAINYARD_TEST_SKIP_PROMTOOL=1 skips the
tests that need them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.test import Client

from shared import prometheus_catalog
from shared.settings import Settings
from tests.conftest import SQLITE_ONLY
from tests.test_broker import _free_port

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "deploy" / "monitoring"
GRAFANA = MONITORING / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "trainyard.json"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
# Where the compose service's entrypoint writes the scrape token (a tmpfs).
TOKEN_FILE = "/run/trainyard/metrics-token"
SCRAPE_TOKEN = "scrape-token-0123456789"
DATASOURCE_UID = "trainyard-prometheus"

# The alerts, and the two that keep the others honest (a stale heartbeat
# before a worker is lost; a failing scrape, which silences every other rule).
ALERTS = {
    "TrainyardQueueBacklogGrowing",
    "TrainyardQueueNotConsumed",
    "TrainyardWorkerLost",
    "TrainyardWorkerHeartbeatStale",
    "TrainyardFailureRateHigh",
    "TrainyardReconcilerNotRunning",
    "TrainyardMetricsDown",
    "TrainyardArtifactStoreFilling",
    "TrainyardWebhooksBackingUp",
}
# Series the dashboard must chart: queues, throughput, failures, wait and run times,
# workers, GPUs, the web and the prediction servers.
CHARTED = {
    "trainyard_queue_waiting_jobs",
    "trainyard_queue_oldest_waiting_seconds",
    "trainyard_queue_consumers",
    "trainyard_job_attempts_finished_total",
    "trainyard_submissions_total",
    "trainyard_job_wait_seconds_bucket",
    "trainyard_job_run_seconds_bucket",
    "trainyard_worker_slots",
    "trainyard_worker_slots_busy",
    "trainyard_gpu_utilization_ratio",
    "trainyard_gpu_memory_used_bytes",
    "trainyard_http_requests_total",
    "trainyard_http_request_duration_seconds_bucket",
    "trainyard_serve_requests_total",
    "trainyard_serve_request_duration_seconds_bucket",
}
# Not Trainyard's, and allowed: Prometheus's own per-target and alert series, Flower's.
OTHER_SERIES = {"up", "ALERTS"}
OTHER_PREFIXES = ("flower_",)

# PromQL words an identifier can be without being a series: keywords and aggregation
# operators (`sum by (x) (...)` puts no parenthesis right after `sum`).
PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "atan2", "sum", "min", "max", "avg", "group", "stddev",
    "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
}  # fmt: skip
# Grafana's variables, replaced by values PromQL accepts before promtool parses a query.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "${queue}": ".*",
    "$queue": ".*",
}


def metric_names(expr: str) -> set[str]:
    """The series an expression reads: identifiers left once strings, label matchers,
    ranges and by/without/on/ignoring/group_* lists are gone, minus function calls,
    keywords and numbers (1e9, the m of 5m)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", r" \1 ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", text):
        before = text[match.start() - 1] if match.start() else " "
        after = text[match.end() :].lstrip()[:1]
        word = match.group()
        if before.isalnum() or before in "._$" or after == "(" or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _rule_exprs() -> dict[str, str]:
    return {
        rule["alert"]: rule["expr"]
        for group in _load(MONITORING / "alerts.yml")["groups"]
        for rule in group["rules"]
    }


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict[str, Any]]:
    found = []
    for panel in _dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return [p for p in found if p["type"] != "row"]


def _dashboard_exprs() -> dict[str, str]:
    """Every query of the dashboard, named where it is: panel title and refId, or the
    template variable. label_values(series, label) contributes its series."""
    exprs = {f"{p['title']} / {t['refId']}": t["expr"] for p in _panels() for t in p["targets"]}
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
            exprs[f"variable {variable['name']}"] = match.group(1) if match else query
    return exprs


def _with_values(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def _compose() -> dict[str, Any]:
    return _load(REPO / "docker-compose.yml")


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _mounts(service: str) -> dict[str, str]:
    """A service's bind mounts: path in the repository -> (target, mode)."""
    found = {}
    for volume in _services()[service].get("volumes", []):
        source, target, *mode = str(volume).split(":")
        if source.startswith("./"):
            found[source[2:]] = f"{target}:{''.join(mode)}"
    return found


def _port(service: str) -> str:
    argv = _services()[service]["command"]
    argv = shlex.split(argv) if isinstance(argv, str) else argv
    for i, arg in enumerate(argv):
        if arg == "--port":
            return str(argv[i + 1])
        if arg.startswith("--port="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{service}: no --port")


@pytest.fixture(scope="module")
def promtool() -> str:
    if os.environ.get("TRAINYARD_TEST_SKIP_PROMTOOL") == "1":
        pytest.skip("TRAINYARD_TEST_SKIP_PROMTOOL=1")
    if not os.access(PROMTOOL, os.X_OK):
        pytest.fail("no promtool: install the 'prometheus' package (scripts/test.sh does)")
    return PROMTOOL


def _promtool(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


# ----------------------------------------------------------------------------- Prometheus


def test_prometheus_config_passes_promtool(promtool: str, tmp_path: Path) -> None:
    """The config as the container sees it (token file included), with its rule files:
    `promtool check config` reads the credentials file and loads every rule file."""
    (tmp_path / "token").write_text(SCRAPE_TOKEN)
    config = (MONITORING / "prometheus.yml").read_text()
    assert config.count(TOKEN_FILE) == 2
    (tmp_path / "prometheus.yml").write_text(config.replace(TOKEN_FILE, str(tmp_path / "token")))
    shutil.copy(MONITORING / "alerts.yml", tmp_path / "alerts.yml")
    checked = _promtool(promtool, "check", "config", "--lint=all", "--lint-fatal",
                        "prometheus.yml", cwd=tmp_path)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 1 rule files found" in checked.stdout

    # The commented-out Alertmanager block (README "Alert rules") is valid once uncommented.
    lines = (tmp_path / "prometheus.yml").read_text().splitlines()
    start = lines.index("# alerting:")
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("#"))
    lines[start:end] = [line.removeprefix("# ") for line in lines[start:end]]
    (tmp_path / "prometheus.yml").write_text("\n".join(lines) + "\n")
    assert yaml.safe_load("\n".join(lines))["alerting"]["alertmanagers"]
    checked = _promtool(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_prometheus_scrapes_what_compose_runs() -> None:
    """Targets are compose services on the ports their commands listen on; the web and
    the prediction servers with the token file the entrypoint writes."""
    config = _load(MONITORING / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"trainyard-web", "trainyard-serve", "flower", "prometheus"}
    web, serve = jobs["trainyard-web"], jobs["trainyard-serve"]
    assert web["static_configs"] == [{"targets": [f"web:{_port('web')}"]}]
    # Every replica of `--scale serve=N`: Docker's DNS answers with all of them.
    [sd] = serve["dns_sd_configs"]
    assert sd["names"] == ["serve"] and sd["type"] == "A" and str(sd["port"]) == _port("serve")
    for job in (web, serve):
        assert job["metrics_path"] == "/metrics"
        assert job["authorization"] == {"type": "Bearer", "credentials_file": TOKEN_FILE}
    flower = _services()["flower"]["command"][2]
    port = re.search(r"celery flower --port=(\d+)", flower).group(1)
    assert jobs["flower"]["static_configs"] == [{"targets": [f"flower:{port}"]}]

    service = _services()["prometheus"]
    assert _mounts("prometheus") == {
        "deploy/monitoring/prometheus.yml": "/etc/prometheus/prometheus.yml:ro",
        "deploy/monitoring/alerts.yml": "/etc/prometheus/alerts.yml:ro",
    }
    assert service["tmpfs"] == [str(Path(TOKEN_FILE).parent)]
    assert service["ports"] == ["127.0.0.1:9090:9090"]
    assert not service["image"].endswith(":latest") and ":" in service["image"]
    assert _services()["grafana"]["ports"] == ["127.0.0.1:3000:3000"]


def _run_entrypoint(service: str, env: dict[str, str], tmp_path: Path) -> tuple[int, str, str]:
    """A monitoring service's entrypoint script under sh, with a stand-in for the
    program it starts that logs its arguments; the token's tmpfs is a directory here."""
    argv = _services()[service]["entrypoint"]
    assert argv[:2] == ["sh", "-c"]
    # A single `$` would be Compose's to interpolate, from the host's environment.
    assert not re.search(r"(?<!\$)\$(?!\$)", argv[2].replace("$$", "")), service
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    script = argv[2].replace("$$", "$").replace(str(Path(TOKEN_FILE).parent), str(run_dir))
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    for program in ("prometheus", "run.sh"):
        stub = stubs / program
        stub.write_text(f'#!/bin/sh\necho "{program} $*" >> "{log}"\n')
        stub.chmod(0o755)
    script = script.replace("exec /run.sh", f"exec {stubs / 'run.sh'}")
    done = subprocess.run(["sh", "-c", script], env={"PATH": f"{stubs}:/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    return done.returncode, done.stderr, log.read_text() if log.exists() else ""


def test_prometheus_and_grafana_refuse_to_start_without_their_secrets(tmp_path: Path) -> None:
    code, err, calls = _run_entrypoint("prometheus", {"PROMETHEUS_RETENTION": "30d"}, tmp_path)
    assert code == 1 and "TRAINYARD_METRICS_TOKEN" in err and calls == ""
    env = {"TRAINYARD_METRICS_TOKEN": SCRAPE_TOKEN, "PROMETHEUS_RETENTION": "15d"}
    code, err, calls = _run_entrypoint("prometheus", env, tmp_path)
    assert code == 0, err
    assert calls.split() == [
        "prometheus", "--config.file=/etc/prometheus/prometheus.yml",
        "--storage.tsdb.path=/prometheus", "--storage.tsdb.retention.time=15d",
        "--web.listen-address=:9090",
    ]  # fmt: skip
    token = tmp_path / "run" / Path(TOKEN_FILE).name
    assert token.read_text() == SCRAPE_TOKEN  # no newline: it is sent as written
    assert token.stat().st_mode & 0o077 == 0

    code, err, calls = _run_entrypoint("grafana", {}, tmp_path)
    assert code == 1 and "GRAFANA_ADMIN_PASSWORD" in err and calls == ""
    code, err, calls = _run_entrypoint("grafana", {"GF_SECURITY_ADMIN_PASSWORD": "pw"}, tmp_path)
    assert code == 0 and calls == "run.sh \n", err


def test_the_token_comes_from_the_env_file() -> None:
    services = _services()
    for name in ("web", "serve"):
        # Passed through: unset in .env, it is absent (not "") and /metrics is admins' only.
        assert services[name]["environment"]["TRAINYARD_METRICS_TOKEN"] is None, name
    monitoring = services["prometheus"]["environment"]
    assert monitoring["TRAINYARD_METRICS_TOKEN"] == "${TRAINYARD_METRICS_TOKEN:-}"
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-}"
    example = (REPO / ".env.example").read_text()
    for name in ("TRAINYARD_METRICS_TOKEN", "GRAFANA_ADMIN_PASSWORD", "PROMETHEUS_RETENTION"):
        assert re.search(rf"^# {name}=", example, re.M), name


# ----------------------------------------------------------------------------- alert rules


def test_alert_rules_pass_promtool_and_their_unit_tests(promtool: str) -> None:
    checked = _promtool(promtool, "check", "rules", "--lint=all", "--lint-fatal", "alerts.yml",
                        cwd=MONITORING)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout
    tested = _promtool(promtool, "test", "rules", "alerts_test.yml", cwd=MONITORING)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_promtool_fails_on_a_broken_rule_and_a_wrong_expectation(
    promtool: str, tmp_path: Path
) -> None:
    """The checks above can fail: a rule that does not parse, and a unit test that
    expects an alert its series does not raise."""
    broken = {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "sum(rate(x[5m])"}]}]}
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    assert _promtool(promtool, "check", "rules", "broken.yml", cwd=tmp_path).returncode != 0

    shutil.copy(MONITORING / "alerts.yml", tmp_path / "alerts.yml")
    wrong = {
        "rule_files": ["alerts.yml"],
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": 'trainyard_worker_nodes{state="lost"}', "values": "0x10"}],
            "alert_rule_test": [{"eval_time": "10m", "alertname": "TrainyardWorkerLost",
                                 "exp_alerts": [{"exp_labels": {"state": "lost"}}]}],
        }],
    }  # fmt: skip
    (tmp_path / "wrong_test.yml").write_text(yaml.safe_dump(wrong))
    failed = _promtool(promtool, "test", "rules", "wrong_test.yml", cwd=tmp_path)
    assert failed.returncode != 0 and "FAILED" in failed.stdout + failed.stderr


def test_every_alert_is_unit_tested_loud_and_quiet_and_documented() -> None:
    groups = _load(MONITORING / "alerts.yml")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} == ALERTS and len(rules) == len(ALERTS)
    readme = (REPO / "README.md").read_text()
    anchors = {
        "README.md#" + re.sub(r"[^\w\- ]", "", heading).strip().lower().replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", readme, re.M)
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        notes = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(notes), rule["alert"]
        assert notes["runbook_url"] in anchors, f"{rule['alert']}: no README section"
        assert f"| `{rule['alert']}` |" in readme, f"{rule['alert']}: not in the README table"

    cases = [case for test in _load(MONITORING / "alerts_test.yml")["tests"]
             for case in test["alert_rule_test"]]  # fmt: skip
    for alert in ALERTS:
        mine = [case for case in cases if case["alertname"] == alert]
        assert any(case.get("exp_alerts") for case in mine), f"{alert}: never seen firing"
        assert any(not case.get("exp_alerts") for case in mine), f"{alert}: never seen quiet"
    # The up{} rules name the web's scrape job.
    jobs = {j["job_name"] for j in _load(MONITORING / "prometheus.yml")["scrape_configs"]}
    for expr in _rule_exprs().values():
        for job in re.findall(r'up\{job="([^"]+)"\}', expr):
            assert job in jobs


# ----------------------------------------------------------------------------- Grafana


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    mounts = _mounts("grafana")
    assert mounts["deploy/monitoring/grafana/provisioning"] == "/etc/grafana/provisioning:ro"
    dashboards_dir = mounts["deploy/monitoring/grafana/dashboards"].removesuffix(":ro")
    assert mounts["deploy/monitoring/grafana/dashboards"].endswith(":ro")

    [source] = _load(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == DATASOURCE_UID
    assert source["url"] == "http://prometheus:9090" and "prometheus" in _services()
    [provider] = _load(GRAFANA / "provisioning" / "dashboards" / "trainyard.yml")["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == dashboards_dir
    home = _services()["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"


def test_the_dashboard_is_well_formed() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "trainyard" and dashboard["title"] == "Trainyard"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == DATASOURCE_UID
    panels = _panels()
    assert len(panels) >= 20
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    by_uid = {"type": "prometheus", "uid": "${datasource}"}
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}  # fmt: skip
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    for panel in panels:
        assert panel["datasource"] == by_uid, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == by_uid and target["expr"].strip(), panel["title"]
    assert variables["queue"]["datasource"] == by_uid
    names = {name for expr in _dashboard_exprs().values() for name in metric_names(expr)}
    assert names >= CHARTED, CHARTED - names
    assert any("histogram_quantile" in expr for expr in _dashboard_exprs().values())


def test_every_dashboard_query_parses(promtool: str, tmp_path: Path) -> None:
    """Each query (Grafana's variables given values) as a recording rule: promtool's own
    PromQL parser reads it."""
    exprs = _dashboard_exprs()
    rules = [{"record": f"dashboard:query_{i}", "expr": _with_values(expr)}
             for i, expr in enumerate(exprs.values())]  # fmt: skip
    (tmp_path / "queries.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    checked = _promtool(promtool, "check", "rules", "queries.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout


# ----------------------------------------------------------------------------- series names


def test_metric_names_finds_series_and_only_series() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (queue, le) (rate(trainyard_job_wait_seconds_bucket"
        '{queue=~"$queue", kind="x"}[$__rate_interval]))) / on (queue) group_left (host) '
        "trainyard_worker_slots offset 5m > 1e9 and count without (gpu) (up) or vector(0) "
        'unless absent(ALERTS{alertname="trainyard_fake"}) * 24 * 3600'
    )
    assert metric_names(expr) == {"trainyard_job_wait_seconds_bucket", "trainyard_worker_slots",
                                  "up", "ALERTS"}  # fmt: skip
    assert metric_names("sum(rate(trainyrd_jobs[5m]))") == {"trainyrd_jobs"}


def _exported_names(text: str) -> set[str]:
    """The names a query may use for each family of a /metrics answer: a gauge's own
    name, a counter's with _total, a histogram's _bucket, _sum and _count. Families
    are exported before their first sample, so names come from HELP/TYPE, not samples."""
    names = set()
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def _catalogue_labels(name: str) -> set[str] | None:
    """The labels shared/prometheus_catalog.py gives the series a query names."""
    for series in (*prometheus_catalog.WEB_SERIES, *prometheus_catalog.SERVE_SERIES):
        if series.kind == "histogram" and name == series.name + "_bucket":
            return {*series.labels, "le"}
        if name == series.name or (series.kind == "histogram" and name in (
            series.name + "_sum", series.name + "_count"
        )):  # fmt: skip
            return set(series.labels)
    return None


def test_every_label_named_is_a_label_of_its_series() -> None:
    """Label matchers, by/without/on/ignoring lists and legends ({{host}}) name labels
    the catalogue gives the series they are about (or Prometheus's job and instance):
    `sum by (queue)` of a series without a queue label is one unlabelled line."""
    target_labels = {"job", "instance"}
    queries = {f"alerts.yml: {name}": (expr, "") for name, expr in _rule_exprs().items()}
    for panel in _panels():
        for target in panel["targets"]:
            where = f"trainyard.json: {panel['title']} / {target['refId']}"
            queries[where] = (target["expr"], target.get("legendFormat", ""))
    for where, (expr, legend) in queries.items():
        allowed = set(target_labels)
        for name in metric_names(expr):
            labels = _catalogue_labels(name)
            if name.startswith("trainyard_"):
                assert labels is not None, f"{where}: {name} is not in the catalogue"
            allowed |= labels or set()
            # A selector's own matchers name its own labels.
            for matchers in re.findall(rf"\b{name}\{{([^}}]*)\}}", expr):
                for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                    if labels is not None:
                        assert label in labels | target_labels, f"{where}: {name}{{{label}}}"
        if "ALERTS" in metric_names(expr):
            allowed |= {"alertname", "alertstate"}
        lists = re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)",
                           expr)  # fmt: skip
        used = {label.strip() for group in lists for label in group.split(",") if label.strip()}
        used |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        assert used <= allowed, f"{where}: {sorted(used - allowed)} not labels of its series"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"metrics_token": SCRAPE_TOKEN})


@SQLITE_ONLY
def test_every_series_named_is_exported(app: Flask, settings: Settings) -> None:
    """Every trainyard_* series a rule or a panel names is among the families of the
    real GET /metrics of the web, or of the prediction server (trainyard_serve_*), on
    an empty installation: no job, no worker, nothing served yet."""
    headers = {"Authorization": f"Bearer {SCRAPE_TOKEN}"}
    web = app.test_client().get("/metrics", headers=headers)
    assert web.status_code == 200, web.get_data(as_text=True)
    exported = _exported_names(web.get_data(as_text=True))

    from worker.serving.app import ServeApp

    serve_app = ServeApp(settings)
    try:
        served = Client(serve_app).get("/metrics", headers=headers)
        assert served.status_code == 200, served.get_data(as_text=True)
        exported_by_serve = _exported_names(served.get_data(as_text=True))
    finally:
        if serve_app.publisher is not None:
            serve_app.publisher.stop()

    queries = {f"alerts.yml: {name}": expr for name, expr in _rule_exprs().items()}
    queries |= {f"trainyard.json: {where}": expr for where, expr in _dashboard_exprs().items()}
    missing = {}
    for where, expr in queries.items():
        for name in metric_names(expr):
            if name.startswith("trainyard_serve_"):
                known = name in exported_by_serve
            elif name.startswith("trainyard_"):
                known = name in exported
            else:
                known = name in OTHER_SERIES or name.startswith(OTHER_PREFIXES)
            if not known:
                missing.setdefault(name, []).append(where)
    assert not missing, f"named but not exported: {missing}"


def _wait_for(what: str, check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except requests.RequestException:
            found = None
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@SQLITE_ONLY
def test_a_real_prometheus_scrapes_the_web_and_evaluates_every_rule_and_query(
    promtool: str, live_server: str, tmp_path: Path
) -> None:
    """Debian's prometheus (the package that brings promtool) with this config: the
    trainyard-web job pointed at a live web, its token read from the credentials file,
    scrapes and rules every second. The scrape succeeds, every rule evaluates without
    an error on the real series, and every dashboard query runs."""
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.fail("no prometheus: install the 'prometheus' package (scripts/test.sh does)")
    (tmp_path / "token").write_text(SCRAPE_TOKEN)
    config = _load(MONITORING / "prometheus.yml")
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    [web] = [job for job in config["scrape_configs"] if job["job_name"] == "trainyard-web"]
    web["static_configs"] = [{"targets": [live_server.removeprefix("http://")]}]
    web["authorization"]["credentials_file"] = str(tmp_path / "token")
    config["scrape_configs"] = [web]  # serve, Flower: no such hosts here
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(MONITORING / "alerts.yml", tmp_path / "alerts.yml")
    api = f"http://127.0.0.1:{_free_port()}/api/v1"
    server = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address={api.split('/')[2]}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def scraped() -> dict[str, Any] | None:
            targets = requests.get(f"{api}/targets", timeout=2).json()["data"]["activeTargets"]
            done = [t for t in targets if t["lastScrape"] > "0001-01-01T00:00:00Z"]
            return done[0] if done else None

        target = _wait_for("the first scrape", scraped)
        assert target["health"] == "up", target["lastError"]

        def evaluated() -> list[dict[str, Any]] | None:
            groups = requests.get(f"{api}/rules", timeout=2).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            ran = all(r["lastEvaluation"] > "0001-01-01T00:00:00Z" for r in rules)
            return rules if ran and len(rules) == len(ALERTS) else None

        for rule in _wait_for("every rule's first evaluation", evaluated):
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))

        def query(expr: str) -> list[dict[str, Any]]:
            answer = requests.get(f"{api}/query", params={"query": expr}, timeout=30).json()
            assert answer["status"] == "success", (expr, answer)
            return answer["data"]["result"]

        _wait_for("the web's series", lambda: query("trainyard_jobs"))
        for expr in _dashboard_exprs().values():
            query(_with_values(expr))
        # On an empty installation, with the web scraped, each rule's condition holds
        # only for the reconciler: none runs here, so no pass was ever reported.
        holding = {name for name, expr in _rule_exprs().items() if query(expr)}
        assert holding == {"TrainyardReconcilerNotRunning"}, holding
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
