"""Whether the tests run in a device venv (`make test-pythons`) instead of the main one.

A device venv (Python 3.10 or 3.13, `litert,camera,metrics,audio`) has neither
TensorFlow nor tflite-runtime: tests marked ``tensorflow`` are left out there, models
the tests build with TensorFlow come prebuilt from ``EDGE_TEST_MODELS``
(tests/prebuilt_models.py), and the runtime-parametrised tests run on ai-edge-litert
only.
"""

from __future__ import annotations

import os

DEVICE_VENV = os.environ.get("EDGE_TEST_DEVICE_VENV") == "1"

# Both device runtimes in the main venv (where a missing one is an error), only
# ai-edge-litert in a device venv (tflite-runtime has no wheel past Python 3.11).
DEVICE_RUNTIMES = ["ai_edge_litert"] if DEVICE_VENV else ["ai_edge_litert", "tflite_runtime"]
