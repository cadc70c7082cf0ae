"""AlignedReID's head: the baseline's global branch plus a local branch of horizontal stripes.

The local branch follows huanghoujing's reproduction (Model.py; the one with published numbers for
its exact code): the backbone's map pooled over each of S horizontal bands (over the band's rows
and the whole width), then a 1x1 conv (with bias) to ``model.local.dim`` channels, BatchNorm and
ReLU, giving ``local`` (B, S, C). At 256x128 with a last stride of 2 the map has 8 rows, one per
stripe, as in both reference codes; with last stride 1 (16 rows) or another input size each stripe
pools its band of rows (adaptive pooling), so S is a choice rather than a property of the input.
Average pooling is the default (huanghoujing); ``model.local.pooling: max`` is Luo's AlignedReID++
(which also normalises each stripe: ``model.local.normalize: true``). Luo's code skips the conv and
BN at test time and ranks 2048-d max-pooled stripes instead, a mismatch with what was trained; here
the test-time stripes are the trained ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpc_reid.config import ModelConfig
from hpc_reid.models.heads import GlobalHead, RetrievalPart, register_head


@register_head("aligned")
class AlignedHead(GlobalHead):
    """Outputs of the ``bnneck`` head plus ``"local"``: (B, S, C) stripe features. Retrieval parts:
    ``global`` (as the baseline) and ``local``, ranked with the DMLI distance ("dmli")."""

    output_keys = GlobalHead.output_keys | {"local"}

    def __init__(self, in_channels: int, num_classes: int, cfg: ModelConfig):
        super().__init__(in_channels, num_classes, cfg)
        local = cfg.local
        self.stripes, self.normalize = local.stripes, local.normalize
        self.band_pool = F.adaptive_avg_pool2d if local.pooling == "avg" else F.adaptive_max_pool2d
        self.local_conv = nn.Conv2d(in_channels, local.dim, kernel_size=1)
        self.local_bn = nn.BatchNorm2d(local.dim)
        # what a checkpoint must match beside the backbone's keys (engine.trainer.model_meta)
        self.meta = {"head": "aligned", "stripes": local.stripes, "local_dim": local.dim}
        self.retrieval_parts = {
            **self.retrieval_parts,
            "local": RetrievalPart("local", distance="dmli"),
        }

    def forward(self, fmap: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(fmap)
        rows = fmap.shape[2]
        if rows < self.stripes:
            raise ValueError(
                f"model.local.stripes={self.stripes}: the backbone's feature map has only {rows} "
                "rows at this input size; use fewer stripes or a larger data.height"
            )
        bands = self.band_pool(fmap, (self.stripes, 1))  # (B, C, S, 1)
        local = F.relu(self.local_bn(self.local_conv(bands)))
        local = local.squeeze(3).transpose(1, 2)  # (B, S, dim)
        if self.normalize:
            local = F.normalize(local, dim=2)
        out["local"] = local
        return out
