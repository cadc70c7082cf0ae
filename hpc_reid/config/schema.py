"""The whole experiment: every section, and the checks that span sections."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import Field, model_validator

from hpc_reid.config.base import Section
from hpc_reid.config.data import SYNTHETIC, DataConfig, LoaderConfig, SamplerConfig
from hpc_reid.config.evaluation import EvaluationConfig
from hpc_reid.config.loss import LossConfig
from hpc_reid.config.model import ModelConfig
from hpc_reid.config.training import (
    DistributedConfig,
    EngineConfig,
    LoggingConfig,
    OptimizerConfig,
    ScheduleConfig,
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
