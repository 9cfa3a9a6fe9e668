"""Inference loops: sources, pre- and post-processing, the worker, pipelines."""
