"""The monitoring set-up in ``deployments/``: Prometheus configuration, alert rules, systemd
units and log rotation, checked with the real tools (promtool, systemd-analyze, logrotate)
and against a live scrape of a real edge.

Not checked yet: a live scrape of the node agent (``zeitwork agent`` and its metrics on port
8081 come with the agent's issue). Its alert rules (InstanceBootSlow, the scrape half of
NodeAgentUnhealthy) are covered by the promtool unit tests in ``deployments/alerts_test.yml``.
"""

from __future__ import annotations

import configparser
import grp
import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # installed with schemathesis, no stubs
from prometheus_client.parser import text_string_to_metric_families

from agent.cli import agent_config
from edge.cli import build_parser
from edge.config import ProxyLimits
from tests.admin.process import running_edge
from tests.conftest import require_tool
from tests.harness import HOST

DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments"
SYSTEMD = DEPLOYMENTS / "systemd"
BINARY = "/usr/local/bin/zeitwork"

# The operations guide's "Alerting Rules", copied verbatim.
GUIDE_RULES = """
groups:
  - name: zeitwork
    rules:
      - alert: ServiceDown
        expr: up{job=~"zeitwork-.*"} == 0
        for: 5m
        annotations:
          summary: "Service {{ $labels.job }} is down on {{ $labels.instance }}"

      - alert: HighErrorRate
        expr: rate(http_requests_total{status=~"5.."}[5m]) > 0.01
        for: 10m
        annotations:
          summary: "High error rate on {{ $labels.instance }}"

      - alert: DatabaseConnectionFailure
        expr: postgres_up == 0
        for: 1m
        annotations:
          summary: "Cannot connect to PostgreSQL database"
"""

# The operations guide's operator targets (its "Prometheus Configuration").
GUIDE_OPERATORS = [
    f"{region}-op-{n}:8080" for region in ("us-east", "eu-west", "ap-south") for n in (1, 2, 3)
]

# The rules beyond the guide's: the thresholds of its "Key Metrics to Monitor" table.
ADDED_ALERTS = {
    "AdminApiLatencyHigh",
    "InstanceBootSlow",
    "DeploymentSuccessRateLow",
    "EdgeErrorRateHigh",
    "NodeAgentUnhealthy",
    "DatabaseLatencyHigh",
    "RoutingTableStale",
    "SchedulerFailing",
    "DeploymentsWaiting",
}

# Metrics the alert rules use (histograms by their _bucket series), by where they stand:
# EXPORTED: the edge exports them already; the live scrape must have them.
EXPORTED = {
    "postgres_up",
    "zeitwork_admin_request_duration_seconds_bucket",
    "zeitwork_database_latency_seconds",
    "zeitwork_routing_table_age_seconds",
    "zeitwork_scheduler_waiting_deployments",
}
# PENDING: being added to the edge (the issue's metrics work) or coming with the node agent
# (zeitwork_instance_boot_seconds, the agent's boot-time histogram, later issue); checked only
# when the scrape has them. Move a name to EXPORTED once it is always there.
PENDING = {
    "http_requests_total",
    "zeitwork_nodes",
    "zeitwork_deployment_success_ratio",
    "zeitwork_instance_boot_seconds_bucket",
    # Counted once the edge has led a pass.
    "zeitwork_scheduler_passes_total",
}
# Labels the rules select on, per metric.
RULE_LABELS = {
    "http_requests_total": "status",
    "zeitwork_nodes": "state",
    "zeitwork_scheduler_passes_total": "result",
}
# Prometheus's own series (`up`), no exporter's.
BUILTIN = {"up"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(DEPLOYMENTS / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


def run(*command: str, cwd: Path | None = None, stdin: bytes | None = None) -> tuple[int, str]:
    done = subprocess.run(command, cwd=cwd, input=stdin, capture_output=True, timeout=60)
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


def copy_rules(tmp_path: Path) -> Path:
    """prometheus.yml, alerts.yml and alerts_test.yml in a temporary directory (their
    relative rule_files resolve there, whoever owns the checkout)."""
    for name in ("prometheus.yml", "alerts.yml", "alerts_test.yml"):
        shutil.copy(DEPLOYMENTS / name, tmp_path / name)
    return tmp_path


# -- prometheus.yml ------------------------------------------------------------------------


@pytest.mark.needs_tool("promtool")
def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    directory = copy_rules(tmp_path)
    code, output = run(promtool, "check", "config", "prometheus.yml", cwd=directory)
    assert code == 0, output
    assert "SUCCESS: 1 rule files found" in output, output
    assert "FAILED" not in output, output


def test_prometheus_config_has_the_guides_jobs() -> None:
    config = load_yaml(DEPLOYMENTS / "prometheus.yml")
    assert config["global"] == {"scrape_interval": "15s", "evaluation_interval": "15s"}
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # No zeitwork-load-balancer job: the edge is the load balancer and nothing listens on
    # 8084 (a job there would keep ServiceDown firing).
    assert set(jobs) == {"zeitwork-operator", "zeitwork-node-agent"}
    targets = {
        name: [t for static in job["static_configs"] for t in static["targets"]]
        for name, job in jobs.items()
    }
    assert targets["zeitwork-operator"] == GUIDE_OPERATORS
    assert targets["zeitwork-node-agent"]
    assert all(t.endswith(":8081") for t in targets["zeitwork-node-agent"])
    assert "zeitwork-load-balancer" in (DEPLOYMENTS / "prometheus.yml").read_text()


# -- alerts.yml ----------------------------------------------------------------------------


@pytest.mark.needs_tool("promtool")
def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    directory = copy_rules(tmp_path)
    code, output = run(promtool, "check", "rules", "alerts.yml", cwd=directory)
    assert code == 0, output
    assert f"SUCCESS: {len(alert_rules())} rules found" in output, output


def test_alert_rules_keep_the_guides_rules_verbatim() -> None:
    groups = load_yaml(DEPLOYMENTS / "alerts.yml")["groups"]
    assert [group["name"] for group in groups] == ["zeitwork"]
    rules = {rule["alert"]: rule for rule in alert_rules()}
    for guide_rule in yaml.safe_load(GUIDE_RULES)["groups"][0]["rules"]:
        assert rules[guide_rule["alert"]] == guide_rule


def test_every_alert_rule_has_for_and_summary() -> None:
    rules = alert_rules()
    guide = {rule["alert"] for rule in yaml.safe_load(GUIDE_RULES)["groups"][0]["rules"]}
    assert {rule["alert"] for rule in rules} == guide | ADDED_ALERTS
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), rule
        assert rule["annotations"]["summary"].strip(), rule
        if rule["alert"] in ADDED_ALERTS:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule
            assert rule["annotations"]["description"].strip(), rule


def rule_metrics() -> set[str]:
    """Metric names in the rules' expressions (ours all start with one of these prefixes;
    label names such as status, state, instance or le do not)."""
    names: set[str] = set()
    for rule in alert_rules():
        expr = rule["expr"]
        names.update(re.findall(r"\b(?:zeitwork|http|postgres)_[a-z0-9_]+", expr))
        names.update(name for name in BUILTIN if re.search(rf"\b{name}\{{", expr))
    return names


def test_every_metric_of_the_rules_is_accounted_for() -> None:
    assert rule_metrics() == EXPORTED | PENDING | BUILTIN


@pytest.mark.needs_tool("promtool")
def test_alert_unit_tests_pass(tmp_path: Path) -> None:
    """alerts_test.yml: HighErrorRate, EdgeErrorRateHigh, DatabaseConnectionFailure (and the
    others) fire on synthetic series of an unhealthy target, after their `for:`, and not on
    the healthy one next to it."""
    promtool = require_tool("promtool")
    directory = copy_rules(tmp_path)
    code, output = run(promtool, "test", "rules", "alerts_test.yml", cwd=directory)
    assert code == 0, output
    assert "SUCCESS" in output, output


@pytest.mark.needs_tool("promtool")
@pytest.mark.parametrize(
    "alert", ["HighErrorRate", "EdgeErrorRateHigh", "DatabaseConnectionFailure"]
)
@pytest.mark.parametrize("broken", ["never fires", "always fires"])
def test_alert_unit_tests_catch_a_broken_rule(tmp_path: Path, alert: str, broken: str) -> None:
    """The unit tests are not vacuous: a rule whose threshold no longer separates unhealthy
    from healthy series fails them."""
    promtool = require_tool("promtool")
    directory = copy_rules(tmp_path)
    config = load_yaml(directory / "alerts.yml")
    (rule,) = [r for r in config["groups"][0]["rules"] if r["alert"] == alert]
    comparison = re.fullmatch(r"(.*) (?:==|>|<) \S+", rule["expr"])
    assert comparison, rule["expr"]
    # All of these metrics are >= 0.
    rule["expr"] = comparison[1] + (" < -1" if broken == "never fires" else " >= -1")
    (directory / "alerts.yml").write_text(yaml.safe_dump(config))
    code, output = run(promtool, "test", "rules", "alerts_test.yml", cwd=directory)
    assert code != 0, output
    assert f"alertname: {alert}" in output, output


# -- a live scrape of the edge ---------------------------------------------------------------


def scrape(admin_url: str) -> str:
    with urllib.request.urlopen(admin_url + "/metrics", timeout=10) as answer:
        assert answer.status == 200
        return str(answer.read().decode())


@pytest.mark.needs_tool("promtool")
def test_live_edge_scrape_passes_promtool_and_has_the_rules_metrics(
    empty_database_url: str, tmp_path: Path
) -> None:
    promtool = require_tool("promtool")
    with running_edge(empty_database_url, tmp_path) as edge:
        # One admin request (admin latency histogram) and one proxied request (no route: 404)
        # so that the labelled metrics have series.
        with urllib.request.urlopen(edge.admin_url + "/health", timeout=10) as answer:
            assert answer.status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://{HOST}:{edge.http_port}/", timeout=10)
        refused.value.close()
        assert 400 <= refused.value.code < 500
        text = scrape(edge.admin_url)
        # The workers publish their counts to the admin process periodically.
        deadline = time.monotonic() + 10
        while (
            "# TYPE http_requests_total " in text
            and "\nhttp_requests_total{" not in text
            and time.monotonic() < deadline
        ):
            time.sleep(0.2)
            text = scrape(edge.admin_url)

    code, output = run(promtool, "check", "metrics", stdin=text.encode())
    assert code == 0, output
    assert output.strip() == "", output

    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.labels)
    missing = sorted(name for name in EXPORTED if name not in samples)
    assert not missing, f"the edge does not export {missing}:\n{text}"
    for name in sorted(EXPORTED | PENDING):
        label = RULE_LABELS.get(name)
        if name in samples and label:
            assert all(label in labels for labels in samples[name]), (name, samples[name])
    if "zeitwork_nodes" in samples:
        assert {"state": "down"} in samples["zeitwork_nodes"], samples["zeitwork_nodes"]


# -- systemd units ---------------------------------------------------------------------------


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((SYSTEMD / name).read_text())
    return parser


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


def test_edge_unit() -> None:
    service = unit("zeitwork-edge.service")["Service"]
    assert service["User"] == "zeitwork"
    assert service["EnvironmentFile"] == "/etc/zeitwork/operator.env"
    assert service["Restart"] == "on-failure"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillMode"] == "mixed"
    assert seconds(service["TimeoutStopSec"]) > ProxyLimits().shutdown_timeout
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"].split() == ["/var/lib/zeitwork", "/var/log/zeitwork"]
    assert service["ProtectHome"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert service["StateDirectory"] == "zeitwork"

    # The command line is one the real CLI accepts, with the ports Prometheus scrapes and the
    # data directory systemd creates.
    command = shlex.split(service["ExecStart"])
    assert command[0] == BINARY
    assert command[-1] == "$ZEITWORK_EDGE_OPTS"
    args = build_parser().parse_args(command[1:-1])
    assert args.command == "edge"
    assert args.http_port == 80
    assert args.data_dir == Path("/var/lib/zeitwork")
    prometheus = load_yaml(DEPLOYMENTS / "prometheus.yml")
    (operator,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "zeitwork-operator"]
    assert all(t.endswith(f":{args.admin_port}") for t in operator["static_configs"][0]["targets"])

    # The example environment file sets what the edge reads from its environment.
    example = (SYSTEMD / "operator.env.example").read_text()
    assert re.search(r"^DATABASE_URL=", example, re.MULTILINE)
    assert re.search(r"^ZEITWORK_ADMIN_TOKEN=", example, re.MULTILINE)


def test_node_agent_unit() -> None:
    service = unit("zeitwork-node-agent.service")["Service"]
    assert service.get("User", "root") == "root"
    assert service["EnvironmentFile"] == "/etc/zeitwork/node-agent.env"
    assert service["Restart"] == "always"
    assert service["KillMode"] == "process"
    command = shlex.split(service["ExecStart"])
    assert command[:2] == [BINARY, "agent"]
    # The example environment file gives what `zeitwork agent` needs, as it reads it.
    example = (SYSTEMD / "node-agent.env.example").read_text()
    settings = dict(
        line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#")
    )
    assert set(settings) == {
        "ZEITWORK_OPERATOR_URL",
        "ZEITWORK_REGION",
        "ZEITWORK_BOOTSTRAP_TOKEN",
    }
    with pytest.MonkeyPatch.context() as env:
        for name, value in settings.items():
            env.setenv(name, value)
        args = build_parser().parse_args(["agent"])
        config = agent_config(args)
    assert (config.operator.host, config.operator.port) == ("us-east-op-1", 8080)
    assert (config.region, config.bootstrap_token) == ("us-east", "CHANGE-ME")
    assert config.metrics_port == 8081  # the port prometheus.yml scrapes


@pytest.mark.needs_tool("systemd-analyze")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    # systemd-analyze insists that ExecStart's binary exists: point the units at a fake.
    fake = tmp_path / "fake-zeitwork"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    units = []
    for source in sorted(SYSTEMD.glob("*.service")):
        copy = tmp_path / source.name
        copy.write_text(source.read_text().replace(BINARY, str(fake)))
        units.append(str(copy))
    assert len(units) == 2
    code, output = run(analyze, "verify", *units)
    # Unknown keys and bad values are only warnings (exit 0): any output is a failure.
    assert code == 0, output
    assert output.strip() == "", output


# -- log rotation ----------------------------------------------------------------------------


def test_rsyslog_writes_the_files_logrotate_rotates() -> None:
    rsyslog = (DEPLOYMENTS / "rsyslog" / "zeitwork.conf").read_text()
    rules = dict(
        re.findall(r'if \$programname == "([\w-]+)" then \{\s*action\([^)]*file="([^"]+)"', rsyslog)
    )
    identifiers = {
        unit(name)["Service"]["SyslogIdentifier"]
        for name in ("zeitwork-edge.service", "zeitwork-node-agent.service")
    }
    assert set(rules) == identifiers
    logrotate = (DEPLOYMENTS / "logrotate" / "zeitwork").read_text()
    assert "/var/log/zeitwork/*.log {" in logrotate
    assert all(re.fullmatch(r"/var/log/zeitwork/[\w-]+\.log", path) for path in rules.values())


def logrotate_config(tmp_path: Path, log_dir: str = "/var/log/zeitwork") -> Path:
    # logrotate ignores a configuration not owned by the user running it (or root) or
    # writable by others: use a copy of our own.
    config = tmp_path / "zeitwork.logrotate"
    text = (DEPLOYMENTS / "logrotate" / "zeitwork").read_text()
    config.write_text(text.replace("/var/log/zeitwork/", log_dir.rstrip("/") + "/"))
    config.chmod(0o644)
    return config


@pytest.mark.needs_tool("logrotate")
def test_logrotate_config_parses(tmp_path: Path) -> None:
    logrotate = require_tool("logrotate")
    config = logrotate_config(tmp_path)
    code, output = run(logrotate, "--debug", "--state", str(tmp_path / "state"), str(config))
    assert code == 0, output
    assert "error" not in output.lower(), output
    assert "rotating pattern: /var/log/zeitwork/*.log" in output, output


@pytest.mark.needs_tool("logrotate")
def test_logrotate_rotates_the_services_logs(tmp_path: Path) -> None:
    """A forced dry run on a directory holding the services' logs."""
    logrotate = require_tool("logrotate")
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    for name in ("edge.log", "node-agent.log"):
        (logs / name).write_text("2025-01-01 12:00:00 INFO edge: a line\n")
    (logs / "empty.log").touch()
    config = logrotate_config(tmp_path, str(logs))
    code, output = run(
        logrotate, "--debug", "--force", "--state", str(tmp_path / "state"), str(config)
    )
    assert code == 0, output
    assert "error" not in output.lower(), output
    adm = grp.getgrnam("adm").gr_gid
    for name in ("edge.log", "node-agent.log"):
        assert f"creating new {logs / name} mode = 0640 uid = 0 gid = {adm}" in output, output
    assert f"creating new {logs / 'empty.log'}" not in output, output  # notifempty
    # sharedscripts: rsyslog is told once to reopen its files.
    assert output.count("running postrotate script") == 1, output
    assert "--signal=HUP rsyslog.service" in output, output
    # Debug mode changes nothing.
    assert sorted(os.listdir(logs)) == ["edge.log", "empty.log", "node-agent.log"]
