"""Checking a Grafana dashboard in docs/grafana against the metrics an exporter really
produced: every PromQL text names only exported metrics and labels."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

GRAFANA = Path(__file__).resolve().parent.parent / "docs" / "grafana"
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}
# A metric name with an optional {label matchers} after it.
SELECTOR = re.compile(r"\b((?:edge_agent|edge_fleet)_[a-zA-Z0-9_]+)\s*(\{[^}]*\})?")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL text in a dashboard: panel targets and template variable queries."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    return found


def exported(text: str) -> dict[str, set[str]]:
    """Metric name -> label names, from an exposition (every sample, counters with
    their ``_total``)."""
    from prometheus_client.parser import text_string_to_metric_families

    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def check(dashboard_file: str, metrics: dict[str, set[str]]) -> set[str]:
    dashboard = json.loads((GRAFANA / dashboard_file).read_text())
    texts = queries(dashboard)
    assert texts, "no queries found"
    used: set[str] = set()
    for text in texts:
        selectors = SELECTOR.findall(text)
        assert selectors, f"names no metric of the code: {text}"
        for name, matchers in selectors:
            assert name in metrics, f"{dashboard_file}: {name} is not exported ({text})"
            labels = set(MATCHER.findall(matchers))
            unknown = labels - metrics[name] - TARGET_LABELS
            assert not unknown, f"{dashboard_file}: {name} has no label {unknown} ({text})"
            used.add(name)
    # Panels read their data from the dashboard's datasource variable.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    return used
