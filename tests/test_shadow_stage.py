"""The lifecycle's shadow stage with fake servers whose shadow figures the test scripts:
a real store and validation child, the decisions of agent.models.shadow_stage."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.config import ProbationConfig
from agent.models.lifecycle import ModelLifecycle
from agent.models.serving import ServingStats, ShadowFigures, ShadowHandle, SwapDone
from agent.models.shadow_stage import ShadowRule, progress_data
from agent.models.store import ModelStore
from agent.models.validate import Requirements, Validator
from agent.protocol import CommandFailed, ReplyCode
from tests.lifecycle_support import Keys, make_bundle, make_keys

PROBATION = ProbationConfig(
    duration_s=0.2,
    min_inferences=1,
    shadow_frames=50,
    shadow_timeout_s=5.0,
    min_agreement=0.9,
    max_distance=0.5,
)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return make_keys()


class ScriptedShadow:
    """A shadow evaluation that compares ``per_look`` more frames each time it is asked
    (at most ``limit``), with the given agreement and distance."""

    def __init__(
        self,
        agreement: float,
        distance: float | None = None,
        per_look: int = 10,
        limit: int | None = None,
    ) -> None:
        self.agreement = agreement
        self.distance = distance
        self.per_look = per_look
        self.limit = limit
        self.frames = 0
        self.stopped = False

    def figures(self) -> ShadowFigures:
        if not self.stopped and (self.limit is None or self.frames < self.limit):
            self.frames += self.per_look
        agreement = self.agreement if self.frames else None
        return ShadowFigures(self.frames, agreement, self.distance)

    def stop(self) -> None:
        self.stopped = True


class ShadowingServer:
    """A ModelServer with shadow evaluation; ``shadow`` is what ``start_shadow`` gives."""

    model_name = "digits"

    def __init__(self, shadow: ScriptedShadow | Exception, pipeline: str = "cam") -> None:
        self.pipeline = pipeline
        self.shadow = shadow
        self.version: str | None = None
        self.swaps: list[str | None] = []
        self.shadowed: list[str] = []

    def serving_version(self) -> str | None:
        return self.version

    def swap(self, version: str | None, model_path: Path | None) -> Future[SwapDone]:
        f: Future[SwapDone] = Future()
        f.set_result(SwapDone(self.pipeline, version, self.version, 1.0))
        self.swaps.append(version)
        self.version = version
        return f

    def stats(self, version: str) -> ServingStats | None:
        return ServingStats(version, 100, 0, 0, 1.0, 1.0, 10.0)

    def requirements(self) -> Requirements | None:
        return None

    def start_shadow(self, version: str, model_path: Path) -> Future[ShadowHandle]:
        assert model_path.is_file()
        self.shadowed.append(version)
        f: Future[ShadowHandle] = Future()
        if isinstance(self.shadow, Exception):
            f.set_exception(self.shadow)
        else:
            f.set_result(self.shadow)
        return f


@dataclass
class Device:
    lifecycle: ModelLifecycle
    servers: list[ShadowingServer]
    keys: Keys
    workdir: Path
    seen: list[tuple[str, float | None, dict[str, Any] | None]] = field(default_factory=list)

    def progress(
        self, stage: str, percent: float | None, data: dict[str, Any] | None = None
    ) -> None:
        self.seen.append((stage, percent, data))

    @property
    def stages(self) -> list[str]:
        return list(dict.fromkeys(stage for stage, _, _ in self.seen))

    def deploy(self, model: Path, version: str, **checks: Any) -> dict[str, Any]:
        self.seen.clear()
        bundle = make_bundle(self.workdir / f"b-{version}", model, self.keys, "digits", version)
        return self.lifecycle.deploy(
            bundle.manifest_data, bundle.signature, bundle.model_path, None, self.progress, **checks
        )

    def refused(self, model: Path, version: str, **checks: Any) -> CommandFailed:
        with pytest.raises(CommandFailed) as info:
            self.deploy(model, version, **checks)
        return info.value

    def active(self) -> str | None:
        return self.lifecycle.store.record("digits").active


def device(
    tmp_path: Path,
    keys: Keys,
    model: Path,
    *servers: ShadowingServer,
    probation: ProbationConfig = PROBATION,
) -> Device:
    """A lifecycle whose servers already serve version 1 (it had nothing to shadow)."""
    store = ModelStore(tmp_path / "state", trusted_keys=[keys.public])
    validator = Validator(runtime="ai_edge_litert", timeout_s=30)
    lifecycle = ModelLifecycle(
        store, validator, list(servers), probation=probation, swap_timeout_s=10, poll_s=0.01
    )
    lifecycle.start()
    d = Device(lifecycle, list(servers), keys, tmp_path)
    d.deploy(model, "1")
    assert "shadow" not in d.stages and d.active() == "1"
    for s in servers:
        assert (s.version, s.shadowed) == ("1", [])
    return d


def test_a_candidate_that_disagrees_is_refused_and_never_served(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    shadow = ScriptedShadow(agreement=0.42, distance=0.1)
    server = ShadowingServer(shadow)
    d = device(tmp_path, keys, tiny_int8_model, server)
    failed = d.refused(tiny_int8_model, "2")
    assert failed.code == ReplyCode.SHADOW_REJECTED
    assert "digits 2 refused by shadow evaluation: agreement 0.420 < 0.9 on pipeline cam" in (
        failed.message
    )
    assert "50 frames on cam compared with the serving version" in failed.message
    assert failed.data == {
        "model": "digits",
        "version": "2",
        "shadow": {"cam": {"frames": 50, "agreement": 0.42, "distance": 0.1}},
    }
    # The active version untouched, the candidate gone from the store, its shadow ended.
    assert server.shadowed == ["2"] and server.swaps == ["1"] and server.version == "1"
    assert d.active() == "1" and d.lifecycle.store.versions("digits") == ["1"]
    assert d.lifecycle.store.record("digits").trial is None
    assert shadow.stopped
    assert d.stages == ["installing", "validating", "shadow"]
    # The progress replies carried the running figures, up to 100 %.
    shadow_reports = [(pct, data) for stage, pct, data in d.seen if stage == "shadow"]
    assert shadow_reports[0] == (0.0, {"frames": 0, "agreement": None, "distance": None})
    assert shadow_reports[-1] == (100.0, {"frames": 50, "agreement": 0.42, "distance": 0.1})


def test_a_candidate_that_agrees_goes_on_to_swap_and_probation(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    cams = [ShadowingServer(ScriptedShadow(0.96, 0.2), p) for p in ("cam", "door")]
    # The slower pipeline decides when the stage ends.
    cams[1].shadow = ScriptedShadow(0.93, None, per_look=5)
    d = device(tmp_path, keys, tiny_int8_model, *cams)
    done = d.deploy(tiny_int8_model, "2")
    assert d.stages == ["installing", "validating", "shadow", "swapping", "probation"]
    assert done["shadow"] == {
        "cam": {"frames": 50, "agreement": 0.96, "distance": 0.2},
        "door": {"frames": 50, "agreement": 0.93, "distance": None},
    }
    assert done["probation"]["cam"]["invokes"] == 100
    assert [s.version for s in cams] == ["2", "2"] and d.active() == "2"
    assert d.lifecycle.store.record("digits").last_known_good == "2"
    # Over the pipelines: the fewest frames, the lowest agreement, the largest distance.
    last = [data for stage, _, data in d.seen if stage == "shadow"][-1]
    assert last == {"frames": 50, "agreement": 0.93, "distance": 0.2}


def test_a_candidate_far_from_its_reference_is_refused(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    d = device(tmp_path, keys, tiny_int8_model, ShadowingServer(ScriptedShadow(1.0, 3.25)))
    failed = d.refused(tiny_int8_model, "2")
    assert failed.code == ReplyCode.SHADOW_REJECTED
    assert "distance 3.25 > 0.5 on pipeline cam" in failed.message
    assert d.active() == "1" and d.lifecycle.store.versions("digits") == ["1"]


def test_too_few_frames_in_time_is_a_refusal(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    probation = PROBATION.model_copy(update={"shadow_timeout_s": 0.2})
    starved = ScriptedShadow(1.0, None, limit=30)
    d = device(tmp_path, keys, tiny_int8_model, ShadowingServer(starved), probation=probation)
    failed = d.refused(tiny_int8_model, "2")
    assert failed.code == ReplyCode.SHADOW_REJECTED
    assert "fewer than 50 frames compared within 0.2s of shadow evaluation (30 frames on cam)" in (
        failed.message
    )
    assert failed.data is not None and failed.data["shadow"]["cam"]["frames"] == 30
    assert d.active() == "1" and d.lifecycle.store.versions("digits") == ["1"]
    assert starved.stopped


def test_the_deploy_sets_its_own_agreement_or_skips_the_stage(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    server = ShadowingServer(ScriptedShadow(0.7))
    d = device(tmp_path, keys, tiny_int8_model, server)
    assert d.refused(tiny_int8_model, "2").code == ReplyCode.SHADOW_REJECTED
    # A retrained model is expected to differ more: this deploy allows it.
    server.shadow = ScriptedShadow(0.7)
    assert d.deploy(tiny_int8_model, "2", min_agreement=0.6)["shadow"]["cam"]["agreement"] == 0.7
    # shadow=False skips it, whatever the figures would have been.
    server.shadow = ScriptedShadow(0.0)
    done = d.deploy(tiny_int8_model, "3", shadow=False)
    assert "shadow" not in done and "shadow" not in d.stages
    assert server.shadowed == ["2", "2"] and d.active() == "3"


def test_shadow_off_in_the_config_and_servers_that_cannot_shadow(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    off = PROBATION.model_copy(update={"shadow": False})
    server = ShadowingServer(ScriptedShadow(0.0))
    d = device(tmp_path / "off", keys, tiny_int8_model, server, probation=off)
    assert "shadow" not in d.deploy(tiny_int8_model, "2") and server.shadowed == []
    # ...unless the deploy asks for it.
    assert d.refused(tiny_int8_model, "3", shadow=True).code == ReplyCode.SHADOW_REJECTED

    class Plain(ShadowingServer):
        start_shadow = None  # type: ignore[assignment]

    plain = Plain(ScriptedShadow(0.0))
    d = device(tmp_path / "plain", keys, tiny_int8_model, plain)
    assert "shadow" not in d.deploy(tiny_int8_model, "2") and d.active() == "2"


def test_a_candidate_that_cannot_be_built_beside_is_a_validation_failure(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    server = ShadowingServer(RuntimeError("cannot build digits 2 beside the serving version"))
    d = device(tmp_path, keys, tiny_int8_model, server)
    failed = d.refused(tiny_int8_model, "2")
    assert failed.code == ReplyCode.VALIDATION_FAILED
    assert failed.message == "digits 2: cannot build digits 2 beside the serving version"
    assert d.active() == "1" and d.lifecycle.store.versions("digits") == ["1"]


def test_an_agent_stop_ends_the_stage_and_the_candidate_is_not_kept(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    endless = ScriptedShadow(1.0, None, limit=10)
    probation = PROBATION.model_copy(update={"shadow_timeout_s": 600.0})
    d = device(tmp_path, keys, tiny_int8_model, ShadowingServer(endless), probation=probation)
    outcome: list[CommandFailed] = []

    def deploy() -> None:
        outcome.append(d.refused(tiny_int8_model, "2"))

    worker = threading.Thread(target=deploy)
    worker.start()
    while "shadow" not in d.stages:
        threading.Event().wait(0.01)
    d.lifecycle.stop()  # what the agent does on SIGTERM
    worker.join(30)
    assert not worker.is_alive()
    (failed,) = outcome
    assert failed.code == ReplyCode.INTERRUPTED
    assert "stopped during shadow evaluation" in failed.message
    assert endless.stopped
    assert d.active() == "1" and d.lifecycle.store.versions("digits") == ["1"]


def test_rule_and_progress_figures() -> None:
    rule = ShadowRule.of(PROBATION, None, 0.5)
    assert rule == ShadowRule(frames=50, timeout_s=5.0, min_agreement=0.5, max_distance=0.5)
    assert ShadowRule.of(PROBATION, False, None) is None
    assert rule.problem(ShadowFigures(50, 0.5, 0.5)) is None
    assert rule.problem(ShadowFigures(50, None, None)) == "agreement 0.000 < 0.5"
    failing = ShadowFigures(50, 0.2, None, errors=3, last_error="NaN/inf outputs")
    assert rule.problem(failing) == "agreement 0.200 < 0.5, 3 failed frames (NaN/inf outputs)"
    assert progress_data({}) == {"frames": 0, "agreement": None, "distance": None}
