"""Evaluation: box metrics (no pipeline imports) and evaluating tables or checkpoints."""
