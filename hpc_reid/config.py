"""Typed experiment configuration: one YAML file per experiment, validated, with CLI overrides.

A config file is a YAML mapping with the sections below; any key left out takes the default shown
in the schema. ``_base_: other.yaml`` (a path relative to the file) merges the file onto another
one, so method and data set variants state only what differs. ``--set a.b=c`` overrides one key;
the value is read as YAML (``--set optimizer.lr=1e-3``, ``--set schedule.milestones=[20,40]``) and
then validated like the file. Every error names the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import itertools
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

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
SYNTHETIC = "synthetic"
# The built-in model heads (model.head); one registered with hpc_reid.models.register_head too.
HEADS = ("bnneck", "aligned", "san", "cace", "temporal_avg", "temporal_attention", "fgreid")
#: model.<key> -> (built-in names, the module and function listing every registered one)
_REGISTRIES = {
    "backbone": (BACKBONES, "hpc_reid.models.backbones", "available_backbones"),
    "head": (HEADS, "hpc_reid.models.heads", "available_heads"),
}


class ConfigError(ValueError):
    """A config file or override is invalid; the message names every bad key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(Section):
    """The built-in Market-format data set, generated on first use into ``cache_dir``."""

    ids: int = Field(200, ge=4, description="identities, half train and half test")
    cams: int = Field(6, ge=2, le=6)
    images_per_id: int = Field(16, ge=2)
    distractors: int = Field(100, ge=0)
    junk: int = Field(30, ge=0)
    seed: int = 0
    cache_dir: str | None = Field(None, description="default $HPC_REID_CACHE or ~/.cache/hpc_reid")
    transit: bool = Field(
        False,
        description="frame numbers from a camera-network transit model (identities walking between "
        "cameras with realistic delays; one sequence per camera, Market-style names), so "
        "spatial-temporal scoring has something to learn; false: the original random frames",
    )
    tracklets: bool = Field(
        False,
        description="a MARS-layout video set (tracklets of walking people) instead of Market "
        "images; read as data set 'mars'",
    )
    tracklets_per_camera: int = Field(
        2, ge=1, description="tracklets: tracklets of an identity in each camera that sees it"
    )
    frames_per_tracklet: tuple[int, int] = Field(
        (8, 24), description="tracklets: [min, max] frames of a tracklet (uniform)"
    )

    @field_validator("frames_per_tracklet")
    @classmethod
    def _frame_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1]:
            raise ValueError(f"expected [min, max] with 1 <= min <= max, got {list(value)}")
        return value


class VideoConfig(Section):
    """Tracklets (video sets: MARS, iLIDS-VID, PRID 2011 multi-shot, the synthetic tracklets): how
    many frames of a tracklet a training sample and a test clip hold. Ignored for image sets."""

    seq_len: int = Field(4, ge=1, description="T: frames per training tracklet and per test clip")
    sampling: Literal["chunked", "consecutive"] = Field(
        "chunked",
        description="training frames: chunked, the tracklet cut into T chunks of max(n // T, 1) "
        "frames (the last to the end) and one random frame from each (the references' restricted "
        "random sampling); consecutive, T consecutive frames from a random start (the last "
        "repeated when the tracklet is shorter)",
    )
    max_clips: int = Field(
        32,
        ge=0,
        description="test: a tracklet's feature is the mean over its consecutive, non-overlapping "
        "clips of T frames (the last padded by cycling its own frames), the first max_clips of "
        "them (0: all; the references cap MARS at 32)",
    )
    augment_per: Literal["tracklet", "frame"] = Field(
        "tracklet",
        description="training augmentation: one flip, crop and erasing decision for every frame "
        "of a tracklet (the references' default), or one per frame",
    )


class TexturesConfig(Section):
    """Per-image target textures for SAN's decoder (the batch field ``texture``): none; the
    synthetic set's own per-identity texture maps (``textures/PPPP.png``, the true textures, SAN's
    PIT pairs); or pseudo textures written by ``hpc-reid textures`` (one per image, in a folder
    mirroring the image names or an HDF5 file). Decoded and normalised to [-1, 1] and resized to
    ``model.san.texture_size``; never flipped, cropped or erased with the person image (the texture
    space is pose- and view-free)."""

    kind: Literal["none", "synthetic", "pseudo"] = "none"
    root: str | None = Field(
        None, description="pseudo: the folder or .h5 file hpc-reid textures wrote"
    )
    missing: Literal["error", "skip"] = Field(
        "error",
        description="a training image without a texture: error, naming it; skip, the image "
        "trains without the texture losses",
    )


class ValidationConfig(Section):
    """A validation holdout carved from the training identities (hpc_reid/data/holdout.py), so
    model selection and hyper-parameter searches (``hpc-reid tune``) never see a test identity:
    ``fraction`` of the train identities leave training and become the query and gallery (per
    held-out identity one random camera stays whole in the gallery and each other camera gives one
    random query; a set whose train split has one camera, VehicleID, follows its own test
    protocol: one random gallery image per identity, the rest queries), and ``distractors`` of the
    remaining train images (tracklets) move to the gallery as distractors, as the fine-grained
    ReID code's search subsets do (10% of the ids, 25% of the rest). The test split is not read."""

    fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of the train identities held out for validation (rounded to a count); "
        "0: off, query and gallery are the data set's test split",
    )
    distractors: float = Field(
        0.25,
        ge=0.0,
        lt=1.0,
        description="share of the remaining train images (tracklets) moved to the validation "
        "gallery as distractors",
    )
    seed: int = Field(0, ge=0, description="the draw of identities, queries and distractors")


class DataConfig(Section):
    dataset: str = Field(SYNTHETIC, description="a registered data set name or 'synthetic'")
    root: str | None = Field(None, description="data set folder; not used for 'synthetic'")
    options: dict[str, Any] = Field(
        default_factory=dict, description="data set specific options, e.g. split_id, variant"
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    textures: TexturesConfig = Field(default_factory=TexturesConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    height: int = Field(256, ge=32, description="input height in pixels")
    width: int = Field(128, ge=16, description="input width in pixels")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        from hpc_reid.data.datasets import available_datasets

        allowed = [SYNTHETIC, *available_datasets()]
        if name not in allowed:
            raise ValueError(f"unknown data set {name!r}{did_you_mean(name, allowed)}")
        return name


class SamplerConfig(Section):
    """Identity-balanced batches (P identities x K images per rank), or plain random batches."""

    kind: Literal["identity", "random"] = Field(
        "identity",
        description="identity: P x K identity-balanced batches (BoT); random: batches of "
        "batch_size images drawn without identity balancing (the anchor loss's stage 2)",
    )
    batch_size: int | None = Field(
        None, ge=1, description="random: images per rank batch; null: P x K, the same batch"
    )
    num_identities: int = Field(16, ge=1, description="P, identities per rank batch")
    num_instances: int = Field(4, ge=1, description="K, images per identity")
    allow_replacement: bool = Field(
        True, description="draw with replacement for identities with fewer than K images"
    )
    passes_per_epoch: int = Field(
        1,
        ge=1,
        description="passes over the identities per epoch (4 on Market-1501 ~ BoT's epoch length)",
    )


class AugmentConfig(Section):
    """Training augmentation (BoT defaults); both loaders implement the same semantics."""

    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    pad: int = Field(10, ge=0)
    random_erasing_prob: float = Field(0.5, ge=0.0, le=1.0)
    erasing_area: tuple[float, float] = (0.02, 0.4)
    erasing_aspect: float = Field(0.3, gt=0.0, le=1.0, description="min aspect; max is 1/min")
    color_jitter: bool = False
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @field_validator("erasing_area")
    @classmethod
    def _area_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError(f"must satisfy 0 < min <= max <= 1, got {list(v)}")
        return v


class LoaderConfig(Section):
    backend: Literal["auto", "dali", "torch"] = "auto"
    num_workers: int = Field(4, ge=0)
    prefetch: int = Field(2, ge=1, description="batches prefetched per worker / pipeline depth")
    dali_pipelines: int = Field(
        0,
        ge=0,
        description="DALI pipelines side by side, dealt batches in turn (0: one per core, "
        "one thread each, when decoding on the CPU; one on the GPU)",
    )
    dali_hw_decoder_load: float = Field(
        0.65,
        ge=0.0,
        le=1.0,
        description="share of each batch's JPEGs that DALI's GPU decoder sends to the hardware "
        "JPEG decoder (A100, H100 and later; ignored elsewhere and on the CPU); the rest go to "
        "nvJPEG's CUDA decoder. 0.65 is DALI's default, for throughput; 0 decodes every image "
        "the same way, for bit-stable comparisons",
    )
    pin_memory: bool = True
    test_batch_size: int = Field(256, ge=1)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


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


class LRScalingConfig(Section):
    """How the learning rate follows the global batch: lr * f(global_batch / base_batch_size)."""

    rule: Literal["none", "linear", "sqrt"] = "none"
    base_batch_size: int = Field(64, ge=1)


class OptimizerConfig(Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(3.5e-4, gt=0.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    weight_decay_bias: float = Field(5e-4, ge=0.0)
    bias_lr_factor: float = Field(1.0, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    amsgrad: bool = Field(False, description="Adam/AdamW's AMSGrad variant (SAN's recipe)")
    decoder_lr: float | None = Field(
        None,
        gt=0.0,
        description="a learning rate of its own for a decoder's parameters (SAN's SA-Dec; "
        "parameters under the head's 'decoder'), constant, in one backward pass with the rest; "
        "null: the model's",
    )
    decoder_betas: tuple[float, float] | None = Field(
        None, description="the decoder group's Adam betas (SAN: 0.5, 0.999); null: betas"
    )
    decoder_weight_decay: float | None = Field(
        None, ge=0.0, description="the decoder groups' weight decay (SAN: 0); null: the model's"
    )
    fused: bool | None = Field(None, description="null: fused where torch supports it")
    apex: bool = Field(False, description="use apex's fused optimizer if installed")
    lr_scaling: LRScalingConfig = Field(default_factory=LRScalingConfig)


class ScheduleConfig(Section):
    epochs: int = Field(120, ge=1)
    kind: Literal["multistep", "cosine", "exponential"] = "multistep"
    milestones: list[int] = Field(default_factory=lambda: [40, 70])
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    warmup_epochs: int = Field(10, ge=0)
    warmup_factor: float = Field(0.1, gt=0.0, le=1.0)
    min_lr: float = Field(1e-7, ge=0.0, description="cosine floor")
    decay_start: int = Field(
        1,
        ge=1,
        description="exponential: the first (1-based) epoch whose lr decays; from there each "
        "epoch e runs at decay_to ** ((e + 1 - decay_start) / (epochs + 1 - decay_start)) times "
        "the base lr (AlignedReID's recipe: 151 of 300, to 0.001)",
    )
    decay_to: float = Field(0.001, gt=0.0, le=1.0, description="exponential: the final factor")

    @model_validator(mode="after")
    def _consistent(self) -> ScheduleConfig:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"schedule.warmup_epochs={self.warmup_epochs} must be smaller than "
                f"schedule.epochs={self.epochs}"
            )
        if self.kind == "exponential" and self.decay_start > self.epochs:
            raise ValueError(
                f"schedule.decay_start={self.decay_start} must lie in 1..schedule.epochs="
                f"{self.epochs}"
            )
        if self.kind == "multistep":
            ms = self.milestones
            if any(b <= a for a, b in itertools.pairwise(ms)):
                raise ValueError(f"schedule.milestones={ms} must be strictly increasing")
            if ms and not (ms[0] > 0 and ms[-1] <= self.epochs):
                raise ValueError(
                    f"schedule.milestones={ms} must lie in 1..schedule.epochs={self.epochs}"
                )
        return self


class EngineConfig(Section):
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    grad_clip: float | None = Field(None, gt=0.0)
    seed: int = 0
    deepspeed_config: str | None = Field(None, description="DeepSpeed JSON/YAML to merge")


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


class LoggingConfig(Section):
    output_dir: str = "runs"
    run_name: str | None = Field(None, description="default: the experiment name")
    log_every: int = Field(20, ge=1, description="steps between logged lines")
    tensorboard: bool = True
    progress_bar: bool = True
    checkpoint_every: int = Field(10, ge=0, description="epochs; 0: only the last")
    keep_last: int = Field(3, ge=1)
    keep_best: bool = True


class DistributedConfig(Section):
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_s: int = Field(1800, ge=10)
    find_unused_parameters: bool = False
    sync_bn: Literal["auto"] | bool = Field(
        "auto",
        description="BatchNorm statistics over the global batch (torch's SyncBatchNorm) rather "
        "than each rank's own: auto, on with CUDA and 2+ processes, else off; true, the same "
        "but an error on the CPU (torch's SyncBatchNorm runs only on CUDA); false, never",
    )
    stop_check_every: int = Field(
        10,
        ge=1,
        description="steps between the ranks' agreements on a pre-emption signal (one "
        "all-reduce, a host-device sync); every rank checks at the same steps (multiples of "
        "this, at an accumulation boundary, and an epoch's last step), so all stop together",
    )


class Config(Section):
    """A whole experiment."""

    name: str = "experiment"
    data: DataConfig = Field(default_factory=DataConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="after")
    def _combinations(self) -> Config:
        if self.data.dataset != SYNTHETIC and not self.data.root:
            raise ValueError(f"data.root is required for data.dataset={self.data.dataset!r}")
        s = self.sampler
        if s.kind == "identity" and s.batch_size not in (None, s.num_identities * s.num_instances):
            raise ValueError(
                f"sampler.batch_size={s.batch_size} with sampler.kind=identity, whose batch is "
                f"num_identities x num_instances = {s.num_identities * s.num_instances}: set "
                "those, or sampler.kind=random"
            )
        if self.sampler.kind == "random":
            for name in ("triplet", "local_triplet"):
                weight = getattr(self.loss, name).weight
                if weight > 0:
                    raise ValueError(
                        f"sampler.kind=random draws batches without identity balancing, which "
                        f"may hold no positive pair for loss.{name} (weight {weight}); use "
                        f"sampler.kind=identity or loss.{name}.weight=0"
                    )
        if self.loss.texture.weight > 0 and self.data.textures.kind == "none":
            raise ValueError(
                f"loss.texture.weight={self.loss.texture.weight} needs target textures: set "
                "data.textures.kind (synthetic: the synthetic set's own; pseudo: hpc-reid "
                "textures' output in data.textures.root)"
            )
        if self.data.textures.kind == "pseudo" and not self.data.textures.root:
            raise ValueError("data.textures.kind=pseudo needs data.textures.root")
        dt = self.loss.decoder_triplet
        fixed_layout = (s.kind, s.num_instances) == ("identity", 4) and s.num_identities >= 2
        if dt.weight > 0 and dt.mining == "fixed" and not fixed_layout:
            raise ValueError(
                "loss.decoder_triplet.mining=fixed is the released code's index pattern over "
                f"identity batches of P >= 2 identities x K=4 images (sampler.kind={s.kind}, "
                f"num_identities={s.num_identities}, num_instances={s.num_instances}); use "
                "mining=hard"
            )
        if self.loss.triplet.weight > 0 and self.sampler.num_instances < 2:
            raise ValueError(
                f"sampler.num_instances={self.sampler.num_instances} leaves no positive pair for "
                f"the triplet loss (loss.triplet.weight={self.loss.triplet.weight}); use K >= 2"
            )
        return self

    @model_validator(mode="after")
    def _temporal_attention_map_size(self) -> Config:
        # the attention conv's kernel is the backbone's whole map: sized from the input here, so
        # that the resolved config (and a checkpoint's) says what the head was built for
        m = self.model
        if m.head == "temporal_attention" and m.temporal.map_size is None:
            from hpc_reid.models.backbones import feature_map_size  # torch: only when needed

            size = feature_map_size(m.backbone, m.last_stride, self.data.height, self.data.width)
            m.temporal.map_size = size
        return self

    @model_validator(mode="after")
    def _osm_reads_centers(self) -> Config:
        # the class-aware attention reads the center loss's centers: without them, refused now
        if self.loss.osm.weight > 0 and self.loss.center.weight == 0:
            raise ValueError(
                f"loss.osm.weight={self.loss.osm.weight} reads the center loss's centers (its "
                "class-aware attention), but loss.center.weight=0; turn the center loss on "
                "(FGReID: 0.0005) or set loss.osm.weight=0"
            )
        return self

    @model_validator(mode="after")
    def _mutual_learning_has_members(self) -> Config:
        # a mutual term with one member has no peer: refused at load, not as a zero loss
        for name in ("mutual_prob", "mutual_global", "mutual_local"):
            weight = getattr(self.loss, name).weight
            if weight > 0 and self.model.members < 2:
                raise ValueError(
                    f"loss.{name}.weight={weight} is mutual learning between the members of "
                    f"model.members={self.model.members}; set model.members >= 2 (2 in "
                    f"AlignedReID) or loss.{name}.weight=0"
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=100)


# ----------------------------------------------------------------------------- loading


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f"; allowed: {', '.join(choices)}"


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class that owns the key at ``loc[:-1]`` (None if not a fixed section)."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        if get_origin(ann) is not None:  # Optional[...] etc.: take the model member if any
            ann = next((a for a in get_args(ann) if isinstance(a, type)), None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _describe(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            section = _section_at(loc)
            prefix = ".".join(str(p) for p in loc[:-1])
            keys = list(section.model_fields) if section else []
            hint = ""
            if keys:  # matched on the key's own name: a shared "sampler." prefix is no likeness
                close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
                full = [f"{prefix}.{k}" if prefix else k for k in [*close, *keys]]
                hint = f" (did you mean {full[0]!r}?)" if close else f"; allowed: {', '.join(full)}"
            lines.append(f"  {path}: unknown key{hint}")
            continue
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] != "value_error":
            lines.append(f"  {path}: {message} (got {err['input']!r})")
        elif not loc or message.startswith(f"{path}."):  # a section's check names its own keys
            lines.append(f"  {message}")
        else:
            lines.append(f"  {path}: {message}")
    return f"invalid config {source}:\n" + "\n".join(lines)


def _deep_merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file, resolving ``_base_`` chains (relative to the including file)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: _base_ cycle through {' -> '.join(map(str, _seen))}")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    return _deep_merge(read_yaml(path.parent / base, (*_seen, path)), data)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {assignment!r}: expected KEY.PATH=VALUE")
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"override {assignment!r}: {where} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = raw


def build_config(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def config_with_overrides(
    data: Mapping[str, Any], overrides: Iterable[str] = (), source: str = "<dict>"
) -> Config:
    """``data`` (a config mapping already read, e.g. the resolved config a checkpoint stores) with
    ``--set`` overrides applied and validated like a file; ``data`` itself is left unchanged."""
    data = copy.deepcopy(dict(data))
    overrides = list(overrides)
    for assignment in overrides:
        apply_override(data, assignment)
    return build_config(data, source + (f" with --set {' '.join(overrides)}" if overrides else ""))


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> Config:
    """Load ``path`` (or the defaults when None), apply ``--set`` overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    overrides = list(overrides)
    for assignment in overrides:
        apply_override(data, assignment)
    source = str(path or "<defaults>") + (f" with --set {' '.join(overrides)}" if overrides else "")
    return build_config(data, source)


def write_atomic(path: str | Path, data: str | bytes | Callable[[BinaryIO], object]) -> Path:
    """Write ``data`` to a temporary sibling, then rename over ``path``: text (UTF-8), bytes, or
    a function that writes to the open binary file (e.g. ``lambda f: fig.savefig(f)``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_resolved(config: Config, run_dir: str | Path) -> Path:
    """Write the resolved config beside a run's outputs as ``config.yaml``."""
    return write_atomic(Path(run_dir) / "config.yaml", config.to_yaml())
