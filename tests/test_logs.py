"""Log output: text and JSON lines on stdout, level from config or EDGE_AGENT_LOG_LEVEL."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agent.ops.logs import LEVEL_ENV, effective_level, setup_logging
from tests.mqtt_support import Broker

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root_logger")
def test_text_lines_are_level_logger_message() -> None:
    out = io.StringIO()
    assert setup_logging("INFO", "text", stream=out, environ={}) == "INFO"
    logging.getLogger("agent.link.client").info("connected to %s:%d", "broker", 8883)
    logging.getLogger("agent.x").debug("not shown at INFO")
    assert out.getvalue() == "INFO agent.link.client: connected to broker:8883\n"


@pytest.mark.usefixtures("restore_root_logger")
def test_json_lines_are_one_object_each() -> None:
    out = io.StringIO()
    setup_logging("DEBUG", "json", stream=out, environ={})
    logging.getLogger("agent.loops").debug("frame %d", 7)
    try:
        raise ValueError("bad frame")
    except ValueError:
        logging.getLogger("agent.loops").exception("worker failed: %s", "multi\nline")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert {k: first[k] for k in ("level", "logger", "message")} == {
        "level": "DEBUG",
        "logger": "agent.loops",
        "message": "frame 7",
    }
    assert abs(first["ts"] - time.time()) < 60
    assert second["level"] == "ERROR"
    assert second["message"] == "worker failed: multi\nline"
    assert "ValueError: bad frame" in second["exc"]


@pytest.mark.usefixtures("restore_root_logger")
def test_environment_level_wins_over_config() -> None:
    out = io.StringIO()
    chosen = setup_logging("WARNING", stream=out, environ={LEVEL_ENV: "debug"})
    assert chosen == "DEBUG"
    logging.getLogger("agent.t").debug("shown")
    assert out.getvalue() == "DEBUG agent.t: shown\n"


@pytest.mark.usefixtures("restore_root_logger")
def test_invalid_environment_level_is_named_and_config_used() -> None:
    out = io.StringIO()
    assert setup_logging("ERROR", stream=out, environ={LEVEL_ENV: "LOUD"}) == "ERROR"
    assert effective_level("INFO", {LEVEL_ENV: ""}) == "INFO"
    logging.getLogger("agent.t").warning("hidden at ERROR")
    assert out.getvalue() == (
        "WARNING agent.ops.logs: EDGE_AGENT_LOG_LEVEL='LOUD' is not one of "
        "DEBUG, INFO, WARNING, ERROR; using log_level ERROR\n"
    )
    assert logging.getLogger().level == logging.ERROR


def test_the_agent_process_logs_json_at_the_environment_level(
    private_broker: Broker, tmp_path: Path
) -> None:
    """`edge-agent run` uses log_format from the config and the level from the environment."""
    config = {
        "device": {"id": "log-1"},
        "state_dir": str(tmp_path / "state"),
        "log_level": "WARNING",
        "log_format": "json",
        "models": {"require_signature": False},
        "mqtt": {"host": "127.0.0.1", "port": private_broker.port},
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), LEVEL_ENV: "DEBUG"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[dict[str, object]] = []
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(json.loads(raw))
            if "started" in str(lines[-1]["message"]):
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=20)
    lines += [json.loads(raw) for raw in rest.splitlines()]
    levels = {line["level"] for line in lines}
    assert "INFO" in levels, err  # WARNING in the config, DEBUG from the environment
    assert any(line["message"] == "stopped" for line in lines), err
    assert all(set(line) >= {"ts", "level", "logger", "message"} for line in lines)
