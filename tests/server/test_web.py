"""The dashboard's pages, fragments, actions and live stream, over a real uvicorn with
urllib-level requests (the browser tests drive Chromium against the same hooks)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import re
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlencode

import pytest
from sqlalchemy import select

import fleet.server.web
from agent.models.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
    load_private_key,
    sign_manifest,
    write_bundle,
)
from fleet.server.api.deps import COOKIE
from fleet.server.db import Database
from fleet.server.db.schema import (
    AuditEntry,
    BundleRecord,
    CommandRecord,
    Device,
    DeviceModel,
    DevicePipeline,
    ReplyRecord,
    Rollout,
    RolloutDevice,
    TelemetryMinute,
)
from tests.fleet_support import make_bundle, manifest_of
from tests.server.api_support import Answer, ApiServer, add_device

MODEL = bytes(range(256)) * 40
NAV = {
    "/": "Overview",
    "/devices": "Devices",
    "/rollouts": "Rollouts",
    "/models": "Models",
    "/audit": "Audit",
}


class Doc(HTMLParser):
    """A page's start tags with their attributes, and the text of each element."""

    VOID = frozenset({"input", "br", "meta", "link", "img", "hr", "source", "col", "wbr"})

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self._open: list[tuple[str, list[str]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        text: list[str] = []
        self.elements.append((tag, {k: v or "" for k, v in attrs}, text))
        if tag not in self.VOID:
            self._open.append((tag, text))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, text in self._open:
            text.append(data)

    def all(self, tag: str = "", **attrs: str | None) -> list[tuple[dict[str, str], str]]:
        """Elements of ``tag`` (any when empty) with these attributes (None: present)."""
        out = []
        for t, a, text in self.elements:
            if tag and t != tag:
                continue
            wanted = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
            if all(k in a and (v is None or a[k] == v) for k, v in wanted.items()):
                out.append((a, " ".join("".join(text).split())))
        return out

    def one(self, tag: str = "", **attrs: str | None) -> str:
        found = self.all(tag, **attrs)
        assert len(found) == 1, f"{tag} {attrs}: {len(found)} found"
        return found[0][1]


@pytest.fixture
def api(database: Database, tmp_path: Path) -> Iterator[ApiServer]:
    server = ApiServer(database, tmp_path).start()
    yield server
    server.stop()


def get(api: ApiServer, path: str, token: str | None = None) -> Answer:
    headers = {"Cookie": f"{COOKIE}={token}"} if token else {}
    return api.request("GET", path, headers=headers)


def page(api: ApiServer, path: str, token: str) -> Doc:
    answer = get(api, path, token)
    assert answer.status == 200, (path, answer.status, answer.body[:300])
    return Doc(answer.body.decode())


def post(
    api: ApiServer,
    path: str,
    token: str | None,
    fields: dict[str, str] | None = None,
    origin: str | None = "same",
) -> Answer:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if token:
        headers["Cookie"] = f"{COOKIE}={token}"
    if origin is not None:
        headers["Origin"] = api.url if origin == "same" else origin
    return api.request("POST", path, data=urlencode(fields or {}).encode(), headers=headers)


def upload_form(api: ApiServer, bundle: Path, token: str, skip: str = "") -> Answer:
    files = {"manifest": MANIFEST_FILE, "signature": SIGNATURE_FILE, "model": MODEL_FILE}
    body = b""
    for field, name in files.items():
        path = bundle / name
        if field == skip or not path.exists():
            continue
        body += (
            (
                f'--xyz\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + path.read_bytes()
            + b"\r\n"
        )
    body += b"--xyz--\r\n"
    headers = {
        "Content-Type": "multipart/form-data; boundary=xyz",
        "Cookie": f"{COOKIE}={token}",
        "Origin": api.url,
    }
    return api.request("POST", "/models", data=body, headers=headers)


def small_fleet(api: ApiServer) -> None:
    add_device(api.database, "cam-a", groups=("door",), models={"digits": "2"}, fps=9.5, p95=12)
    add_device(api.database, "cam-b", groups=("door",), models={"digits": "1"}, fps=8.0, p95=30)
    add_device(
        api.database,
        "cam-c",
        online=False,
        status="offline",
        groups=("lab",),
        models={"digits": "1"},
        last_seen=900_000.0,
    )
    add_device(api.database, "cam-d", status="degraded", groups=("lab",), models={"digits": "2"})


def store_bundle(api: ApiServer, tmp: Path, version: str = "2") -> None:
    bundle = make_bundle(tmp / f"bundle-{version}", MODEL, version=version, keys=api.keys)
    assert upload_form(api, bundle, api.operator).status == 303


def new_rollout(api: ApiServer, **fields: str) -> Answer:
    form = {
        "bundle": "digits:2",
        "target_kind": "group",
        "target": "door",
        "canary": "1",
        "waves": "1",
        "max_failures": "0",
        "approval": "on",
        **fields,
    }
    return post(api, "/rollouts/new", api.operator, form)


# ----------------------------------------------------------------------- assets


def test_vendored_assets_match_their_sums_and_pages_load_nothing_from_elsewhere(
    api: ApiServer,
) -> None:
    vendor = Path(fleet.server.web.__file__).parent / "static" / "vendor"
    sums = dict(
        reversed(line.split("  ", 1)) for line in (vendor / "SHA256SUMS").read_text().splitlines()
    )
    assert set(sums) == {p.name for p in vendor.iterdir()} - {"SHA256SUMS"}
    for name, digest in sums.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
    assert {"htmx.LICENSE", "htmx-ext-sse.LICENSE", "uPlot.LICENSE"} <= set(sums)

    add_device(api.database, "cam-a")
    weight = 0
    for path in ("/login", "/", "/devices/cam-a"):
        doc = Doc(get(api, path, api.reader).body.decode())
        assets = [a["src"] for a, _ in doc.all("script")] + [a["href"] for a, _ in doc.all("link")]
        assert all(a.startswith("/static/") or a == "data:," for a in assets), assets
        for asset in assets:
            if asset.startswith("/static/"):
                answer = get(api, asset)  # public: the login page needs its style
                assert answer.status == 200, asset
                weight += len(answer.body) if path == "/" else 0
    assert weight < 150_000  # the overview's scripts and styles


# ------------------------------------------------------------------------- login


def test_login_sets_the_cookie_and_a_bad_token_is_refused(api: ApiServer) -> None:
    answer = get(api, "/devices")
    assert answer.status == 303 and answer.headers["location"] == "/login"
    form = Doc(get(api, "/login").body.decode())
    assert form.all("input", id="token") and form.all("button", type="submit")
    assert form.one("label", for_="token") == "API token"

    refused = post(api, "/login", None, {"token": "eft_wrong"})
    assert refused.status == 401 and COOKIE not in refused.headers.get("set-cookie", "")
    assert Doc(refused.body.decode()).one(role="alert") == "unknown or revoked token"
    # A login form sent from another site is refused too (login CSRF).
    assert post(api, "/login", None, {"token": api.operator}, "http://evil.test").status == 403

    ok = post(api, "/login", None, {"token": api.operator})
    assert ok.status == 303 and ok.headers["location"] == "/"
    cookie = ok.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={api.operator};")
    assert all(part in cookie for part in ("HttpOnly", "Path=/", "SameSite=strict"))
    assert "Secure" not in cookie  # plain http here

    out = post(api, "/logout", api.operator)
    assert out.status == 303 and f'{COOKIE}="";' in out.headers["set-cookie"]
    # An htmx request without a login is told where to go, not given the login page.
    hx = api.request("GET", "/ui/fragments/devices", headers={"HX-Request": "true"})
    assert hx.status == 401 and hx.headers["hx-redirect"] == "/login"


# ------------------------------------------------------------------------- pages


def test_pages_render_for_operator_and_reader_and_only_operators_get_actions(
    api: ApiServer, tmp_path: Path
) -> None:
    small_fleet(api)
    store_bundle(api, tmp_path)
    rollout = new_rollout(api).headers["location"]
    paths = ["/", "/devices", "/devices/cam-a", "/rollouts", rollout, "/models", "/audit"]
    for token, who in ((api.operator, "ops (operator)"), (api.reader, "viewer (read)")):
        for path in paths:
            answer = get(api, path, token)
            assert answer.status == 200, path
            doc = Doc(answer.body.decode())
            nav = re.search(r'<nav aria-label="Main">.*?</nav>', answer.body.decode(), re.S)
            assert nav is not None, path
            links = {a["href"]: text for a, text in Doc(nav.group(0)).all("a")}
            assert links == NAV, path
            assert doc.one(data_testid="whoami") == who
            body = doc.all("body", sse_connect=None)
            assert body and body[0][0]["data-live"] == "off"  # app.js turns it on
            assert body[0][0]["sse-connect"] == "/ui/events" + (
                "?device=cam-a"
                if path == "/devices/cam-a"
                else f"?rollout={rollout.rsplit('/', 1)[1]}"
                if path == rollout
                else ""
            )
            actions = doc.all(data_action=None)
            assert bool(actions) == (
                token == api.operator
                and path not in ("/", "/devices", "/rollouts", "/models", "/audit")
            ), (path, actions)
        assert page(api, "/rollouts", token).all("a", href="/rollouts/new") == (
            [({"href": "/rollouts/new", "class": "button"}, "New rollout")]
            if token == api.operator
            else []
        )
        assert bool(page(api, "/models", token).all("form", data_testid="upload")) == (
            token == api.operator
        )
    assert get(api, "/rollouts/new", api.reader).status == 403
    missing = get(api, "/devices/cam-zz", api.reader)
    assert missing.status == 404
    assert Doc(missing.body.decode()).one(role="alert") == "unknown device 'cam-zz'"
    assert get(api, "/rollouts/r-nothing", api.reader).status == 404
    assert post(api, "/ui/devices/cam-a/command", api.reader, {"op": "ping"}).status == 403
    assert not api.sender.sent


def test_every_page_has_its_hooks(api: ApiServer, tmp_path: Path) -> None:
    small_fleet(api)
    store_bundle(api, tmp_path)
    rollout = new_rollout(api).headers["location"]
    rollout_id = rollout.rsplit("/", 1)[1]
    op = api.operator

    doc = page(api, "/", op)
    counts = {
        k: doc.one(data_testid=f"count-{k}") for k in ("online", "offline", "degraded", "updating")
    }
    assert counts == {"online": "3", "offline": "1", "degraded": "1", "updating": "0"}
    assert doc.all("table", data_testid="versions")
    assert doc.all("tr", data_model="digits", data_version="2")
    counts_of = [t for a, t in doc.all("td") if "count" in a.get("class", "").split()]
    assert counts_of == ["2", "2"]  # digits 1: cam-b, cam-c; digits 2: cam-a, cam-d
    assert doc.all("ul", data_testid="rollouts-active")
    item = doc.all("li", data_rollout=rollout_id)
    assert item and doc.all("progress", value="0", max="2")
    problems = [a["data-device"] for a, _ in doc.all("li", data_device=None)]
    assert problems[0] == "cam-c"

    doc = page(api, "/devices", op)
    for tag, name in (
        ("select", "status"),
        ("input", "q"),
        ("select", "group"),
        ("input", "model"),
        ("input", "version"),
        ("select", "sort"),
    ):
        assert doc.all(tag, name=name), name
    assert doc.one(data_testid="devices-total") == "4"
    assert doc.all("table", data_testid="devices")
    assert [a["data-device"] for a, _ in doc.all("tr", data_device=None)] == [
        "cam-a",
        "cam-b",
        "cam-c",
        "cam-d",
    ]
    classes = [a["class"].split() for a, _ in doc.all("td", class_=None)]
    for cls in ("status", "fps", "p95", "last-seen", "spark"):
        assert sum(cls in c for c in classes) == 4, cls
    assert len(doc.all("polyline")) == 0  # no telemetry yet: empty sparklines
    assert doc.one(data_testid="page") == "page 1 of 1"

    doc = page(api, "/devices/cam-a", op)
    for hook in (
        "device-state",
        "chart-fps",
        "chart-latency",
        "chart-errors",
        "commands",
        "versions",
        "action-result",
    ):
        assert doc.all(data_testid=hook), hook
    assert {o["value"] for o, _ in doc.all("option") if "data-seconds" in o} == {
        "1h",
        "6h",
        "24h",
        "7d",
    }
    assert doc.all("select", name="range")
    for action in ("ping", "status", "restart", "rollback"):
        assert doc.all("button", data_action=action), action
    assert doc.all("select", name="pipeline") and doc.all("select", name="model")
    assert doc.all("input", name="to_version") and doc.all("dialog")
    assert doc.all("button", data_confirm=None)
    assert doc.all("form", data_action="config")
    assert doc.all("input", name="key") and doc.all("input", name="value")

    doc = page(api, "/rollouts/new", op)
    assert {o["value"] for o, _ in doc.all("option") if ":" in o.get("value", "")} == {"digits:2"}
    for tag, name in (
        ("select", "bundle"),
        ("select", "target_kind"),
        ("input", "target"),
        ("input", "canary"),
        ("input", "waves"),
        ("input", "max_failures"),
    ):
        assert doc.all(tag, name=name), name
    assert doc.all("input", name="approval", type="checkbox")

    doc = page(api, rollout, op)
    assert doc.one(data_testid="rollout-state") == "running"
    assert doc.all("li", data_wave="0") and doc.all("li", data_wave="1")
    assert len(doc.all("progress")) == 2
    rows = {a["data-device"]: t for a, t in doc.all("tr", data_device=None)}
    assert set(rows) == {"cam-a", "cam-b"}
    assert [a["data-action"] for a, _ in doc.all("button", data_action=None)] == ["pause", "abort"]
    assert doc.all("td", class_="code") and doc.all("td", class_="detail")

    doc = page(api, "/models", op)
    row = doc.one("tr", data_bundle="digits:2")
    assert "int8" in row and "input int8 [1, 8, 8, 1]" in row
    for name in ("manifest", "signature", "model"):
        assert doc.all("input", name=name, type="file")

    doc = page(api, "/audit?actor=ops&action=rollout", op)
    assert doc.all("input", name="actor") and doc.all("input", name="action")
    rows = [t for a, t in doc.all("tr") if "rollout.create" in t]
    assert len(rows) == 1 and rollout_id in rows[0]
    assert not [t for a, t in doc.all("tr") if "bundle.upload" in t]


def test_devices_page_pages_and_filters_a_few_hundred_rows(api: ApiServer) -> None:
    with api.database.session() as s:
        for i in range(300):
            s.add(
                Device(
                    id=f"cam-{i:03d}",
                    first_seen=0,
                    last_seen=1_000_000.0 + i,
                    online=i % 3 != 0,
                    status=("offline", "ok", "degraded")[i % 3],
                    fps=float(i % 50),
                    invoke_p95_ms=float(i),
                )
            )
    doc = page(api, "/devices", api.reader)
    assert doc.one(data_testid="devices-total") == "300"
    assert len(doc.all("tr", data_device=None)) == 50
    assert doc.one(data_testid="page") == "page 1 of 6"
    assert not doc.all("a", rel="prev")
    next_link = doc.all("a", rel="next")[0][0]["href"]
    assert next_link == "/devices?page=2"

    doc = page(api, "/devices?page=6", api.reader)
    assert [a["data-device"] for a, _ in doc.all("tr", data_device=None)][-1] == "cam-299"
    assert doc.one(data_testid="page") == "page 6 of 6" and not doc.all("a", rel="next")

    doc = page(api, "/devices?status=degraded&sort=-invoke_p95_ms&per_page=20", api.reader)
    assert doc.one(data_testid="devices-total") == "100"
    ids = [a["data-device"] for a, _ in doc.all("tr", data_device=None)]
    assert ids[:2] == ["cam-299", "cam-296"] and len(ids) == 20
    assert {t for a, t in doc.all("td") if "status" in a.get("class", "").split()} == {"degraded"}
    assert doc.all("a", rel="next")[0][0]["href"] == (
        "/devices?status=degraded&sort=-invoke_p95_ms&per_page=20&page=2"
    )
    doc = page(api, "/devices?q=cam-01&status=", api.reader)
    assert doc.one(data_testid="devices-total") == "10"


def test_overview_lists_problems_worst_first(api: ApiServer) -> None:
    # A fixed instant in the middle of a minute: the page's "recent" window is counted in
    # whole minutes, and a minute that turned between here and the request moved a row.
    now = (int(time.time() // 60) * 60) + 30.0
    api.ctx.clock = lambda: now
    minute = int(now // 60)
    add_device(api.database, "old-off", online=False, status="offline", last_seen=now - 9000)
    add_device(api.database, "new-off", online=False, status="offline", last_seen=now - 60)
    for name in ("trial", "source", "drops", "slow", "fine"):
        add_device(api.database, name, models={"digits": "2"}, last_seen=now)
    with api.database.session() as s:
        row = s.get(DeviceModel, ("trial", "digits"))
        assert row is not None
        row.status, row.message = "serving", "2 failed probation: invoke errors; back on 1"
        for m in range(10):
            recent = m < 3  # RECENT_MIN
            for device in ("source", "drops", "slow", "fine"):
                s.add(TelemetryMinute(
                    device_id=device, pipeline="", minute=minute - m, samples=1,
                    fps_sum=5.0, latency_samples=1,
                    invoke_p95_sum=40.0 if device == "slow" and recent else 10.0,
                    source_failures=(10 - m) if device == "source" else 0,
                    outbox_dropped=(10 - m) * 5 if device == "drops" else 0,
                ))  # fmt: skip
    doc = page(api, "/", api.reader)
    listed = [(a["data-device"], a["class"]) for a, _ in doc.all("li", data_device=None)]
    assert listed == [
        ("old-off", "problem-offline"),
        ("new-off", "problem-offline"),
        ("trial", "problem-probation"),
        ("source", "problem-source"),
        ("drops", "problem-outbox"),
        ("slow", "problem-latency"),
    ]
    assert "rose from 10.0 to 40.0 ms" in doc.one("li", data_device="slow")
    assert "45 outbox message(s) dropped" in doc.one("li", data_device="drops")


WARNING = '<script>alert("x")</script> PSI 0.41 over 0.25 since 12:00:03'


def drifting_fleet(api: ApiServer, warning: str = WARNING) -> None:
    """``drifting`` (its door pipeline carries ``warning``) and ``fine``, as ingest
    leaves them."""
    for name in ("drifting", "fine"):
        add_device(api.database, name, models={"digits": "2"}, last_seen=time.time())
    with api.database.session() as s:
        for name, drift in (("drifting", warning), ("fine", None)):
            s.add(DevicePipeline(device_id=name, pipeline="door", status="running", drift=drift))
            row = s.get(Device, name)
            assert row is not None and row.state is not None
            pipes = [{"name": "door", "model": "digits", "status": "running"}]
            if drift:
                pipes[0]["drift"] = drift
            row.state = {**row.state, "pipelines": pipes}
            row.telemetry = {"pipelines": {"door": {"fps": 5.0, "drift": 0.41 if drift else None}}}


def test_the_overview_lists_devices_whose_pipelines_drift(api: ApiServer) -> None:
    drifting_fleet(api)
    doc = page(api, "/", api.reader)
    listed = [(a["data-device"], a["class"]) for a, _ in doc.all("li", data_device=None)]
    assert listed == [("drifting", "problem-drift")]
    assert doc.one("li", data_device="drifting").startswith("drifting drift: door: <script>")
    overview = get(api, "/ui/fragments/overview", api.reader).body.decode()
    assert "<script>alert" not in overview and "drift: door: &lt;script&gt;" in overview


def test_the_device_page_shows_the_drift_warning_escaped_and_a_drift_chart(
    api: ApiServer,
) -> None:
    drifting_fleet(api)
    answer = get(api, "/devices/drifting", api.reader)
    body = answer.body.decode()
    assert "<script>alert" not in body and "&lt;script&gt;alert(&#34;x&#34;)" in body
    doc = Doc(body)
    assert doc.one("td", data_testid="drift-warning") == WARNING
    assert doc.one("td", class_="num drift") == "0.41"
    assert doc.all(data_testid="chart-drift", data_chart="drift")
    doc = page(api, "/devices/fine", api.reader)
    assert doc.one("td", data_testid="drift-warning") == ""


def test_a_fragment_returns_rows(api: ApiServer) -> None:
    small_fleet(api)
    doc = page(api, "/ui/fragments/devices?status=offline", api.reader)
    assert not doc.all("nav", **{"aria-label": "Main"})  # a fragment, not a page
    assert [a["data-device"] for a, _ in doc.all("tr", data_device=None)] == ["cam-c"]
    assert doc.one("td", class_="status status-offline") == "offline"
    doc = page(api, "/ui/fragments/overview", api.reader)
    assert doc.one(data_testid="count-offline") == "1"


# ----------------------------------------------------------------------- writes


def test_a_cookie_write_must_come_from_this_server(api: ApiServer) -> None:
    small_fleet(api)
    body = b'{"op": "ping", "device": "cam-a"}'

    def command(headers: dict[str, str]) -> int:
        headers = {"Content-Type": "application/json", **headers}
        return api.request("POST", "/api/commands", data=body, headers=headers).status

    cookie = {"Cookie": f"{COOKIE}={api.operator}"}
    assert command(cookie) == 403
    assert command({**cookie, "Origin": "http://evil.test"}) == 403
    assert command({**cookie, "Referer": "http://evil.test/devices/cam-a"}) == 403
    assert command({**cookie, "Origin": api.url}) == 202
    assert command({**cookie, "Referer": f"{api.url}/devices/cam-a"}) == 202
    assert command({"Authorization": f"Bearer {api.operator}"}) == 202  # unchanged
    assert command({"Cookie": f"{COOKIE}=eft_unknown", "Origin": api.url}) == 401
    assert post(api, "/ui/devices/cam-a/command", api.operator, {"op": "ping"}, None).status == 403
    assert len(api.sender.sent) == 3


def test_device_actions_send_commands_and_show_the_outcome(api: ApiServer) -> None:
    small_fleet(api)
    done = post(api, "/ui/devices/cam-a/command", api.operator, {"op": "ping"})
    assert done.status == 200
    text = Doc(done.body.decode()).one("p")
    assert text.startswith("ping sent to cam-a (command ping-") or "ping sent to cam-a" in text
    post(
        api,
        "/ui/devices/cam-a/command",
        api.operator,
        {"op": "config", "key": "pipelines.door.threshold", "value": "0.6"},
    )
    post(
        api,
        "/ui/devices/cam-a/command",
        api.operator,
        {"op": "rollback", "model": "digits", "to_version": "1"},
    )
    refused = post(api, "/ui/devices/cam-a/command", api.operator, {"op": "config", "key": ""})
    assert "changes" in Doc(refused.body.decode()).one(role="alert")
    sent = [(d, c.op, c.model_dump(exclude_none=True)) for d, c in api.sender.sent]
    assert [op for _, op, _ in sent] == ["ping", "config", "rollback"]
    assert sent[1][2]["changes"] == {"pipelines.door.threshold": 0.6}
    assert (sent[2][2]["model"], sent[2][2]["to_version"]) == ("digits", "1")
    with api.database.session() as s:
        actions = [e.action for e in s.scalars(select(AuditEntry).order_by(AuditEntry.id))]
    assert actions == ["command.ping", "command.config", "command.rollback"]
    doc = page(api, "/ui/fragments/devices/cam-a", api.reader)
    assert len(doc.all("tr", data_command=None)) == 3


def test_rollouts_are_created_and_steered_from_the_pages(api: ApiServer, tmp_path: Path) -> None:
    small_fleet(api)
    store_bundle(api, tmp_path)
    bad = new_rollout(api, canary="lots")
    assert bad.status == 422
    assert Doc(bad.body.decode()).one(role="alert").startswith("canary: ")
    unknown = new_rollout(api, bundle="digits:9")
    assert "9" in Doc(unknown.body.decode()).one(role="alert")

    made = new_rollout(api)
    assert made.status == 303 and made.headers["location"].startswith("/rollouts/r-")
    rid = made.headers["location"].rsplit("/", 1)[1]
    paused = post(api, f"/ui/rollouts/{rid}/pause", api.operator)
    doc = Doc(paused.body.decode())
    assert doc.one(data_testid="rollout-state") == "paused"
    assert [a["data-action"] for a, _ in doc.all("button", data_action=None)] == ["resume", "abort"]
    again = Doc(post(api, f"/ui/rollouts/{rid}/pause", api.operator).body.decode())
    assert again.one(role="alert").startswith("state: cannot pause")
    post(api, f"/ui/rollouts/{rid}/resume", api.operator)
    doc = Doc(post(api, f"/ui/rollouts/{rid}/abort", api.operator).body.decode())
    assert doc.one(data_testid="rollout-state") == "aborted"
    assert not doc.all("button", data_action=None)
    with api.database.session() as s:
        actions = [e.action for e in s.scalars(select(AuditEntry).order_by(AuditEntry.id))]
    assert actions == [
        "bundle.upload",
        "rollout.create",
        "rollout.pause",
        "rollout.resume",
        "rollout.abort",
    ]


def test_the_new_rollout_form_sets_shadow_and_min_agreement(api: ApiServer, tmp_path: Path) -> None:
    small_fleet(api)
    store_bundle(api, tmp_path)
    form = Doc(get(api, "/rollouts/new", api.operator).body.decode())
    assert form.all("select", name="shadow") and form.all("input", name="min_agreement")
    bad = new_rollout(api, min_agreement="1.5")
    assert bad.status == 422
    assert Doc(bad.body.decode()).one(role="alert").startswith("min_agreement: ")
    assert new_rollout(api, shadow="maybe").status == 422
    with api.database.session() as s:
        assert s.scalars(select(Rollout)).all() == []

    made = new_rollout(api, shadow="off", min_agreement="0.9")
    assert made.status == 303
    page = Doc(get(api, made.headers["location"], api.reader).body.decode())
    assert page.one(data_testid="rollout-checks") == "shadow off, min agreement 0.9"
    plain = new_rollout(api, target="lab")
    page = Doc(get(api, plain.headers["location"], api.reader).body.decode())
    assert page.one(data_testid="rollout-checks") == (
        "shadow each device's config, min agreement each device's config"
    )
    with api.database.session() as s:
        rows = {r.target: (r.shadow, r.min_agreement) for r in s.scalars(select(Rollout))}
    assert rows == {"door": (False, 0.9), "lab": (None, None)}


def test_models_upload_stores_a_signed_bundle_and_refuses_a_bad_one(
    api: ApiServer, tmp_path: Path
) -> None:
    unsigned = make_bundle(tmp_path / "unsigned", MODEL, version="3", keys=None)
    refused = upload_form(api, unsigned, api.operator)
    assert refused.status == 422
    assert Doc(refused.body.decode()).one(role="alert").startswith("bundle refused: ")
    signed = make_bundle(tmp_path / "signed", MODEL, version="3", keys=api.keys)
    missing = upload_form(api, signed, api.operator, skip="model")
    assert (
        Doc(missing.body.decode()).one(role="alert") == "form field 'model' missing (model.tflite)"
    )
    assert upload_form(api, signed, api.operator).status == 303
    with api.database.session() as s:
        assert [(b.name, b.version) for b in s.scalars(select(BundleRecord))] == [("digits", "3")]
    add_device(api.database, "cam-x", models={"digits": "3"})
    assert page(api, "/models", api.reader).one("td", class_="running num") == "1"


def test_models_page_shows_golden_samples_and_reference_in_a_few_words(
    api: ApiServer, tmp_path: Path
) -> None:
    manifest = manifest_of(MODEL, version="5")
    golden_data = base64.b64encode(bytes(range(64))).decode()
    tensor = {"dtype": "int8", "shape": [1, 8, 8, 1], "data": golden_data}
    manifest["golden"] = {
        "runtime": "ai_edge_litert 2.3.0",
        "tolerance_steps": 4.0,
        "samples": [{"inputs": [tensor], "outputs": [{**tensor, "shape": [1, 64]}]}] * 3,
    }
    manifest["reference"] = {
        "samples": 360,
        "classify": {
            "classes": 2,
            "top1_freq": [0.5, 0.5],
            "confidence": {"edges": [0.9], "freq": [0.5, 0.5]},
            "confidence_quantiles": [0.8, 0.9, 0.95],
        },
    }
    key = load_private_key(api.keys.private)
    bundle = write_bundle(tmp_path / "b", MODEL, manifest, sign_manifest(manifest, key))
    assert upload_form(api, bundle, api.operator).status == 303
    answer = get(api, "/models", api.reader)
    assert golden_data not in answer.body.decode()  # kilobytes of base64 stay out
    health = Doc(answer.body.decode()).one("td", class_="health")
    assert "reference: classify, 360 samples" in health
    assert "golden: 3 samples, ±4 steps" in health


# ------------------------------------------------------------------------- live


def test_the_event_stream_says_when_a_device_or_rollout_changes(
    api: ApiServer, tmp_path: Path
) -> None:
    small_fleet(api)
    store_bundle(api, tmp_path)
    rid = new_rollout(api).headers["location"].rsplit("/", 1)[1]
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    watch = f"/ui/events?device=cam-a&device=cam-b&rollout={rid}"
    conn.request("GET", watch, headers={"Cookie": f"{COOKIE}={api.reader}"})
    stream = conn.getresponse()
    try:
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.readline().startswith(b"retry:")  # sent at once: the page goes live

        def next_events(want: str) -> list[str]:
            seen: list[str] = []
            while want not in seen:
                line = stream.readline()  # the 10 s socket timeout guards a hang
                assert line, "stream ended"
                if line.startswith(b"event: "):
                    seen.append(line[7:].decode().strip())
            return seen

        # At once, every event the page listens to: what changed between the page's
        # rendering and the stream's opening is fetched again.
        opening = next_events(f"rollout-{rid}")
        assert opening == ["devices", "rollouts", "device-cam-a", "device-cam-b", f"rollout-{rid}"]

        with api.database.session() as s:
            device = s.get(Device, "cam-b")
            assert device is not None
            device.online, device.status, device.state_ts = False, "offline", 2_000_000.0
        events = next_events("device-cam-b")
        assert "devices" in events and "device-cam-a" not in events
        assert not [e for e in events if e.startswith("rollout")]

        with api.database.session() as s:
            row = s.get(RolloutDevice, (rid, "cam-a"))
            assert row is not None
            row.status, row.updated_at = "sent", row.updated_at + 1
        events = next_events(f"rollout-{rid}")
        assert "rollouts" in events and "devices" not in events

        # A reply to one of the rollout's commands (a stage: downloading, probation...)
        # moves its page before the row's updated_at does.
        with api.database.session() as s:
            s.add(
                CommandRecord(
                    id="dep-live", device_id="cam-a", op="deploy", body={}, rollout_id=rid,
                    created_at=1.0, created_by="reconciler", status="accepted", message="",
                )
            )  # fmt: skip
        next_events("devices")  # the command's own creation
        with api.database.session() as s:
            s.add(
                ReplyRecord(
                    command_id="dep-live", device_id="cam-a", status="progress",
                    code="in_progress", stage="probation", message="", ts=4e6, received_at=4e6,
                )
            )  # fmt: skip
        events = next_events(f"rollout-{rid}")
        assert "rollouts" in events

        add_device(api.database, "cam-e", last_seen=3e6)  # unwatched: the collective event
        assert next_events("devices") == ["devices"]
        # A stopping server ends its streams (uvicorn waits for open responses).
        api.app.state.stopping.set()
        while stream.readline():
            pass
    finally:
        conn.close()
