"""The ``evaluation`` section: metric, flip-averaging, re-ranking, spatial-temporal scoring."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from hpc_reid.config.base import Section


class SpatialTemporalConfig(Section):
    """Spatial-temporal scoring (st-ReID, Wang et al., AAAI 2019): the appearance similarity s
    joined with the probability p of the (camera pair, frame difference) under the training set's
    histogram, score = 1/(1 + lambda0 e^(-gamma0 s)) x 1/(1 + lambda1 e^(-gamma1 p)); for sets
    whose file names give frame numbers (Market-1501, DukeMTMC-reID, VeRi-776, synthetic)."""

    enabled: bool = False
    histogram: str | None = Field(
        None,
        description="the histogram file written at training time (null: the run's "
        "st_histogram.npz beside its checkpoints)",
    )
    bin_frames: int = Field(100, ge=1, description="frames per histogram bin")
    bins: int = Field(5000, ge=1, description="histogram bins per camera pair")
    smooth_sigma: float = Field(
        50.0, gt=0.0, description="Parzen window (Gaussian) std in bins, applied at evaluation"
    )
    lambda0: float = Field(1.0, gt=0.0)
    gamma0: float = Field(5.0, gt=0.0)
    lambda1: float = Field(2.0, gt=0.0)
    gamma1: float = Field(5.0, gt=0.0)


class RerankConfig(Section):
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017)."""

    enabled: bool = False
    k1: int = Field(20, ge=1)
    k2: int = Field(6, ge=1)
    lambda_value: float = Field(0.3, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _k2_within_k1(self) -> RerankConfig:
        if self.k2 > self.k1:
            raise ValueError(
                f"evaluation.rerank.k2={self.k2} must not exceed evaluation.rerank.k1={self.k1} "
                "(query expansion averages over the k2 nearest of the k1 neighbourhood)"
            )
        return self


class EvaluationConfig(Section):
    every_epochs: int = Field(0, ge=0, description="0: only after the last epoch")
    at_start: bool = Field(
        False, description="also evaluate the initial model before training (a fresh run only)"
    )
    metric: Literal["cosine", "euclidean"] = "cosine"
    flip_average: bool = Field(
        True,
        description="rank with the mean of each image's features and its horizontal flip's (won "
        "on every real set and the synthetic one: README, Recipes on real images); false: the "
        "plain, single-image protocol",
    )
    rescore_k: int = Field(
        0,
        ge=0,
        description="CACE-Net's conditional re-scoring: each query's top-K gallery items by the "
        "single-image distance re-ordered by the pair module's distance (positions beyond K "
        "keep their order; metrics exact on the re-scored ranking); 0: off, the single-image "
        "ranking (the released code's inference)",
    )
    rescore_batch: int = Field(
        32, ge=1, description="candidates whose feature maps are recomputed at a time"
    )
    report_without_flip: bool = Field(
        True,
        description="with flip_average, also the metrics of the image-only features "
        "(without_flip/rank-1 ...; papers report both), from the same extraction pass",
    )
    max_rank: int = Field(50, ge=1)
    backend: Literal["auto", "numpy", "torch", "cython", "cuda"] = "auto"
    rerank: RerankConfig = Field(default_factory=RerankConfig)
    st: SpatialTemporalConfig = Field(default_factory=SpatialTemporalConfig)
    plots: bool = True
    distance: str = Field(
        "global",
        description="the test-time distance: retrieval parts the model declares, joined by '+' "
        "for their weighted sum (global; local, AlignedReID's DMLI distance; global+local)",
    )
    distance_weights: dict[str, float] = Field(
        default_factory=dict, description="weight of each part of `distance` (default 1 each)"
    )

    @field_validator("distance")
    @classmethod
    def _distance_parts(cls, value: str) -> str:
        parts = value.split("+")
        if any(not p.isidentifier() for p in parts) or len(set(parts)) != len(parts):
            raise ValueError(
                f"{value!r}: expected part names joined by '+', each once (global, local, "
                "global+local)"
            )
        return value

    @model_validator(mode="after")
    def _weights_of_parts(self) -> EvaluationConfig:
        parts = self.distance.split("+")
        for name, w in self.distance_weights.items():
            if name not in parts:
                raise ValueError(
                    f"distance_weights.{name}: {name!r} is not a part of distance {self.distance!r}"
                )
            if not w >= 0:
                raise ValueError(f"distance_weights.{name}: {w} must be >= 0")
        return self
