"""Importing TensorFlow safely, and keeping its chatter off the user's terminal.

In one process the TFLite runtimes must be imported before TensorFlow: the other
order makes every ``tflite_runtime`` Interpreter fail.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any


def import_runtimes_first() -> None:
    with contextlib.suppress(ImportError):
        import tflite_runtime.interpreter  # noqa: F401
    with contextlib.suppress(ImportError):
        import ai_edge_litert.interpreter  # noqa: F401


def import_tensorflow() -> ModuleType:
    import_runtimes_first()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with quiet_fds():
        import tensorflow as tf
    tf.get_logger().setLevel("ERROR")
    return tf


def tensorflow_version() -> str | None:
    tf: Any = sys.modules.get("tensorflow")
    return str(tf.__version__) if tf is not None else None


class Captured:
    """What the process wrote to stdout and stderr inside ``quiet_fds``."""

    text = ""


@contextlib.contextmanager
def quiet_fds() -> Iterator[Captured]:
    """Send fds 1 and 2 to a temp file while TensorFlow works.

    The MLIR converter and TensorFlow's C++ logging write straight to the file
    descriptors (hundreds of lines on a failed conversion), and Keras and TensorFlow print to
    stdout and stderr, which would corrupt ``--json`` output. The text is kept so that an
    error can be mined for the ops it names.
    """
    captured = Captured()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            python_output = io.StringIO()
            with (
                contextlib.redirect_stdout(python_output),
                contextlib.redirect_stderr(python_output),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")
                try:
                    yield captured
                finally:
                    captured.text = python_output.getvalue()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.text += sink.read().decode("utf-8", "replace")
