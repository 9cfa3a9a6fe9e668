"""The ``digits-torch`` example: the digits CNN in PyTorch, trained offline in seconds.

``edge-convert example digits-torch -o digits.pt2`` writes it as an exported program (NCHW
input ``[1, 1, 8, 8]``, weights inside) with the same data files as the Keras ``digits``
example (NHWC pixel values 0..255, converted with ``--std 255``). ``digits_net`` is the same
model as a ``module:factory`` (``converter.torch_examples:digits_net``). Needs the ``torch``
extra; imported only when asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from converter.errors import ConverterError
from converter.examples import DIGITS_LABELS, DIGITS_STD, ExampleFiles, digits_data, save_data

DIGITS_INPUT = (1, 1, 8, 8)


class DigitsNet(nn.Module):
    """Two convolutions and two dense layers over an 8x8 grey digit (NCHW)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, x: Any) -> Any:
        return self.head(self.features(x))


def train_digits(*, epochs: int = 12, seed: int = 0) -> DigitsNet:
    """The trained model (eval mode); the same weights for the same seed on one machine."""
    torch.manual_seed(seed)
    x_train, y_train, _, _ = digits_data(seed)
    # The data is NHWC pixels, as a camera gives; the module takes NCHW in 0..1.
    x = torch.from_numpy(np.transpose(x_train / DIGITS_STD, (0, 3, 1, 2)).astype(np.float32))
    y = torch.from_numpy(y_train)
    model = DigitsNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 32):
            batch = order[start : start + 32]
            optimiser.zero_grad()
            loss(model(x[batch]), y[batch]).backward()
            optimiser.step()
    return model.eval()


def digits_net() -> DigitsNet:
    """``module:factory`` for ``edge-convert convert converter.torch_examples:digits_net
    --input-shape 1,1,8,8``."""
    return train_digits()


def build_digits_torch(dest: Path, *, epochs: int = 12, seed: int = 0) -> ExampleFiles:
    if dest.suffix != ".pt2":
        raise ConverterError(f"{dest}: the PyTorch example is written as .pt2 (exported program)")
    if dest.is_dir():
        raise ConverterError(f"{dest}: is a directory")
    model = train_digits(epochs=epochs, seed=seed)
    x_train, _, x_val, y_val = digits_data(seed)
    dest.parent.mkdir(parents=True, exist_ok=True)
    program = torch.export.export(model, (torch.zeros(DIGITS_INPUT),))
    torch.export.save(program, str(dest))
    return save_data(dest, {"x": x_train}, {"x": x_val, "y": y_val}, DIGITS_LABELS)
