"""Inference loops: frame sources, the inference worker, pipelines."""
