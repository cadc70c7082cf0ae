"""Evaluation: feature extraction, distances, exact ranking metrics (CMC, mAP, mINP), k-reciprocal
re-ranking and plots."""

from hpc_reid.evaluation.distances import evaluate_features, pairwise_distance
from hpc_reid.evaluation.features import extract_features
from hpc_reid.evaluation.ranking import RankResult, rank_metrics
from hpc_reid.evaluation.rerank import rerank, rerank_blocks, rerank_from_config
from hpc_reid.evaluation.sharded import evaluate_sharded

__all__ = [
    "RankResult",
    "evaluate_features",
    "evaluate_sharded",
    "extract_features",
    "pairwise_distance",
    "rank_metrics",
    "rerank",
    "rerank_blocks",
    "rerank_from_config",
]
