"""Kept frames over the agent's local HTTP API (list, serve, delete, names checked
strictly), and ``edge-fleet captures fetch`` against the API server object and against
a real running agent (as a subprocess, the console's own process)."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from agent.config import CaptureConfig
from agent.live import LiveConfig
from agent.loops.capture import CaptureShelf, FrameCapture
from agent.loops.frames import Frame
from agent.models.manifest import read_bundle
from agent.models.store import ModelStore
from agent.ops.httpapi import HttpApi, Predictor
from agent.protocol import ClassScore, Result
from agent.service import Agent
from fleet.cli import main as fleet_main
from tests.converter_support import build_digits_bundle
from tests.mqtt_support import Broker, free_port
from tests.test_pipeline_live import wait_for

ROOT = Path(__file__).resolve().parent.parent


class NoModels:
    def active(self, name: str) -> tuple[str, Path] | None:
        return None

    def health(self) -> tuple[bool, dict[str, Any]]:
        return True, {}


def result(seq: int, score: float) -> Result:
    return Result(
        device="pi-test",
        pipeline="cam",
        seq=0,
        ts=1_790_000_000.0 + seq,
        frame=seq,
        model="colors",
        version="3",
        latency_ms=1.5,
        classes=[ClassScore(index=2, label="blue", score=score)],
    )


def keep(capture: FrameCapture, seq: int, data: np.ndarray, confidence: float) -> None:
    before = capture.written
    frame = Frame(seq, 1_790_000_000.0 + seq, data, {"scene": "steady"})
    assert capture.offer(frame, result(seq, confidence), confidence, "low_confidence")
    wait_for(lambda: capture.written > before, what=f"frame {seq} kept")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, FrameCapture]]:
    """Three images and a sensor window kept for pipeline ``cam``, and the API."""
    capture = FrameCapture(
        "cam", CaptureConfig(enabled=True, min_interval_s=0), tmp_path / "captures" / "cam"
    )
    capture.start()
    rng = np.random.default_rng(0)
    for seq, confidence in ((1, 0.31), (2, 0.12), (3, 0.44)):
        keep(capture, seq, rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), confidence)
    keep(capture, 4, rng.standard_normal((128, 3)).astype(np.float32), 0.2)
    api = HttpApi(
        "127.0.0.1",
        0,
        Predictor(NoModels(), lambda p: None),  # type: ignore[arg-type, return-value]
        captures=CaptureShelf({"cam": capture}),
    )
    api.start()
    try:
        yield f"http://127.0.0.1:{api.port}", capture
    finally:
        api.stop()
        capture.stop()


def request(url: str, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    """Sends ``path`` exactly as given (no normalising of '..' or '%2F' on the way)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


def listing(url: str) -> list[dict[str, Any]]:
    status, _, body = request(url, "/captures")
    assert status == 200, body
    rows: list[dict[str, Any]] = json.loads(body)["captures"]
    return rows


def test_the_api_lists_and_serves_the_kept_frames(served: tuple[str, FrameCapture]) -> None:
    url, capture = served
    rows = listing(url)
    assert [r["confidence"] for r in rows] == [0.31, 0.12, 0.44, 0.2]  # by name: by time
    assert {r["format"] for r in rows} == {"jpeg", "npy"}
    for row in rows:
        assert row["pipeline"] == "cam" and row["reason"] == "low_confidence"
        status, kind, image = request(url, f"/captures/cam/{row['file']}")
        assert status == 200 and len(image) == row["bytes"]
        assert hashlib.sha256(image).hexdigest() == row["sha256"]
        assert image == (capture.folder.path / row["file"]).read_bytes()
        status, _, sidecar = request(url, f"/captures/cam/{row['sidecar']}")
        assert status == 200 and json.loads(sidecar)["sha256"] == row["sha256"]
        if row["format"] == "jpeg":
            assert kind == "image/jpeg" and row["file"].endswith(".jpg")
        else:
            assert kind == "application/octet-stream" and row["file"].endswith(".npy")
            window = np.load(io.BytesIO(image), allow_pickle=False)
            assert window.shape == (128, 3) and window.dtype == np.float32
            assert json.loads(sidecar)["result"]["classes"][0]["label"] == "blue"


def test_names_are_checked_strictly(served: tuple[str, FrameCapture]) -> None:
    url, capture = served
    kept = listing(url)[0]["file"]
    # Files of the directory's own that the index does not hold are not served either.
    (capture.folder.path / "notes.txt").write_text("not a capture")
    (capture.folder.path / "1700000000000-7.jpg").write_bytes(b"not kept")
    secret = capture.folder.path.parent.parent / "secret.json"
    secret.write_text("{}")
    bad_names = [
        "/captures/../../secret.json",
        "/captures/cam/../../secret.json",
        "/captures/cam/..%2F..%2Fsecret.json",
        "/captures/cam/%2e%2e",
        "/captures/cam/..",
        "/captures/..%2Fcam/" + kept,
        "/captures/cam//secret.json",
        "/captures//" + kept,
        "/captures/cam/" + kept + "/x",
        "/captures/cam/notes.txt",
        "/captures/cam/.1700000000000-1.jpg.x.tmp",
        "/captures/cam/1700000000000-1.JPG",
        "/captures/cam/" + kept.replace(".jpg", ".jpg\x00"),
    ]
    for path in bad_names:
        for method in ("GET", "DELETE"):
            status, _, body = request(url, path.replace("\x00", "%00"), method)
            assert status == 400, (method, path, status, body)
            assert "error" in json.loads(body)
    for path in ("/captures/cam/1700000000000-7.jpg", "/captures/door/" + kept):
        assert request(url, path)[0] == 404, path
        assert request(url, path, "DELETE")[0] == 404, path
    assert request(url, "/captures", "DELETE")[0] == 405
    assert request(url, "/captures/cam/" + kept, "POST")[0] == 405
    assert len(listing(url)) == 4 and secret.exists()
    assert (capture.folder.path / "1700000000000-7.jpg").exists()


def test_a_deleted_capture_is_gone_with_its_sidecar(served: tuple[str, FrameCapture]) -> None:
    url, capture = served
    row = listing(url)[1]
    status, _, body = request(url, f"/captures/cam/{row['sidecar']}", "DELETE")
    assert status == 200 and json.loads(body) == {"deleted": [row["file"], row["sidecar"]]}
    assert request(url, f"/captures/cam/{row['file']}")[0] == 404
    assert request(url, f"/captures/cam/{row['file']}", "DELETE")[0] == 404
    assert not (capture.folder.path / row["file"]).exists()
    assert not (capture.folder.path / row["sidecar"]).exists()
    assert len(listing(url)) == 3 and capture.captured == 3


def fetch(url: str, out: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> Any:
    code = fleet_main(["captures", "fetch", "--url", url, "-o", str(out), "--json", *extra])
    report = json.loads(capsys.readouterr().out)
    return code, report


def test_fleet_fetch_downloads_skips_what_it_has_and_deletes_when_asked(
    served: tuple[str, FrameCapture], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, capture = served
    rows = listing(url)
    out = tmp_path / "labelling"
    code, report = fetch(url, out, capsys=capsys)
    assert code == 0 and len(report["fetched"]) == 4 and report["failed"] == {}
    for row in rows:
        for name in (row["file"], row["sidecar"]):
            assert (out / "cam" / name).read_bytes() == (capture.folder.path / name).read_bytes()
    assert not [p for p in (out / "cam").iterdir() if p.name.startswith(".")]  # no temp files
    # Again: everything is there already; a damaged copy is fetched again.
    (out / "cam" / rows[0]["file"]).write_bytes(b"damaged")
    code, report = fetch(url, out, capsys=capsys)
    assert code == 0 and report["fetched"] == [f"cam/{rows[0]['file']}"]
    assert len(report["skipped"]) == 3
    # --delete: each capture goes from the device once both its files are here.
    code, report = fetch(url, out, "--delete", capsys=capsys)
    assert code == 0 and len(report["skipped"]) == 4 and len(report["deleted"]) == 4
    assert listing(url) == [] and capture.captured == 0
    assert sorted(os.listdir(capture.folder.path)) == []
    assert len(list((out / "cam").iterdir())) == 8


def test_fleet_fetch_says_when_the_device_cannot_be_reached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = fleet_main(
        ["captures", "fetch", "--url", f"http://127.0.0.1:{free_port()}", "-o", str(tmp_path)]
    )
    assert code == 1 and "cannot reach" in capsys.readouterr().err
    assert fleet_main(["captures", "fetch", "--url", "ftp://x", "-o", str(tmp_path)]) == 2


def test_fetch_from_a_running_agent(broker: Broker, tmp_path: Path) -> None:
    """A real agent serving the digits model keeps its least confident frames;
    ``edge-fleet captures fetch --delete`` (its own process) takes them home."""
    bundle = read_bundle(build_digits_bundle(tmp_path / "bundle", "1"))
    store = ModelStore(tmp_path / "state", require_signature=False)
    store.open()
    store.install(bundle.manifest_data, None, bundle.model_path)
    store.set_active("digits", "1")
    port = free_port()
    config = {
        "device": {"id": "pi-capture"},
        "state_dir": str(tmp_path / "state"),
        "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": "capture-test"},
        "models": {"require_signature": False},
        "http": {"enabled": True, "port": port, "metrics": False},
        "pipelines": [
            {"name": "cam", "model": "digits", "queue": "fifo",
             "source": {"type": "synthetic", "kind": "digits", "width": 32, "height": 32,
                        "channels": 1, "fps": 200},
             "capture": {"enabled": True, "below": 0.995, "max_frames": 6,
                         "min_interval_s": 0.05}},
        ],
    }  # fmt: skip
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    agent = Agent(LiveConfig.load(path))
    url = f"http://127.0.0.1:{port}"
    out = tmp_path / "labelling"
    agent.start()
    try:
        assert "captures-cam" in agent.supervisor.threads()
        wait_for(lambda: len(listing(url)) >= 3, timeout=60, what="captures listed")
        figures = agent.build_telemetry().pipelines["cam"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [sys.executable, "-m", "fleet.cli", "captures", "fetch", "--url", url,
             "-o", str(out), "--delete", "--json"],
            capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        after = {(r["pipeline"], r["file"]) for r in listing(url)}
    finally:
        agent.stop()
    assert figures.captured >= 3 and figures.capture_errors == 0
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["fetched"]) >= 3 and report["deleted"] == report["fetched"]
    for key in report["fetched"]:
        pipeline, name = key.split("/")
        image = (out / pipeline / name).read_bytes()
        sidecar = json.loads((out / pipeline / (Path(name).stem + ".json")).read_text())
        assert hashlib.sha256(image).hexdigest() == sidecar["sha256"]
        assert sidecar["confidence"] < 0.995 and sidecar["result"]["model"] == "digits"
        assert (pipeline, name) not in after  # deleted on the device
    assert time.time() - sidecar["captured_at"] < 600
