"""SAN's model (Jin et al., AAAI 2020, Fig. 2): the re-identification encoder (SA-Enc, the backbone
and the baseline's head) with the texture decoder (SA-Dec, :mod:`hpc_reid.methods.san.decoder`)
on its stages, ``model.head: san``.

The decoder only shapes the encoder's training: in eval mode the head returns the retrieval
outputs alone, at the baseline's cost, unless :func:`decoding` switches the decoder on (``hpc-reid
textures``, which writes SAN-PG's pseudo textures, and pictures of predicted textures).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from hpc_reid.config import ModelConfig
from hpc_reid.methods.san.decoder import BLOCK_KEYS, SemanticsAlignedDecoder
from hpc_reid.models.heads import GlobalHead, register_head


@register_head("san")
class SanHead(GlobalHead):
    """The ``bnneck`` head's outputs (``global``, ``bn``, ``logits``) plus, in training (or under
    :func:`decoding`), ``texture`` (B, 3, H, W) at ``model.san.texture_size``, in the targets'
    [-1, 1] units (no tanh, as the released code), and the decoder's block outputs ``decoder.1``
    .. ``decoder.4``. Its retrieval part is the baseline's ``global``.

    ``model.san.embedding_dim`` n: the released ``resnet50_fc512`` instead of the neck (so
    ``model.neck`` is not used): the pooled feature -> Linear(D, n) + BN1d + ReLU gives the n-d
    feature v, which is both ``global`` (triplet, center loss; ``feature_dim`` n) and ``bn``
    (retrieval), and the classifier Linear(n, classes) with bias reads it; Linear weights N(0,
    0.01^2), zero biases (torchreid's init).

    The decoder is the submodule ``decoder``: ``optimizer.decoder_lr`` gives its parameters their
    own constant learning rate (:func:`hpc_reid.engine.optim.param_groups`). It is built after the
    baseline's layers, so those draw the same initial weights as a ``bnneck`` model's from one
    seed.
    """

    wants_stages = True
    output_keys = GlobalHead.output_keys | {"texture", *BLOCK_KEYS}

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        cfg: ModelConfig,
        stage_channels: tuple[int, ...],
    ):
        san = cfg.san
        n = san.embedding_dim
        if n is None:
            super().__init__(in_channels, num_classes, cfg)
            self.embedding: nn.Sequential | None = None
        else:
            # no neck: v itself is classified and ranked (GlobalHead's neck-less classifier on n)
            super().__init__(n, num_classes, cfg.model_copy(update={"neck": "none"}))
            self.embedding = nn.Sequential(
                nn.Linear(in_channels, n), nn.BatchNorm1d(n), nn.ReLU(inplace=True)
            )
            for linear in (self.embedding[0], self.classifier):
                nn.init.normal_(linear.weight, std=0.01)
                nn.init.zeros_(linear.bias)
        self.decoder = SemanticsAlignedDecoder(stage_channels, san.texture_size, san.decoder_width)
        #: eval-mode outputs include the texture (switched by :func:`decoding`)
        self.decoding = False
        # what a checkpoint must match beside the backbone's keys (engine.trainer.model_meta):
        # the weights' shapes. texture_size is not one of them (the decoder's last resize), so a
        # SAN-PG trained at one size initialises or decodes at another.
        self.meta = {
            "head": "san",
            "decoder_width": san.decoder_width,
            "embedding_dim": n,
        }

    def forward(self, fmap: torch.Tensor, stages: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        feat = self.pool(fmap)
        if self.embedding is not None:
            feat = self.embedding(feat)
        bn = feat if self.neck is None else self.neck(feat)
        out = {"global": feat, "bn": bn}
        if self.training:
            classifier = self.classifier if self.neck is None else self.neck.classifier
            out["logits"] = classifier(bn)
        if self.training or self.decoding:
            texture, blocks = self.decoder(stages)
            out["texture"] = texture
            out.update(zip(BLOCK_KEYS, blocks, strict=True))
        return out


@contextlib.contextmanager
def decoding(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model``'s SAN head(s) decode in eval mode too (``texture`` and the
    block outputs beside the retrieval ones); on leaving, each is set back as it was.

    ``model`` may be a :class:`~hpc_reid.models.ReidModel`, a DDP, DeepSpeed or ``torch.compile``
    wrapper of one, or a mutual-learning model: every SAN head among its modules is switched. A
    model without one is an error rather than a block that silently yields no texture.
    """
    heads = [m for m in model.modules() if isinstance(m, SanHead)]
    if not heads:
        raise ValueError(
            f"decoding: {type(model).__name__} has no SAN head (model.head: san), so it decodes "
            "no texture"
        )
    before = [head.decoding for head in heads]
    for head in heads:
        head.decoding = True
    try:
        yield model
    finally:
        for head, was in zip(heads, before, strict=True):
            head.decoding = was
