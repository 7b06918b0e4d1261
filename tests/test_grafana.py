"""The shipped Grafana dashboard and the README's metrics table name exactly what `/metrics` exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from tests.stack import running_stack

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "spendgate.json"
METRIC = re.compile(r"\bspendgate_[a-z0-9_]+")


def exposed(engine: Engine, db_url: str, tmp_path: Path) -> dict[str, str]:
    """Every metric family a real proxy exposes, by name, with its type (families without samples too)."""
    with running_stack(engine, db_url, tmp_path, metrics_token="t") as stack:
        text = httpx.get(f"{stack.url}/metrics", headers={"authorization": "Bearer t"}).text
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def series_names(families: dict[str, str]) -> set[str]:
    """The names PromQL can select, per family type."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    return {name + suffix for name, kind in families.items() for suffix in suffixes[kind]}


def documented_names(families: dict[str, str]) -> set[str]:
    """How the README names a family: counters with `_total`, the rest as they are."""
    return {name + "_total" if kind == "counter" else name for name, kind in families.items()}


def readme_metrics() -> set[str]:
    """The metric names in the README's `### Metrics` table (a cell may list several)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n### Metrics\n", 1)[1]
    names: set[str] = set()
    for line in section.splitlines()[1:]:
        if not line.startswith("|"):
            if names:
                break
            continue
        first = line.split("|")[1]
        names |= set(re.findall(r"`(spendgate_[a-z0-9_]+)`", first))
    return names


def expressions(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [expr for value in node.values() for expr in expressions(value)]
    if isinstance(node, list):
        return [expr for item in node for expr in expressions(item)]
    return []


def test_dashboard_and_readme_name_only_what_is_exposed(engine: Engine, db_url: str, tmp_path: Path) -> None:
    families = exposed(engine, db_url, tmp_path)
    assert len(families) >= 25
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {name for expr in expressions(dashboard) for name in METRIC.findall(expr)}
    assert queried, "the dashboard queries nothing"
    assert queried <= series_names(families), sorted(queried - series_names(families))
    documented = readme_metrics()
    assert documented_names(families) - documented == set(), "exposed but missing from the README's metrics table"
    assert documented - documented_names(families) == set(), "in the README's metrics table but not exposed"


def test_every_exposed_family_is_on_the_dashboard_or_documented_why_not(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    families = exposed(engine, db_url, tmp_path)
    queried = {name for expr in expressions(json.loads(DASHBOARD.read_text())) for name in METRIC.findall(expr)}
    # Allow-listed feature and user series are opt-in; a dashboard for them depends on the deployment's list.
    opt_in = {
        "spendgate_feature_calls",
        "spendgate_feature_spend_usd",
        "spendgate_user_calls",
        "spendgate_user_spend_usd",
        "spendgate_user_budget_limit_usd",
        "spendgate_user_budget_spent_usd",
        "spendgate_user_budget_held_usd",
        "spendgate_user_budget_window_limit_usd",
        "spendgate_user_budget_window_remaining_usd",
    }
    missing = {name for name in families if name not in opt_in and not series_names({name: families[name]}) & queried}
    assert missing == set()


def test_compose_provisions_prometheus_and_grafana_with_the_dashboard() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"]
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"])
    mounts = [volume.split(":")[0] for volume in services["grafana"]["volumes"]]
    assert "./deploy/grafana/spendgate.json" in mounts
    for mount in mounts + [services["prometheus"]["volumes"][0].split(":")[0]]:
        if mount.startswith("./"):
            assert (ROOT / mount).exists(), mount
    scraped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    target = scraped["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target.split(":")[1] == services["spendgate"]["environment"]["SPENDGATE_METRICS_ADDR"].split(":")[1]
