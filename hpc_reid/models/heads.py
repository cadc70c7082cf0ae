"""Heads: what turns the backbone's feature map into the model's outputs dict.

A head is registered by name (``model.head``) with :func:`register_head`; the built-in ``bnneck``
head (global pooling + BNNeck, the BoT baseline) is here, and each method's head lives in its own
package (``hpc_reid/methods/<method>/``) and registers itself when :mod:`hpc_reid.methods` is
imported. A head declares:

- ``output_keys``: the outputs it returns in training, so that a loss term reading a key no head
  produces is a config error at start (:func:`hpc_reid.losses.check_loss_inputs`);
- ``retrieval_parts``: name -> :class:`RetrievalPart`, the outputs evaluation ranks with (the
  ``global`` part; AlignedReID adds ``local``), so evaluation never special-cases a method;
- ``feature_dim``: the dimension of the ``global`` output (the center loss's feature).

A head whose class sets ``wants_stages = True`` (SAN's, whose decoder takes skips) is built with
``stage_channels=`` the backbone's and called as ``head(fmap, stages)``, ``stages`` being the
backbone's ``forward_stages`` (the last is ``fmap``); every other head as ``head(fmap)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hpc_reid.config import ModelConfig


@dataclass(frozen=True)
class RetrievalPart:
    """One feature evaluation ranks with: the eval-mode output ``key`` and its distance, "metric"
    (``evaluation.metric``, cosine or euclidean, on the flattened output) or the name of a
    registered part distance (:func:`hpc_reid.evaluation.register_part_distance`, e.g. "dmli")."""

    key: str
    distance: str = "metric"


#: ``factory(in_channels, num_classes, cfg) -> head``
HeadFactory = Callable[[int, int, ModelConfig], nn.Module]
_HEADS: dict[str, HeadFactory] = {}


def register_head(name: str) -> Callable[[HeadFactory], HeadFactory]:
    """Register ``factory(in_channels, num_classes, model_config) -> nn.Module`` as head ``name``.
    The module maps the backbone's (N, C, h, w) map to the outputs dict and has ``output_keys``,
    ``retrieval_parts`` and ``feature_dim`` (module docstring). A name can be registered once."""

    def add(factory: HeadFactory) -> HeadFactory:
        if name in _HEADS:
            raise ValueError(f"head {name!r} is already registered ({_HEADS[name]!r})")
        _HEADS[name] = factory
        return factory

    return add


def _load_methods() -> None:
    import hpc_reid.methods  # noqa: F401  (each method registers its heads on import)
    from hpc_reid.models import temporal  # noqa: F401  (temporal_avg, temporal_attention)


def available_heads() -> list[str]:
    _load_methods()
    return sorted(_HEADS)


def build_head(
    name: str,
    in_channels: int,
    num_classes: int,
    cfg: ModelConfig,
    stage_channels: tuple[int, ...] | None = None,
) -> nn.Module:
    """The head ``name`` on a backbone with ``in_channels`` output channels (and the channels of
    its ``forward_stages`` maps, which a head with ``wants_stages`` needs)."""
    _load_methods()
    if name not in _HEADS:
        close = difflib.get_close_matches(name, _HEADS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown head {name!r}{hint}; available: {', '.join(sorted(_HEADS))}")
    factory = _HEADS[name]
    if getattr(factory, "wants_stages", False):
        if stage_channels is None:
            raise TypeError(
                f"model.head={name!r} reads the backbone's intermediate stages, but model.backbone="
                f"{cfg.backbone!r} has no `forward_stages` / `stage_channels` "
                "(hpc_reid.models.backbones)"
            )
        head = factory(in_channels, num_classes, cfg, stage_channels=tuple(stage_channels))
    else:
        head = factory(in_channels, num_classes, cfg)
    for attr in ("output_keys", "retrieval_parts", "feature_dim"):
        if not hasattr(head, attr):
            raise TypeError(f"head {name!r} was built without `{attr}` (see hpc_reid.models.heads)")
    return head


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović, Tolias, Chum, "Fine-tuning CNN Image Retrieval with No
    Human Annotation", TPAMI 2018, Eq. 3): f_c = (mean_hw x_c^p)^(1/p) with one learnable p;
    p = 1 is average pooling and p -> inf tends to max pooling. Inputs are clamped at ``eps`` so
    the power is defined (and its gradient finite) for the zeros a ReLU leaves."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # at least float32: in fp16, x^p overflows for activations above 65504^(1/p)
        dtype = torch.promote_types(x.dtype, torch.float32)
        p = self.p.to(dtype)
        pooled = x.to(dtype).clamp(min=self.eps).pow(p).mean(dim=(2, 3))
        return pooled.pow(1.0 / p).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4g}, eps={self.eps}"


class AvgPool(nn.Module):
    """Global average pooling to (N, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class BNNeck(nn.Module):
    """BNNeck (Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person Re-identification",
    CVPRW 2019, Sec. 3.5; "A Strong Baseline and Batch Normalization Neck", TMM 2019).

    The pooled feature f_t feeds the triplet loss; f_i = BN(f_t) feeds a bias-free classifier (the
    ID loss) and retrieval. The BN's shift is frozen at zero and the classifier has no bias, so the
    ID loss's decision boundaries pass through the origin of the normalised feature space, where
    cosine retrieval works; weight 1, classifier weights N(0, 0.001^2) as in the authors' code.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.bn.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """The BN feature; the classifier is applied by the caller, in training only."""
        return self.bn(feat)


def global_pool(cfg: ModelConfig) -> nn.Module:
    """``model.pooling``: GeM with ``model.gem_p`` or average pooling."""
    return GeM(cfg.gem_p) if cfg.pooling == "gem" else AvgPool()


@register_head("bnneck")
class GlobalHead(nn.Module):
    """The BoT head (Luo et al., CVPRW 2019): global pooling, then the BNNeck (``model.neck:
    bnneck``) or nothing (``none``: a linear classifier with bias on the pooled feature).

    Outputs: ``"global"``, the pooled feature (the triplet and center losses' input); ``"bn"``, the
    BNNeck feature (the pooled one itself without a neck); in training, ``"logits"``, the ID
    classifier on ``"bn"``. Its one retrieval part, ``global``, reads ``"bn"`` or ``"global"``
    (``model.retrieval_feature``, a test-time choice: no part of the weights). Methods' heads build
    on it, adding their outputs beside these (``hpc_reid.methods.alignedreid.model``).
    """

    output_keys = frozenset({"global", "bn", "logits"})

    def __init__(self, in_channels: int, num_classes: int, cfg: ModelConfig):
        super().__init__()
        if cfg.neck not in ("bnneck", "none"):
            raise ValueError(f"neck must be 'bnneck' or 'none', got {cfg.neck!r}")
        self.pool = global_pool(cfg)
        self.feature_dim: int = in_channels
        if cfg.neck == "bnneck":
            self.neck: BNNeck | None = BNNeck(in_channels, num_classes)
        else:
            self.neck = None
            self.classifier = nn.Linear(in_channels, num_classes)
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)
        if cfg.retrieval_feature not in ("bn", "global"):
            raise ValueError(
                f"model.retrieval_feature: {cfg.retrieval_feature!r} is not an output this head "
                "ranks with; expected 'bn' or 'global'"
            )
        self.retrieval_parts = {"global": RetrievalPart(cfg.retrieval_feature)}

    def forward(self, fmap: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.neck_outputs(self.pool(fmap))

    def neck_outputs(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs for the pooled feature ``feat``: heads that pool otherwise (over time: the
        temporal heads) reuse the neck and classifier through this."""
        bn = feat if self.neck is None else self.neck(feat)
        out = {"global": feat, "bn": bn}
        if self.training:
            classifier = self.classifier if self.neck is None else self.neck.classifier
            out["logits"] = classifier(bn)
        return out
