"""A streaming model's state between windows (manifest ``state``).

Some audio models keep what they heard in tensors of their own: each invoke reads the
state the previous one left (an input) and leaves the next (an output). The state
belongs to one loaded model (one served version): it starts at zero (for a quantised
tensor, its zero point: real 0.0) and starts there again when another version swaps in
or the pipeline is built anew, since one version's state means nothing to another.
Only the thread that invokes the model (the worker) touches it: ``feed`` before the
invoke, ``keep`` after it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from agent.models.manifest import StateLink
from agent.models.runtime import LoadedModel, TensorInfo

logger = logging.getLogger(__name__)


def zero_state(t: TensorInfo) -> np.ndarray:
    """Real 0.0 in the tensor's dtype: its zero point when quantised."""
    return t.quantize(np.zeros(t.shape, np.float32))


class StreamState:
    """The state tensors of ``loaded``, carried from its state outputs to its inputs."""

    def __init__(self, loaded: LoadedModel, links: Sequence[StateLink]) -> None:
        self.loaded = loaded
        inputs = {t.name: t for t in loaded.inputs}
        outputs = {t.name: t for t in loaded.outputs}
        self._pairs: list[tuple[TensorInfo, TensorInfo]] = []
        for link in links:
            i, o = inputs.get(link.input), outputs.get(link.output)
            if i is None or o is None:
                missing = link.input if i is None else link.output
                raise ValueError(f"state tensor {missing!r} is not in the loaded model")
            if i.shape != o.shape or i.dtype != o.dtype:
                raise ValueError(
                    f"state output {o.name!r} {o.dtype}{list(o.shape)} cannot feed input "
                    f"{i.name!r} {i.dtype}{list(i.shape)}"
                )
            self._pairs.append((i, o))
        self._values = [zero_state(i) for i, _ in self._pairs]
        self.steps = 0

    @property
    def outputs(self) -> set[int]:
        """Indexes (tensor indexes) of the state outputs: not the task's to read."""
        return {o.index for _, o in self._pairs}

    def reset(self) -> None:
        self._values = [zero_state(i) for i, _ in self._pairs]
        self.steps = 0

    def feed(self) -> None:
        """Set the state inputs to what the last invoke left (zero at first)."""
        interpreter = self.loaded.interpreter
        for (i, _), value in zip(self._pairs, self._values, strict=True):
            interpreter.set_tensor(i.index, value)

    def keep(self) -> None:
        """Take the state the invoke just left; re-quantised when the output's scale
        or zero point is not the input's (converters may give them different ones)."""
        interpreter = self.loaded.interpreter
        values = []
        for i, o in self._pairs:
            value = interpreter.get_tensor(o.index)
            if (i.scale, i.zero_point) != (o.scale, o.zero_point):
                value = i.quantize(o.dequantize(value))
            values.append(value)
        self._values = values
        self.steps += 1
