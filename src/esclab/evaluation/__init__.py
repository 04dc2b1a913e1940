"""Evaluation: the folds' test predictions pooled into metrics, a per-class table and plots."""
