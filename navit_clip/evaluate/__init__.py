"""Evaluating trained models: zero-shot classification, retrieval, resolution sweeps.

runner.py runs the evaluators of `config.evals`; restore.py loads a model from a workdir.
"""
