"""The shipped Grafana dashboard and alerting rules use metrics the relay really exports."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

from offset_appliance.config import Config
from offset_appliance.probe import ProbeResult, format_prometheus
from offset_appliance.relay.metrics import Snapshot, Stats, render

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "packaging" / "prometheus" / "offset-relay.rules.yml"
DASHBOARD = ROOT / "packaging" / "grafana" / "offset-relay.json"


# The metrics of the controls of who uses the relay (access lists, bans, memory ceiling,
# bandwidth, budgets), which the dashboard and the rules show. Until the relay exports them
# (its configuration has those tables), they are taken as exported; once it does, each
# must really be.
CONTROL_METRICS = {
    "offset_relay_throttled_seconds_total",
    "offset_relay_budget_used_bytes",
    "offset_relay_budget_over",
    "offset_relay_bans_active",
    "offset_relay_bans_total",
    "offset_relay_memory_rss_bytes",
    "offset_relay_memory_ceiling_active",
}
CONTROLS_IN_CONFIG = {"access", "bandwidth", "budgets", "bans"} <= {
    f.name for f in dataclasses.fields(Config)
}


def exported_names() -> set[str]:
    snap = Snapshot(
        connections={"tunnel": 0}, listeners=0, half_tunnels=0, tunnels=0, rekeys_live=0
    )
    text = render(Stats(), snap)
    text += format_prometheus(ProbeResult(0, "h:1", "ok", 0.001, 0.002))
    names = {m.group(1) for m in re.finditer(r"^# TYPE (\S+)", text, re.M)}
    return names if CONTROLS_IN_CONFIG else names | CONTROL_METRICS


def referenced(expr: str) -> set[str]:
    return set(re.findall(r"\b(offset_relay_[a-z_]+)", expr))


def test_dashboard_queries_use_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    names = exported_names()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        assert referenced(expr) <= names, expr


def test_rules_use_exported_metrics_and_pass_promtool():
    names = exported_names()
    text = RULES.read_text()
    for expr_names in map(referenced, text.splitlines()):
        assert expr_names <= names
    assert shutil.which("promtool"), "promtool (Debian package prometheus) is needed"
    result = subprocess.run(["promtool", "check", "rules", RULES], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# A relay whose reload failed, one shedding load and one refusing by policy only.
RULE_TESTS = """
rule_files: [RULES]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'offset_relay_config_last_reload_successful{instance="a"}'
        values: '1 1 0 0 0 0 0'
      - series: 'offset_relay_config_last_reload_successful{instance="b"}'
        values: '1 1 1 1 1 1 1'
      - series: 'offset_relay_connections_refused_total{instance="a",limit="max_connections"}'
        values: '0+10x30'
      - series: 'offset_relay_connections_refused_total{instance="b",limit="ip_denied"}'
        values: '0+10x30'
      - series: 'offset_relay_connections_refused_total{instance="b",limit="banned"}'
        values: '0+10x30'
    alert_rule_test:
      - eval_time: 2m
        alertname: OffsetRelayConfigReloadFailed
        exp_alerts: []
      - eval_time: 4m
        alertname: OffsetRelayConfigReloadFailed
        exp_alerts:
          - exp_labels: {severity: warning, instance: a}
            exp_annotations:
              summary: "Offset relay a refused its new configuration"
              description: >-
                The last reload found a bad file; the relay keeps running with the
                configuration it had. `systemctl status offset-relay` shows the file and the
                key ("reload failed: FILE: table.key: reason"); fix it and reload again.
      - eval_time: 25m
        alertname: OffsetRelayShedding
        exp_alerts:
          - exp_labels: {severity: warning, instance: a, limit: max_connections}
            exp_annotations:
              summary: "Offset relay a refuses connections (max_connections)"
              description: >-
                Connections are refused by the max_connections limit. Raise it in
                /etc/offset-relay/relay.d/ if the load is legitimate, or add relays.
"""


def _promtool_rule_tests(tmp_path, text: str) -> None:
    """``promtool test rules`` on ``text`` (its RULES: the shipped alert rules) passes."""
    assert shutil.which("promtool"), "promtool (Debian package prometheus) is needed"
    tests = tmp_path / "tests.yml"
    tests.write_text(text.replace("RULES", str(RULES)))
    result = subprocess.run(["promtool", "test", "rules", tests], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_reload_and_shedding_alerts_fire_as_written(tmp_path):
    _promtool_rule_tests(tmp_path, RULE_TESTS)


# No probe results at all (the timer not enabled, no ticket): the absence alert fires after
# its 5 minutes, and not while a probe reports, even a failing one.
ABSENT_TESTS = """
rule_files: [RULES]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series: []
    alert_rule_test:
      - eval_time: 4m
        alertname: OffsetRelayProbeAbsent
        exp_alerts: []
      - eval_time: 6m
        alertname: OffsetRelayProbeAbsent
        exp_alerts:
          - exp_labels: {severity: warning}
            exp_annotations:
              summary: "No Offset relay probe results"
              description: >-
                Prometheus has had no offset_relay_probe_success for 5 minutes: the probe
                does not run, or cannot (no ticket), or node_exporter is not scraped. On the
                relay's host: `systemctl enable --now offset-relay-probe.timer`, then
                `systemctl status offset-relay-probe.service` says why it fails.
  - interval: 1m
    input_series:
      - series: 'offset_relay_probe_success{address="relay.example.org:4567"}'
        values: '0x10'
    alert_rule_test:
      - eval_time: 8m
        alertname: OffsetRelayProbeAbsent
        exp_alerts: []
"""


def test_probe_absent_alert_fires_without_probe_results(tmp_path):
    _promtool_rule_tests(tmp_path, ABSENT_TESTS)
