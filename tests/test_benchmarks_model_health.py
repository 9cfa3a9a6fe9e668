"""The model-health benchmark's pieces: how it reads a deploy's replies, counts its
figures, finds when a scene changed, and makes candidates. Its --quick run takes
minutes (real agents, many deploys), so it is the benchmark's business, not a test's;
tests/test_model_health_e2e.py deploys each kind for real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.models.lifecycle import created_time
from agent.models.manifest import (
    generate_keypair,
    load_private_key,
    load_public_key,
    read_bundle,
    verify_bundle,
)
from benchmarks import model_health as mh
from tests.converter_support import build_colors_bundle


def reply(status: str, ts: float, **fields: Any) -> dict[str, Any]:
    return {"status": status, "ts": ts, "code": fields.pop("code", "in_progress"), **fields}


def test_a_promotion_is_decided_when_probation_starts_and_its_shadow_stage_is_timed() -> None:
    replies = [
        reply("accepted", 100.1, code="ok"),
        reply("progress", 100.2, stage="validating"),
        reply("progress", 101.0, stage="shadow", data={"frames": 0, "agreement": None}),
        reply("progress", 101.5, stage="shadow", data={"frames": 60, "agreement": 0.98}),
        reply("progress", 101.8, stage="swapping"),
        reply("progress", 101.9, stage="probation"),
        reply("done", 103.0, code="ok", data={
            "shadow": {mh.PIPELINE: {"frames": 100, "agreement": 0.99, "distance": 0.1}},
            "golden": {"over": 0},
        }),
    ]  # fmt: skip
    record = mh.outcome(replies, sent=100.0)
    assert record["promoted"] and record["code"] == "ok"
    assert record["decision_s"] == pytest.approx(1.9)
    assert record["shadow_window"] == (101.0, 101.8)
    assert record["shadow"] == {"frames": 100, "agreement": 0.99, "distance": 0.1}
    assert record["golden"] == {"over": 0}
    assert "message" not in record


def test_a_refusal_is_decided_by_its_final_reply() -> None:
    shadowed = [
        reply("progress", 10.5, stage="shadow", data={"frames": 80, "agreement": 0.1}),
        reply("failed", 11.0, code="shadow_rejected", message="refused by shadow evaluation"),
    ]
    record = mh.outcome(shadowed, sent=10.0)
    assert (record["promoted"], record["code"], record["decision_s"]) == (
        False, "shadow_rejected", pytest.approx(1.0)
    )  # fmt: skip
    # No figures in the final reply: the last running ones.
    assert record["shadow"]["agreement"] == 0.1 and record["shadow_window"] == (10.5, 11.0)
    assert record["message"] == "refused by shadow evaluation"
    golden = mh.outcome(
        [reply("failed", 5.0, code="validation_failed", data={"golden": {"over": 6}})], sent=4.5
    )
    assert golden["golden"] == {"over": 6} and "shadow_window" not in golden
    assert mh.outcome([reply("progress", 1.0, stage="validating")], 0.0)["code"] == "no_reply"


def test_summary_counts_only_model_health_refusals_and_made_candidates() -> None:
    def model(deploys: list[dict[str, Any]], ratio: float, drift: float | None) -> dict[str, Any]:
        return {"deploys": deploys, "shadow_fps_ratio": ratio, "drift_detected_s": drift,
                "steady_s": 1800.0, "steady_frames": 1000, "drift_false_alarms": 0}  # fmt: skip

    deploys = [
        {"kind": "good", "status": "done", "code": "ok", "promoted": True, "decision_s": 3.0},
        {"kind": "good", "status": "failed", "code": "shadow_rejected", "decision_s": 2.0},
        {"kind": "shuffled_labels", "status": "failed", "code": "shadow_rejected",
         "decision_s": 1.0},
        {"kind": "wrong_normalisation", "status": "failed", "code": "download_failed",
         "decision_s": 0.5},
        {"kind": "perturbed_golden", "code": mh.NOT_MADE, "message": "no golden samples"},
    ]  # fmt: skip
    figures = mh.summary({"a": model(deploys, 0.95, 4.0), "b": model([], 0.9, 7.5)})
    assert figures["broken_rejected"] == 0.5  # a refusal for another reason is no catch
    assert figures["good_accepted"] == 0.5
    assert (figures["broken"], figures["good"], figures["candidates"]) == (2, 2, 4)
    assert figures["shadow_fps_ratio"] == 0.9 and figures["drift_detected_s"] == 7.5
    assert figures["drift_false_alarms_per_hour"] == 0.0 and figures["steady_s"] == 3600.0
    assert mh.summary({"a": model([], 0.9, None)})["drift_detected_s"] is None


def test_scene_change_warnings_and_rates() -> None:
    # Frames at 30 fps from an opening at t=50; the first ones waited for the model.
    frames = [(52.0, 0), (52.01, 1), (52.02, 2), (50.0 + 90 / 30, 90), (50.0 + 91 / 30, 91)]
    assert mh.source_opened_at(frames, 30.0) == pytest.approx(50.0)
    assert mh.source_opened_at([], 30.0) is None

    def state(drift: str | None) -> dict[str, Any]:
        return {
            "pipelines": [{"name": "other", "drift": "x"}, {"name": mh.PIPELINE, "drift": drift}]
        }

    warnings = mh.drift_warnings([(1.0, state(None)), (2.0, state("PSI 0.3")),
                                  (3.0, state("PSI 0.3")), (4.0, state(None)),
                                  (5.0, state("PSI 0.4")), (6.0, {"pipelines": []})])  # fmt: skip
    assert [w for _, w in warnings] == [None, "PSI 0.3", "PSI 0.3", None, "PSI 0.4", None]
    assert mh.raised_between(warnings, 0.0, 10.0) == 2
    assert mh.raised_between(warnings, 2.5, 4.5) == 0  # raised before, still on
    assert mh.first_warning(warnings, after=2.5) == 3.0
    times = [0.5, 1.0, 1.5, 2.0, 3.5]
    assert mh.frames_between(times, [(1.0, 2.0), (3.0, 4.0)]) == 3
    assert mh.rate(times, [(0.0, 2.0)]) == 1.5 and mh.rate(times, []) is None


@pytest.mark.slow
def test_candidates_are_new_to_a_device_and_signed(tmp_path: Path) -> None:
    private, public = generate_keypair()
    (tmp_path / "key").write_bytes(private)
    (tmp_path / "pub").write_bytes(public)
    key = load_private_key(tmp_path / "key")
    base = build_colors_bundle(tmp_path / "colors", "1", tmp_path / "key")
    before = created_time(read_bundle(base).manifest)
    assert before is not None
    for n, kind in enumerate(mh.KINDS):
        version = f"{n + 2}-{kind.replace('_', '-')}"
        made = mh.make_candidate(kind, base, tmp_path / "work", key, version)
        checked = verify_bundle(made, [load_public_key(tmp_path / "pub")], require_signature=True)
        assert checked.manifest.version == version
        created = created_time(checked.manifest)
        assert created is not None and created > before, kind  # never a downgrade
        before = created
        changed = {
            k
            for k, v in checked.manifest_data.items()
            if read_bundle(base).manifest_data.get(k) != v
        }
        expected = {
            "good": set(),
            "wrong_normalisation": {"preprocess"},
            "swapped_channels": {"preprocess"},
            "shuffled_labels": {"labels"},
            "perturbed_golden": {"golden"},
        }[kind]
        assert changed == expected | {"version", "created_at"}, kind
