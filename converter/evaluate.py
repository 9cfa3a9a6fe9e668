"""Float model vs .tflite on the validation set: accuracy, top-1 agreement, per-output SQNR.

The .tflite side runs through the agent's own loader with its default runtime,
exactly as a device would run it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.models.manifest import Metrics
from agent.models.runtime import LoadedModel, load_model
from converter.errors import AccuracyGateFailed, ConverterError
from converter.progress import ProgressBar

SQNR_CAP_DB = 100.0  # identical outputs: JSON has no infinity


@dataclass(frozen=True)
class Evaluation:
    samples: int
    sqnr_db: list[float]
    float_accuracy: float | None = None
    int8_accuracy: float | None = None
    top1_agreement: float | None = None

    @property
    def accuracy_drop(self) -> float | None:
        if self.float_accuracy is None or self.int8_accuracy is None:
            return None
        return round(self.float_accuracy - self.int8_accuracy, 6)

    def to_metrics(self) -> Metrics:
        return Metrics(
            float_accuracy=self.float_accuracy,
            int8_accuracy=self.int8_accuracy,
            accuracy_drop=self.accuracy_drop,
            top1_agreement=self.top1_agreement,
            sqnr_db=self.sqnr_db,
            samples=self.samples,
        )

    def check_gate(self, max_drop: float) -> None:
        drop = self.accuracy_drop
        if drop is not None and drop > max_drop + 1e-9:
            raise AccuracyGateFailed(
                f"accuracy drop {drop * 100:.2f} points exceeds --max-drop "
                f"{max_drop * 100:.2f} (float {self.float_accuracy:.4f}, "
                f"tflite {self.int8_accuracy:.4f}); no bundle published"
            )


def run_tflite(
    model: bytes | LoadedModel, x: np.ndarray, progress: ProgressBar | None = None
) -> list[np.ndarray]:
    """Every (dequantised) output for every sample, one invoke per sample."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    if len(loaded.inputs) != 1:
        raise ConverterError(f"the .tflite model has {len(loaded.inputs)} inputs; expected 1")
    (inp,) = loaded.inputs
    interpreter = loaded.interpreter
    results: list[list[np.ndarray]] = [[] for _ in loaded.outputs]
    for i in range(len(x)):
        interpreter.set_tensor(inp.index, inp.quantize(x[i : i + 1]))
        interpreter.invoke()
        for slot, out in zip(results, loaded.outputs, strict=True):
            slot.append(out.dequantize(interpreter.get_tensor(out.index)))
        if progress is not None:
            progress.advance()
    return [np.concatenate(parts) for parts in results]


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    signal = float(np.sum(np.square(reference.astype(np.float64))))
    noise = float(np.sum(np.square(reference.astype(np.float64) - test)))
    if noise == 0.0:
        return SQNR_CAP_DB
    if signal == 0.0:
        return 0.0
    return round(min(10.0 * np.log10(signal / noise), SQNR_CAP_DB), 2)


def match_outputs(float_out: list[np.ndarray], tflite_out: list[np.ndarray]) -> list[np.ndarray]:
    """The float output for each .tflite output: same shape, first unused (order may differ)."""
    unused = list(range(len(float_out)))
    matched = []
    for t in tflite_out:
        pick = next((i for i in unused if float_out[i].shape == t.shape), None)
        if pick is None:
            raise ConverterError(
                f"no float model output matches .tflite output shape {list(t.shape)}"
            )
        unused.remove(pick)
        matched.append(float_out[pick])
    return matched


def compare(
    float_out: list[np.ndarray],
    tflite_out: list[np.ndarray],
    labels: np.ndarray | None,
    classify: bool,
) -> Evaluation:
    reference = match_outputs(float_out, tflite_out)
    samples = len(tflite_out[0])
    sqnr = [sqnr_db(r, t) for r, t in zip(reference, tflite_out, strict=True)]
    if not classify:
        return Evaluation(samples=samples, sqnr_db=sqnr)
    float_top1 = reference[0].reshape(samples, -1).argmax(axis=1)
    tflite_top1 = tflite_out[0].reshape(samples, -1).argmax(axis=1)
    agreement = round(float(np.mean(float_top1 == tflite_top1)), 6)
    if labels is None:
        return Evaluation(samples=samples, sqnr_db=sqnr, top1_agreement=agreement)
    classes = reference[0].reshape(samples, -1).shape[1]
    if labels.min() < 0 or labels.max() >= classes:
        raise ConverterError(
            f"validation labels range {labels.min()}..{labels.max()} but the model has "
            f"{classes} classes"
        )
    return Evaluation(
        samples=samples,
        sqnr_db=sqnr,
        float_accuracy=round(float(np.mean(float_top1 == labels)), 6),
        int8_accuracy=round(float(np.mean(tflite_top1 == labels)), 6),
        top1_agreement=agreement,
    )
