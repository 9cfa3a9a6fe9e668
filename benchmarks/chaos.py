"""Chaos: the real agent process killed, starved and fed garbage; what it loses and leaves.

    python -m benchmarks.chaos [--quick] [--json] [--only NAME,...]

Each scenario runs ``python -m agent run`` (its own device id and state directory)
with a stored converter-built digits model, a synthetic source at 50 fps and
``publish: every``, against a private Mosquitto. One persistent-session QoS 1
subscriber records every ``seq`` of every result and telemetry message (both take
their seq from the outbox's one per-device counter). Scenarios, once each:

- ``broker_kill``: the broker is killed (-9) for 10 s while results flow;
- ``agent_kill``: the agent is killed (-9) mid-stream and started again;
- ``deploy_kill_<stage>``: a deploy of version 2 is interrupted by SIGKILL at each stage
  (``EDGE_AGENT_KILL_AT``: downloading, receiving (MQTT chunks), installing,
  validating, swapping, probation), then the agent is started again;
- ``disk_full``: the broker is down while the state directory's filesystem (a small
  tmpfs) fills up; the broker comes back before the disk is freed;
- ``fuzz``: a few hundred mutated command payloads on the device and group topics,
  then a ``ping``;
- ``sigterm_download``: SIGTERM while a deploy's download stalls mid-file.

Figures (summed over the scenarios):

- ``lost``: per device, the seqs below the cutoff (the outbox's ``next_seq`` from a
  ``status`` reply, else the last telemetry's seq + 1) that never arrived after a
  drain of up to 20 s, less the drops the agent counts (``dropped.telemetry`` +
  ``dropped.results`` from ``status``, else telemetry's ``outbox_dropped``). Results
  still in the agent's memory at a SIGKILL have no seq yet and are not seen here; a
  broker killed with -9 could itself lose what it acknowledged since its last
  autosave (1 s) and had not yet passed on (the subscriber is online, so it passes
  messages on at once).
- ``uncounted_drops``: the agent's own books, ``accepted`` - ``delivered`` - dropped -
  ``queued`` from ``status`` (before the outbox counted ``accepted``: ``next_seq`` -
  ``published`` - dropped - ``depth``), after the drain and again after a stop and start (which
  counts the queue from disk, so messages the running agent believes queued but
  never stored show); the larger of the two, each the smallest of three samples so
  that a batch caught between seq and insert does not count.
- ``thread_deaths``: "Exception in thread" in the agent's log, or what its telemetry
  or state reports, whichever is larger.
- ``unanswered_commands``: commands that never got a final reply: each interrupted
  deploy (before or after the restart), the ping after the fuzz, a ping while the
  disk is full, the deploy stopped by SIGTERM.
- ``unproven_active_after_crash``: deploy-kill runs after which version 2 (which never
  passed probation) is active in the retained state or serves results.
- ``leftover_files``: entries under ``state_dir/tmp`` and ``state_dir/models/.incoming``
  once the restarted agent serves.
- ``sigterm_s_max``: SIGTERM to process exit (capped; ``exited: false`` when the cap hit).
- ``fuzz_payloads``, ``rss_growth_mb_fuzz`` (VmRSS after the fuzz and ping minus before).
- ``failed_health_commands``: a ``ping`` that was answered, but not ``done`` (the ping
  while the disk is full, the ping after the fuzz).

A scenario that breaks records ``error`` in its entry and the totals say
``complete: false``. Every agent, broker and temp dir is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.models.manifest import read_bundle
from agent.protocol import MAX_COMMAND_BYTES, Topics
from benchmarks._agent_harness import (
    MODEL,
    PREFIX,
    AgentProcess,
    ArtifactHttp,
    Observer,
    agent_config,
    digits_bundles,
    model_state,
    preinstall,
    serving,
    thread_deaths_in_log,
    wait_until,
)
from fleet.serve import ChunkPublisher
from tests.mqtt_support import Broker

STAGES = {
    "downloading": "downloading@50",
    "receiving": "receiving@50",
    "installing": "installing",
    "validating": "validating",
    "swapping": "swapping",
    "probation": "probation",
}
CHUNK_SIZE = 16 * 1024
START_TIMEOUT_S = 90.0
DRAIN_S = 20.0


class Lab:
    """The broker, the observer, an HTTP server for artifacts, the bundles, the agents."""

    def __init__(self, work: Path, quick: bool) -> None:
        self.work = work
        self.quick = quick
        self.bundles = digits_bundles(("1", "2"))
        self.v2 = read_bundle(self.bundles["2"])
        self.agents: list[AgentProcess] = []
        self.observer: Observer | None = None
        self.http: ArtifactHttp | None = None
        self.broker = Broker(work / "mosquitto")
        self.broker.start()
        try:
            self.observer = Observer(self.broker)
            self.http = ArtifactHttp()
            self.http.files["digits-2.tflite"] = self.v2.model_path.read_bytes()
        except BaseException:
            self.close()
            raise

    @property
    def obs(self) -> Observer:
        assert self.observer is not None
        return self.observer

    def device(
        self,
        name: str,
        *,
        state_dir: Path | None = None,
        extra: dict[str, Any] | None = None,
    ) -> tuple[str, AgentProcess, Path]:
        """A device of its own with version 1 stored (active, last-known-good)."""
        device = f"chaos-{name}".replace("_", "-")
        workdir = self.work / device
        state = state_dir or workdir / "state"
        preinstall(state, self.bundles["1"])
        config = agent_config(
            workdir, device, self.broker, state_dir=state,
            extra={"device": {"id": device, "groups": [f"g-{device}"]}, **(extra or {})},
        )  # fmt: skip
        agent = AgentProcess(config, workdir / "agent.log")
        self.agents.append(agent)
        return device, agent, state

    def start_serving(
        self, device: str, agent: AgentProcess, env: dict[str, str] | None = None
    ) -> float:
        """Start the agent; returns once it serves (raises after START_TIMEOUT_S)."""
        since = time.time()
        agent.start(env)
        if not wait_until(serving(self.obs, device, since), START_TIMEOUT_S):
            raise RuntimeError(
                f"{device} did not come up serving within {START_TIMEOUT_S:.0f}s "
                f"(alive={agent.alive}): {agent.log_text()[-1500:]}"
            )
        return since

    def deploy_v2(self, device: str, via: str, *, stall: bool = False) -> tuple[str, Any]:
        """Send a deploy of version 2; returns its id and the chunk publisher (or None)."""
        publisher = None
        if via == "mqtt":
            publisher = ChunkPublisher(
                lambda msgs: self.obs.publish_many(msgs),
                self.obs.handle,
                self.v2.model_path,
                Topics(PREFIX),
                CHUNK_SIZE,
            )
            publisher.start()
            artifact = publisher.artifact().model_dump(mode="json")
        else:
            assert self.http is not None
            artifact = {"kind": "url", "url": self.http.url("digits-2.tflite", stall=stall)}
        body = {"op": "deploy", "manifest": self.v2.manifest_data, "artifact": artifact}
        return self.obs.command(device, body), publisher

    def close(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.close()
        if self.http is not None:
            self.http.close()
        if self.observer is not None:
            self.observer.close()
        self.broker.kill()


# ---------------------------------------------------------------------- accounting


def _outbox(reply: dict[str, Any] | None) -> dict[str, Any] | None:
    data = (reply or {}).get("data") or {}
    outbox = data.get("outbox")
    if isinstance(outbox, dict) and isinstance(outbox.get("next_seq"), int):
        return outbox
    return None


def _dropped_with_seq(outbox: dict[str, Any]) -> int:
    dropped = outbox.get("dropped") or {}
    if isinstance(dropped, dict):
        return int(dropped.get("telemetry", 0)) + int(dropped.get("results", 0))
    return int(dropped)


def _imbalance(outbox: dict[str, Any]) -> int:
    if isinstance(outbox.get("accepted"), int):
        # The outbox's own invariant: accepted == delivered + dropped (any reason) + queued.
        dropped = outbox.get("dropped") or {}
        return (
            int(outbox["accepted"])
            - int(outbox.get("delivered", 0))
            - sum(int(v) for v in dropped.values())
            - int(outbox.get("queued", 0))
        )
    return (
        int(outbox["next_seq"])
        - int(outbox.get("published", 0))
        - _dropped_with_seq(outbox)
        - int(outbox.get("depth", 0))
    )


def _reported_deaths(node: Any, inside_threads: bool = False) -> int:
    """Thread deaths a future agent reports in telemetry or state (any key naming them)."""
    total = 0
    if isinstance(node, dict):
        for key, value in node.items():
            k = str(key).lower()
            if isinstance(value, int) and not isinstance(value, bool):
                if "death" in k or "died" in k or (inside_threads and k in ("deaths", "crashes")):
                    total += value
            else:
                total += _reported_deaths(value, inside_threads or "thread" in k)
    elif isinstance(node, list):
        total += sum(_reported_deaths(v, inside_threads) for v in node)
    return total


def account(lab: Lab, device: str, agent: AgentProcess) -> dict[str, Any]:
    """lost / uncounted_drops / thread_deaths of one device's stream; see the module doc."""
    obs = lab.obs
    first = _outbox(obs.ask(device, "status"))
    if first is not None:
        cutoff, source = int(first["next_seq"]), "status"
    else:
        tel = obs.last_telemetry(device)
        seqs = obs.seqs(device)
        cutoff = int(tel["seq"]) + 1 if tel else (max(seqs) + 1 if seqs else 0)
        source = "telemetry"

    def below() -> int:
        return sum(1 for s in obs.seqs(device) if s < cutoff)

    wait_until(lambda: below() >= cutoff, DRAIN_S, step=0.2)
    missing = cutoff - below()
    # A device that did not answer the first status is not asked three more times.
    asks = 3 if first is not None else 0
    samples = [o for o in (_outbox(obs.ask(device, "status", 10)) for _ in range(asks)) if o]
    tel = obs.last_telemetry(device) or {}
    if samples:
        dropped = _dropped_with_seq(samples[-1])
        uncounted: int | None = min(max(0, _imbalance(o)) for o in samples)
    else:
        dropped = int(tel.get("outbox_dropped", 0))
        uncounted = None
    received = len(obs.seqs(device))
    # Telemetry and state carry the same counter: the larger, not the sum.
    deaths_reported = max(_reported_deaths(tel), _reported_deaths(obs.last_state(device) or {}))
    # The books again after a restart: a restart counts the queue from disk, so messages
    # the running agent believes queued but never stored show up as unaccounted.
    after_restart = books_after_restart(lab, device, agent)
    counts = [u for u in (uncounted, after_restart) if u is not None]
    return {
        "cutoff_seq": cutoff,
        "cutoff_from": source,
        "received_distinct": received,
        "missing_below_cutoff": missing,
        "dropped_counted": dropped,
        "telemetry_outbox_dropped": tel.get("outbox_dropped"),
        "lost": max(0, missing - dropped),
        "uncounted_drops": max(counts) if counts else None,
        "uncounted_live": uncounted,
        "uncounted_after_restart": after_restart,
        "outbox_after_drain": samples[-1] if samples else None,
        "thread_deaths": max(thread_deaths_in_log(agent.log_text()), deaths_reported),
    }


def books_after_restart(lab: Lab, device: str, agent: AgentProcess) -> int | None:
    """Stop (SIGTERM, else SIGKILL after 15 s), start, and read the outbox's books."""
    agent.terminate()
    if agent.wait(15) is None:
        agent.kill()
    lab.start_serving(device, agent)
    samples = [o for o in (_outbox(lab.obs.ask(device, "status", 10)) for _ in range(3)) if o]
    return min(max(0, _imbalance(o)) for o in samples) if samples else None


def leftovers(state_dir: Path) -> list[str]:
    found: list[str] = []
    for root in (state_dir / "tmp", state_dir / "models" / ".incoming"):
        if root.exists():
            found += sorted(str(p.relative_to(state_dir)) for p in root.rglob("*"))
    return found


# ----------------------------------------------------------------------- scenarios


def broker_kill(lab: Lab) -> dict[str, Any]:
    device, agent, _state = lab.device("broker-kill")
    lab.start_serving(device, agent)
    time.sleep(2.0)  # the broker's autosave (1 s) holds the subscriber's session
    before = len(lab.obs.seqs(device))
    lab.broker.kill()
    outage_s = 10.0
    time.sleep(outage_s)
    lab.broker.start()
    back = time.time()
    resumed = wait_until(lambda: len(lab.obs.results(device, back)) >= 20, 60)
    out: dict[str, Any] = {
        "outage_s": outage_s,
        "received_before_outage": before,
        "resumed_s": round(time.time() - back, 2) if resumed else None,
    }
    out.update(account(lab, device, agent))
    agent.kill()
    return out


def agent_kill(lab: Lab) -> dict[str, Any]:
    device, agent, _state = lab.device("agent-kill")
    lab.start_serving(device, agent)
    time.sleep(3.0)
    agent.kill()
    restart = time.time()
    lab.start_serving(device, agent)
    out: dict[str, Any] = {"restart_to_serving_s": round(time.time() - restart, 2)}
    time.sleep(2.0)
    out.update(account(lab, device, agent))
    agent.kill()
    return out


def deploy_kill(lab: Lab, *, stage: str) -> dict[str, Any]:
    device, agent, state = lab.device(f"kill-{stage}")
    lab.start_serving(device, agent, {"EDGE_AGENT_KILL_AT": STAGES[stage]})
    via = "mqtt" if stage == "receiving" else "http"
    command_id, publisher = lab.deploy_v2(device, via)
    out: dict[str, Any] = {"kill_at": STAGES[stage], "via": via}
    try:
        rc = agent.wait(180)
        out["exit"] = rc
        out["killed_at_stage"] = rc == -9
        if rc is None:
            agent.kill()
            out["error"] = "the agent did not reach the stage within 180 s"
        out["replies_before_kill"] = [
            (r.get("status"), r.get("stage") or r.get("code"))
            for r in lab.obs.replies(device, command_id)
        ]
        out["leftovers_before_restart"] = leftovers(state)
    finally:
        if publisher is not None:
            publisher.stop()
    restart = time.time()
    lab.start_serving(device, agent)
    out["restart_to_serving_s"] = round(time.time() - restart, 2)
    final = lab.obs.wait_final(device, command_id, 15)
    # Let a probation the agent may rerun at start-up end before judging what serves.
    wait_until(
        lambda: model_state(lab.obs.last_state(device, restart)).get("status") != "probation", 30
    )
    time.sleep(1.0)
    ms = model_state(lab.obs.last_state(device, restart))
    versions = lab.obs.results(device, restart)
    served = sorted(set(versions))
    out.update(
        {
            "final_reply": {k: final.get(k) for k in ("status", "code", "message")}
            if final
            else None,
            "active_after_restart": ms.get("active"),
            "status_after_restart": ms.get("status"),
            "last_known_good_after_restart": ms.get("last_known_good"),
            "versions_served_after_restart": served,
            "unproven_active_after_crash": int(ms.get("active") == "2" or "2" in served),
            "leftovers_after_restart": leftovers(state),
            "unanswered_commands": int(final is None),
        }
    )
    out["leftover_files"] = len(out["leftovers_after_restart"])
    out.update(account(lab, device, agent))
    agent.kill()
    return out


def _fill(path: Path) -> int:
    """Write ``path`` until the filesystem says ENOSPC; returns bytes written."""
    written = 0
    with path.open("wb", buffering=0) as f:
        for block in (1 << 20, 1 << 12, 1 << 9, 1):
            data = b"\0" * block
            while True:
                try:
                    f.write(data)
                    written += block
                except OSError:
                    break
    return written


def disk_full(lab: Lab) -> dict[str, Any]:
    mount = lab.work / "diskfull-fs"
    mount.mkdir()
    size_mb = 16
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount)],
        capture_output=True, text=True,
    ).returncode == 0  # fmt: skip
    out: dict[str, Any] = {"tmpfs_mb": size_mb if mounted else None}
    agent: AgentProcess | None = None
    try:
        if mounted:
            device, agent, _state = lab.device("disk-full", state_dir=mount / "state")
        else:
            # No tmpfs here: the closest real limit is the outbox's own bound.
            out["note"] = "mount -t tmpfs failed; outbox.max_messages 200 stands in for the disk"
            device, agent, _state = lab.device("disk-full", extra={"outbox": {"max_messages": 200}})
        lab.start_serving(device, agent)
        time.sleep(1.0)
        lab.broker.kill()
        filler = mount / "filler" if mounted else None
        out["filled_bytes"] = _fill(filler) if filler else 0
        full_s = 5.0 if lab.quick else 20.0
        time.sleep(full_s)
        out["full_with_broker_down_s"] = full_s
        out["agent_alive_while_full"] = agent.alive
        lab.broker.start()
        back = time.time()
        # The link comes back before the disk is freed: ping and status must still answer.
        wait_until(lambda: bool((lab.obs.last_state(device, back) or {}).get("online")), 30)
        ping = lab.obs.ask(device, "ping", 15)
        out["ping_while_full"] = (ping or {}).get("code")
        unanswered = int(ping is None)
        out["failed_health_commands"] = int(ping is not None and ping.get("status") != "done")
        if filler is not None:
            filler.unlink()
        out["agent_alive_after_full"] = agent.alive
        if not agent.alive:
            out["agent_exit"] = agent.returncode
            lab.start_serving(device, agent)
        wait_until(lambda: len(lab.obs.results(device, time.time() - 1)) > 0, 30)
        time.sleep(2.0)
        out.update(account(lab, device, agent))
        out["unanswered_commands"] = unanswered
    finally:
        if agent is not None:
            agent.kill()
        if mounted:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    return out


def fuzz_payloads(n: int, seed: int, manifest: dict[str, Any]) -> list[bytes]:
    """Mutated commands: random bytes, truncated JSON, deep nesting, huge numbers, lone
    surrogates, long ids, reused ids, wrong types, oversize, fields swapped for junk."""
    rng = random.Random(seed)
    bases: list[dict[str, Any]] = [
        {"op": "ping"},
        {"op": "status"},
        {"op": "config", "changes": {"pipelines.cam.threshold": 0.1}},
        {"op": "rollback", "model": MODEL},
        {"op": "restart", "pipeline": "cam"},
        {"op": "deploy", "manifest": manifest,
         "artifact": {"kind": "url", "url": "http://127.0.0.1:9/none.tflite"}},
        {"op": "deploy", "manifest": manifest,
         "artifact": {"kind": "mqtt", "transfer_id": "t-fuzz", "chunk_size": 1,
                      "chunks": 10**9}},
    ]  # fmt: skip
    junk: list[Any] = [
        None, True, -1, 0, 2**63, 10**400, 1e308, -1e308, "", "x" * 5000, [], {}, [[[]]],
        "\ud800", "a\nb", "../../etc", "#", "+/+", {"$ref": "#"}, "é" * 1000,
    ]  # fmt: skip
    fields = ["op", "expires_at", "issued_at", "auth", "manifest", "artifact", "changes"]
    surrogate_key = {"id": "s-1", "op": "config", "changes": {"telemetry.interval_s\ud800": 5}}
    sent: list[bytes] = []

    def command() -> dict[str, Any]:
        body = dict(rng.choice(bases))
        body["id"] = f"f-{rng.randrange(10**9)}"
        return body

    def dumps(obj: Any) -> bytes:
        # ensure_ascii keeps lone surrogates as \ud800 escapes: valid JSON, bad Unicode.
        return json.dumps(obj).encode()

    kinds: list[Callable[[], bytes]] = [
        lambda: rng.randbytes(rng.randrange(0, 2048)),
        lambda: (lambda b: b[: rng.randrange(len(b))])(dumps(command())),
        lambda: b"[" * rng.choice((100, 1000, 2000, 50_000)),
        lambda: b'{"a":' * rng.choice((100, 1000, 5000)) + b"1" + b"}" * 10,
        lambda: dumps({**command(), "changes": {"x": json.loads("[" * 50 + "]" * 50)}}),
        lambda: (
            b'{"id":"h-%d","op":"ping","issued_at":%s}'
            % (rng.randrange(10**6), b"9" * rng.choice((400, 5000)))
        ),
        lambda: dumps({**command(), "id": rng.choice(junk)}),
        lambda: dumps({**command(), rng.choice(fields): rng.choice(junk)}),
        lambda: dumps({**surrogate_key, "id": f"s-{rng.randrange(10**6)}"}),
        lambda: dumps({"id": "x" * rng.choice((65, 1000, 100_000)), "op": "ping"}),
        lambda: rng.choice(sent) if sent else dumps(command()),
        lambda: rng.choice([b"null", b"[]", b'"ping"', b"1e999", b"\xed\xa0\x80", b"{}"]),
        lambda: b" " * (MAX_COMMAND_BYTES + 1) + dumps(command()),
        lambda: dumps(command()).replace(b'"op"', b'"op\\u0000"'),
        lambda: dumps({**command(), "extra_key": 1}),
    ]
    for i in range(n):
        payload = b"[" * 2000 if i == n // 3 else rng.choice(kinds)()
        sent.append(payload)
    return sent


def fuzz(lab: Lab) -> dict[str, Any]:
    device, agent, _state = lab.device("fuzz")
    lab.start_serving(device, agent)
    time.sleep(3.0)
    # The same wait without fuzz first: how much RSS moves on its own while serving.
    rss_idle = agent.rss_mb()
    time.sleep(5.0)
    rss_before = agent.rss_mb()
    n = 300 if lab.quick else 1000
    payloads = fuzz_payloads(n, 14, lab.v2.manifest_data)
    topics = [f"{PREFIX}/{device}/cmd", f"{PREFIX}/group/g-{device}/cmd"]
    started = time.time()
    for i in range(0, len(payloads), 50):
        lab.obs.publish_many(
            [(topics[(i + j) % 2], p) for j, p in enumerate(payloads[i : i + 50])], timeout=60
        )
    publish_s = time.time() - started
    ping = lab.obs.ask(device, "ping", 30)
    time.sleep(1.0)
    rss_after = agent.rss_mb()
    results_during = len(lab.obs.results(device, started))
    out: dict[str, Any] = {
        "fuzz_payloads": len(payloads),
        "publish_s": round(publish_s, 2),
        "ping_after_fuzz": (ping or {}).get("code"),
        "unanswered_commands": int(ping is None),
        "failed_health_commands": int(ping is not None and ping.get("status") != "done"),
        "agent_alive": agent.alive,
        "results_since_fuzz_start": results_during,
        "rss_drift_mb_5s_without_fuzz": round(rss_before - rss_idle, 1)
        if rss_before and rss_idle
        else None,
        "rss_before_mb": round(rss_before, 1) if rss_before else None,
        "rss_after_mb": round(rss_after, 1) if rss_after else None,
        "rss_growth_mb_fuzz": round(rss_after - rss_before, 1)
        if rss_before and rss_after
        else None,
    }
    out.update(account(lab, device, agent))
    agent.kill()
    return out


def sigterm_download(lab: Lab) -> dict[str, Any]:
    device, agent, state = lab.device("sigterm")
    lab.start_serving(device, agent)
    command_id, _ = lab.deploy_v2(device, "http", stall=True)
    downloading = wait_until(
        lambda: any(r.get("stage") == "downloading" for r in lab.obs.replies(device, command_id)),
        30,
    )
    time.sleep(1.0)  # well inside the stalled read
    cap_s = 45.0 if lab.quick else 150.0
    started = time.monotonic()
    agent.terminate()
    rc = agent.wait(cap_s)
    took = time.monotonic() - started
    out: dict[str, Any] = {
        "stalled_in_download": downloading,
        "exited": rc is not None,
        "exit": rc,
        "sigterm_s": round(took, 2) if rc is not None else cap_s,
        "cap_s": cap_s,
        "final_reply_before_exit": (lab.obs.final_reply(device, command_id) or {}).get("code"),
    }
    if rc is None:
        agent.kill()
    assert lab.http is not None
    lab.http.release.set()  # the stalled transfer may end now
    restart = time.time()
    lab.start_serving(device, agent)
    final = lab.obs.wait_final(device, command_id, 15)
    time.sleep(1.0)
    out["final_reply"] = {k: final.get(k) for k in ("status", "code", "message")} if final else None
    out["unanswered_commands"] = int(final is None)
    out["active_after_restart"] = model_state(lab.obs.last_state(device, restart)).get("active")
    out["leftovers_after_restart"] = leftovers(state)
    out["leftover_files"] = len(out["leftovers_after_restart"])
    out.update(account(lab, device, agent))
    agent.kill()
    lab.http.release.clear()
    return out


SCENARIOS: dict[str, Callable[[Lab], dict[str, Any]]] = {
    "broker_kill": broker_kill,
    "agent_kill": agent_kill,
    **{f"deploy_kill_{stage}": functools.partial(deploy_kill, stage=stage) for stage in STAGES},
    "disk_full": disk_full,
    "fuzz": fuzz,
    "sigterm_download": sigterm_download,
}


# ---------------------------------------------------------------------------- main


def _total(scenarios: dict[str, dict[str, Any]], key: str) -> int:
    return sum(int(s.get(key) or 0) for s in scenarios.values())


def run(quick: bool, only: list[str] | None = None) -> dict[str, Any]:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    scenarios: dict[str, dict[str, Any]] = {}
    lab: Lab | None = None
    try:
        lab = Lab(work, quick)
        for name, scenario in SCENARIOS.items():
            if only and name not in only:
                continue
            t0 = time.monotonic()
            try:
                scenarios[name] = scenario(lab)
            except Exception as exc:
                scenarios[name] = {
                    "error": f"{type(exc).__name__}: {exc}"[:2000],
                    "where": traceback.format_exc(limit=3)[-1500:],
                }
            scenarios[name]["scenario_s"] = round(time.monotonic() - t0, 1)
            for agent in lab.agents:
                agent.close()
            print(f"chaos: {name}: {json.dumps(scenarios[name])[:400]}", file=sys.stderr)
    except Exception as exc:
        scenarios["setup"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    finally:
        if lab is not None:
            lab.close()
        if os.environ.get("CHAOS_KEEP_WORKDIR"):
            print(f"chaos: work dir kept at {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    sigterm = scenarios.get("sigterm_download", {})
    fuzzed = scenarios.get("fuzz", {})
    errors = sorted(n for n, s in scenarios.items() if "error" in s)
    return {
        "benchmark": "chaos",
        "quick": quick,
        "complete": not errors and (only is None or set(only) <= set(scenarios)),
        "errors": errors,
        "lost": _total(scenarios, "lost"),
        "uncounted_drops": _total(scenarios, "uncounted_drops"),
        "thread_deaths": _total(scenarios, "thread_deaths"),
        "unanswered_commands": _total(scenarios, "unanswered_commands"),
        "unproven_active_after_crash": _total(scenarios, "unproven_active_after_crash"),
        # ping/status answered, but failed (e.g. `internal` while the disk is full)
        "failed_health_commands": _total(scenarios, "failed_health_commands"),
        "leftover_files": _total(scenarios, "leftover_files"),
        "sigterm_s_max": sigterm.get("sigterm_s"),
        "fuzz_payloads": fuzzed.get("fuzz_payloads", 0),
        "rss_growth_mb_fuzz": fuzzed.get("rss_growth_mb_fuzz"),
        "elapsed_s": round(time.monotonic() - started, 1),
        "scenarios": scenarios,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="each scenario once, a few minutes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--only", help=f"comma-separated scenarios (default all): {', '.join(SCENARIOS)}"
    )
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    if only and (unknown := sorted(set(only) - set(SCENARIOS))):
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    report = run(args.quick, only)
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
