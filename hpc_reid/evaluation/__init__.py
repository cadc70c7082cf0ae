"""Evaluation: feature extraction, test-time distances of retrieval rows, exact ranking metrics
(CMC, mAP, mINP), k-reciprocal re-ranking and plots."""

from hpc_reid.evaluation.distances import (
    RowDistance,
    as_row_distance,
    evaluate_features,
    pairwise_distance,
)
from hpc_reid.evaluation.features import extract_features
from hpc_reid.evaluation.parts import (
    PartLayout,
    RowLayout,
    probe_layout,
    register_part_distance,
    retrieval_layout,
)
from hpc_reid.evaluation.ranking import RankResult, rank_metrics
from hpc_reid.evaluation.rerank import rerank, rerank_blocks, rerank_from_config
from hpc_reid.evaluation.sharded import evaluate_sharded

__all__ = [
    "PartLayout",
    "RankResult",
    "RowDistance",
    "RowLayout",
    "as_row_distance",
    "evaluate_features",
    "evaluate_sharded",
    "extract_features",
    "pairwise_distance",
    "probe_layout",
    "rank_metrics",
    "register_part_distance",
    "rerank",
    "rerank_blocks",
    "rerank_from_config",
    "retrieval_layout",
]
