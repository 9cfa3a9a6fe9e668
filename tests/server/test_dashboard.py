"""The dashboard in a real Chromium against a real ``edge-fleet server``, a real broker,
simulated devices and one real agent: the issue's browser tests, written to the page
contract of /work/brief/dashboard.md (the hooks: ``data-testid``, ``data-device``, ...).

One Chromium for the session (tests/server/browser_support.py), a new context and page
per test; a test that fails leaves ``failure.png`` (the whole page) in its tmp dir.
Most tests share one server (``dash``) whose simulated devices are split into groups,
one group per test that changes devices, so they leave each other alone; the 10,000
devices and the real agent get servers of their own.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from playwright.sync_api import Browser, Locator, Page, expect

from agent.live import LiveConfig
from agent.models import manifest as mf
from agent.protocol import ReplyCode
from agent.service import Agent
from fleet.sim import SimFleet
from tests.fleet_support import make_bundle, make_keys
from tests.lifecycle_support import manifest_for
from tests.mqtt_support import Broker
from tests.server.browser_support import (
    CHROMIUM_ENV,
    VIEWPORT,
    Dashboard,
    chromium,
    login,
    seed_devices,
)
from tests.server.server_support import ROOT, wait_until
from tests.server.test_server_agents import agent_config

PREFIX = "dash"
# Simulated devices of the shared server, by group. The door devices take a second per
# deploy stage and four for probation, so that a browser polling live sees the canary's
# probation even on a loaded machine.
GROUPS = {"door": 4, "lab": 3, "yard": 2, "spare": 2}
STEP_DELAY_S = {"door": 1.0}
PROBATION_S = {"door": 4.0}
LIVE_BOUND_MS = 2_000  # the issue: a change reaches the page within 2 s
NO_ACTIONS_PAGES = ("/", "/devices", "/rollouts", "/models", "/audit")

expect.set_options(timeout=5_000)

# Records every device status a rollout or device table shows, however briefly, so a
# stage that lasts a second is seen even if the test looks a moment later.
STATUS_RECORDER = """
window.__statuses = [];
new MutationObserver(() => {
  for (const td of document.querySelectorAll('tr[data-device] td.status')) {
    const seen = td.closest('tr').dataset.device + ' ' + td.textContent.trim();
    if (!window.__statuses.includes(seen)) window.__statuses.push(seen);
  }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""
# Non-transparent pixels on a chart's canvas (uPlot draws axes and series there).
CANVAS_INK = """
(el) => {
  const c = el.querySelector('canvas');
  if (!c || !c.width || !c.height) return 0;
  const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let ink = 0;
  for (let i = 3; i < px.length; i += 4) if (px[i]) ink++;
  return ink;
}
"""


# -------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser: Browser, tmp_path: Path, failed_so_far: Callable[[], bool]) -> Iterator[Page]:
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(10_000)
    yield page
    if failed_so_far():
        shot = tmp_path / "failure.png"
        try:
            page.screenshot(path=shot, full_page=True)
            print(f"screenshot of the failure: {shot} (at {page.url})")
        except Exception as exc:  # the page may be what broke
            print(f"no screenshot of the failure: {exc}")
    context.close()


class Fleets:
    """One SimFleet per group of the shared server, found by device id."""

    def __init__(self, broker: Broker) -> None:
        self.by_group = {group: self._fleet(broker, group, n) for group, n in GROUPS.items()}

    @staticmethod
    def _fleet(broker: Broker, group: str, n: int) -> SimFleet:
        return SimFleet(
            broker.host, broker.port, devices=[f"{group}-{i}" for i in range(n)],
            prefix=PREFIX, groups=[group], interval_s=1.0,
            step_delay_s=STEP_DELAY_S.get(group, 0.05), probation_s=PROBATION_S.get(group),
            fetch_artifacts=True,
        )  # fmt: skip

    def __getitem__(self, device: str) -> SimFleet:
        return self.by_group[device.rsplit("-", 1)[0]]

    @property
    def devices(self) -> list[str]:
        return [d for fleet in self.by_group.values() for d in fleet.devices]

    def online(self) -> int:
        return sum(self[d].online(d) for d in self.devices)

    def start(self) -> None:
        for fleet in self.by_group.values():
            fleet.start()

    def stop(self) -> None:
        for fleet in self.by_group.values():
            fleet.stop()


@pytest.fixture(scope="module")
def fleets(broker: Broker) -> Iterator[Fleets]:
    sims = Fleets(broker)
    sims.start()
    yield sims
    sims.stop()


@pytest.fixture(scope="module")
def dash(
    tmp_path_factory: pytest.TempPathFactory, broker: Broker, fleets: Fleets
) -> Iterator[Dashboard]:
    board = Dashboard(tmp_path_factory.mktemp("dashboard"), broker, PREFIX).start()
    try:
        api = board.api()
        total = len(fleets.devices)
        wait_until(lambda: api.devices(online=True)["total"] == total, 30, "devices online")
        board.upload_bundle("2")
        yield board
    finally:
        board.stop()


def rollout_id(page: Page) -> str:
    match = re.search(r"/rollouts/([^/?#]+)$", page.url)
    assert match and match.group(1) != "new", page.url
    return match.group(1)


def row(page: Page, device: str) -> Locator:
    return page.locator(f'tr[data-device="{device}"]')


# ----------------------------------------------------------------------------- tests


def test_ensure_chromium_accepts_an_executable_and_names_what_is_missing(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "ensure-chromium.sh"
    ok = subprocess.run([script], env={**os.environ, CHROMIUM_ENV: "/bin/true"},
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    missing = tmp_path / "no-chromium"
    refused = subprocess.run([script], env={**os.environ, CHROMIUM_ENV: str(missing)},
                             capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 1
    assert f"EDGE_TEST_CHROMIUM={missing} is not an executable file" in refused.stderr


def test_chromium_reaches_the_server(page: Page, dash: Dashboard) -> None:
    response = page.goto(dash.url + "/healthz")
    assert response is not None and response.status == 200, response
    assert "ok" in page.content()


def test_login_refuses_a_bad_token_and_lands_on_the_overview(page: Page, dash: Dashboard) -> None:
    page.goto(dash.url + "/devices")
    expect(page).to_have_url(dash.url + "/login")  # not logged in: sent to the form
    expect(page.get_by_label("API token")).to_be_visible()

    login(page, dash.url, "eft_not-a-token")
    expect(page.locator("[role=alert]")).to_contain_text("unknown or revoked token")
    expect(page).to_have_url(re.compile(r"/login$"))

    login(page, dash.url, dash.token)
    expect(page).to_have_url(dash.url + "/")
    whoami = page.locator("[data-testid=whoami]")
    expect(whoami).to_contain_text("admin")
    expect(whoami).to_contain_text("operator")
    nav = page.locator("nav")
    for name, href in (("Overview", "/"), ("Devices", "/devices"), ("Rollouts", "/rollouts"),
                       ("Models", "/models"), ("Audit", "/audit")):  # fmt: skip
        expect(nav.get_by_role("link", name=name, exact=True)).to_have_attribute("href", href)
    expect(page.locator("body")).to_have_attribute("data-live", "on")


def test_the_overview_counts_match_the_simulated_devices(
    page: Page, dash: Dashboard, fleets: Fleets
) -> None:
    login(page, dash.url, dash.token)
    total = len(fleets.devices)
    on_1 = sum(fleets[d].active(d) == "1" for d in fleets.devices)
    counts = {name: page.locator(f"[data-testid=count-{name}]") for name in
              ("online", "offline", "degraded", "updating")}  # fmt: skip
    expect(counts["online"]).to_have_text(str(fleets.online()))
    expect(counts["offline"]).to_have_text(str(total - fleets.online()))
    expect(counts["degraded"]).to_have_text("0")  # simulated devices never degrade
    expect(counts["updating"]).to_have_text("0")  # no rollout moves a device now
    versions = page.locator("[data-testid=versions]")
    expect(versions.locator('tr[data-model="digits"][data-version="1"] td.count')).to_have_text(
        str(on_1)
    )

    # A device goes away: the counts and the problems follow, without a reload.
    expect(page.locator("body")).to_have_attribute("data-live", "on")
    fleets["spare-1"].stop_device("spare-1")
    try:
        expect(counts["online"]).to_have_text(str(fleets.online()))
        expect(counts["offline"]).to_have_text(str(total - fleets.online()))
        problems = page.locator("[data-testid=problems]")
        expect(problems.locator('li[data-device="spare-1"]')).to_be_visible()
    finally:
        fleets["spare-1"].start_device("spare-1")


def test_a_device_that_goes_offline_turns_offline_in_the_list_within_2s(
    page: Page, dash: Dashboard, fleets: Fleets
) -> None:
    login(page, dash.url, dash.token)
    page.goto(dash.url + "/devices?group=lab")
    status = row(page, "lab-1").locator("td.status")
    expect(status).to_have_text("ok")
    expect(page.locator("body")).to_have_attribute("data-live", "on")
    page.evaluate("window.__not_reloaded = true")

    fleets["lab-1"].stop_device("lab-1")  # returns once the offline state is published
    try:
        expect(status).to_have_text("offline", timeout=LIVE_BOUND_MS)
        assert page.evaluate("window.__not_reloaded === true"), "the page was reloaded"
    finally:
        fleets["lab-1"].start_device("lab-1")
    expect(status).to_have_text("ok")


def test_a_canary_rollout_made_in_the_browser_passes_probation_live_and_is_approved(
    page: Page, dash: Dashboard, fleets: Fleets
) -> None:
    page.add_init_script(STATUS_RECORDER)
    login(page, dash.url, dash.token)
    page.goto(dash.url + "/rollouts")
    page.locator('a[href="/rollouts/new"]').click()
    expect(page).to_have_url(dash.url + "/rollouts/new")
    page.locator("select[name=bundle]").select_option("digits:2")
    page.locator("select[name=target_kind]").select_option("group")
    page.locator("input[name=target]").fill("door")
    page.locator("input[name=canary]").fill("1")
    page.locator("input[name=waves]").fill("1")
    page.locator("input[name=max_failures]").fill("0")
    page.locator("input[name=approval]").check()
    page.locator("select[name=shadow]").select_option("off")
    page.locator("input[name=min_agreement]").fill("0.9")
    # (Every page has a submit button of its own: log out.)
    page.locator("form", has=page.locator("select[name=bundle]")).locator(
        "button[type=submit]"
    ).click()
    expect(page).to_have_url(re.compile(r"/rollouts/[^/]+$"))
    rid = rollout_id(page)
    checks = page.locator("[data-testid=rollout-checks]")
    expect(checks).to_have_text("shadow off, min agreement 0.9")

    [canary] = [d["device"] for d in dash.api().rollout(rid)["devices"] if d["wave"] == 0]
    rest = sorted(set(fleets.by_group["door"].devices) - {canary})
    state = page.locator("[data-testid=rollout-state]")
    expect(state).to_have_text("waiting_approval", timeout=30_000)
    expect(row(page, canary).locator("td.status")).to_have_text("done")
    for device in rest:
        expect(row(page, device).locator("td.status")).to_have_text("waiting")
    expect(page.locator('[data-wave="0"] progress')).to_have_attribute("value", "1")
    expect(page.locator('[data-wave="1"] progress')).to_have_attribute("value", "0")
    seen = page.evaluate("window.__statuses")
    assert f"{canary} probation" in seen, f"the canary's probation never showed: {seen}"
    assert fleets[canary].active(canary) == "2"
    assert all(fleets[d].active(d) == "1" for d in rest), "a wave opened before approval"

    page.locator("button[data-action=approve]").click()
    expect(state).to_have_text("done", timeout=30_000)
    for device in rest:
        expect(row(page, device).locator("td.status")).to_have_text("done")
    expect(page.locator('[data-wave="1"] progress')).to_have_attribute("value", str(len(rest)))
    expect(page.locator("button[data-action=approve]")).to_have_count(0)  # nothing to approve
    assert all(fleets[d].active(d) == "2" for d in fleets.by_group["door"].devices)

    # Who did it, in the audit log, filtered.
    page.goto(dash.url + "/audit")
    page.locator("input[name=action]").fill("rollout.approve")
    page.locator("input[name=action]").press("Enter")
    audit_rows = page.locator("table[data-testid=audit] tbody tr")
    expect(audit_rows.filter(has_text=rid)).to_have_count(1)
    expect(audit_rows.filter(has_text="rollout.create")).to_have_count(0)
    expect(audit_rows.filter(has_text=rid)).to_contain_text("admin")


def test_a_device_that_fails_probation_shows_the_code_and_detail(
    page: Page, dash: Dashboard, fleets: Fleets
) -> None:
    detail = "p95 latency 3x the previous version"
    fleets["yard-0"].fail_deploys("yard-0", ReplyCode.PROBATION_FAILED, detail)
    api = dash.api()
    rollout = api.create_rollout(
        {"model": "digits", "version": "2", "group": "yard", "waves": 1, "max_failures": 0}
    )
    # What is shown of a failure, not how fast it shows (the other tests see to that).
    wait_until(lambda: api.rollout(rollout["id"])["state"] == "halted", 30, "the rollout halted")
    login(page, dash.url, dash.token)
    page.goto(f"{dash.url}/rollouts/{rollout['id']}")
    failed = row(page, "yard-0")
    expect(failed.locator("td.status")).to_have_text(re.compile(r"^(failed|given_up)$"))
    expect(failed.locator("td.code")).to_have_text("probation_failed")
    expect(failed.locator("td.detail")).to_contain_text(detail)
    expect(page.locator("[data-testid=rollout-state]")).to_have_text("halted")

    page.goto(dash.url + "/")  # a probation failure is a problem on the overview
    expect(page.locator('[data-testid=problems] li[data-device="yard-0"]')).to_be_visible()


def test_a_device_is_rolled_back_from_its_page_after_confirming(
    page: Page, dash: Dashboard, fleets: Fleets
) -> None:
    api = dash.api()
    rollout = api.create_rollout({"model": "digits", "version": "2", "device": "lab-0"})
    wait_until(lambda: api.rollout(rollout["id"])["state"] == "done", 30, "lab-0 on 2")
    assert fleets["lab-0"].active("lab-0") == "2"
    # Without the pin, or the server would bring the device back to 2 as declared.
    api.remove_desired("digits", device="lab-0")

    login(page, dash.url, dash.token)
    page.goto(dash.url + "/devices/lab-0")
    page.locator("select[name=model]").select_option("digits")
    page.locator("input[name=to_version]").fill("1")
    page.locator("button[data-action=rollback]").click()
    dialog = page.locator("dialog[open]")
    expect(dialog).to_be_visible()
    assert fleets["lab-0"].active("lab-0") == "2", "rolled back before the confirmation"
    dialog.locator("button[data-confirm]").click()
    expect(page.locator("[data-testid=action-result]")).not_to_be_empty()
    wait_until(lambda: fleets["lab-0"].active("lab-0") == "1", 10, "lab-0 rolled back to 1")
    # Sent as the API sends commands: recorded, by the logged-in token's name.
    [rollback] = [c for c in api.history("lab-0")["commands"] if c["op"] == "rollback"]
    assert rollback["created_by"] == "admin", rollback


def test_a_bundle_is_uploaded_from_the_models_page_and_a_bad_signature_refused(
    page: Page, dash: Dashboard, tmp_path: Path
) -> None:
    login(page, dash.url, dash.token)
    page.goto(dash.url + "/models")
    expect(page.locator('tr[data-bundle="digits:2"]')).to_contain_text("int8")

    def upload(bundle: Path) -> None:
        form = page.locator("form[data-testid=upload]")
        form.locator("input[name=manifest]").set_input_files(bundle / mf.MANIFEST_FILE)
        form.locator("input[name=signature]").set_input_files(bundle / mf.SIGNATURE_FILE)
        form.locator("input[name=model]").set_input_files(bundle / "model.tflite")
        form.locator("button[type=submit]").click()

    stranger = make_keys(tmp_path / "stranger")  # a key the server does not trust
    upload(make_bundle(tmp_path / "bad", b"x" * 3000, version="7", keys=stranger))
    expect(page.locator("[role=alert]")).to_contain_text("trusted key")
    expect(page.locator('tr[data-bundle="digits:7"]')).to_have_count(0)

    upload(make_bundle(tmp_path / "good", b"y" * 3000, version="8", keys=dash.keys))
    expect(page.locator('tr[data-bundle="digits:8"]')).to_be_visible()
    assert dash.api().bundle("digits", "8")["version"] == "8"


def test_a_read_only_token_sees_no_action_anywhere(
    page: Page, browser: Browser, dash: Dashboard
) -> None:
    rollout = dash.api().create_rollout({"model": "digits", "version": "2", "device": "spare-0"})
    pages = (*NO_ACTIONS_PAGES, "/devices/spare-0", f"/rollouts/{rollout['id']}")
    # The operator sees actions on the device page: the selector finds them when there.
    operator = browser.new_context(viewport=VIEWPORT)
    try:
        op_page = operator.new_page()
        login(op_page, dash.url, dash.token)
        op_page.goto(dash.url + "/devices/spare-0")
        expect(op_page.locator("button[data-action=ping]")).to_be_visible()
    finally:
        operator.close()

    token = dash.add_token("viewer", "read")
    login(page, dash.url, token)
    expect(page).to_have_url(dash.url + "/")
    expect(page.locator("[data-testid=whoami]")).to_contain_text("viewer")
    expect(page.locator("[data-testid=whoami]")).to_contain_text("read")
    for path in pages:
        page.goto(dash.url + path)
        expect(page.locator("body")).to_have_attribute("data-live", "on")
        expect(page.locator("[data-action]"), path).to_have_count(0)
        expect(page.locator('a[href="/rollouts/new"]'), path).to_have_count(0)
        expect(page.locator("form[data-testid=upload]"), path).to_have_count(0)
    # And the API refuses its writes, cookie or not (same origin, so not a CSRF refusal).
    refused = page.request.post(
        dash.url + "/api/commands",
        data={"op": "ping", "device": "spare-0"},
        headers={"Origin": dash.url},
    )
    assert refused.status == 403, (refused.status, refused.text())


def test_the_device_list_pages_through_10000_devices(
    page: Page, broker: Broker, tmp_path: Path
) -> None:
    board = Dashboard(tmp_path / "big", broker, "dash-big")
    counts = seed_devices(board.db_url, 10_000)
    board.start()
    try:
        login(page, board.url, board.token)
        page.goto(board.url + "/devices")
        rows = page.locator("table[data-testid=devices] tbody tr[data-device]")
        expect(page.locator("[data-testid=devices-total]")).to_have_text("10000")
        expect(page.locator("[data-testid=page]")).to_have_text("page 1 of 200")
        expect(rows).to_have_count(50)
        expect(rows.first).to_have_attribute("data-device", "dev-00000")
        expect(page.locator('tr[data-device="dev-00001"] td.spark svg')).to_have_count(1)

        page.locator("a[rel=next]").first.click()
        expect(page.locator("[data-testid=page]")).to_have_text("page 2 of 200")
        expect(rows).to_have_count(50)
        expect(rows.first).to_have_attribute("data-device", "dev-00050")
        expect(page.locator("a[rel=prev]").first).to_be_visible()

        page.locator("select[name=status]").select_option("degraded")
        page.locator("input[name=q]").press("Enter")
        degraded = counts["degraded"]
        expect(page.locator("[data-testid=devices-total]")).to_have_text(str(degraded))
        expect(page.locator("[data-testid=page]")).to_have_text(
            f"page 1 of {math.ceil(degraded / 50)}"
        )
        expect(rows.first.locator("td.status")).to_have_text("degraded")

        page.locator("select[name=status]").select_option("")
        page.locator("input[name=q]").fill("dev-0012")
        page.locator("input[name=q]").press("Enter")
        expect(page.locator("[data-testid=devices-total]")).to_have_text("10")
        expect(rows).to_have_count(10)
        expect(page.locator("[data-testid=page]")).to_have_text("page 1 of 1")
    finally:
        board.stop()


def test_a_real_agent_shows_on_the_overview_and_draws_its_fps_chart(
    page: Page, broker: Broker, tmp_path: Path, tiny_int8_model: Path
) -> None:
    prefix = "dash-agent"
    board = Dashboard(tmp_path / "server", broker, prefix).start()
    agent: Agent | None = None
    serving: threading.Thread | None = None
    try:
        manifest = manifest_for(tiny_int8_model, name="tiny", version="1")
        signature = mf.sign_manifest(manifest, mf.load_private_key(board.keys.private))
        bundle = mf.write_bundle(tmp_path / "tiny-1", tiny_int8_model, manifest, signature)
        config = agent_config(tmp_path / "agents", "pi-a", broker, board.keys.public)
        settings = yaml.safe_load(config.read_text())
        settings["mqtt"]["topic_prefix"] = prefix
        config.write_text(yaml.safe_dump(settings))
        agent = Agent(LiveConfig.load(config))
        agent.start()
        # The main loop (as `edge-agent run` runs it): it sends the telemetry.
        serving = threading.Thread(target=agent.serve, name="agent-serve", daemon=True)
        serving.start()
        api = board.api()
        wait_until(lambda: api.devices(online=True)["total"] == 1, 30, "the agent online")
        api.upload_bundle(bundle)
        rollout = api.create_rollout({"model": "tiny", "version": "1", "device": "pi-a"})
        wait_until(lambda: api.rollout(rollout["id"])["state"] == "done", 60, "tiny 1 on pi-a")
        wait_until(lambda: (api.device("pi-a")["fps"] or 0) > 0, 30, "fps from pi-a")

        login(page, board.url, board.token)
        expect(page.locator("[data-testid=count-online]")).to_have_text("1")
        expect(
            page.locator('[data-testid=versions] tr[data-model="tiny"][data-version="1"] td.count')
        ).to_have_text("1")

        with page.expect_response(
            lambda r: "/api/devices/pi-a/telemetry" in r.url and r.status == 200
        ) as telemetry:
            page.goto(board.url + "/devices/pi-a")
        points = telemetry.value.json()["points"]
        assert any((p.get("fps") or 0) > 0 for p in points), points
        chart = page.locator("[data-testid=chart-fps]")
        expect(chart.locator("canvas")).to_have_count(1)
        deadline = time.monotonic() + 5
        while chart.evaluate(CANVAS_INK) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert chart.evaluate(CANVAS_INK) > 0, "the fps chart's canvas is blank"
        with page.expect_response(
            lambda r: "/api/devices/pi-a/telemetry" in r.url and r.status == 200
        ) as wider:
            page.locator("select[name=range]").select_option("6h")
        query = wider.value.json()
        assert query["until"] - query["since"] == pytest.approx(6 * 3600, abs=120), query
        expect(page.locator("[data-testid=device-state]")).to_contain_text("tiny")
    finally:
        if agent is not None:
            agent.stop_event.set()
            if serving is not None:
                serving.join(10)
            agent.stop()
        board.stop()
