"""Shadow evaluation's parts (agent.loops.shadow, agent.loops.model_server): agreement
arithmetic, the evaluator on a real tiny model with the pipeline side faked, the 1-deep
hand-over, and a real pipeline that offers its frames to a running evaluation."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import PipelineConfig
from agent.loops.frames import Frame
from agent.loops.model_server import PipelineServer
from agent.loops.pipeline import Pipeline
from agent.loops.postprocess import Output
from agent.loops.processing import build_processing, preprocess_frame
from agent.loops.shadow import ShadowEvaluator, agreement
from agent.models import runtime as rt
from agent.models.health import Reference, classify_reference
from agent.models.manifest import Manifest, parse_manifest
from agent.models.serving import ShadowFigures, ShadowHandle
from agent.protocol import ClassScore, Detection, Result
from tests.lifecycle_support import RUNTIMES, manifest_for

CONFIG = PipelineConfig.model_validate(
    {"name": "cam", "model": "digits", "queue": "fifo",
     "source": {"type": "synthetic", "kind": "frames", "width": 8, "height": 8, "channels": 1,
                "fps": 200}}
)  # fmt: skip
# Labels moved one place on: every top-1 answer names another class.
SHUFFLED = [str((i + 1) % 10) for i in range(10)]


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def frames(n: int, seed: int = 1) -> list[Frame]:
    rng = np.random.default_rng(seed)
    return [Frame(i, 0.0, rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)) for i in range(n)]


# ------------------------------------------------------------------------ agreement


def cls(index: int, label: str | None) -> Output:
    return Output(classes=[ClassScore(index=index, label=label, score=0.9)])


def box(index: int, label: str | None, x: float) -> Detection:
    return Detection(index=index, label=label, score=0.8, box=(x, 0.0, x + 10.0, 10.0))


def test_agreement_by_task() -> None:
    # classify: by label when both name it (shuffled labels disagree), else by index
    assert agreement(cls(3, "cat"), cls(3, "cat")) == 1.0
    assert agreement(cls(3, "cat"), cls(3, "dog")) == 0.0
    assert agreement(cls(3, "cat"), cls(5, "cat")) == 1.0
    assert agreement(cls(3, None), cls(3, "cat")) == 1.0
    assert agreement(cls(3, None), cls(4, None)) == 0.0
    # nothing over the pipeline's threshold on both sides agrees; on one side does not
    assert agreement(Output(classes=[]), Output(classes=[])) == 1.0
    assert agreement(Output(classes=[]), cls(3, "cat")) == 0.0
    # detect: box F1 at IoU 0.5, class key = label, else index
    active = Output(detections=[box(1, "person", 0), box(2, "car", 50)])
    assert agreement(active, active) == 1.0
    moved = Output(detections=[box(1, "person", 0), box(2, "car", 56)])  # IoU 4/16
    assert agreement(active, moved) == pytest.approx(0.5)
    relabelled = Output(detections=[box(1, "car", 0), box(2, "person", 50)])
    assert agreement(active, relabelled) == 0.0
    unnamed = Output(detections=[box(1, None, 0)])
    assert agreement(unnamed, Output(detections=[box(1, None, 1)])) == 1.0
    assert agreement(unnamed, Output(detections=[box(2, None, 0)])) == 0.0
    assert agreement(Output(detections=[]), Output(detections=[])) == 1.0

    # raw: cosine similarity, never below 0
    def raw(*values: float) -> Output:
        return Output(tensors=[np.array(values)])

    assert agreement(raw(1.0, 2.0), raw(2.0, 4.0)) == pytest.approx(1.0)
    assert agreement(raw(1.0, 0.0), raw(0.0, 1.0)) == 0.0
    assert agreement(raw(1.0, 0.0), raw(-1.0, 0.0)) == 0.0
    # a candidate of another task agrees with nothing
    assert agreement(cls(1, "a"), Output(detections=[])) == 0.0
    # keyword: a window that fired nothing on a side agrees when both heard the same class
    silent = Output(silent=True, top1=(0, 0.9))
    assert agreement(silent, Output(silent=True, top1=(0, 0.6))) == 1.0
    assert agreement(silent, Output(classes=[], top1=(2, 0.95))) == 0.0
    assert agreement(Output(classes=[], top1=(2, 0.9)), Output(silent=True, top1=(2, 0.7))) == 1.0


# ----------------------------------------------------- the evaluator, pipeline faked


def manifest_of(model: Path, version: str, **over: Any) -> Manifest:
    return parse_manifest(manifest_for(model, version=version, **over))


class ServingSide:
    """The pipeline's side, faked: the serving version's own processing on the same
    frames gives the ``Output`` the results thread would offer."""

    def __init__(self, model: Path, runtime: str) -> None:
        self.loaded = rt.load_model(model, runtime=runtime, num_threads=1)
        self.proc = build_processing("1", manifest_of(model, "1"), self.loaded, CONFIG)

    def output(self, frame: Frame) -> Output:
        tensor, context = preprocess_frame(self.proc, frame)
        interpreter = self.loaded.interpreter
        interpreter.set_tensor(self.proc.input_index, tensor)
        interpreter.invoke()
        values = [interpreter.get_tensor(o.index) for o in self.loaded.outputs]
        return self.proc.post(values, context)


@contextmanager
def evaluator(
    model: Path, manifest: Manifest, load: Callable[[Path], rt.LoadedModel]
) -> Iterator[ShadowEvaluator]:
    shadow = ShadowEvaluator("cam", manifest.version, model, manifest, CONFIG, load)
    shadow.start().result(30)
    try:
        yield shadow
    finally:
        shadow.stop()


def offer_each(shadow: ShadowEvaluator, serving: ServingSide, items: list[Frame]) -> ShadowFigures:
    """Offer frames one by one, each once the last was compared (none dropped)."""
    for i, frame in enumerate(items):
        assert shadow.offer(frame, serving.output(frame))
        wait_for(lambda i=i: shadow.figures().frames == i + 1, what=f"frame {i} compared")
    return shadow.figures()


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_the_same_model_agrees_and_shuffled_labels_do_not(
    tiny_int8_model: Path, runtime: str
) -> None:
    serving = ServingSide(tiny_int8_model, runtime)

    def load(path: Path) -> rt.LoadedModel:
        return rt.load_model(path, runtime=runtime, num_threads=1)

    items = frames(12)
    with evaluator(tiny_int8_model, manifest_of(tiny_int8_model, "2"), load) as same:
        figures = offer_each(same, serving, items)
    assert (figures.frames, figures.agreement, figures.errors) == (12, 1.0, 0)
    assert figures.distance is None  # no reference in the manifest
    shuffled = manifest_of(tiny_int8_model, "3", labels=SHUFFLED)
    with evaluator(tiny_int8_model, shuffled, load) as relabelled:
        figures = offer_each(relabelled, serving, items)
    assert (figures.frames, figures.agreement) == (12, 0.0)


def test_frames_the_candidate_disagreed_on_go_to_the_frame_capture(tiny_int8_model: Path) -> None:
    serving = ServingSide(tiny_int8_model, "ai_edge_litert")
    offered: list[tuple[Frame, Result, float | None, dict[str, Any]]] = []

    def result_of(frame: Frame) -> Result:
        out = serving.output(frame)
        return Result(device="d", pipeline="cam", seq=0, ts=0.0, frame=frame.seq,
                      model="digits", version="1", latency_ms=1.0, classes=out.classes)  # fmt: skip

    for version, labels in (("2", None), ("3", SHUFFLED)):
        manifest = manifest_of(tiny_int8_model, version, **({"labels": labels} if labels else {}))
        shadow = ShadowEvaluator(
            "cam", version, tiny_int8_model, manifest, CONFIG, rt.load_model,
            on_disagree=lambda *args: offered.append(args),
        )  # fmt: skip
        shadow.start().result(30)
        try:
            for i, frame in enumerate(frames(3)):
                shadow.offer(frame, serving.output(frame), lambda f=frame: result_of(f))
                wait_for(lambda i=i, s=shadow: s.figures().frames == i + 1, what=f"frame {i}")
        finally:
            shadow.stop()
    # The same model agreed on every frame: nothing offered; shuffled labels: every frame,
    # with the serving version's result and what the candidate answered.
    assert [o[0].seq for o in offered] == [0, 1, 2]
    frame, result, confidence, details = offered[0]
    assert result.frame == 0 and result.version == "1" and confidence is not None
    assert details["candidate"] == "3" and details["agreement"] == 0.0
    assert details["candidate_result"]["classes"][0]["label"] in SHUFFLED


def test_distance_from_the_candidates_own_reference(tiny_int8_model: Path) -> None:
    serving = ServingSide(tiny_int8_model, "ai_edge_litert")
    items = frames(30)
    # A reference of these very frames' outputs, and one where every frame was class 9
    # with certainty: near, and far.
    logits = np.stack(
        [
            serving.loaded.outputs[0].dequantize(np.asarray(v)).reshape(-1)
            for v in (serving_logits(serving, f) for f in items)
        ]
    )
    near = Reference(samples=30, classify=classify_reference(logits))
    sure_nine = np.full((30, 10), -20.0)
    sure_nine[:, 9] = 20.0
    far = Reference(samples=30, classify=classify_reference(sure_nine))
    distances = {}
    for version, reference in (("2", near), ("3", far)):
        manifest = manifest_of(tiny_int8_model, version, reference=reference.model_dump())
        with evaluator(tiny_int8_model, manifest, rt.load_model) as shadow:
            distances[version] = offer_each(shadow, serving, items).distance
    assert distances["2"] is not None and distances["2"] < 0.05, distances
    assert distances["3"] is not None and distances["3"] > 2.0, distances


def serving_logits(serving: ServingSide, frame: Frame) -> np.ndarray:
    serving.output(frame)
    return np.asarray(serving.loaded.interpreter.get_tensor(serving.loaded.outputs[0].index))


def test_a_frame_the_candidate_fails_on_counts_as_a_disagreement(tiny_int8_model: Path) -> None:
    serving = ServingSide(tiny_int8_model, "ai_edge_litert")
    good, bad = frames(2)
    with evaluator(tiny_int8_model, manifest_of(tiny_int8_model, "2"), rt.load_model) as shadow:
        assert shadow.offer(good, serving.output(good))
        wait_for(lambda: shadow.figures().frames == 1, what="the good frame")
        # A frame its pre-processing cannot take (the serving side's answer aside).
        assert shadow.offer(Frame(1, 0.0, np.zeros((0, 3), np.uint8)), serving.output(bad))
        wait_for(lambda: shadow.figures().frames == 2, what="the bad frame")
        figures = shadow.figures()
    assert (figures.frames, figures.agreement, figures.errors) == (2, 0.5, 1)
    assert figures.last_error


class HeldInterpreter:
    """The candidate's interpreter with an invoke that waits until the test lets it go."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.go = threading.Event()

    def invoke(self) -> None:
        self.entered.set()
        self.go.wait(30)
        self.inner.invoke()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_an_offer_never_waits_it_is_dropped_while_one_is_waiting(tiny_int8_model: Path) -> None:
    serving = ServingSide(tiny_int8_model, "ai_edge_litert")
    held: list[HeldInterpreter] = []

    def load(path: Path) -> rt.LoadedModel:
        loaded = rt.load_model(path, runtime="ai_edge_litert", num_threads=1)
        held.append(HeldInterpreter(loaded.interpreter))
        return dataclasses.replace(loaded, interpreter=held[0])  # the same, invoke held

    a, b, c, d = frames(4)
    with evaluator(tiny_int8_model, manifest_of(tiny_int8_model, "2"), load) as shadow:
        assert shadow.offer(a, serving.output(a))
        assert held[0].entered.wait(10)  # a is being evaluated, and held there
        assert shadow.offer(b, serving.output(b))  # waits in the 1-deep slot
        assert not shadow.offer(c, serving.output(c))  # dropped at once
        assert not shadow.offer(d, serving.output(d))
        assert (shadow.offered, shadow.dropped) == (2, 2)
        held[0].go.set()
        wait_for(lambda: shadow.figures().frames == 2, what="a and b compared")
        assert shadow.figures().agreement == 1.0
    # Stopped: offers are refused, figures keep answering.
    assert not shadow.offer(a, serving.output(a))
    assert shadow.figures().frames == 2


def test_a_candidate_that_cannot_be_built_fails_the_future(tiny_int8_model: Path) -> None:
    def load(path: Path) -> rt.LoadedModel:
        raise rt.ModelLoadError("no such op\nmore detail")

    stopped: list[ShadowEvaluator] = []
    shadow = ShadowEvaluator(
        "cam", "2", tiny_int8_model, manifest_of(tiny_int8_model, "2"), CONFIG, load,
        on_stop=stopped.append,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="beside the serving version on cam: no such op$"):
        shadow.start().result(10)
    assert stopped == [shadow]


# ------------------------------------------------------------- a real pipeline


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_real_pipeline_offers_its_frames_to_a_running_evaluation(
    tiny_int8_model: Path, runtime: str
) -> None:
    manifests = {v: manifest_of(tiny_int8_model, v) for v in ("1", "2")}
    manifests["3"] = manifest_of(tiny_int8_model, "3", labels=SHUFFLED)
    runtime_ = rt.select_runtime(runtime)

    def load(path: Path) -> rt.LoadedModel:
        return rt.load_model(path, runtime=runtime_, num_threads=1)

    results: list[Result] = []
    pipeline = Pipeline(
        CONFIG,
        device="pi-test",
        manifests=lambda _name, version: manifests.get(version),
        publish=results.append,
        load=load,
    )
    server = PipelineServer(pipeline, load, lambda _name, version: manifests.get(version))
    future: Future[ShadowHandle] = server.start_shadow("2", tiny_int8_model)
    with pytest.raises(RuntimeError, match="serves no version"):
        future.result(10)
    pipeline.start()
    try:
        server.swap("1", tiny_int8_model).result(30)
        handle = server.start_shadow("2", tiny_int8_model).result(30)
        assert pipeline.shadow_tap is not None
        wait_for(lambda: handle.figures().frames >= 20, what="20 frames compared")
        # Another start ends the first: one evaluation per pipeline at a time.
        relabelled = server.start_shadow("3", tiny_int8_model).result(30)
        wait_for(lambda: relabelled.figures().frames >= 20, what="20 frames compared")
        relabelled.stop()
        assert pipeline.shadow_tap is None
        served = len(results)
        wait_for(lambda: len(results) >= served + 5, what="results after the shadow")
    finally:
        pipeline.stop()
    same = handle.figures()
    assert same.agreement == 1.0 and same.errors == 0 and same.frames >= 20
    assert relabelled.figures().agreement == 0.0
    # Nothing the candidates computed was published.
    assert {r.version for r in results} == {"1"}
