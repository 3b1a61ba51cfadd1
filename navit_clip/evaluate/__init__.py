"""Evaluators of trained models: zero-shot classification (more in later modules)."""
