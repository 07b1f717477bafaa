"""Evaluation: shapes prompt adherence, FID, DrawBench."""
