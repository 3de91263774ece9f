"""Retrieval metrics and scorers."""

from ._retrieval import make_map_at_r_scorer, map_at_r_score, recall_at_k_score

__all__ = ["make_map_at_r_scorer", "map_at_r_score", "recall_at_k_score"]
