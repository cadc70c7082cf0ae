"""Temporal heads: a tracklet's T per-frame maps pooled over time into one feature (video ReID).

A head whose class sets ``temporal = True`` takes the backbone's per-frame maps as (B, T, C, h, w)
(:class:`hpc_reid.models.ReidModel` runs any image backbone on the B x T frames) and returns the
``bnneck`` head's outputs, one row per tracklet, so losses, samplers and evaluation see (B, ...)
outputs as for images. Both heads here are the ``bnneck`` head after a pooling over T: its pooling
(``model.pooling``), BNNeck and classifier, with the same parameter names, so an image model's
weights load into ``temporal_avg`` and the other way round.

- ``temporal_avg``: temporal average pooling, the "TP" model of Gao and Nevatia ("Revisiting
  Temporal Modeling for Video-based Person ReID", arXiv:1805.02104, Sec. 3.2): each frame pooled
  spatially, then the mean over T.
- ``temporal_attention``: their temporal attention ("TA", Sec. 3.2) as the fine-grained ReID
  author's ``ResNet50TA_BT`` (Pathak et al.'s video code, models/ResNet.py): a conv over the whole
  spatial map C -> 256 (kernel = the map's (h, w)), ReLU, a temporal Conv1d 256 -> 1 (kernel 3,
  padding 1), ReLU, softmax over T; the feature is the attention-weighted sum of the per-frame
  pooled features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpc_reid.config import ModelConfig
from hpc_reid.models.heads import GlobalHead, register_head

#: The (h, w) of the backbone's map the attention's spatial conv covers when neither the caller
#: nor ``model.temporal.map_size`` says (a ModelConfig built alone; a whole Config fills the key
#: from the input size): the default input, 256 x 128, at output stride 16.
MAP_SIZE = (16, 8)


class TemporalHead(GlobalHead):
    """What both temporal heads share: the ``bnneck`` head's layers and outputs, on a feature
    pooled over T by :meth:`pool_time` (the subclass's)."""

    temporal = True

    def forward(self, fmaps: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.neck_outputs(self.pool_time(fmaps, self.frame_features(fmaps)))

    def pool_time(self, fmaps: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """(B, C): the tracklet's feature from its maps and their pooled (B, T, C) features."""
        raise NotImplementedError

    def frame_features(self, fmaps: torch.Tensor) -> torch.Tensor:
        """(B, T, C): each frame's map pooled by ``model.pooling``, as the ``bnneck`` head would."""
        if fmaps.dim() != 5:
            raise TypeError(
                f"the {type(self).__name__} head takes per-frame maps (B, T, C, h, w), got a "
                f"{fmaps.dim()}-D tensor of shape {tuple(fmaps.shape)}"
            )
        t = fmaps.shape[1]
        return self.pool(fmaps.flatten(0, 1)).unflatten(0, (-1, t))


@register_head("temporal_avg")
class TemporalAvgHead(TemporalHead):
    """Temporal average pooling (Gao and Nevatia's TP): the mean over T of each frame's pooled
    feature, then the BNNeck. The same parameters as the ``bnneck`` head (no ``meta``): an image
    model's checkpoint loads into it, and a tracklet of one frame gives that image's outputs."""

    def pool_time(self, fmaps: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        return frames.mean(dim=1)


@register_head("temporal_attention")
class TemporalAttentionHead(TemporalHead):
    """Temporal attention (Gao and Nevatia's TA, as ``ResNet50TA_BT``): softmax-over-T weights
    from a spatial conv over each frame's whole map and a temporal conv, applied to the per-frame
    pooled features, then the BNNeck.

    The spatial conv's kernel is the map's (h, w) (``map_size``), so it weighs every position of
    the map with its own weights, which a 1x1 conv and a spatial mean cannot: it must be sized at
    build time, before the optimizer and data-parallel wrappers see the parameters, and the input
    size is not part of the model config, so it is ``model.temporal.map_size`` (which a whole
    config fills in from ``data.height`` and ``data.width``; ``MAP_SIZE`` for a model config
    alone); a map of another size is refused at the first batch, naming the size to use. Taking
    the size from the first batch instead would leave the parameters unmade when the optimizer,
    DDP/FSDP and a checkpoint's loading need them. Both convs start with Kaiming normal (fan in) and
    zero biases, as the reference.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        cfg: ModelConfig,
        *,
        map_size: tuple[int, int] | None = None,
        attention_dim: int | None = None,
    ):
        super().__init__(in_channels, num_classes, cfg)
        if map_size is None:
            map_size = cfg.temporal.map_size if cfg.temporal.map_size is not None else MAP_SIZE
        attention_dim = cfg.temporal.attention_dim if attention_dim is None else attention_dim
        if len(map_size) != 2 or min(map_size) < 1 or attention_dim < 1:
            raise ValueError(
                f"temporal_attention: expected map_size (h, w) >= 1 and attention_dim >= 1, got "
                f"map_size={map_size!r}, attention_dim={attention_dim!r}"
            )
        self.map_size = (int(map_size[0]), int(map_size[1]))
        self.attention_conv = nn.Conv2d(in_channels, attention_dim, kernel_size=self.map_size)
        self.attention_tconv = nn.Conv1d(attention_dim, 1, kernel_size=3, padding=1)
        for conv in (self.attention_conv, self.attention_tconv):
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
            nn.init.zeros_(conv.bias)
        # what a checkpoint must match beside the backbone's keys (engine.trainer.model_meta)
        self.meta = {
            "head": "temporal_attention",
            "map_size": list(self.map_size),
            "attention_dim": attention_dim,
        }

    def attention(self, fmaps: torch.Tensor) -> torch.Tensor:
        """(B, T) weights over the frames of each tracklet, non-negative, summing to 1."""
        t, h, w = fmaps.shape[1], fmaps.shape[3], fmaps.shape[4]
        if (h, w) != self.map_size:
            raise ValueError(
                f"temporal_attention: the backbone's map is {h}x{w} at this input size, but the "
                f"attention's spatial conv was built for {self.map_size[0]}x{self.map_size[1]} "
                f"(model.temporal.map_size): set it to [{h}, {w}] (or leave it null in a whole "
                "config, which sizes it from data.height and data.width), or use the input size it "
                "was made for"
            )
        spatial = F.relu(self.attention_conv(fmaps.flatten(0, 1)))  # (B*T, dim, 1, 1)
        per_tracklet = spatial.flatten(1).unflatten(0, (-1, t))  # (B, T, dim); -1: export-safe
        scores = F.relu(self.attention_tconv(per_tracklet.transpose(1, 2)))  # (B, 1, T)
        return F.softmax(scores.squeeze(1), dim=1)

    def pool_time(self, fmaps: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        weights = self.attention(fmaps)
        return (weights.unsqueeze(2).to(frames.dtype) * frames).sum(dim=1)
