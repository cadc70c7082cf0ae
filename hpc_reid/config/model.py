"""The ``model`` section: backbone, neck, head and each method head's own keys."""

from __future__ import annotations

import importlib
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from hpc_reid.config.base import Section, did_you_mean

# The built-in backbones; one registered with hpc_reid.models.register_backbone is accepted too.
BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet50_ibn_a",
    "mobilenet_v2",
    "osnet_x1_0",
    "osnet_x0_25",
)
# The built-in model heads (model.head); one registered with hpc_reid.models.register_head too.
HEADS = ("bnneck", "aligned", "san", "cace", "temporal_avg", "temporal_attention", "fgreid")
#: model.<key> -> (built-in names, the module and function listing every registered one)
_REGISTRIES = {
    "backbone": (BACKBONES, "hpc_reid.models.backbones", "available_backbones"),
    "head": (HEADS, "hpc_reid.models.heads", "available_heads"),
}


def _registered_name(kind: str, name: str) -> str:
    """``name`` when it is a built-in ``kind`` ("backbone" or "head"), else one registered
    (hpc_reid.models.register_backbone/_head); a ValueError otherwise."""
    builtin, module, function = _REGISTRIES[kind]
    if name in builtin:
        return name
    known = getattr(importlib.import_module(module), function)()  # imports torch: only here
    if name not in known:
        raise ValueError(f"unknown {kind} {name!r}{did_you_mean(name, known)}")
    return name


class SanConfig(Section):
    """SAN's semantics-aligned decoder (model.head: san; Jin et al., AAAI 2020): a U-Net-like
    SA-Dec on the backbone's last map with skips from the three stages before it, regressing the
    person's texture image; dropped at test time."""

    texture_size: tuple[int, int] = Field(
        (256, 256), description="(height, width) of the decoded texture and of its targets"
    )
    decoder_width: float = Field(
        1.0, gt=0.0, description="the decoder's channels times this (smaller for CPU backbones)"
    )
    embedding_dim: int | None = Field(
        None,
        ge=1,
        description="the seed's embedding: pooled feature -> Linear(D, n) + BN + ReLU, the "
        "classifier and the retrieval feature on it (512 in the released code); null: the "
        "baseline's neck (model.neck)",
    )


class TemporalConfig(Section):
    """The temporal heads of video models (``model.head: temporal_avg | temporal_attention``)."""

    attention_dim: int = Field(
        256,
        ge=1,
        description="temporal_attention: channels of the conv over each frame's whole map before "
        "the temporal conv that scores the frames (Gao & Nevatia's ResNet50TA: 256)",
    )
    map_size: tuple[int, int] | None = Field(
        None,
        description="temporal_attention: the (h, w) of the backbone's map, the kernel of that "
        "conv; null: the map's size at data.height x data.width, filled in when the config is "
        "read (the backbone run on the meta device)",
    )


class CaceConfig(Section):
    """CACE-Net's head (model.head: cace; Jiang et al., "Devil's in the Details: Aligning Visual
    Clues for Conditional Embedding in Person Re-Identification", arXiv 2009.05250): every ordered
    pair of a
    rank's batch side by side on the feature-map grid, a learned correspondence attention between
    their cells and a discrepancy graph convolution conditioning each image on the other, then one
    shared embedding head for single and conditioned maps."""

    embedding_dim: int = Field(768, ge=1, description="1x1 conv + BN after pooling")
    pooling: Literal["concat", "gem"] = Field(
        "concat", description="concat: [GAP, GMP] (the TF release); gem: GeM, learnable p = 3"
    )
    attention_dim: int | None = Field(
        None, ge=1, description="the 1x1 projections' width; null: channels / 16 (128 on R50)"
    )
    pair_chunk: int = Field(
        64,
        ge=1,
        description="pairs through the graph module at a time; with several chunks each is "
        "recomputed in the backward pass (memory ~ chunk, one more graph forward); at least "
        "B(B+1)/2 keeps all and recomputes none",
    )
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="before both classifiers")


class FGReIDConfig(Section):
    """The fine-grained ReID head (``model.head: fgreid``; Pathak, "Fine-Grained
    Re-Identification", arXiv 2011.13475; hpc_reid/methods/fgreid/model.py): a second trunk on the
    same input, an attention map from the first trunk's map weighting the second's, a non-local
    block over the positions (T x positions for tracklets), two BN branches sharing one classifier.
    """

    mid_dim: int = Field(
        1024, ge=1, description="the 1x1 convs conv1 and conv2 from the trunks' maps (2048 -> 1024)"
    )
    nonlocal_dim: int = Field(
        256, ge=1, description="the non-local block's theta and g projections (1024 -> 256)"
    )
    second_backbone: str | None = Field(
        None,
        description="the second trunk (the reference's base_mars), by name; null: model.backbone. "
        "Its map must have the first trunk's size",
    )
    second_init_from: str | None = Field(
        None,
        description="a checkpoint (file, run or checkpoints folder, best.pt) of any hpc-reid "
        "model whose backbone.* weights start the second trunk (the reference: a MARS-trained "
        "video model's trunk); null: model.pretrained when the trunks are one architecture, else "
        "a fresh initialisation. Loaded when the model is built",
    )
    batch_min: bool = Field(
        False,
        description="the attention map's offset: false, the minimum of each image's own conv1 "
        "map; true, the reference's minimum over the whole batch tensor (a sample's map then "
        "depends on the rest of its batch)",
    )

    @field_validator("second_backbone")
    @classmethod
    def _registered_backbone(cls, name: str | None) -> str | None:
        return None if name is None else _registered_name("backbone", name)


class LocalBranchConfig(Section):
    """The local branch of heads with stripe features (``model.head: aligned``): the final map
    pooled over each of ``stripes`` horizontal bands, a 1x1 conv to ``dim`` + BN + ReLU
    (AlignedReID, Zhang et al. 2017; both public reproductions)."""

    stripes: int = Field(8, ge=1, description="horizontal bands (8 at 256x128 in AlignedReID)")
    dim: int = Field(128, ge=1, description="channels of each stripe feature")
    pooling: Literal["avg", "max"] = Field(
        "avg", description="over each band's width and rows: avg (huanghoujing) or max (Luo)"
    )
    normalize: bool = Field(
        False, description="L2-normalise each stripe feature, in training and at test time"
    )


class ModelConfig(Section):
    backbone: str = "resnet50"
    last_stride: Literal[1, 2] = 1
    pretrained: str | None = Field(None, description="path to a local ImageNet state dict")
    # Trained from scratch, the synthetic main job's outcome was a lottery of its initial weights:
    # 45.3 +- 8.2 rank-1 over 5 seeds, and seed 1's initial weights gave 37.3 / 45.0 under the data
    # order of seeds 1 / 0 while seed 0's gave 53.4 / 53.1. Zero-init residual: seeds 1 and 3
    # 37.3 -> 85.1 and 35.8 -> 80.5 (README, Quickstart, for all 5 seeds).
    zero_init_residual: bool = Field(
        True,
        description="without pretrained weights, the BatchNorm ending each residual branch starts "
        "at scale 0, so every residual block starts as the identity (Goyal et al. 2017; He et al., "
        "Bag of Tricks, CVPR 2019); no effect when model.pretrained loads weights",
    )
    pooling: Literal["avg", "gem"] = "avg"
    gem_p: float = Field(3.0, gt=0.0)
    neck: Literal["bnneck", "none"] = "bnneck"
    # Luo et al. (BoT, CVPRW 2019) rank with the BN feature and report the pooled one slightly lower
    # on Market (cosine). With neck none both keys name the same feature (the model's "bn" output is
    # the pooled one), so the default stays valid for a no-neck recipe rather than an error.
    retrieval_feature: Literal["bn", "global"] = Field(
        "bn",
        description="the feature evaluation ranks with: bn, after the BNNeck (the pooled feature "
        "when neck is none); global, the pooled feature before the neck. A test-time choice: "
        "any checkpoint evaluates with either (eval --checkpoint CKPT --set "
        "model.retrieval_feature=global)",
    )

    head: str = Field(
        "bnneck",
        description="the head on the backbone's map, by name (hpc_reid.models.register_head): "
        "bnneck, global pooling + neck (BoT); aligned, that + AlignedReID's stripe features",
    )
    local: LocalBranchConfig = Field(default_factory=LocalBranchConfig)
    san: SanConfig = Field(default_factory=SanConfig)
    cace: CaceConfig = Field(default_factory=CaceConfig)
    temporal: TemporalConfig = Field(default_factory=TemporalConfig)
    fgreid: FGReIDConfig = Field(default_factory=FGReIDConfig)
    non_local: bool = Field(
        False,
        description="embedded-Gaussian non-local blocks (zero-initialised output) after the "
        "second-to-last bottleneck of layers 2, 3 and 4 of a ResNet (CACE-Net's backbone)",
    )
    init_from: str | None = Field(
        None,
        description="start from another run's weights (a checkpoint file, its run or "
        "checkpoints folder, or best.pt): weights only, no optimizer, schedule, sampler or RNG "
        "state; a stage-2 run (the anchor loss) from stage 1. Ignored when the run resumes",
    )
    members: int = Field(
        1,
        ge=1,
        description="models trained together (mutual learning, AlignedReID: 2, with a "
        "loss.mutual_* weight): the same architecture, each with its own initial weights; member "
        "0 is the one evaluated and exported",
    )

    def weights_part(self) -> dict[str, Any]:
        """The keys the trained weights depend on: all but the test-time ``retrieval_feature``, so
        that an evaluation of a checkpoint may change that key and no other (bench/real_data.py)."""
        return self.model_dump(exclude={"retrieval_feature"})

    @field_validator("backbone", "head")
    @classmethod
    def _registered(cls, name: str, info: ValidationInfo) -> str:
        return _registered_name(info.field_name, name)
