"""The shipped Grafana dashboard and alerting rules use metrics the relay really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from offset_appliance.probe import ProbeResult, format_prometheus
from offset_appliance.relay.metrics import Snapshot, Stats, render

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "packaging" / "prometheus" / "offset-relay.rules.yml"
DASHBOARD = ROOT / "packaging" / "grafana" / "offset-relay.json"


def exported_names() -> set[str]:
    snap = Snapshot(
        connections={"tunnel": 0}, listeners=0, half_tunnels=0, tunnels=0, rekeys_live=0
    )
    text = render(Stats(), snap)
    text += format_prometheus(ProbeResult(0, "h:1", "ok", 0.001, 0.002))
    return {m.group(1) for m in re.finditer(r"^# TYPE (\S+)", text, re.M)}


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
