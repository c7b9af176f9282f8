"""Evaluation: tasks (synthetic test split, LoCoMo), methods (window, full history, BM25, δ-mem, control), scoring,
bootstrap confidence intervals, reports."""
