"""FGReID's head, ``model.head: fgreid`` (Pathak, "Fine-Grained Re-Identification", arXiv
2011.13475; the released ``ResNet50TA_BT_image`` / ``_video`` of models/ResNet.py,
/work/shared/methods/fgreid-video-st-vehicles.md, section 1).

Two trunks see the same images: the model's backbone (the reference's ImageNet-started ``base``)
and a second one built inside this head (``base_mars``, started from another run:
:mod:`hpc_reid.methods.fgreid.trunk`). :class:`~hpc_reid.models.ReidModel` runs the first and
hands this head its map and the images (``wants_input``); the head runs the second. On trunk 1's
map X_a and trunk 2's X_m (C x h x w each):

- A = conv1(X_a) (1x1, C -> mid_dim), g = GAP(A), s = softmax_c(g), and the spatial attention
  M = sigmoid(sum_c s_c (A_c - min A)) (h x w, in [0.5, 1) since the offset makes every term
  non-negative); F1 = BN1(g), y1 = classifier(F1).
- Z = conv2(X_m) * M; a non-local block mixes Z's positions with a cosine affinity
  (:class:`CosineNonLocal`, W_z zero-initialised so it starts as the identity); the masked pooling
  sum_hw Z' / sum_hw M; F2 = BN2(that), y2 = the same classifier(F2).
- The feature f = [F1, F2] (2 mid_dim): what the triplet, center, OSM and variance terms read
  (``global``) and what retrieval ranks with (``bn``, the same tensor: the reference's losses and
  its evaluation both take the post-BN concatenation; ``model.retrieval_feature`` either way).

Tracklets (B, T, C, H, W): the per-frame computation on the B*T frames, then F1 = BN1(mean_t g),
the non-local block over a tracklet's T x h x w positions, the masked pooling per frame averaged
over T, BN2. A tracklet of one frame gives its image's outputs. The head takes images and
tracklets alike (``accepts_tracklets``), the reference's ``_image`` and ``_video`` models in one.

The reference's quirk fixed here: its attention offset is the minimum over the whole batch
tensor, so an image's map (and feature) depends on the other images of its batch and on the test
batch size; here it is each image's (each frame's) own minimum. ``model.fgreid.batch_min`` keeps
the reference's. Its layers' starts are the reference's: conv1 and conv2 Kaiming normal (fan in)
with zero bias, theta, g and the classifier (no bias) torch's defaults, W_z zero, plain
BatchNorm1d (trainable shift, unlike BoT's BNNeck). ``model.pooling`` and ``model.neck`` are the
``bnneck`` head's and are not read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpc_reid.config import ModelConfig
from hpc_reid.methods.fgreid.trunk import build_second_trunk, second_trunk_name
from hpc_reid.models.heads import RetrievalPart, register_head


def attention_map(maps: torch.Tensor, batch_min: bool = False) -> torch.Tensor:
    """(N, 1, h, w): M = sigmoid(sum_c softmax_c(GAP(A))_c (A_c - min A)) of the conv1 maps A
    (N, C, h, w), min A each map's own minimum, or the whole tensor's with ``batch_min`` (the
    reference)."""
    scores = F.softmax(maps.mean(dim=(2, 3)), dim=1)
    floor = maps.amin() if batch_min else maps.amin(dim=(1, 2, 3), keepdim=True)
    return torch.sigmoid((scores[:, :, None, None] * (maps - floor)).sum(dim=1, keepdim=True))


class CosineNonLocal(nn.Module):
    """The reference's non-local block (after Wang et al., "Non-local Neural Networks", CVPR 2018,
    with a cosine affinity): theta = ReLU(conv_theta(Z)) L2-normalised over channels, the
    affinity softmax_j(theta_i . theta_j) over a sample's positions, O = affinity x ReLU(conv_g(Z)),
    Z' = W_z(O) + Z. The 1x1 convs have no bias; W_z starts at zero, so the block starts as the
    identity."""

    def __init__(self, channels: int, inner: int):
        super().__init__()
        self.theta = nn.Conv2d(channels, inner, kernel_size=1, bias=False)
        self.g = nn.Conv2d(channels, inner, kernel_size=1, bias=False)
        self.w_z = nn.Conv2d(inner, channels, kernel_size=1, bias=False)
        nn.init.zeros_(self.w_z.weight)

    def forward(self, z: torch.Tensor, frames: int = 1) -> torch.Tensor:
        """Z' for the maps ``z`` (B*frames, C, h, w), a sample's ``frames`` maps consecutive: the
        positions mixed are a sample's frames x h x w cells."""
        h, w = z.shape[-2:]

        def positions(x: torch.Tensor) -> torch.Tensor:
            # (B*T, c, h, w) -> (B, c, T*h*w), frame-major as the reference's (T, N) grid
            return x.flatten(2).unflatten(0, (-1, frames)).transpose(1, 2).flatten(2)

        theta = F.normalize(positions(F.relu(self.theta(z))), dim=1)
        affinity = F.softmax(theta.transpose(1, 2) @ theta, dim=-1)  # (B, P, P)
        mixed = affinity @ positions(F.relu(self.g(z))).transpose(1, 2)  # (B, P, inner)
        per_frame = mixed.transpose(1, 2).unflatten(2, (frames, h * w)).transpose(1, 2)
        return self.w_z(per_frame.flatten(0, 1).unflatten(2, (h, w))) + z


@register_head("fgreid")
class FGReIDHead(nn.Module):
    """Outputs (module docstring): ``"global"`` and ``"bn"``, both f = [F1, F2] (B, 2 mid_dim);
    ``"attention"``, the attention maps M (B, h, w), or (B, T, h, w) for tracklets; in training,
    ``"logits"`` (y1, F1's) and ``"logits2"`` (y2, F2's), one classifier's. Its retrieval part
    ``global`` is f."""

    wants_input = True  # ReidModel passes the images: the second trunk runs on them
    accepts_tracklets = True  # and (B, T, C, h, w) maps of tracklets, as well as images
    output_keys = frozenset({"global", "bn", "logits", "logits2", "attention"})

    def __init__(self, in_channels: int, num_classes: int, cfg: ModelConfig):
        super().__init__()
        f = cfg.fgreid
        self.trunk2 = build_second_trunk(cfg)
        self.conv1 = nn.Conv2d(in_channels, f.mid_dim, kernel_size=1)
        self.conv2 = nn.Conv2d(self.trunk2.out_channels, f.mid_dim, kernel_size=1)
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
            nn.init.zeros_(conv.bias)
        self.non_local = CosineNonLocal(f.mid_dim, f.nonlocal_dim)
        self.bn1 = nn.BatchNorm1d(f.mid_dim)
        self.bn2 = nn.BatchNorm1d(f.mid_dim)
        self.classifier = nn.Linear(f.mid_dim, num_classes, bias=False)
        self.batch_min = f.batch_min
        self.feature_dim: int = 2 * f.mid_dim
        self.retrieval_parts = {"global": RetrievalPart(cfg.retrieval_feature)}
        # what a checkpoint must match beside the first trunk (engine.trainer.model_meta)
        self.meta = {
            "head": "fgreid",
            "mid_dim": f.mid_dim,
            "nonlocal_dim": f.nonlocal_dim,
            "second_backbone": second_trunk_name(cfg),
        }

    def forward(self, fmap: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs for trunk 1's maps ``fmap`` (B, C, h, w), or (B, T, C, h, w) for tracklets,
        and the images trunk 1 ran on, (B, 3, H, W) or the (B*T, 3, H, W) frames."""
        tracklets = fmap.dim() == 5
        t = fmap.shape[1] if tracklets else 1
        first = fmap.flatten(0, 1) if tracklets else fmap
        second = self.trunk2(images)
        if second.shape[0] != first.shape[0] or second.shape[2:] != first.shape[2:]:
            raise ValueError(
                f"fgreid: the second trunk's maps are {tuple(second.shape)} for images of shape "
                f"{tuple(images.shape)}, the first trunk's {tuple(first.shape)}: the attention "
                "map of one weighs the other, so both must give one map of one size per image "
                "(model.fgreid.second_backbone with model.backbone's output stride)"
            )
        a = self.conv1(first)
        g = a.mean(dim=(2, 3))
        m = attention_map(a, self.batch_min)
        f1 = self.bn1(g.unflatten(0, (-1, t)).mean(dim=1))
        z = self.non_local(self.conv2(second) * m, t)
        pooled = z.sum(dim=(2, 3)) / m.sum(dim=(2, 3))  # per frame: M >= 1/2, never 0
        f2 = self.bn2(pooled.unflatten(0, (-1, t)).mean(dim=1))
        feat = torch.cat([f1, f2], dim=1)
        maps = m.squeeze(1)
        out = {
            "global": feat,
            "bn": feat,
            "attention": maps.unflatten(0, (-1, t)) if tracklets else maps,
        }
        if self.training:
            out["logits"] = self.classifier(f1)
            out["logits2"] = self.classifier(f2)
        return out
