"""Evaluation: verification protocols (and, later, privacy attacks)."""
