from __future__ import annotations

import io
import os
import pty
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent import config as c
from agent.loops.frames import Frame, FrameQueue, LatestFrameSlot
from agent.loops.sources import CaptureThread, EndOfStream, SourceError, create_source
from agent.loops.sources.base import Source, source_types
from agent.loops.sources.jpeg import MjpegReader, reduction_for
from agent.loops.sources.sensor import SensorWindows
from agent.loops.sources.synthetic import COLOR_BANK, SyntheticFrames, digit_samples
from agent.scenes import COLOR_LABELS, MAX_SHAPES, SHAPE_LABELS, color_patches


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def write_video(path: Path, frames: int = 10, size: tuple[int, int] = (64, 48)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, size)
    for i in range(frames):
        img = np.full((size[1], size[0], 3), i * 20, np.uint8)
        writer.write(img)
    writer.release()
    assert path.stat().st_size > 0
    return path


def drain(source: Source, n: int) -> list[tuple[np.ndarray, dict]]:
    out = []
    while len(out) < n:
        item = source.read()
        if item is not None:
            out.append(item)
    return out


def test_registry_knows_every_configured_type() -> None:
    assert set(source_types()) == {
        "camera", "picamera2", "video", "images", "sensor", "synthetic", "microphone", "wav"
    }  # fmt: skip


def test_picamera2_missing_is_a_clear_error() -> None:
    source = create_source(c.PiCamera2Source(type="picamera2"))
    with pytest.raises(SourceError, match="picamera2 is not installed"):
        source.open()


def test_synthetic_digits_carry_their_label() -> None:
    images, labels = digit_samples()
    assert images.shape == (200, 8, 8) and set(labels.tolist()) == set(range(10))
    src = create_source(
        c.SyntheticSource(type="synthetic", kind="digits", width=32, height=32, channels=1)
    )
    src.open()
    (frame, meta), (_frame2, meta2) = drain(src, 2)
    assert frame.shape == (32, 32, 1) and frame.dtype == np.uint8
    assert meta["label"] == labels[0] and meta2["label"] == labels[1]
    # Nearest-neighbour upscale: every 4x4 block is one original pixel.
    assert np.array_equal(frame[::4, ::4, 0], images[0])


def test_synthetic_frames_and_windows() -> None:
    frames = create_source(c.SyntheticSource(type="synthetic", width=16, height=8))
    frames.open()
    (a, _), (b, _) = drain(frames, 2)
    assert a.shape == (8, 16, 3) and not np.array_equal(a, b)
    windows = create_source(c.SyntheticSource(type="synthetic", kind="windows", width=3, height=20))
    windows.open()
    (w, _) = drain(windows, 1)[0]
    assert w.shape == (20, 3) and w.dtype == np.float32


def test_synthetic_colors_are_bgr_patches_with_balanced_labels() -> None:
    config = c.SyntheticSource(type="synthetic", kind="colors", width=40, height=24, seed=3)
    src = create_source(config)
    src.open()
    reads = drain(src, COLOR_BANK)
    frame, meta = reads[0]
    assert frame.shape == (24, 40, 3) and frame.dtype == np.uint8 and "scene" not in meta
    labels = [m["label"] for _, m in reads]
    assert np.bincount(labels).tolist() == [COLOR_BANK // len(COLOR_LABELS)] * len(COLOR_LABELS)
    # Blue patches (label 4) are blue in the frame's first channel: BGR, as cameras give.
    blue = np.stack([f for f, m in reads if COLOR_LABELS[m["label"]] == "blue"]).mean((0, 1, 2))
    assert blue[0] > 2 * blue[2]
    # Patches vary (brightness, texture, noise); the same seed draws the same bank.
    assert len({f.tobytes() for f, _ in reads}) == COLOR_BANK
    again = create_source(config)
    again.open()
    assert np.array_equal(drain(again, 1)[0][0], frame)


@pytest.mark.parametrize("kind", ["colors", "shapes"])
def test_colour_scenes_need_three_channels(kind: str) -> None:
    with pytest.raises(ValueError, match=f"kind '{kind}' needs channels 3"):
        c.SyntheticSource(type="synthetic", kind=kind, channels=1)


def test_synthetic_shapes_carry_their_boxes() -> None:
    src = create_source(c.SyntheticSource(type="synthetic", kind="shapes", width=64, height=48))
    src.open()
    reads = drain(src, 40)
    assert {len(m["objects"]) for _, m in reads} == set(range(MAX_SHAPES + 1))
    for frame, meta in reads:
        assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
        for obj in meta["objects"]:
            y0, x0, y1, x1 = np.rint(np.multiply(obj["box"], (48, 64, 48, 64))).astype(int)
            inside = frame[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0)
            # A flat square of its class's colour, in BGR: red squares are red last.
            assert frame[y0:y1, x0:x1].std(axis=(0, 1)).max() < 30
            if SHAPE_LABELS[obj["index"]] == "red":
                assert inside[2] > inside[0] + 40
            if SHAPE_LABELS[obj["index"]] == "blue":
                assert inside[0] > inside[2] + 40


def test_colour_cast_tints_patches_towards_orange() -> None:
    labels = np.arange(len(COLOR_LABELS)).repeat(20)
    plain = color_patches(np.random.default_rng(0), labels).astype(float).mean((1, 2))
    cast = color_patches(np.random.default_rng(0), labels, cast=(255, 160, 40))
    tinted = cast.astype(float).mean((1, 2))
    blue = labels == COLOR_LABELS.index("blue")
    # Red rises and blue falls on every colour: the light, not the objects, changed.
    assert (tinted[:, 0] - tinted[:, 2]).mean() > (plain[:, 0] - plain[:, 2]).mean() + 60
    assert tinted[blue, 2].mean() < plain[blue, 2].mean() - 40


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("kind", ["digits", "colors", "shapes", "frames", "windows"])
def test_scene_changes_after_drift_after_s(kind: str) -> None:
    clock = FakeClock()
    config = c.SyntheticSource(
        type="synthetic", kind=kind, width=8, height=8, channels=3, drift_after_s=30
    )
    steady_src = SyntheticFrames(config.model_copy(update={"drift_after_s": None}))
    steady_src.open()
    src = SyntheticFrames(config, clock=clock)
    src.open()
    before = drain(src, 2)
    clock.now += 29.9
    before += drain(src, 1)
    clock.now += 0.1
    after = drain(src, 2)
    steady = drain(steady_src, 5)
    assert [m["scene"] for _, m in before + after] == ["steady"] * 3 + ["drift"] * 2
    for (frame, meta), (same, plain) in zip(before, steady[:3], strict=True):
        assert meta.get("label") == plain.get("label")
        assert meta.get("objects") == plain.get("objects")
        if kind != "windows":  # windows carry fresh noise on every read
            assert np.array_equal(frame, same)
    for (frame, meta), (same, plain) in zip(after, steady[3:], strict=True):
        assert meta.get("label") == plain.get("label")  # same objects, another scene
        assert meta.get("objects") == plain.get("objects")
        assert frame.shape == same.shape and frame.dtype == same.dtype
        assert np.abs(frame.astype(float) - same.astype(float)).mean() > 0.5
    if kind in ("digits", "frames"):
        assert np.array_equal(after[0][0], 255 - steady[3][0])


def test_video_file_loops_or_ends(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.avi", frames=5)
    looped = create_source(c.VideoSource(type="video", path=path, pace="fast"))
    looped.open()
    assert looped.fps is None
    assert len(drain(looped, 12)) == 12  # past the end: it rewinds
    looped.close()
    once = create_source(c.VideoSource(type="video", path=path, loop=False))
    once.open()
    assert once.fps == pytest.approx(25.0)
    drain(once, 5)
    with pytest.raises(EndOfStream):
        once.read()


def test_reduction_keeps_at_least_the_target_both_ways() -> None:
    assert reduction_for((640, 480), None) == 1
    assert reduction_for((640, 480), (224, 224)) == 2
    assert reduction_for((640, 480), (160, 120)) == 4
    assert reduction_for((640, 480), (161, 120)) == 2
    assert reduction_for((640, 480), (32, 32)) == 8
    assert reduction_for((640, 480), (640, 480)) == 1


def test_mjpg_video_is_decoded_at_the_size_the_model_needs(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.avi", frames=4, size=(640, 480))
    source = create_source(c.VideoSource(type="video", path=path, pace="fast"))
    source.open()
    try:
        frame, meta = drain(source, 1)[0]
        assert frame.shape == (480, 640, 3) and meta == {}
        source.target_size = (224, 224)
        frames = drain(source, 5)  # past the end: the file loops in this mode too
        assert all(f.shape == (240, 320, 3) for f, _ in frames)
        assert all(m == {"source_size": (640, 480)} for _, m in frames)
        # The same picture as a full decode, averaged 2x2: frame 1 is flat grey 20.
        assert abs(float(frames[0][0].mean()) - 20) < 2
        source.target_size = (100, 100)
        assert drain(source, 1)[0][0].shape == (120, 160, 3)
    finally:
        source.close()


def test_other_codecs_are_decoded_whole(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 25.0, (640, 480))
    for i in range(3):
        writer.write(np.full((480, 640, 3), i * 20, np.uint8))
    writer.release()
    source = create_source(c.VideoSource(type="video", path=path, pace="fast"))
    source.target_size = (224, 224)
    source.open()
    try:
        frame, meta = drain(source, 1)[0]
    finally:
        source.close()
    assert frame.shape == (480, 640, 3) and meta == {}


def test_mjpg_camera_stream_is_decoded_reduced(tmp_path: Path) -> None:
    path = write_video(tmp_path / "cam.avi", frames=3, size=(320, 240))
    source = create_source(c.CameraSource(type="camera", device=str(path)))
    source.target_size = (40, 30)
    source.open()
    try:
        frame, meta = drain(source, 1)[0]
    finally:
        source.close()
    assert frame.shape == (30, 40, 3) and meta == {"source_size": (320, 240)}


class _Packets:
    """An OpenCV capture in compressed mode, as far as MjpegReader uses one."""

    def __init__(self, packets: list[bytes]) -> None:
        self.packets = list(packets)

    def read(self) -> tuple[bool, np.ndarray | None]:
        if not self.packets:
            return False, None
        return True, np.frombuffer(self.packets.pop(0), np.uint8)


def test_corrupt_mjpg_frames_are_skipped_then_the_stream_is_broken() -> None:
    ok, jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), 90, np.uint8))
    assert ok
    reader = MjpegReader(cv2, _Packets([b"garbage", jpeg.tobytes()]), (64, 48), "cam")
    item = reader.read((16, 12))
    assert item is not None and item[0].shape == (12, 16, 3) and reader.undecodable == 1
    assert reader.read(None) is None  # the end of the stream
    reader = MjpegReader(cv2, _Packets([b"garbage"] * 10), (64, 48), "cam")
    with pytest.raises(SourceError, match="10 frames in a row are not JPEG"):
        reader.read(None)


def test_missing_video_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="video file not found"):
        create_source(c.VideoSource(type="video", path=tmp_path / "nope.mp4")).open()


def test_image_folder_skips_undecodable_files(tmp_path: Path) -> None:
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((4, 6, 3), i, np.uint8))
    (tmp_path / "3.jpg").write_bytes(b"not a jpeg")
    src = create_source(c.ImagesSource(type="images", path=tmp_path, loop=False))
    src.open()
    got = [src.read() for _ in range(4)]
    assert [g[1]["file"] for g in got if g] == ["0.png", "1.png", "2.png"]
    assert got[3] is None
    with pytest.raises(EndOfStream):
        src.read()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no images"):
        create_source(c.ImagesSource(type="images", path=empty)).open()


def sensor(**kw: Any) -> c.SensorSource:
    return c.SensorSource(type="sensor", **kw)


def test_sensor_csv_replay_in_windows(tmp_path: Path) -> None:
    csv = tmp_path / "s.csv"
    csv.write_text("t,ax,ay\n" + "".join(f"{i},{i}.5,{-i}\n" for i in range(10)))
    src = create_source(sensor(input="file", path=csv, columns=["ay", "ax"], window=4, hop=2))
    src.open()
    windows = []
    with pytest.raises(EndOfStream):
        while True:
            item = src.read()
            if item is not None:
                windows.append(item[0])
    assert len(windows) == 4  # samples 0-3, 2-5, 4-7, 6-9
    assert windows[0].tolist() == [[0, 0.5], [-1, 1.5], [-2, 2.5], [-3, 3.5]]
    assert windows[1][0].tolist() == [-2, 2.5]


def test_sensor_jsonl_from_stdin() -> None:
    lines = "".join(f'{{"x": {i}, "y": {2 * i}, "note": "ok"}}\n' for i in range(3))
    src = SensorWindows(
        sensor(input="stdin", columns=["y", "x"], window=3), stdin=io.StringIO(lines)
    )
    src.open()
    item = src.read()
    assert item is not None and item[0].tolist() == [[0, 0], [2, 1], [4, 2]]


def test_sensor_over_a_pseudo_terminal_and_its_loss() -> None:
    master, slave = pty.openpty()
    port = os.ttyname(slave)
    src = create_source(sensor(input="serial", port=port, window=2, hop=1, baudrate=115200))
    src.open()
    os.write(master, b"1,2\n3,4\n")
    got = [x for x in (src.read() for _ in range(20)) if x is not None]
    assert got[0][0].tolist() == [[1, 2], [3, 4]]
    os.close(master)
    os.close(slave)
    with pytest.raises(SourceError):
        for _ in range(50):
            src.read()
    src.close()


def test_missing_serial_port_is_named() -> None:
    with pytest.raises(SourceError, match="cannot open serial port /dev/ttyNOPE0"):
        create_source(sensor(input="serial", port="/dev/ttyNOPE0", window=2)).open()


def test_latest_slot_drops_stale_frames_and_queue_keeps_all() -> None:
    slot = LatestFrameSlot()
    for i in range(5):
        slot.put(Frame(i, 0.0, np.zeros(1)))
    got = slot.get(0.1)
    assert got is not None and got.seq == 4 and slot.dropped == 4
    assert slot.get(0.01) is None
    q = FrameQueue(maxsize=8)
    for i in range(5):
        q.put(Frame(i, 0.0, np.zeros(1)))
    assert [q.get(0.1).seq for _ in range(5)] == [0, 1, 2, 3, 4]  # type: ignore[union-attr]


def test_camera_on_a_file_fails_and_comes_back(tmp_path: Path) -> None:
    """A camera that stops delivering is reopened with backoff, and frames flow again."""
    path = write_video(tmp_path / "cam.avi", frames=3)
    hidden = tmp_path / "away.avi"
    source = create_source(c.CameraSource(type="camera", device=str(path)))
    queue = FrameQueue(maxsize=1000)
    capture = CaptureThread("cam", source, queue, min_backoff_s=0.05, max_backoff_s=0.2)
    os.rename(path, hidden)  # the camera is unplugged before start
    capture.start()
    try:
        wait_until(lambda: capture.failures >= 2)
        assert capture.state == "reconnecting" and "cannot open camera" in (
            capture.last_error or ""
        )
        assert capture.frames == 0
        os.rename(hidden, path)  # plugged back in
        wait_until(lambda: capture.frames >= 3)
        # End of the file = the stream stopped: counted as a failure and reopened.
        wait_until(lambda: capture.frames >= 6)
        assert capture.alive
    finally:
        capture.stop()
    assert capture.state == "stopped" and not capture.alive


class _Exploding(Source):
    type = "exploding"

    def __init__(self) -> None:
        self.opened = 0

    def open(self) -> None:
        self.opened += 1

    def read(self) -> tuple[np.ndarray, dict]:
        raise ZeroDivisionError("driver bug")


def test_capture_survives_a_driver_bug_and_stops_promptly() -> None:
    src = _Exploding()
    capture = CaptureThread("x", src, FrameQueue(), min_backoff_s=0.01, max_backoff_s=0.02)
    capture.start()
    wait_until(lambda: src.opened >= 3)
    started = time.monotonic()
    capture.stop()
    assert time.monotonic() - started < 2.0
    assert "ZeroDivisionError" in (capture.last_error or "")


def test_paced_synthetic_source_runs_near_its_rate() -> None:
    source = create_source(c.SyntheticSource(type="synthetic", fps=50, width=4, height=4))
    slot = LatestFrameSlot()
    capture = CaptureThread("syn", source, slot)
    seen: list[int] = []
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            f = slot.get(0.05)
            if f is not None:
                seen.append(f.seq)

    consumer = threading.Thread(target=consume)
    consumer.start()
    capture.start()
    time.sleep(0.5)
    capture.stop()
    stop.set()
    consumer.join()
    # Paced, not free-running: a free-running source would make thousands of frames.
    assert 5 <= capture.frames <= 60
    assert seen == sorted(seen)
