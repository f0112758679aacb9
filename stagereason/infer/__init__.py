"""Inference: generation primitives, search strategies, judges, the Reasoner API and evaluation."""
