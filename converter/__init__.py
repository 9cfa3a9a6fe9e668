"""edge-convert: Keras/SavedModel -> signed int8 TFLite bundle, checked against the float model.

TensorFlow is imported lazily, and only after the TFLite runtimes (see ``tfimport``):
``verify``, ``sign``, ``inspect`` and ``bundle`` never import it.
"""

__version__ = "0.1.0"
