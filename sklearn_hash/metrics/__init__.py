"""Retrieval metrics and scorers, and the label trees of graded relevance."""

from .._hierarchy import hierarchy_depth, make_hierarchy
from ._graded import make_ndcg_at_r_scorer, ndcg_at_r_score
from ._retrieval import make_map_at_r_scorer, map_at_r_score, recall_at_k_score

__all__ = [
    "hierarchy_depth",
    "make_hierarchy",
    "make_map_at_r_scorer",
    "make_ndcg_at_r_scorer",
    "map_at_r_score",
    "ndcg_at_r_score",
    "recall_at_k_score",
]
