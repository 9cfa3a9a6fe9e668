"""Model health end to end: broken candidates refused, good ones promoted, drift seen.

    python -m benchmarks.model_health [--quick] [--json] [--models digits,colors,shapes]

A real agent process per model (``python -m agent run``, benchmarks/_agent_harness.py)
against a private Mosquitto, serving a synthetic source of that model's scene as fast
as it can (``fps`` far above what the pipeline does, ``queue: fifo``, every result
published), so the pipeline is CPU-bound and its rate shows what shadow evaluation
costs it. Bundles are the converter's (tests/converter_support, with TensorFlow in a
child process; cached), two trainings of each example: seed 0 (version 1, active at
the start) and seed 1.

Deploy phase, per model: in ``rounds`` rounds, one candidate of each kind, each under a
fresh version and creation time, signed with the benchmark's key, sent as a ``deploy``
command (the file over HTTP) and followed to its final reply. Every candidate is made
from the *other* training than the one serving (a new training run; exported wrong for
the broken kinds, tests/health_support.py):

- ``good``: as converted; it may differ from the serving model a little;
- ``wrong_normalisation``: ``preprocess.std`` 1 instead of 255;
- ``swapped_channels``: RGB <-> BGR (colors and shapes: grey digits cannot show it);
- ``shuffled_labels``: the labels permuted so that none keeps its name;
- ``perturbed_golden``: the golden outputs moved by 4x their tolerance: what a runtime
  computing wrong int8 gives (the model itself is right).

A broken candidate that is promoted all the same (a miss) is rolled back at once
(``rolled_back`` in its record), so every candidate meets a good serving model.

Figures:

- ``broken_rejected``: refused broken candidates / broken candidates; ``good_accepted``:
  promoted good ones / good ones (over all models);
- ``decision_s_p50``: deploy sent -> promotion (the ``probation`` stage reported) or
  refusal (the final reply), over all candidates, with p90 and max;
- ``shadow_fps_ratio``: per model, the serving pipeline's results per second captured
  during ``shadow`` stages (from the ``shadow`` progress reply to the next stage or the
  refusal) over those captured in the idle second before each deploy, pooled over the
  model's deploys; the top-level figure is the lowest model's;
- ``drift_detected_s``: after the deploy phase each agent restarts with its source at a
  camera's ``DRIFT_FPS`` and ``drift_after_s`` set; the time from the scene's change
  (the source's open time, from the results' frame numbers and timestamps, plus
  ``drift_after_s``) to a retained state with the pipeline's drift warning; per model,
  top-level the slowest;
- ``drift_false_alarms``: drift warnings raised while the scene was steady (the whole
  deploy phase and the drift phase before the change), with the observed time and
  frames (``steady_s``, ``steady_frames``) and the rate per hour. The synthetic scenes
  loop over a fixed bank of frames, so this checks the reference against the scene,
  not sampling noise (benchmarks/drift.py measures that).

The shapes detector's pipeline keeps boxes scoring 0.5 or more, and its candidates ask
for ``min_agreement`` 0.85 (two trainings' matched-box F1 is about 0.92); digits and
colors candidates use the device's default (0.95).

``--quick`` (about 2.5 min): digits and colors, 3 rounds, 20 s of steady scene in the
drift phase (the shapes detector would add a minute: ``--models`` takes it); full
(about 30 min): every model, 20 rounds, 10 min of steady scene per model. Candidate
details (code, stage, shadow figures, golden figures) are under
``models.<name>.deploys``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.models.manifest import generate_keypair, load_private_key, read_bundle
from benchmarks._agent_harness import (
    ROOT,
    AgentProcess,
    ArtifactHttp,
    Observer,
    agent_config,
    cache_dir,
    preinstall,
    serving,
    wait_until,
)
from tests import health_support as hs
from tests.mqtt_support import Broker

NOT_MADE = "not_made"  # a candidate the bundles cannot give (e.g. no golden samples)
# Model health's refusals: validation (golden samples), shadow evaluation, probation.
REFUSAL_CODES = ("validation_failed", "shadow_rejected", "probation_failed")
KINDS = ("good", "wrong_normalisation", "swapped_channels", "shuffled_labels", "perturbed_golden")
BROKEN = KINDS[1:]
PIPELINE = "cam"
SOURCE_FPS = 2000.0  # far above what any of these pipelines does: CPU-bound
DRIFT_FPS = 30.0  # a camera's rate in the drift phase
PROBATION_S = 1.0
IDLE_S = 1.0  # between a deploy's final reply and the next deploy (the baseline rate)
BASELINE_S = 0.8  # the last part of the idle time, where the rate without shadow is counted
DEPLOY_TIMEOUT_S = 120.0
START_TIMEOUT_S = 90.0
DRIFT_TIMEOUT_S = 60.0  # after the change, for the warning


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: str  # tests.converter_support function
    source: dict[str, Any]  # the synthetic source, less type and fps
    kinds: tuple[str, ...]
    threshold: float = 0.0  # the pipeline's
    # Sent with every candidate of this model (None: the device's default, 0.95).
    min_agreement: float | None = None


MODELS = {
    "digits": ModelSpec(
        "digits",
        "build_digits_bundle",
        {"kind": "digits", "width": 32, "height": 32, "channels": 1},
        tuple(k for k in KINDS if k != "swapped_channels"),
    ),
    "colors": ModelSpec(
        "colors", "build_colors_bundle", {"kind": "colors", "width": 32, "height": 32}, KINDS
    ),
    # A detector pipeline keeps boxes above a score (0: all 16 slots, mostly noise, which
    # two trainings never agree on); matched-box F1 of the two trainings at 0.5: about
    # 0.92, so its deploys ask for 0.85.
    "shapes": ModelSpec(
        "shapes",
        "build_shapes_bundle",
        {"kind": "shapes", "width": 32, "height": 32},
        KINDS,
        threshold=0.5,
        min_agreement=0.85,
    ),
}

_BUILD = r"""
import sys
from pathlib import Path
import tests.converter_support as cs
dest = Path(sys.argv[1])
for arg in sys.argv[2:]:
    name, builder = arg.split(":")
    build = getattr(cs, builder)
    build(dest / f"{name}-seed0", "1", seed=0)
    build(dest / f"{name}-seed1", "1", seed=1)
"""


# ------------------------------------------------------------------------------ bundles


def _sources_digest() -> str:
    """What shapes the bundles: the builders, the converter, the manifest's blocks."""
    digest = hashlib.sha256()
    paths = [
        "tests/converter_support.py",
        "tests/model_factory.py",
        "agent/models/manifest.py",
        "agent/models/health.py",
        "agent/models/golden.py",
        "agent/scenes.py",
        "agent/loops/sources/scenes.py",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "converter").rglob("*.py")),
    ]
    for name in paths:
        path = ROOT / name
        if path.exists():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def build_bundles(specs: list[ModelSpec]) -> dict[str, dict[int, Path]]:
    """Both trainings of each model, converted (unsigned), built once and cached."""
    root = cache_dir() / f"model-health-{_sources_digest()}"
    missing = [s for s in specs if not (root / f"{s.name}-seed1" / "manifest.json").exists()]
    if missing:
        tmp = root.with_name(f"{root.name}.{uuid.uuid4().hex[:6]}.tmp")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
        env.pop("EDGE_TEST_MODELS", None)
        try:
            builds = [f"{s.name}:{s.builder}" for s in missing]
            subprocess.run(
                [sys.executable, "-c", _BUILD, str(tmp), *builds],
                check=True, env=env, cwd=ROOT,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=1200,
            )  # fmt: skip
            root.mkdir(parents=True, exist_ok=True)
            for s in missing:
                for seed in (0, 1):
                    with contextlib.suppress(OSError):
                        os.replace(tmp / f"{s.name}-seed{seed}", root / f"{s.name}-seed{seed}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {s.name: {seed: root / f"{s.name}-seed{seed}" for seed in (0, 1)} for s in specs}


def make_candidate(kind: str, base: Path, work: Path, key: Ed25519PrivateKey, version: str) -> Path:
    """A candidate of ``kind`` made from ``base``, under ``version``, created now."""
    fresh = hs.restamped(base, work / f"{version}-base", key, version=version)
    if kind == "good":
        return fresh
    made = hs.BROKEN_MAKERS[kind](fresh, work / version, key, version=version)
    shutil.rmtree(fresh, ignore_errors=True)
    return made


# ------------------------------------------------------------------------- observing


def result_times(obs: Observer, device: str) -> list[float]:
    """When (device clock) each result's frame was captured, in order."""
    with obs.lock:
        return sorted(t for t, _ in obs.devices[device].result_versions)


def states_of(obs: Observer, device: str) -> list[tuple[float, dict[str, Any]]]:
    with obs.lock:
        return list(obs.devices[device].states)


def frames_of(obs: Observer, device: str, since: float) -> list[tuple[float, int]]:
    with obs.lock:
        return [(t, n) for t, n in obs.devices[device].result_frames if t >= since]


def drift_warnings(states: list[tuple[float, dict[str, Any]]]) -> list[tuple[float, str | None]]:
    """(arrival, the pipeline's drift warning or None) of each state."""
    out = []
    for at, state in states:
        pipelines = [p for p in state.get("pipelines") or [] if p.get("name") == PIPELINE]
        out.append((at, pipelines[0].get("drift") if pipelines else None))
    return out


def raised_between(warnings: list[tuple[float, str | None]], start: float, end: float) -> int:
    """Warnings that came (from none to one) in [start, end)."""
    raised, before = 0, None
    for at, warning in warnings:
        if start <= at < end and warning and not before:
            raised += 1
        before = warning
    return raised


def first_warning(warnings: list[tuple[float, str | None]], after: float) -> float | None:
    return next((at for at, warning in warnings if at >= after and warning), None)


def source_opened_at(frames: list[tuple[float, int]], fps: float) -> float | None:
    """When the source opened, from (capture time, frame number) of its first results:
    frame n is due n/fps after the opening, and is never captured earlier."""
    return min((t - n / fps for t, n in frames[:200]), default=None)


def frames_between(times: list[float], windows: list[tuple[float, float]]) -> int:
    """Of sorted ``times``, how many fall in the windows [start, end)."""
    return sum(bisect_left(times, end) - bisect_left(times, start) for start, end in windows)


def rate(times: list[float], windows: list[tuple[float, float]]) -> float | None:
    seconds = sum(end - start for start, end in windows)
    return frames_between(times, windows) / seconds if seconds > 0 else None


def runtime_of(obs: Observer, device: str) -> str | None:
    state = obs.last_state(device)
    info = (state or {}).get("runtime") or {}
    return f"{info['name']} {info['version']}" if info.get("name") else None


# --------------------------------------------------------------------------- the lab


class Lab:
    """The broker, the observer, the artifact server, the signing key."""

    def __init__(self, work: Path) -> None:
        self.work = work
        private, public = generate_keypair()
        (work / "fleet.key").write_bytes(private)
        (work / "fleet.pub").write_bytes(public)
        self.key = load_private_key(work / "fleet.key")
        self.pub = work / "fleet.pub"
        self.http = ArtifactHttp()
        self.broker = Broker(work / "mosquitto")
        self.observer: Observer | None = None
        self.agents: list[AgentProcess] = []
        self.broker.start()
        try:
            self.observer = Observer(self.broker)
        except BaseException:
            self.close()
            raise

    @property
    def obs(self) -> Observer:
        assert self.observer is not None
        return self.observer

    def config(
        self, spec: ModelSpec, device: str, fps: float, drift_after_s: float | None = None
    ) -> Path:
        source = {"type": "synthetic", **spec.source, "fps": fps}
        if drift_after_s is not None:
            source["drift_after_s"] = drift_after_s
        return agent_config(
            self.work / device, device, self.broker, state_dir=self.work / device / "state",
            extra={
                "device": {"id": device, "groups": ["health"]},
                "log_level": "WARNING",
                "models": {
                    "require_signature": True,
                    "trusted_keys": [str(self.pub)],
                    "validation": {"timeout_s": 120},
                    "probation": {"duration_s": PROBATION_S, "min_inferences": 5},
                },
                "pipelines": [{
                    "name": PIPELINE, "model": spec.name, "queue": "fifo",
                    "source": source, "publish": {"mode": "every"}, "threshold": spec.threshold,
                }],
            },
        )  # fmt: skip

    def start(self, device: str, config: Path) -> tuple[AgentProcess, float]:
        agent = AgentProcess(config, self.work / device / "agent.log")
        self.agents.append(agent)
        since = time.time()
        agent.start()
        if not wait_until(serving(self.obs, device, since), START_TIMEOUT_S):
            raise RuntimeError(
                f"{device} did not come up serving within {START_TIMEOUT_S:.0f}s "
                f"(alive={agent.alive}): {agent.log_text()[-1500:]}"
            )
        return agent, since

    def deploy(self, device: str, bundle: Path, min_agreement: float | None = None) -> str:
        b = read_bundle(bundle)
        name = f"{b.manifest.name}-{b.manifest.version}.tflite"
        self.http.files[name] = b.model_path.read_bytes()
        body: dict[str, Any] = {
            "op": "deploy",
            "manifest": b.manifest_data,
            "signature": b.signature,
            "artifact": {"kind": "url", "url": self.http.url(name)},
        }
        if min_agreement is not None:
            body["min_agreement"] = min_agreement
        return self.obs.command(device, body)

    def rollback(self, device: str, model: str, to_version: str) -> str | None:
        """Back to ``to_version``; the final reply's code (None: no reply)."""
        body = {"op": "rollback", "model": model, "to_version": to_version}
        final = self.obs.wait_final(device, self.obs.command(device, body), DEPLOY_TIMEOUT_S)
        return None if final is None else str(final.get("code"))

    def close(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.close()
        self.http.close()
        if self.observer is not None:
            self.observer.close()
        self.broker.kill()


# --------------------------------------------------------------------------- deploys


@dataclass
class ModelRun:
    """One model's agent through both phases, and what was seen of it."""

    spec: ModelSpec
    device: str
    agent: AgentProcess
    deploy_from: float = 0.0  # the deploy phase: agent start to the last deploy's end
    deploy_to: float = 0.0
    deploys: list[dict[str, Any]] = field(default_factory=list)
    baselines: list[tuple[float, float]] = field(default_factory=list)
    shadows: list[tuple[float, float]] = field(default_factory=list)
    paired: list[tuple[tuple[float, float], tuple[float, float]]] = field(default_factory=list)
    runtime: str | None = None
    drift_from: float | None = None  # the drift phase: agent start, then the change
    drift_change: float | None = None
    drift_detected_s: float | None = None
    drift_on_at_change: bool = False


def outcome(replies: list[dict[str, Any]], sent: float) -> dict[str, Any]:
    """One deploy's outcome from its replies: code, decision time (``sent`` -> the
    ``probation`` stage of a promotion, or the refusal), the figures, and the shadow
    stage's ``shadow_window`` (device clock: replies carry the agent's, as results do)."""
    final = next((r for r in replies if r.get("status") in ("done", "failed")), None)
    if final is None:
        return {"status": None, "code": "no_reply"}
    stages = [(float(r["ts"]), r.get("stage")) for r in replies if r.get("status") == "progress"]
    data = final.get("data") or {}
    done = final["status"] == "done"
    promoted_at = next((t for t, stage in stages if stage == "probation"), None)
    decided = promoted_at if done and promoted_at is not None else float(final["ts"])
    record: dict[str, Any] = {
        "status": final["status"],
        "code": final.get("code"),
        "promoted": done and promoted_at is not None,
        "decision_s": round(decided - sent, 3),
    }
    shadow_at = next((t for t, stage in stages if stage == "shadow"), None)
    if shadow_at is not None:
        after = [t for t, stage in stages if t > shadow_at and stage not in ("shadow", None)]
        record["shadow_window"] = (shadow_at, after[0] if after else float(final["ts"]))
    running = [r["data"] for r in replies if r.get("stage") == "shadow" and r.get("data")]
    shadow = (data.get("shadow") or {}).get(PIPELINE) or (running[-1] if running else None)
    if shadow:
        record["shadow"] = {k: shadow.get(k) for k in ("frames", "agreement", "distance")}
    if data.get("golden") is not None:
        record["golden"] = data["golden"]
    if not done:
        record["message"] = str(final.get("message", ""))[:300]
    return record


def deploy_phase(lab: Lab, spec: ModelSpec, bundles: dict[int, Path], rounds: int) -> ModelRun:
    """Version 1 (seed 0) serving; ``rounds`` x each kind, made from the other training.
    A broken candidate that gets promoted (a miss) is rolled back at once, so that the
    next candidates meet a good serving model as the others did."""
    device = f"health-{spec.name}"
    v1 = hs.restamped(bundles[0], lab.work / device / "v1", lab.key, version="1")
    preinstall(lab.work / device / "state", v1)
    agent, since = lab.start(device, lab.config(spec, device, SOURCE_FPS))
    run = ModelRun(spec, device, agent, deploy_from=since)
    work = lab.work / device / "candidates"
    work.mkdir(parents=True)
    serving_seed, serving_version = 0, "1"
    time.sleep(IDLE_S)
    for n in range(rounds):
        for kind in spec.kinds:
            version = f"{n + 2}-{kind.replace('_', '-')}"
            try:
                bundle = make_candidate(kind, bundles[1 - serving_seed], work, lab.key, version)
            except ValueError as exc:  # e.g. bundles without golden samples
                run.deploys.append({"kind": kind, "version": version, "code": NOT_MADE,
                                    "message": str(exc)[:300]})  # fmt: skip
                continue
            sent = time.time()
            run.baselines.append((sent - BASELINE_S, sent))
            command_id = lab.deploy(device, bundle, spec.min_agreement)
            lab.obs.wait_final(device, command_id, DEPLOY_TIMEOUT_S)
            record = outcome(lab.obs.replies(device, command_id), sent)
            if (window := record.pop("shadow_window", None)) is not None:
                run.shadows.append(window)
                run.paired.append((run.baselines[-1], window))
            if record.get("promoted") and kind in BROKEN:
                record["rolled_back"] = lab.rollback(device, spec.name, serving_version)
            elif record.get("promoted"):
                serving_seed, serving_version = 1 - serving_seed, version
            run.deploys.append({"kind": kind, "version": version, **record})
            shutil.rmtree(bundle, ignore_errors=True)
            time.sleep(IDLE_S)
            if not agent.alive:
                raise RuntimeError(f"{device} died: {agent.log_text()[-1500:]}")
    run.deploy_to = time.time()
    run.runtime = runtime_of(lab.obs, device)
    return run


def start_drift_phase(lab: Lab, run: ModelRun, drift_after_s: float) -> None:
    """The agent again, its source at a camera's rate, the scene changing after
    ``drift_after_s``; the serving version is what the deploy phase left."""
    run.agent.terminate()
    if run.agent.wait(15) is None:
        run.agent.kill()
    config = lab.config(run.spec, run.device, DRIFT_FPS, drift_after_s)
    run.agent, run.drift_from = lab.start(run.device, config)
    opened = source_opened_at(frames_of(lab.obs, run.device, run.drift_from), DRIFT_FPS)
    if opened is None:
        raise RuntimeError(f"{run.device}: no results with frame numbers")
    run.drift_change = opened + drift_after_s


def finish_drift_phase(lab: Lab, run: ModelRun) -> None:
    change = run.drift_change
    assert change is not None

    def warned_at() -> float | None:
        return first_warning(drift_warnings(states_of(lab.obs, run.device)), change)

    wait_until(lambda: time.time() >= change, max(0.0, change - time.time()) + 10, step=0.2)
    wait_until(lambda: warned_at() is not None, DRIFT_TIMEOUT_S, step=0.1)
    if (at := warned_at()) is not None:
        run.drift_detected_s = round(at - change, 2)
    # A warning already on at the change is not raised again (nor a detection of it).
    before = [w for at, w in drift_warnings(states_of(lab.obs, run.device)) if at < change]
    run.drift_on_at_change = bool(before and before[-1])


# ------------------------------------------------------------------------------ figures


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def fraction(hits: int, of: int) -> float | None:
    return round(hits / of, 4) if of else None


def rejected(record: dict[str, Any]) -> bool:
    """Refused by model health (a refusal for any other reason is not counted)."""
    return record.get("status") == "failed" and record.get("code") in REFUSAL_CODES


def kinds_figures(deploys: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in KINDS:
        mine = [d for d in deploys if d["kind"] == kind]
        if not mine:
            continue
        shadow = [d["shadow"] for d in mine if d.get("shadow")]
        agreements = [f["agreement"] for f in shadow if f.get("agreement") is not None]
        distances = [f["distance"] for f in shadow if f.get("distance") is not None]
        out[kind] = {
            "n": len(mine),
            "codes": dict(Counter(str(d.get("code")) for d in mine)),
            "promoted": sum(bool(d.get("promoted")) for d in mine),
            "agreement_min": round(min(agreements), 4) if agreements else None,
            "agreement_max": round(max(agreements), 4) if agreements else None,
            "distance_max": round(max(distances), 4) if distances else None,
            "decision_s_p50": percentile([d["decision_s"] for d in mine if "decision_s" in d], 0.5),
        }
    return out


def model_figures(lab: Lab, run: ModelRun) -> dict[str, Any]:
    times = result_times(lab.obs, run.device)
    steady = [(run.deploy_from, run.deploy_to)]
    if run.drift_from is not None and run.drift_change is not None:
        steady.append((run.drift_from, run.drift_change))
    warnings = drift_warnings(states_of(lab.obs, run.device))
    during, without = rate(times, run.shadows), rate(times, run.baselines)
    # Each shadow stage against the idle time just before its own deploy.
    ratios = [
        a / b
        for base, shadow in run.paired
        if (a := rate(times, [shadow])) is not None and (b := rate(times, [base]))
    ]
    return {
        "runtime": run.runtime,
        "min_agreement": run.spec.min_agreement,
        "kinds": kinds_figures(run.deploys),
        "fps_without_shadow": round(without, 1) if without else None,
        "fps_during_shadow": round(during, 1) if during else None,
        "shadow_s": round(sum(b - a for a, b in run.shadows), 2),
        "shadow_fps_ratio": round(during / without, 3) if during and without else None,
        "shadow_fps_ratio_per_deploy_p50": percentile(ratios, 0.5),
        "drift_detected_s": run.drift_detected_s,
        "drift_on_at_change": run.drift_on_at_change,
        "drift_false_alarms": sum(raised_between(warnings, a, b) for a, b in steady),
        "steady_s": round(sum(b - a for a, b in steady), 1),
        "steady_frames": frames_between(times, steady),
        "deploys": run.deploys,
    }


def summary(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    deploys = [d for m in models.values() for d in m["deploys"] if d.get("code") != NOT_MADE]
    broken = [d for d in deploys if d["kind"] in BROKEN]
    good = [d for d in deploys if d["kind"] == "good"]
    ratios = [m["shadow_fps_ratio"] for m in models.values() if m["shadow_fps_ratio"] is not None]
    detected = [m["drift_detected_s"] for m in models.values()]
    steady_s = sum(m["steady_s"] for m in models.values())
    alarms = sum(m["drift_false_alarms"] for m in models.values())
    decisions = [d["decision_s"] for d in deploys if "decision_s" in d]
    return {
        "broken_rejected": fraction(sum(map(rejected, broken)), len(broken)),
        "good_accepted": fraction(sum(bool(d.get("promoted")) for d in good), len(good)),
        "decision_s_p50": percentile(decisions, 0.5),
        "decision_s_p90": percentile(decisions, 0.9),
        "decision_s_max": max(decisions, default=None),
        "shadow_fps_ratio": min(ratios) if ratios else None,
        "drift_detected_s": max(detected) if detected and None not in detected else None,
        "drift_false_alarms": alarms,
        "drift_false_alarms_per_hour": round(alarms * 3600 / steady_s, 3) if steady_s else None,
        "steady_s": round(steady_s, 1),
        "steady_frames": sum(m["steady_frames"] for m in models.values()),
        "candidates": len(deploys),
        "broken": len(broken),
        "good": len(good),
    }


# ------------------------------------------------------------------------------ run


def run(quick: bool, names: list[str]) -> dict[str, Any]:
    started = time.monotonic()
    specs = [MODELS[n] for n in names]
    rounds = 3 if quick else 20
    drift_after_s = 20.0 if quick else 600.0
    bundles = build_bundles(specs)
    work = Path(tempfile.mkdtemp(prefix="bench-health-"))
    lab: Lab | None = None
    models: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}

    def failed(what: str, exc: Exception) -> None:
        errors[what] = f"{type(exc).__name__}: {exc}"[:1500]
        print(f"model_health: {what}: {traceback.format_exc()}", file=sys.stderr)

    try:
        lab = Lab(work)
        runs: list[ModelRun] = []
        for spec in specs:
            try:
                runs.append(deploy_phase(lab, spec, bundles[spec.name], rounds))
            except Exception as exc:
                failed(spec.name, exc)
            else:
                runs[-1].agent.terminate()  # the next model's deploys have the CPU to themselves
        # The drift phases side by side: at a camera's rate the agents are light.
        for model in list(runs):
            try:
                start_drift_phase(lab, model, drift_after_s)
            except Exception as exc:
                failed(f"{model.spec.name}-drift", exc)
        for model in runs:
            if model.drift_change is not None:
                finish_drift_phase(lab, model)
            models[model.spec.name] = model_figures(lab, model)
            log = model.agent.log_text()
            if "Traceback" in log:
                errors[f"{model.spec.name}-log"] = log[-1500:]
    except Exception as exc:
        failed("setup", exc)
    finally:
        if lab is not None:
            lab.close()
        if os.environ.get("HEALTH_KEEP_WORKDIR"):
            print(f"model_health: work dir kept at {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    figures = summary(models)
    not_made = sorted({
        f"{d['kind']}: {d['message']}"
        for m in models.values() for d in m["deploys"] if d.get("code") == NOT_MADE
    })  # fmt: skip
    return {
        "benchmark": "model_health",
        "quick": quick,
        "complete": not errors and not not_made and figures["drift_detected_s"] is not None,
        "errors": errors,
        "not_made": not_made,
        **figures,
        "settings": {
            "models": names,
            "rounds": rounds,
            "source_fps": SOURCE_FPS,
            "drift_fps": DRIFT_FPS,
            "drift_after_s": drift_after_s,
            "probation_s": PROBATION_S,
            "shadow": "the device's defaults (models.probation); min_agreement per model below",
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "models": models,
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_health", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="digits and colors, 3 rounds")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--models", help=f"comma-separated, of {', '.join(MODELS)}")
    args = parser.parse_args(argv)
    names = (
        [n.strip() for n in args.models.split(",")]
        if args.models
        else (["digits", "colors"] if args.quick else list(MODELS))
    )
    if unknown := sorted(set(names) - set(MODELS)):
        parser.error(f"unknown model(s): {', '.join(unknown)}")
    result = run(args.quick, names)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
