"""GET /metrics: the telemetry figures in Prometheus' format, scraped from a running agent
(in this process, real broker, a converter-built digits bundle in its store)."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agent.live import LiveConfig
from agent.models.manifest import read_bundle
from agent.models.store import ModelStore
from agent.ops.metrics import INSTALL_HINT, MetricsExporter
from agent.protocol import PipelineTelemetry, StageLatency, Telemetry
from agent.service import Agent
from tests.converter_support import build_digits_bundle
from tests.mqtt_support import Broker, free_port


def scrape(port: int) -> tuple[int, str, str]:
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    key = (name, frozenset(labels.items()))
    assert key in found, f"no {name}{labels} in {sorted(n for n, _ in found)}"
    return found[key]


@pytest.fixture
def agent(broker: Broker, tmp_path: Path) -> Iterator[tuple[Agent, int]]:
    bundle = read_bundle(build_digits_bundle(tmp_path / "bundle", "1"))
    store = ModelStore(tmp_path / "state", require_signature=False)
    store.open()
    store.install(bundle.manifest_data, None, bundle.model_path)
    store.set_active("digits", "1")
    port = free_port()
    config = {
        "device": {"id": "pi-metrics"},
        "state_dir": str(tmp_path / "state"),
        "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": "metrics-test"},
        "models": {"require_signature": False},
        "http": {"enabled": True, "port": port},
        "pipelines": [
            {"name": "cam", "model": "digits", "queue": "fifo",
             "source": {"type": "synthetic", "kind": "digits", "width": 32, "height": 32,
                        "channels": 1, "fps": 100}},
        ],
    }  # fmt: skip
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    running = Agent(LiveConfig.load(path))
    running.start()
    try:
        yield running, port
    finally:
        running.stop()


def test_metrics_scraped_from_a_running_agent(
    agent: tuple[Agent, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    running, port = agent
    pipeline = running.pipelines["cam"]
    deadline = time.monotonic() + 60
    while pipeline.results_out < 20:
        assert time.monotonic() < deadline, "no results from the agent"
        time.sleep(0.05)
    status, content_type, text = scrape(port)
    assert status == 200 and content_type.startswith("text/plain")
    found = samples(text)
    assert value(found, "edge_agent_info", device="pi-metrics") == 1
    assert value(found, "edge_agent_pipeline_model_info", pipeline="cam", model="digits",
                 version="1") == 1  # fmt: skip
    assert value(found, "edge_agent_pipeline_source_state", pipeline="cam", state="open") == 1
    assert value(found, "edge_agent_pipeline_source_state", pipeline="cam", state="ended") == 0
    assert value(found, "edge_agent_pipeline_results_out_total", pipeline="cam") >= 20
    assert value(found, "edge_agent_pipeline_frames_in_total", pipeline="cam") >= 20
    assert value(found, "edge_agent_pipeline_errors_total", pipeline="cam") == 0
    assert value(found, "edge_agent_pipeline_captured", pipeline="cam") == 0  # capture off
    assert value(found, "edge_agent_pipeline_capture_errors_total", pipeline="cam") == 0
    invoke = value(found, "edge_agent_pipeline_stage_latency_seconds", pipeline="cam",
                   stage="invoke", quantile="0.5")  # fmt: skip
    assert 0 < invoke < 1
    assert value(found, "edge_agent_resident_memory_bytes") > 10 * 2**20
    assert value(found, "edge_agent_outbox_depth") >= 0
    assert value(found, "edge_agent_outbox_dropped_total", kind="results") == 0
    assert value(found, "edge_agent_thread_deaths_total") == 0
    assert value(found, "edge_agent_threads_down") == 0
    # A scrape has fps windows of its own: telemetry's are untouched by it.
    assert running.telemetry.build().pipelines["cam"].fps == 0.0  # first telemetry read
    time.sleep(0.3)
    assert value(samples(scrape(port)[2]), "edge_agent_pipeline_fps", pipeline="cam") > 0
    # The API's other endpoints are unchanged.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/digits", timeout=10) as r:
        assert json.loads(r.read())["model_version_status"][0]["version"] == "1"
    # Without prometheus-client the agent runs on; a scrape gets a 503 saying why.
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    status, _, text = scrape(port)
    assert status == 503 and json.loads(text) == {"error": INSTALL_HINT}
    assert pipeline.results_out > 20 and running.health()[0]


def test_without_prometheus_client_a_scrape_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    telemetry = Telemetry(
        device="pi-x",
        seq=0,
        ts=0.0,
        uptime_s=1.0,
        pipelines={"cam": PipelineTelemetry(model="m", stages={"invoke": StageLatency(p50=2.0)})},
        thread_deaths=3,
        threads_down=["outbox", "results-cam"],
    )
    exporter = MetricsExporter(lambda: telemetry)
    body, _ = exporter.render()
    found = samples(body.decode())
    assert value(found, "edge_agent_thread_deaths_total") == 3
    assert value(found, "edge_agent_threads_down") == 2
    assert b'edge_agent_pipeline_model_info{model="m",pipeline="cam",version=""} 1.0' in body
    assert b'stage="invoke"' in body and b"0.002" in body
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(RuntimeError, match="prometheus-client is not installed") as err:
        exporter.render()
    assert str(err.value) == INSTALL_HINT
