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
from tests.mqtt_support import Broker, MessageCollector, publish

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


# ------------------------------------------------------------- untrusted text


@pytest.mark.usefixtures("restore_root_logger")
def test_text_records_stay_one_line_whatever_the_message_holds() -> None:
    out = io.StringIO()
    setup_logging("INFO", "text", stream=out, environ={})
    hostile = "k\nERROR agent.link.commands: FORGED\r\x1b[2J\x85\u2028\ud800"
    logging.getLogger("agent.link.commands").warning("command %s failed", hostile)
    assert out.getvalue() == (
        "WARNING agent.link.commands: command "
        "k\\nERROR agent.link.commands: FORGED\\r\\x1b[2J\\x85\\u2028\\ud800 failed\n"
    )


@pytest.mark.usefixtures("restore_root_logger")
def test_every_traceback_line_is_indented_so_none_reads_as_a_record() -> None:
    out = io.StringIO()
    setup_logging("INFO", "text", stream=out, environ={})
    try:
        raise ValueError("bad key\nERROR agent.x: FORGED")
    except ValueError:
        logging.getLogger("agent.x").exception("handling failed")
    first, *rest = out.getvalue().splitlines()
    assert first == "ERROR agent.x: handling failed"
    assert rest and all(line.startswith("  ") for line in rest)
    assert "  ERROR agent.x: FORGED" in rest


@pytest.mark.usefixtures("restore_root_logger")
def test_json_lines_survive_a_lone_surrogate_and_line_separators() -> None:
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", write_through=True)
    setup_logging("INFO", "json", stream=out, environ={})
    logging.getLogger("agent.x").warning("key %s", "a\ud800b\u2028c")
    lines = raw.getvalue().decode("utf-8").splitlines()  # before: UnicodeEncodeError, no line
    assert len(lines) == 1
    assert json.loads(lines[0])["message"] == "key a\ud800b\u2028c"


def test_a_config_command_cannot_forge_a_line_in_the_agent_log(
    private_broker: Broker, tmp_path: Path
) -> None:
    """A real agent, a real broker: the key of a `config` command ends up in the log."""
    config = {
        "device": {"id": "log-2"},
        "state_dir": str(tmp_path / "state"),
        "log_level": "INFO",
        "models": {"require_signature": False},
        "mqtt": {"host": "127.0.0.1", "port": private_broker.port},
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(LEVEL_ENV, None)
    replies = MessageCollector(private_broker, "edge/log-2/reply")
    log = tmp_path / "agent.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", str(path)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        wait_for_text(log, "started", proc)
        command = {"id": "cfg-forge", "op": "config", "changes": {"x\nFAKE": 1}}
        publish(private_broker, "edge/log-2/cmd", json.dumps(command).encode())
        final = final_reply(replies)
        assert final["code"] == "config_rejected", final
        assert "\n" not in final["message"]
    finally:
        replies.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    lines = log.read_text().splitlines()
    assert not any(line.startswith("FAKE") for line in lines), lines
    forged = [line for line in lines if "FAKE" in line]
    assert len(forged) >= 1 and all(line.startswith("WARNING ") for line in forged), lines
    assert all("x\\nFAKE" in line for line in forged), forged


def final_reply(replies: MessageCollector, timeout: float = 30) -> dict[str, object]:
    """The first reply that is done or failed (accepted/progress come before it)."""
    n = 1
    while True:
        for message in replies.wait_for(n, timeout):
            reply = json.loads(message.payload)
            if reply.get("status") in ("done", "failed"):
                return dict(reply)
        n += 1


def wait_for_text(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"no {text!r} in {log.read_text()}"
        time.sleep(0.1)
