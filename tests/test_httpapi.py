"""The local predict API against a real loaded model."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.models.runtime import load_model
from agent.ops.httpapi import HttpApi, Predictor


class Catalog:
    def __init__(self, path: Path) -> None:
        self.versions = {"digits": ("1", path)}
        self.healthy = True

    def active(self, name: str) -> tuple[str, Path] | None:
        return self.versions.get(name)

    def health(self) -> tuple[bool, dict[str, Any]]:
        return self.healthy, {"pipelines": {"main": "running" if self.healthy else "degraded"}}


@pytest.fixture
def api(tiny_int8_model: Path) -> Iterator[tuple[HttpApi, Catalog]]:
    catalog = Catalog(tiny_int8_model)
    server = HttpApi("127.0.0.1", 0, Predictor(catalog, lambda p: load_model(p)))
    server.start()
    yield server, catalog
    server.stop()


def call(server: HttpApi, path: str, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=body)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_predict_matches_a_direct_invoke(
    api: tuple[HttpApi, Catalog], tiny_int8_model: Path
) -> None:
    server, _ = api
    x = np.random.default_rng(0).random((2, 8, 8, 1)).astype(np.float32)
    status, body = call(
        server, "/v1/models/digits:predict", json.dumps({"instances": x.tolist()}).encode()
    )
    assert status == 200, body
    assert body["model_version"] == "1" and len(body["predictions"]) == 2
    m = load_model(tiny_int8_model)
    i, o = m.inputs[0], m.outputs[0]
    q = np.clip(np.round(x[1:2] / i.scale + i.zero_point), -128, 127).astype(np.int8)
    m.interpreter.set_tensor(i.index, q)
    m.interpreter.invoke()
    expect = (m.interpreter.get_tensor(o.index).astype(np.float32) - o.zero_point) * o.scale
    assert np.allclose(body["predictions"][1], expect[0], atol=1e-5)


def test_status_and_health(api: tuple[HttpApi, Catalog]) -> None:
    server, catalog = api
    status, body = call(server, "/v1/models/digits")
    assert status == 200 and body["model_version_status"][0]["version"] == "1"
    assert call(server, "/healthz")[0] == 200
    catalog.healthy = False
    status, body = call(server, "/healthz")
    assert status == 503 and body["pipelines"]["main"] == "degraded"


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v1/models/nope:predict", b'{"instances": [1]}', 404, "no active version"),
        ("/v1/models/digits:predict", b"{broken", 400, "not valid JSON"),
        ("/v1/models/digits:predict", b'{"inputs": []}', 400, '"instances"'),
        (
            "/v1/models/digits:predict",
            b'{"instances": [[1, 2, 3]]}',
            400,
            "does not fit input shape",
        ),
        ("/v1/models/digits:predict", b'{"instances": []}', 400, "non-empty"),
        ("/v2/other", None, 404, "no such endpoint"),
    ],
)
def test_malformed_requests_get_a_4xx_with_a_reason(
    api: tuple[HttpApi, Catalog], path: str, body: bytes | None, status: int, words: str
) -> None:
    server, _ = api
    got, reply = call(server, path, body)
    assert got == status and words in reply["error"]
    # And the server still answers afterwards.
    assert call(server, "/v1/models/digits")[0] == 200
