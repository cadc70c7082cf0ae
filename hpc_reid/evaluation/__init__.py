"""Evaluation: feature extraction, distances, exact ranking metrics (CMC, mAP, mINP) and plots."""

from hpc_reid.evaluation.distances import evaluate_features, pairwise_distance
from hpc_reid.evaluation.features import extract_features
from hpc_reid.evaluation.ranking import RankResult, rank_metrics

__all__ = [
    "RankResult",
    "evaluate_features",
    "extract_features",
    "pairwise_distance",
    "rank_metrics",
]
