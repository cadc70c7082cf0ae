"""The data set, sampler and loader sections (``data``, ``sampler``, ``loader``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from hpc_reid.config.base import Section, did_you_mean

# data.dataset's name for the built-in generated set
SYNTHETIC = "synthetic"


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
