"""The ``loss`` section: one sub-section per registered loss term."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from hpc_reid.config.base import Section


class CrossEntropyConfig(Section):
    weight: float = Field(1.0, ge=0.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    also: list[str] = Field(
        default_factory=list,
        description="more logits outputs: the term is then the mean of the label-smoothed CE "
        "over logits and these (FGReID's two branches: [logits2])",
    )

    @field_validator("also")
    @classmethod
    def _distinct_outputs(cls, keys: list[str]) -> list[str]:
        if "logits" in keys or len(set(keys)) != len(keys):
            raise ValueError(
                f"loss.ce.also={keys}: expected distinct logits outputs other than 'logits' "
                "(which the term always reads)"
            )
        return keys


class TripletConfig(Section):
    weight: float = Field(1.0, ge=0.0)
    margin: float | None = Field(0.3, gt=0.0, description="null for the soft-margin variant")
    cross_rank: bool = Field(False, description="mine over features all-gathered from all ranks")
    normalize: bool = Field(
        False, description="on L2-normalised features (CACE-Net's triplet, margin 0.5)"
    )
    distance: Literal["euclidean", "cosine"] = Field(
        "euclidean",
        description="euclidean (BoT); cosine: 1 - cos, so each anchor's term is max(0, cos_n - "
        "cos_p + margin), the hardest positive the least similar (FGReID)",
    )


class CenterConfig(Section):
    weight: float = Field(0.0005, ge=0.0)
    lr: float = Field(0.5, gt=0.0, description="its own SGD optimizer, as in BoT")


class LocalTripletConfig(Section):
    """AlignedReID's local loss: batch-hard triplet on the DMLI distance of the stripe features
    (model output ``local``)."""

    weight: float = Field(0.0, ge=0.0)
    margin: float | None = Field(0.3, gt=0.0, description="null for the soft-margin variant")
    mining: Literal["global", "local"] = Field(
        "global",
        description="global: the hardest positive and negative found with the global distance "
        "(both reference codes' default); local: found with the DMLI distance itself",
    )
    cross_rank: bool = Field(
        False, description="mine over the features all-gathered from all ranks (as loss.triplet)"
    )


class MutualConfig(Section):
    """A mutual-learning term between the members of ``model.members`` (AlignedReID, after Deep
    Mutual Learning; hpc_reid/methods/alignedreid/mutual.py)."""

    weight: float = Field(0.0, ge=0.0)


class TextureLossConfig(Section):
    """SAN's reconstruction loss: mean |T_hat - T| of the decoded texture (output ``texture``)
    against the image's target texture (batch field ``texture``, data.textures)."""

    weight: float = Field(0.0, ge=0.0)


class DecoderTripletConfig(Section):
    """SAN's triplet ReID constraints on the decoder's four block outputs (``decoder.1`` ..
    ``decoder.4``), MSE as the distance, summed over terms and blocks as the released code."""

    weight: float = Field(0.0, ge=0.0)
    margin: float = Field(0.3, ge=0.0)
    mining: Literal["fixed", "hard"] = Field(
        "fixed",
        description="fixed: the released code's index pattern over a P x 4 batch (15 triplets a "
        "block, no mining); hard: batch-hard positive and negative per anchor",
    )


class PairIdConfig(Section):
    """CACE-Net's mixed-up ID loss on the conditioned features of every ordered pair (i, j):
    alpha CE(pair_fc(f0), y_j) + (1 - alpha) CE(pair_fc(f0), y_i), and the same for f1 with the
    labels swapped, mean over the pairs."""

    weight: float = Field(0.0, ge=0.0)
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class PairTripletConfig(Section):
    """CACE-Net's pair triplet: the B x B matrix of ||n(f0) - n(f1)|| over the ordered pairs,
    batch-hard with the pair labels (y_i, y_j)."""

    weight: float = Field(0.0, ge=0.0)
    margin: float = Field(0.5, gt=0.0)
    exclude_diagonal: bool = Field(
        True, description="the TF release leaves the (i, i) pairs out of the positives"
    )


class AnchorConfig(Section):
    """The cluster-level anchor loss (Chen et al. 2020, hpc_reid/methods/anchor): each feature is
    pulled towards its class anchor, the mean feature of all the class's training images under
    the current model (eval mode, un-augmented, flip-averaged), recomputed at the start of every
    ``every_epochs``-th epoch (and every ``every_steps`` optimizer steps, if set)."""

    weight: float = Field(0.0, ge=0.0)
    form: Literal["mse", "l1", "intra_inter"] = Field(
        "mse",
        description="mse: mean of (f - a_y)^2 (the released scripts); l1: mean |f - a_y|; "
        "intra_inter: hinge of ||f - a_y|| - min over c != y of ||f - a_c|| + margin",
    )
    margin: float = Field(0.3, ge=0.0, description="intra_inter only")
    feature: Literal["bn", "global"] = Field(
        "bn", description="the feature anchored: bn, after the BNNeck (the reference); global"
    )
    flip_average: bool = Field(True, description="anchors from the mean of image and its flip")
    every_epochs: int = Field(1, ge=1, description="recompute the anchors every N epochs")
    every_steps: int = Field(
        0, ge=0, description="also recompute every N optimizer steps within an epoch; 0: off"
    )


class OsmConfig(Section):
    """Online soft mining with class-aware attention (Wang et al., "Deep Metric Learning by Online
    Soft Mining and Class-Aware Attention", AAAI 2019, arXiv 1811.01459; as FGReID uses it:
    hpc_reid/methods/fgreid/losses.py): a weighted contrastive loss on L2-normalised features
    whose pair weights are the smaller of the two samples' attention to their own class, read
    from the center loss's centers (loss.center must be on). Defaults: the fine-grained ReID
    code's tools/dataset_config.conf."""

    weight: float = Field(0.0, ge=0.0)
    alpha: float = Field(2.0708620, gt=0.0, description="the negatives' margin")
    sigma: float = Field(0.1985924, gt=0.0, description="the positives' similarity scale")
    l: float = Field(  # noqa: E741  (the paper's and the reference's name)
        0.4834911, ge=0.0, le=1.0, description="(1 - l) L_P + l L_N: the negatives' share"
    )
    center_grad: bool = Field(
        True,
        description="let the loss move the centers too, as the reference (which hands it the "
        "centers undetached); false: the attention reads them as constants",
    )


class VarianceConfig(Section):
    """FGReID's within-class variance term on the global feature: the summed squared distance of
    each feature to its identity's prototype in the batch, over the pooled count (K - 1) B / K."""

    weight: float = Field(0.0, ge=0.0)
    instances: int | None = Field(
        None,
        ge=2,
        description="K, the images of an identity in a batch (the reference hard-codes 4); "
        "null: each identity's own count in the batch (the sampler's K on identity batches)",
    )


class SatisfiedRankConfig(Section):
    """FGReID's satisfied-rank term on the two branches' class probabilities p1 = softmax(logits),
    p2 = softmax(logits2): mean min(relu(p1[y] - p2[y] + margin), relu(2 satisfied - p1[y] -
    p2[y]))."""

    weight: float = Field(0.0, ge=0.0)
    margin: float = Field(2.0, ge=0.0, description="m_r, the rank margin")
    satisfied: float = Field(1.0, ge=0.0, description="m_s, the satisfied margin")


class RankConsistencyConfig(Section):
    """FGReID's consistency term: relu(mean over the batch of KL(p1 || p2) - margin)."""

    weight: float = Field(0.0, ge=0.0)
    margin: float = Field(0.005, ge=0.0, description="m_cs, the KL divergence tolerated")


class LossConfig(Section):
    """Each section is one loss term, registered by name (hpc_reid.losses.register_loss); a term
    with weight 0 is off."""

    ce: CrossEntropyConfig = Field(default_factory=CrossEntropyConfig)
    triplet: TripletConfig = Field(default_factory=TripletConfig)
    center: CenterConfig = Field(default_factory=CenterConfig)
    local_triplet: LocalTripletConfig = Field(default_factory=LocalTripletConfig)
    anchor: AnchorConfig = Field(default_factory=AnchorConfig)
    texture: TextureLossConfig = Field(default_factory=TextureLossConfig)
    decoder_triplet: DecoderTripletConfig = Field(default_factory=DecoderTripletConfig)
    pair_id: PairIdConfig = Field(default_factory=PairIdConfig)
    pair_triplet: PairTripletConfig = Field(default_factory=PairTripletConfig)
    osm: OsmConfig = Field(default_factory=OsmConfig)
    variance: VarianceConfig = Field(default_factory=VarianceConfig)
    satisfied_rank: SatisfiedRankConfig = Field(default_factory=SatisfiedRankConfig)
    rank_consistency: RankConsistencyConfig = Field(default_factory=RankConsistencyConfig)
    mutual_prob: MutualConfig = Field(
        default_factory=MutualConfig,
        description="KL divergence of each member's ID class probabilities from its peers' "
        "(huanghoujing's pm loss; 0 in its README runs)",
    )
    mutual_global: MutualConfig = Field(
        default_factory=MutualConfig,
        description="mean squared difference of each member's batch global distance matrix from "
        "its peers' (gdm loss; 1 in huanghoujing's README runs)",
    )
    mutual_local: MutualConfig = Field(
        default_factory=MutualConfig,
        description="the same on the batch DMLI distance matrices of the local stripes (ldm loss; "
        "0 in huanghoujing's README runs)",
    )
