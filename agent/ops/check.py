"""``edge-agent check CONFIG`` without ``--offline``: everything the agent will touch.

Each check gives one row of a PASS/FAIL table, and each failure a remedy an
operator can act on: the config's files, the runtime and delegate, one frame or
window from every source, every configured model that is in the store (checksum
and the isolated validation child), and a real MQTT CONNECT with the configured
TLS and credentials. SKIP rows (nothing to check yet) and WARN rows (the agent
starts, but not quite as configured: a saved override it drops; results larger than
a pipeline's raw.max_values or about 2 KB) do not fail the check.

The check uses the agent's own parts, so it runs at the service's level of the
dependency arrows: ops -> link, loops, models. It never changes state: the store is
read without being opened and the broker sees a throw-away client id, so the check
may run next to a running agent (a camera or Edge TPU it holds will show as busy).
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from agent.config import AgentConfig, PipelineConfig, pipeline_key
from agent.config_paths import check_files
from agent.link.client import LinkError, resolve_password, tls_context
from agent.loops.sources.base import EndOfStream, SourceError, create_source
from agent.models.runtime import LoaderError, Runtime, probe_delegate, select_runtime
from agent.models.store import ModelRecord, ModelStore, StoreError
from agent.models.validate import ValidationFailed, Validator
from agent.ops.result_size import result_size_remedy, result_size_warning
from agent.ops.stream_queue import stream_queue_warning

Status = Literal["PASS", "FAIL", "SKIP", "WARN"]
_SOURCE_PATH = re.compile(r"pipelines\.[^:]+\.source\.path: ")
AS_AGENT = "sudo -u edge-agent /opt/edge-agent/venv/bin/edge-agent check /etc/edge-agent/agent.yaml"


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str
    remedy: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


def _pass(name: str, detail: str) -> CheckResult:
    return CheckResult(name, "PASS", detail)


def _fail(name: str, detail: str, remedy: str) -> CheckResult:
    return CheckResult(name, "FAIL", detail, remedy)


# ------------------------------------------------------------------- config, runtime


def check_config_files(
    config: AgentConfig, path: Path, warnings: Iterable[str] = ()
) -> list[CheckResult]:
    remedy = (
        "the agent drops it at start and rewrites the overrides file; if it is still "
        "wanted, send the `config` command again (the new pipeline name, a value in bounds)"
    )
    warned = [CheckResult("config", "WARN", line, remedy) for line in warnings]
    # A missing source file gets its own row, with a remedy for its source type.
    problems = [p for p in check_files(config) if not _SOURCE_PATH.match(p)]
    if not problems:
        summary = f"{path}: device {config.device.id}, {len(config.pipelines)} pipeline(s)"
        return [_pass("config", summary), *warned]
    remedy = (
        "create the file or fix the path in the config (relative paths are taken from the "
        "config's folder); the edge-agent user must be able to read it"
    )
    return [*(_fail("config", line, remedy) for line in problems), *warned]


def check_runtime(config: AgentConfig) -> tuple[CheckResult, Runtime | None]:
    rc = config.runtime
    try:
        runtime = select_runtime(rc.prefer)
    except LoaderError as exc:
        remedy = (
            "install a runtime into the agent's venv: pip install 'edge-deploy[litert]' "
            "(Python 3.10-3.12) or 'edge-deploy[tflite]' (Python <= 3.11), or set "
            "runtime.prefer: auto"
        )
        return _fail("runtime", str(exc), remedy), None
    return _pass("runtime", f"{runtime} (runtime.prefer: {rc.prefer})"), runtime


def check_delegate(config: AgentConfig, runtime: Runtime | None) -> CheckResult:
    rc = config.runtime
    if rc.delegate == "cpu":
        return _pass("delegate", "cpu (the runtime's XNNPACK kernels)")
    if runtime is None:
        return _fail("delegate", f"{rc.delegate}: no runtime to load it into", "see runtime")
    try:
        probe_delegate(runtime, rc.delegate, rc.delegate_path, rc.delegate_options)
    except LoaderError as exc:
        if rc.delegate == "edgetpu":
            remedy = (
                "install the Edge TPU runtime (apt install libedgetpu1-std from Coral's apt "
                "repository), plug the accelerator in and re-check; or set runtime.delegate: cpu"
            )
        else:
            remedy = (
                "runtime.delegate_path must name the delegate's .so built for this machine "
                f"and {runtime.name} {runtime.version}; check its dependencies with ldd"
            )
        return _fail("delegate", str(exc), remedy)
    return _pass("delegate", f"{rc.delegate} loaded into {runtime}")


# -------------------------------------------------------------------------- sources


def _source_remedy(pipeline: PipelineConfig, pipeline_key: str) -> str:
    s = pipeline.source
    key = f"{pipeline_key}.source"
    if s.type == "camera":
        return (
            f"check {key}.device: the camera exists (ls /dev/video*), the edge-agent user "
            "is in the video group and no other process holds it (a running agent does: "
            "stop it to check); test a stream URL with ffprobe"
        )
    if s.type == "picamera2":
        return (
            "Raspberry Pi camera: apt install python3-picamera2, and the venv must see it "
            "(install.sh --system-site-packages); test the camera with rpicam-hello"
        )
    if s.type == "video":
        return (
            f"make {key}.path name a video file the edge-agent user can read, in a format "
            "OpenCV decodes (the venv needs the camera extra: edge-deploy[camera])"
        )
    if s.type == "images":
        return (
            f"make {key}.path name a folder of jpg/png/bmp images the edge-agent user can "
            "read (the venv needs the camera extra: edge-deploy[camera])"
        )
    if s.type == "sensor" and s.input == "serial":
        return (
            f"check {key}.port exists (ls /dev/ttyUSB* /dev/ttyACM*), the edge-agent user is "
            "in the dialout group, and baudrate and columns match what the sensor sends"
        )
    if s.type == "sensor":
        return (
            f"make {key}.path a CSV or JSONL file with the configured columns and at least "
            f"{s.window} rows"
        )
    return "a synthetic source needs nothing: please report this as a bug"


def _first_item(pipeline: PipelineConfig, timeout_s: float) -> tuple[Any, float]:
    """Open the source, read one frame or window, close it; in a thread, with a timeout."""
    outcome: dict[str, Any] = {}
    source = create_source(pipeline.source)

    def read_one() -> None:
        start = time.monotonic()
        try:
            source.open()
            while time.monotonic() - start < timeout_s:
                item = source.read()
                if item is not None:
                    outcome["item"] = (item[0], time.monotonic() - start)
                    return
                time.sleep(0.01)
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            try:
                source.close()
            except Exception as exc:  # a close that fails says little; the read decides
                outcome.setdefault("close_error", exc)

    thread = threading.Thread(target=read_one, name=f"check-{pipeline.name}", daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    if "item" in outcome:
        return outcome["item"]
    if "error" in outcome:
        raise outcome["error"]
    raise TimeoutError(f"no frame within {timeout_s:g}s")


def check_source(pipeline: PipelineConfig, key: str, timeout_s: float) -> CheckResult:
    """``key``: the pipeline's key path, ``pipelines.<name>`` (``pipeline_key``)."""
    name = f"source {pipeline.name}"
    s = pipeline.source
    if s.type == "sensor" and s.input == "stdin":
        return CheckResult(name, "SKIP", "sensor on stdin: fed by another process at run time")
    try:
        data, seconds = _first_item(pipeline, timeout_s)
    except EndOfStream:
        return _fail(name, f"{s.type}: ended before a first frame", _source_remedy(pipeline, key))
    except (SourceError, TimeoutError, OSError) as exc:
        return _fail(name, f"{s.type}: {exc}", _source_remedy(pipeline, key))
    except Exception as exc:  # a driver bug is still a failed check, not a crash
        detail = f"{s.type}: {type(exc).__name__}: {exc}"
        return _fail(name, detail, _source_remedy(pipeline, key))
    shape = "x".join(str(n) for n in getattr(data, "shape", ()))
    what = "window" if s.type == "sensor" or getattr(s, "kind", "") == "windows" else "frame"
    dtype = getattr(data, "dtype", "")
    return _pass(name, f"{s.type}: first {what} {shape} {dtype} in {seconds * 1000:.0f} ms")


# --------------------------------------------------------------------------- models


def check_models(config: AgentConfig) -> list[CheckResult]:
    names = list(dict.fromkeys(p.model for p in config.pipelines))
    if not names:
        return []
    store = ModelStore(config.state_dir)
    try:
        records = store.peek_records()
    except OSError as exc:
        remedy = f"run the check as the agent's user: {AS_AGENT}"
        detail = f"cannot read the model store in {config.state_dir}: {exc.strerror or exc}"
        return [_fail(f"model {n}", detail, remedy) for n in names]
    m, rc = config.models, config.runtime
    validator = Validator(
        runtime=rc.prefer,
        num_threads=rc.num_threads,
        timeout_s=m.validation.timeout_s,
        memory_mb=m.validation.memory_mb,
    )
    return [_check_model(store, validator, name, records) for name in names]


def _check_model(
    store: ModelStore, validator: Validator, name: str, records: dict[str, ModelRecord]
) -> CheckResult:
    row = f"model {name}"
    record = records.get(name) or ModelRecord()
    version = record.active or (record.installed[-1] if record.installed else None)
    if version is None:
        return CheckResult(row, "SKIP", "no version stored yet: the pipeline waits for a deploy")
    which = "active" if version == record.active else "newest stored"
    redeploy = f"deploy a good version again (edge-fleet deploy) or roll back {name}"
    try:
        stored = store.get(name, version, verify=True)
    except StoreError as exc:
        return _fail(row, f"{version} ({which}): {exc.message}", redeploy)
    try:
        report = validator.validate(stored.model_path, stored.manifest)
    except ValidationFailed as exc:
        remedy = (
            f"the runtime here cannot serve this version: {redeploy}, or install the runtime "
            "the model was converted for; models.validation sets time and memory limits"
        )
        return _fail(row, f"{version} ({which}): {exc.message}", remedy)
    detail = (
        f"{version} ({which}) on {report.runtime} {report.runtime_version}: "
        f"invoke {report.invoke_ms:.1f} ms"
    )
    if report.golden is not None:
        detail += f", {report.golden['samples']} golden samples match"
    return _pass(row, detail)


def check_result_sizes(config: AgentConfig) -> list[CheckResult]:
    """A WARN row per pipeline whose active model would publish more than its
    ``raw.max_values`` for a raw output, or results of more than about 2 KB; and one
    per streaming model (manifest ``state``) on a ``queue: latest`` pipeline."""
    store = ModelStore(config.state_dir)
    try:
        records = store.peek_records()
    except OSError:
        return []  # the model rows say why
    rows = []
    for pipeline in config.pipelines:
        active = records.get(pipeline.model, ModelRecord()).active
        if active is None:
            continue
        try:
            manifest = store.get(pipeline.model, active).manifest
        except StoreError:
            continue  # the model row fails for it
        warning = result_size_warning(pipeline, manifest)
        if warning is not None:
            remedy = result_size_remedy(pipeline, manifest)
            rows.append(CheckResult(f"results {pipeline.name}", "WARN", warning, remedy))
        streaming = stream_queue_warning(pipeline, manifest)
        if streaming is not None:
            remedy = f"set pipelines[{pipeline.name}].queue: fifo"
            rows.append(CheckResult(f"queue {pipeline.name}", "WARN", streaming, remedy))
    return rows


# --------------------------------------------------------------------------- broker


def _broker_remedy(config: AgentConfig, exc: BaseException) -> str:
    m = config.mqtt
    where = f"{m.host}:{m.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            "mqtt.tls.ca_file must be the CA that signed the broker's certificate, and the "
            f"certificate must name {m.host} (or set mqtt.tls.verify_hostname: false); "
            "check the device clock too"
        )
    if isinstance(exc, ssl.SSLError):
        return (
            "TLS handshake failed: the broker may not use TLS on this port (or TLS is "
            "disabled here while the broker expects it), or it rejected "
            "mqtt.tls.cert_file/key_file"
        )
    if isinstance(exc, socket.gaierror):
        return f"mqtt.host {m.host!r} does not resolve: fix it or the device's DNS"
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"nothing listens at {where}: start the broker, or fix mqtt.host/mqtt.port "
            "(TLS brokers usually listen on 8883)"
        )
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"no answer from {where}: check the network, firewall and mqtt.host"
    return f"check mqtt.host/mqtt.port, the network and the broker's log ({where})"


def check_broker(config: AgentConfig, timeout_s: float) -> CheckResult:
    m = config.mqtt
    name = "broker"
    where = f"{m.host}:{m.port}"
    tls = " with TLS" if m.tls.enabled else ""
    # Never the device's own client id: the broker would drop the running agent.
    client_id = f"{config.device.id}-check-{os.getpid()}"
    v5 = m.protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if v5 else True,
    )
    client.connect_timeout = timeout_s
    try:
        if m.username is not None:
            client.username_pw_set(m.username, resolve_password(m))
        if m.tls.enabled:
            client.tls_set_context(tls_context(m))
    except LinkError as exc:
        return _fail(name, str(exc), "fix the mqtt.tls files or the mqtt password source")
    outcome: dict[str, Any] = {}

    def on_connect(*args: Any) -> None:
        outcome["reason"] = args[3]

    client.on_connect = on_connect
    start = time.monotonic()
    try:
        client.connect(m.host, m.port, keepalive=m.keepalive_s)
    except (OSError, ssl.SSLError) as exc:
        return _fail(name, f"{where}{tls}: {exc}", _broker_remedy(config, exc))
    try:
        while "reason" not in outcome and time.monotonic() - start < timeout_s:
            rc = client.loop(timeout=0.1)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and "reason" not in outcome:
                detail = f"{where}{tls}: closed before the broker accepted the connection"
                remedy = (
                    "the broker rejected the TLS client certificate (mqtt.tls.cert_file), or "
                    "this port is not an MQTT listener; see the broker's log"
                )
                return _fail(name, f"{detail} ({mqtt.error_string(rc)})", remedy)
        reason = outcome.get("reason")
        if reason is None:
            return _fail(
                name,
                f"{where}{tls}: no CONNACK within {timeout_s:g}s",
                _broker_remedy(config, TimeoutError()),
            )
        if reason.is_failure:
            remedy = (
                f"the broker refused the login: check mqtt.username and the password source, "
                f"and that its ACL lets client ids like {client_id!r} connect"
            )
            return _fail(name, f"{where}{tls}: refused: {reason}", remedy)
        elapsed = (time.monotonic() - start) * 1000
        return _pass(name, f"{where}{tls}: MQTT {m.protocol} CONNACK in {elapsed:.0f} ms")
    finally:
        client.disconnect()


# ---------------------------------------------------------------------------- table


def run_checks(
    config: AgentConfig,
    config_path: Path,
    *,
    warnings: Iterable[str] = (),
    source_timeout_s: float = 10.0,
    broker_timeout_s: float = 10.0,
) -> list[CheckResult]:
    """Every check, in the order the agent meets them at start-up.

    ``warnings`` are what loading the config said (``EffectiveConfig.warnings``).
    """
    results = check_config_files(config, config_path, warnings)
    runtime_result, runtime = check_runtime(config)
    results += [runtime_result, check_delegate(config, runtime)]
    names = [p.name for p in config.pipelines]
    results += [
        check_source(p, f"pipelines.{pipeline_key(names, i)}", source_timeout_s)
        for i, p in enumerate(config.pipelines)
    ]
    results += check_models(config)
    results += check_result_sizes(config)
    results.append(check_broker(config, broker_timeout_s))
    return results


def format_table(results: Iterable[CheckResult]) -> str:
    rows = list(results)
    width = max((len(r.name) for r in rows), default=0)
    lines = []
    for r in rows:
        lines.append(f"{r.status:<4}  {r.name:<{width}}  {r.detail}")
        if r.remedy:
            lines.append(f"{'':<4}  {'':<{width}}  remedy: {r.remedy}")
    failed = sum(r.failed for r in rows)
    passed = sum(r.status == "PASS" for r in rows)
    skipped = sum(r.status == "SKIP" for r in rows)
    warned = sum(r.status == "WARN" for r in rows)
    summary = f"{passed} passed, {failed} failed, {skipped} skipped"
    lines.append(f"{summary}, {warned} warned" if warned else summary)
    return "\n".join(lines)
