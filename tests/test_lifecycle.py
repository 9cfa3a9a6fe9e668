"""The model lifecycle end to end, on both device runtimes: store, child validation,
hot-swap on a running worker, probation, rollback and start-up recovery."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import ProbationConfig
from agent.loops.frames import Frame
from agent.loops.worker import InferenceWorker, ServedModel, feed_tensor
from agent.models import manifest as mf
from agent.models.lifecycle import ModelLifecycle, ServingStats, SwapDone
from agent.models.store import ModelStore
from agent.models.validate import Requirements, Validator
from agent.protocol import CommandFailed, ReplyCode
from tests.converter_support import build_digits_bundle
from tests.health_support import perturbed_golden
from tests.lifecycle_support import (
    RUNTIMES,
    Keys,
    Results,
    build_nan_classifier,
    faulty_child,
    make_bundle,
    make_keys,
    manifest_for,
    running_worker,
)
from tests.model_factory import build_slow_classifier

FAST_PROBATION = ProbationConfig(duration_s=0.3, min_inferences=5, max_latency_ratio=2.0)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return make_keys()


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_nan_classifier(tmp_path_factory.mktemp("m") / "nan.tflite")


@dataclass
class Device:
    """One pipeline's worker fed by a paced stream, and a lifecycle over a store."""

    runtime: str
    state_dir: Path
    keys: Keys
    worker: InferenceWorker
    results: Results
    lifecycle: ModelLifecycle
    stages: list[str] = field(default_factory=list)

    def progress(self, stage: str, percent: float | None) -> None:
        self.stages.append(stage)

    def deploy(self, model: Path, version: str, *, name: str = "digits", **kw: Any) -> dict:
        bundle = make_bundle(
            self.state_dir.parent / f"b-{name}-{version}", model, self.keys, name, version
        )
        return self.lifecycle.deploy(
            bundle.manifest_data,
            bundle.signature,
            bundle.model_path,
            kw.get("pipeline"),
            self.progress,
        )

    def state(self) -> tuple[str | None, str | None, str]:
        (s,) = [m for m in self.lifecycle.model_states() if m.name == "digits"]
        return s.active, s.last_known_good, s.status


def make_lifecycle(
    state_dir: Path,
    keys: Keys,
    runtime: str,
    servers: list[Any],
    *,
    write: Any = os.write,
    child: tuple[str, ...] | None = None,
    probation: ProbationConfig = FAST_PROBATION,
) -> ModelLifecycle:
    store = ModelStore(state_dir, trusted_keys=[keys.public], write=write)
    extra = {"child": child} if child else {}
    validator = Validator(runtime=runtime, timeout_s=30, **extra)
    lifecycle = ModelLifecycle(store, validator, servers, probation=probation, swap_timeout_s=20)
    lifecycle.start()
    return lifecycle


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


INT8_FRAME = np.random.default_rng(3).integers(-128, 127, (1, 8, 8, 1), dtype=np.int8)
FLOAT_FRAME = np.zeros((1, 8, 8, 1), np.float32)


@contextlib.contextmanager
def device(
    tmp_path: Path, keys: Keys, runtime: str, data: np.ndarray = INT8_FRAME, **kw: Any
) -> Iterator[Device]:
    worker_kw = {k: kw.pop(k) for k in ("prepare",) if k in kw}
    with running_worker("cam", "digits", data, runtime, **worker_kw) as (worker, results, _f):
        lifecycle = make_lifecycle(tmp_path / "state", keys, runtime, [worker], **kw)
        try:
            yield Device(runtime, tmp_path / "state", keys, worker, results, lifecycle)
        finally:
            lifecycle.stop()


def test_a_model_no_pipeline_uses_is_stored_through_deploy_rollback_and_restart(
    tmp_path: Path, keys: Keys, runtime: str, tiny_int8_model: Path
) -> None:
    def spare() -> tuple[str | None, str, str | None]:
        (s,) = [m for m in d.lifecycle.model_states() if m.name == "spare"]
        return s.active, s.status, s.message

    with device(tmp_path, keys, runtime) as d:
        first = d.deploy(tiny_int8_model, "1", name="spare")
        assert (first["served"], first["pipelines"]) == (False, [])
        assert d.stages == ["installing", "validating", "swapping"]  # no probation to wait for
        d.deploy(tiny_int8_model, "2", name="spare")
        active, status, message = spare()
        assert (active, status) == ("2", "stored") and "no pipeline uses model spare" in (
            message or ""
        )
        back = d.lifecycle.rollback("spare", "1", d.progress)
        assert (back["version"], back["served"]) == ("1", False) and "spare" in back["note"]
        active, status, message = spare()
        assert (active, status) == ("1", "stored")
        assert message and message.startswith("rolled back to 1 by command; no pipeline uses")
        d.lifecycle.stop()
        d.lifecycle = make_lifecycle(d.state_dir, keys, runtime, [d.worker])
        assert spare()[:2] == ("1", "stored")  # as the restart found it
        assert d.worker.serving_version() is None  # the pipeline's model, digits, is not stored


def test_deploy_swaps_and_passes_probation(
    tmp_path: Path, keys: Keys, runtime: str, tiny_int8_model: Path
) -> None:
    with device(tmp_path, keys, runtime) as d:
        assert d.state() == (None, None, "absent")
        first = d.deploy(tiny_int8_model, "1")
        assert first["model"] == "digits" and first["version"] == "1"
        assert first["previous"] is None and first["pipelines"] == ["cam"]
        assert first["probation"]["cam"]["invokes"] >= 5
        assert d.stages == ["installing", "validating", "swapping", "probation"]
        assert d.state() == ("1", "1", "serving")
        second = d.deploy(tiny_int8_model, "2")
        assert (second["version"], second["previous"]) == ("2", "1")
        assert d.state() == ("2", "2", "serving")
        assert d.worker.serving_version() == "2"
        n = len(d.results.snapshot())
        later = d.results.wait_for(n + 5)[n:]
        assert {(r.model, r.version) for r in later} == {("digits", "2")}
        again = d.deploy(tiny_int8_model, "2")
        assert again["unchanged"] is True


def bad_deploys(
    tmp: Path, keys: Keys, model: Path
) -> list[tuple[str, dict, str | None, Path, ReplyCode]]:
    good = manifest_for(model, version="2")

    def sign(data: dict, k: Keys = keys) -> str:
        return mf.sign_manifest(data, k.private)

    short = tmp / "short.tflite"
    short.write_bytes(model.read_bytes()[:-64])
    flipped = bytearray(model.read_bytes())
    flipped[300] ^= 0x55
    changed = tmp / "changed.tflite"
    changed.write_bytes(bytes(flipped))
    no_inputs = {k: v for k, v in good.items() if k != "inputs"}
    slash = manifest_for(model, version="2/../../x")
    return [
        ("truncated", good, sign(good), short, ReplyCode.CHECKSUM_MISMATCH),
        ("sha256", good, sign(good), changed, ReplyCode.CHECKSUM_MISMATCH),
        ("unsigned", good, None, model, ReplyCode.BAD_SIGNATURE),
        ("bad signature", good, sign(no_inputs), model, ReplyCode.BAD_SIGNATURE),
        ("unknown key", good, sign(good, make_keys()), model, ReplyCode.BAD_SIGNATURE),
        ("slash", slash, sign(slash), model, ReplyCode.BAD_MANIFEST),
        ("missing field", no_inputs, sign(no_inputs), model, ReplyCode.BAD_MANIFEST),
    ]


def test_bad_input_is_refused_and_the_active_model_keeps_serving(
    tmp_path: Path, keys: Keys, runtime: str, tiny_int8_model: Path
) -> None:
    with device(tmp_path, keys, runtime) as d:
        d.deploy(tiny_int8_model, "1")
        for what, manifest, sig, model, code in bad_deploys(tmp_path, keys, tiny_int8_model):
            with pytest.raises(CommandFailed) as info:
                d.lifecycle.deploy(manifest, sig, model, None, d.progress)
            assert info.value.code == code, (what, info.value.message)
            assert "\n" not in info.value.message
            assert d.state() == ("1", "1", "serving"), what
            assert d.worker.serving_version() == "1"
            assert d.lifecycle.store.versions("digits") == ["1"]
            assert not any((d.state_dir / "models/.incoming").glob("*"))


def test_disk_full_during_a_deploy(
    tmp_path: Path, keys: Keys, runtime: str, tiny_int8_model: Path
) -> None:
    room = {"left": 10**9}

    def disk(fd: int, data: bytes) -> int:
        if room["left"] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(fd, data[: room["left"]])
        room["left"] -= n
        return n

    with device(tmp_path, keys, runtime, write=disk) as d:
        d.deploy(tiny_int8_model, "1")
        room["left"] = 2000
        with pytest.raises(CommandFailed) as info:
            d.deploy(tiny_int8_model, "2")
        assert info.value.code == ReplyCode.STORAGE_FAILED
        assert "disk full" in info.value.message
        assert d.state() == ("1", "1", "serving")
        assert not any((d.state_dir / "models/.incoming").glob("*"))


def test_a_model_that_fails_validation_is_not_kept(
    tmp_path: Path, keys: Keys, runtime: str, tiny_int8_model: Path, tiny_float_model: Path
) -> None:
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"\0" * 4096)
    with device(tmp_path, keys, runtime) as d:
        d.deploy(tiny_int8_model, "1")
        manifest = manifest_for(tiny_int8_model, version="2")
        manifest["model"] = {**manifest["model"], "size": 4096}
        manifest["model"]["sha256"] = hashlib.sha256(b"\0" * 4096).hexdigest()
        with pytest.raises(CommandFailed) as info:
            d.lifecycle.deploy(
                manifest, mf.sign_manifest(manifest, keys.private), garbage, None, d.progress
            )
        assert info.value.code == ReplyCode.VALIDATION_FAILED
        assert f"{runtime} cannot load the model" in info.value.message
        # A float model does not fit the int8 pipeline.
        with pytest.raises(CommandFailed) as info:
            d.deploy(tiny_float_model, "3")
        assert info.value.code == ReplyCode.INCOMPATIBLE
        assert "do not fit the pipeline" in info.value.message
        assert d.lifecycle.store.versions("digits") == ["1"]
        assert d.state() == ("1", "1", "serving")
        assert d.worker.serving_version() == "1"


def test_a_model_that_kills_its_validator(
    tmp_path: Path, keys: Keys, runtime: str, tiny_int8_model: Path
) -> None:
    with device(tmp_path, keys, runtime, child=faulty_child("abort")) as d:
        with pytest.raises(CommandFailed) as info:
            d.deploy(tiny_int8_model, "1")
        assert info.value.code == ReplyCode.VALIDATION_FAILED
        assert "crashed the validator (signal SIGABRT)" in info.value.message
        assert d.worker.serving_version() is None
        assert d.state() == (None, None, "absent")


def test_nan_outputs_fail_probation_and_roll_back(
    tmp_path: Path, keys: Keys, runtime: str, tiny_float_model: Path, nan_model: Path
) -> None:
    with device(tmp_path, keys, runtime, data=FLOAT_FRAME) as d:
        d.deploy(tiny_float_model, "1")
        with pytest.raises(CommandFailed) as info:
            d.deploy(nan_model, "2")
        assert info.value.code == ReplyCode.PROBATION_FAILED
        assert "NaN/inf outputs on pipeline cam; rolled back to 1" in info.value.message
        assert info.value.data == {"model": "digits", "version": "2", "rolled_back_to": "1"}
        assert d.worker.serving_version() == "1"
        active, lkg, status = d.state()
        assert (active, lkg, status) == ("1", "1", "serving")
        (s,) = d.lifecycle.model_states()
        assert "2 failed probation" in (s.message or "")
        assert s.versions == ["1", "2"]  # kept for a post-mortem
        n = len(d.results.snapshot())
        assert {r.version for r in d.results.wait_for(n + 5)[n:]} == {"1"}


def test_invoke_errors_fail_probation_and_roll_back(
    tmp_path: Path, keys: Keys, runtime: str, tiny_int8_model: Path
) -> None:
    def broken_in_v2(model: ServedModel, frame: Frame) -> None:
        if model.version == "2":
            raise RuntimeError("tensor arena overflow")
        feed_tensor(model, frame)

    with device(tmp_path, keys, runtime, prepare=broken_in_v2) as d:
        d.deploy(tiny_int8_model, "1")
        with pytest.raises(CommandFailed, match="invoke errors on pipeline cam .tensor arena"):
            d.deploy(tiny_int8_model, "2")
        assert d.worker.serving_version() == "1"
        assert d.state()[:2] == ("1", "1")


def test_first_version_failing_probation_leaves_no_model(
    tmp_path: Path, keys: Keys, runtime: str, nan_model: Path
) -> None:
    with device(tmp_path, keys, runtime, data=FLOAT_FRAME) as d:
        with pytest.raises(CommandFailed, match="no version to roll back to"):
            d.deploy(nan_model, "1")
        assert d.worker.serving_version() is None
        active, _lkg, status = d.state()
        assert (active, status) == (None, "degraded")


def test_manual_rollback_to_previous_and_named(
    tmp_path: Path, keys: Keys, runtime: str, tiny_int8_model: Path
) -> None:
    with device(tmp_path, keys, runtime) as d:
        d.deploy(tiny_int8_model, "1")
        d.deploy(tiny_int8_model, "2")
        back = d.lifecycle.rollback("digits", None, d.progress)
        assert (back["version"], back["previous"]) == ("1", "2")
        assert d.worker.serving_version() == "1"
        assert d.state() == ("1", "1", "serving")
        forth = d.lifecycle.rollback("digits", "2", d.progress)
        assert forth["version"] == "2" and d.worker.serving_version() == "2"
        for model, version in (("digits", "9"), ("nope", None), ("digits", "../1")):
            with pytest.raises(CommandFailed) as info:
                d.lifecycle.rollback(model, version, d.progress)
            assert info.value.code == ReplyCode.NOT_FOUND, info.value.message


def test_restart_with_a_corrupt_active_version_falls_back(
    tmp_path: Path, keys: Keys, runtime: str, tiny_int8_model: Path
) -> None:
    with device(tmp_path, keys, runtime) as d:
        d.deploy(tiny_int8_model, "1")
        d.deploy(tiny_int8_model, "2")
        d.lifecycle.rollback("digits", "1", d.progress)
        d.deploy(tiny_int8_model, "3")  # active 3, last-known-good 3, 2 and 1 kept
    model3 = tmp_path / "state/models/digits/3/model.tflite"
    with model3.open("r+b") as f:
        f.seek(64)
        f.write(b"\xff" * 16)
    with device(tmp_path, keys, runtime) as d:
        active, lkg, status = d.state()
        assert (active, lkg, status) == ("2", "3", "degraded")
        (s,) = d.lifecycle.model_states()
        assert "active version 3 failed" in (s.message or "") and "sha256" in (s.message or "")
        assert d.worker.serving_version() == "2"
        assert {r.version for r in d.results.wait_for(5)} == {"2"}


def test_restart_with_no_valid_version_runs_without_the_model(
    tmp_path: Path, keys: Keys, runtime: str, tiny_int8_model: Path
) -> None:
    with device(tmp_path, keys, runtime) as d:
        d.deploy(tiny_int8_model, "1")
    (tmp_path / "state/models/digits/1/model.tflite").write_bytes(b"gone")
    with device(tmp_path, keys, runtime) as d:
        (s,) = d.lifecycle.model_states()
        assert (s.active, s.status) == (None, "degraded")
        assert "no valid version" in (s.message or "") and "running without model digits" in (
            s.message or ""
        )
        assert d.worker.serving_version() is None
        # A good deploy brings it back.
        d.deploy(tiny_int8_model, "2")
        assert d.worker.serving_version() == "2"


def test_a_second_deploy_of_the_same_model_is_busy(
    tmp_path: Path, keys: Keys, runtime: str, tiny_int8_model: Path
) -> None:
    slow = ProbationConfig(duration_s=1.5, min_inferences=5, max_latency_ratio=2.0)
    with device(tmp_path, keys, runtime, probation=slow) as d:
        outcome: list[Any] = []
        first = threading.Thread(target=lambda: outcome.append(d.deploy(tiny_int8_model, "1")))
        first.start()
        while "probation" not in d.stages:
            threading.Event().wait(0.02)
        with pytest.raises(CommandFailed) as info:
            d.deploy(tiny_int8_model, "2")
        assert info.value.code == ReplyCode.BUSY
        first.join(10)
        assert outcome and outcome[0]["version"] == "1"


def test_pipeline_argument_is_checked(
    tmp_path: Path, keys: Keys, runtime: str, tiny_int8_model: Path
) -> None:
    with device(tmp_path, keys, runtime) as d:
        with pytest.raises(CommandFailed) as info:
            d.deploy(tiny_int8_model, "1", pipeline="door")
        assert info.value.code == ReplyCode.NOT_FOUND
        with pytest.raises(CommandFailed) as info:
            d.deploy(tiny_int8_model, "1", name="other", pipeline="cam")
        assert info.value.code == ReplyCode.INCOMPATIBLE
        assert d.deploy(tiny_int8_model, "1", pipeline="cam")["pipelines"] == ["cam"]


# ------------------------------------------------------------------- latency rule


@pytest.fixture(scope="module")
def slow_int8_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_int8_model's inputs and outputs, about a thousand times the work."""
    return build_slow_classifier(tmp_path_factory.mktemp("m") / "slow.tflite")


def test_a_really_slower_model_fails_probation_on_a_real_worker_and_is_rolled_back(
    tmp_path: Path, keys: Keys, runtime: str, tiny_int8_model: Path, slow_int8_model: Path
) -> None:
    probation = ProbationConfig(duration_s=1.0, min_inferences=5, max_latency_ratio=2.0)
    with device(tmp_path, keys, runtime, probation=probation) as d:
        d.deploy(tiny_int8_model, "1")
        fast = d.worker.stats("1")
        assert fast is not None and fast.p95_ms is not None
        with pytest.raises(CommandFailed) as info:
            d.deploy(slow_int8_model, "2")
        assert info.value.code == ReplyCode.PROBATION_FAILED, info.value.message
        assert "p95 invoke latency" in info.value.message
        assert "over 2x the previous version's" in info.value.message
        assert "rolled back to 1" in info.value.message
        assert d.worker.serving_version() == "1"
        assert d.state() == ("1", "1", "serving")
        slow = d.worker.stats("2")
        assert slow is not None and slow.p95_ms is not None and slow.errors == 0
        assert slow.p95_ms > 2 * fast.p95_ms
        # Served again after the rollback: the results after it are version 1's.
        served = len(d.results.snapshot())
        d.results.wait_for(served + 10)
        assert {r.version for r in d.results.snapshot()[served:]} == {"1"}


# ------------------------------------------------------- latency rule (unit, fake server)


class FakeServer:
    """A ModelServer whose statistics the test dictates."""

    pipeline = "cam"
    model_name = "digits"

    def __init__(self, p95: dict[str, float]) -> None:
        self.p95 = p95
        self.version: str | None = None

    def serving_version(self) -> str | None:
        return self.version

    def swap(self, version: str | None, model_path: Path | None) -> Future[SwapDone]:
        f: Future[SwapDone] = Future()
        f.set_result(SwapDone("cam", version, self.version, 1.0))
        self.version = version
        return f

    def stats(self, version: str) -> ServingStats | None:
        return ServingStats(version, 100, 0, 0, 1.0, self.p95[version], 10.0)

    def requirements(self) -> Requirements | None:
        return None


def test_p95_latency_over_the_ratio_fails_probation(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    server = FakeServer({"1": 2.0, "2": 4.5})
    lifecycle = make_lifecycle(tmp_path / "state", keys, "ai_edge_litert", [server])
    d = Device("ai_edge_litert", tmp_path / "state", keys, None, Results(), lifecycle)  # type: ignore[arg-type]
    d.deploy(tiny_int8_model, "1")
    with pytest.raises(CommandFailed) as info:
        d.deploy(tiny_int8_model, "2")
    assert info.value.code == ReplyCode.PROBATION_FAILED
    assert (
        "p95 invoke latency 4.50 ms on pipeline cam is over 2x the previous version's 2.00 ms"
        in info.value.message
    )
    assert server.version == "1"


def test_sub_millisecond_jitter_does_not_fail_probation(
    tmp_path: Path, keys: Keys, tiny_int8_model: Path
) -> None:
    # 0.03 -> 0.07 ms is over 2x, but costs nothing a frame: noise on a busy machine.
    server = FakeServer({"1": 0.03, "2": 0.07})
    lifecycle = make_lifecycle(tmp_path / "state", keys, "ai_edge_litert", [server])
    d = Device("ai_edge_litert", tmp_path / "state", keys, None, Results(), lifecycle)  # type: ignore[arg-type]
    d.deploy(tiny_int8_model, "1")
    d.deploy(tiny_int8_model, "2")
    assert server.version == "2"


# ------------------------------------------------- crashes, trial state and downgrades


class Killed(BaseException):
    """Stands for SIGKILL at a stage: nothing after it runs, no handler sees it."""


def killed_at(stage: str) -> Any:
    def progress(seen: str, percent: float | None) -> None:
        if seen == stage:
            raise Killed(stage)

    return progress


def deploy_killed_at(d: Device, model: Path, version: str, stage: str) -> None:
    bundle = make_bundle(
        d.state_dir.parent / f"b-digits-{version}", model, d.keys, "digits", version
    )
    with pytest.raises(Killed):
        d.lifecycle.deploy(
            bundle.manifest_data, bundle.signature, bundle.model_path, None, killed_at(stage)
        )


def test_a_restart_during_probation_serves_last_known_good(
    tmp_path: Path, keys: Keys, runtime: str, tiny_int8_model: Path
) -> None:
    """Fails on the old code: the unproven version was active and came back as serving."""
    with device(tmp_path, keys, runtime) as d:
        d.deploy(tiny_int8_model, "1")
        deploy_killed_at(d, tiny_int8_model, "2", "probation")
        assert d.worker.serving_version() == "2"  # it was on trial when the agent died
    # The restart, and one more: the candidate (think: it kills the process on real
    # frames) is never served again, so the device cannot crash-loop on it.
    for _ in range(2):
        with device(tmp_path, keys, runtime) as d:
            (s,) = d.lifecycle.model_states()
            assert (s.active, s.last_known_good, s.status) == ("1", "1", "serving")
            assert (s.message or "").startswith(
                "probation_failed: version 2: agent restarted during probation"
            ), s.message
            assert d.worker.serving_version() == "1"
            assert {r.version for r in d.results.wait_for(5)} == {"1"}
            rec = d.lifecycle.store.record("digits")
            assert (rec.trial, rec.failed, s.versions) == (None, ["2"], ["1", "2"])
            assert rec.failure == {
                "version": "2",
                "code": "probation_failed",
                "message": "agent restarted during probation",
                "rolled_back_to": "1",
            }
            assert d.lifecycle.last_failure("digits") == rec.failure
    # A rollback without a target never picks the failed version...
    with device(tmp_path, keys, runtime) as d:
        with pytest.raises(CommandFailed) as info:
            d.lifecycle.rollback("digits", None, d.progress)
        assert info.value.code == ReplyCode.NOT_FOUND
        # ...an explicit one does: the operator vouches for it.
        assert d.lifecycle.rollback("digits", "2", d.progress)["version"] == "2"
        assert d.state() == ("2", "2", "serving")
        assert d.lifecycle.store.record("digits").failed == []


def test_a_restart_during_the_first_probation_leaves_no_model(
    tmp_path: Path, keys: Keys, runtime: str, tiny_int8_model: Path
) -> None:
    with device(tmp_path, keys, runtime) as d:
        deploy_killed_at(d, tiny_int8_model, "1", "probation")
    with device(tmp_path, keys, runtime) as d:
        (s,) = d.lifecycle.model_states()
        assert (s.active, s.status) == (None, "degraded")
        assert "agent restarted during probation" in (s.message or "")
        assert d.worker.serving_version() is None
        # A new version is the way forward.
        d.deploy(tiny_int8_model, "2")
        assert d.state() == ("2", "2", "serving")


@pytest.mark.parametrize("stage", ["validating", "swapping"])
def test_a_deploy_killed_before_its_swap_leaves_nothing(
    tmp_path: Path, keys: Keys, runtime: str, tiny_int8_model: Path, stage: str
) -> None:
    with device(tmp_path, keys, runtime) as d:
        d.deploy(tiny_int8_model, "1")
        deploy_killed_at(d, tiny_int8_model, "2", stage)
    with device(tmp_path, keys, runtime) as d:
        assert d.state() == ("1", "1", "serving")
        assert d.lifecycle.store.versions("digits") == ["1"]
        assert not (d.state_dir / "models/digits/2").exists()
        # So the operator's retry is a plain deploy again.
        d.deploy(tiny_int8_model, "2")
        assert d.state() == ("2", "2", "serving")


def test_deploys_do_not_go_back(
    tmp_path: Path, keys: Keys, runtime: str, tiny_int8_model: Path
) -> None:
    with device(tmp_path, keys, runtime) as d:
        d.deploy(tiny_int8_model, "1")
        d.deploy(tiny_int8_model, "2")
        # A replay of version 1's signed deploy: stored here, not active.
        with pytest.raises(CommandFailed) as info:
            d.deploy(tiny_int8_model, "1")
        assert info.value.code == ReplyCode.DOWNGRADE
        assert "rollback" in info.value.message
        # A version the device has never seen, but built before the active one.
        old = manifest_for(tiny_int8_model, version="0", created_at="2026-01-01T00:00:00Z")
        with pytest.raises(CommandFailed) as info:
            d.lifecycle.deploy(
                old, mf.sign_manifest(old, keys.private), tiny_int8_model, None, d.progress
            )
        assert info.value.code == ReplyCode.DOWNGRADE
        assert "created at 2026-01-01T00:00:00Z, before version 2" in info.value.message
        assert d.state() == ("2", "2", "serving") and d.worker.serving_version() == "2"
        assert d.lifecycle.store.versions("digits") == ["1", "2"]
        # The active version again is unchanged, a newer one goes ahead, rollback goes back.
        assert d.deploy(tiny_int8_model, "2")["unchanged"] is True
        newer = manifest_for(tiny_int8_model, version="3", created_at="2026-12-01T00:00:00Z")
        d.lifecycle.deploy(
            newer, mf.sign_manifest(newer, keys.private), tiny_int8_model, None, d.progress
        )
        assert d.state() == ("3", "3", "serving")
        assert d.lifecycle.rollback("digits", "1", d.progress)["version"] == "1"
        assert d.worker.serving_version() == "1"


def test_a_stop_during_probation_leaves_the_trial_to_the_next_start(
    tmp_path: Path, keys: Keys, runtime: str, tiny_int8_model: Path
) -> None:
    with device(tmp_path, keys, runtime) as d:
        d.deploy(tiny_int8_model, "1")
    slow = ProbationConfig(duration_s=600, min_inferences=5, max_latency_ratio=2.0)
    with device(tmp_path, keys, runtime, probation=slow) as d:
        outcome: list[BaseException] = []

        def second() -> None:
            try:
                d.deploy(tiny_int8_model, "2")
            except CommandFailed as exc:
                outcome.append(exc)

        worker = threading.Thread(target=second)
        worker.start()
        while "probation" not in d.stages:
            threading.Event().wait(0.02)
        d.lifecycle.stop()  # what the agent does on SIGTERM
        worker.join(30)
        assert not worker.is_alive()
        (failed,) = outcome
        assert isinstance(failed, CommandFailed)
        assert failed.code == ReplyCode.PROBATION_FAILED
        assert "stopped during probation" in failed.message
        # No swap back during the stop; the store still has it on trial.
        assert d.worker.serving_version() == "2"
        assert d.lifecycle.store.record("digits").trial == "2"
    with device(tmp_path, keys, runtime) as d:
        assert d.state() == ("1", "1", "serving")
        assert d.worker.serving_version() == "1"


# ------------------------------------------------------------------ golden samples


@pytest.fixture(scope="module")
def digits_bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[mf.Bundle, mf.Bundle]:
    """Converter-built digits bundles 1 and 2, with their golden samples (unsigned)."""
    root = tmp_path_factory.mktemp("digits")
    return (
        mf.read_bundle(build_digits_bundle(root / "1", "1")),
        mf.read_bundle(build_digits_bundle(root / "2", "2")),
    )


def test_wrong_golden_outputs_are_refused_and_the_active_model_keeps_serving(
    tmp_path: Path, keys: Keys, runtime: str, digits_bundles: tuple[mf.Bundle, mf.Bundle]
) -> None:
    good, second = digits_bundles
    # What a runtime that computes int8 wrongly looks like: outputs 9 steps off.
    bad = mf.read_bundle(
        perturbed_golden(
            second.path,
            tmp_path / "bad",
            keys.private,
            steps=9,
            every=3,
            version=second.manifest.version,
        )
    )
    with device(tmp_path, keys, runtime) as d:
        sig = mf.sign_manifest(good.manifest_data, keys.private)
        done = d.lifecycle.deploy(good.manifest_data, sig, good.model_path, None, d.progress)
        assert done["golden"]["samples"] == 4 and done["golden"]["over"] == 0
        with pytest.raises(CommandFailed) as info:
            d.lifecycle.deploy(bad.manifest_data, bad.signature, bad.model_path, None, d.progress)
        assert info.value.code == ReplyCode.VALIDATION_FAILED
        assert info.value.message.startswith("digits 2: golden sample ")
        assert info.value.data is not None
        assert (info.value.data["model"], info.value.data["version"]) == ("digits", "2")
        assert info.value.data["golden"]["over"] > 0
        assert d.state() == ("1", "1", "serving")
        assert d.worker.serving_version() == "1"
        assert d.lifecycle.store.versions("digits") == ["1"]
    # Start-up validates the stored version's golden samples again: here the runtime
    # "changed" under it (the stored outputs perturbed), so the model does not serve.
    stored = tmp_path / "state/models/digits/1"
    perturbed_golden(good.path, tmp_path / "bad1", None, steps=9, every=3, version="1")
    (stored / mf.MANIFEST_FILE).write_bytes((tmp_path / "bad1" / mf.MANIFEST_FILE).read_bytes())
    with device(tmp_path, keys, runtime) as d:
        (state,) = d.lifecycle.model_states()
        assert state.status == "degraded"
        assert "golden sample" in (state.message or "")
        assert d.worker.serving_version() is None
