"""SAN (Jin, Lan, Zeng, Wei and Chen, "Semantics-Aligned Representation Learning for Person
Re-identification", AAAI 2020, arXiv 1905.13143): a decoder on the re-identification encoder
regresses the person's full-body texture image in a pose-free UV layout, whose pixels are
semantically aligned across people, poses and views; learning to fill it drives the encoder toward
semantically aligned features. The decoder is dropped at test time. Real data sets have no
textures: SAN-PG, the same encoder-decoder trained with the reconstruction loss alone on synthetic
(image, texture) pairs, writes pseudo textures for them (``hpc-reid textures``).

Where the parts are:

- :mod:`~hpc_reid.methods.san.decoder`: SA-Dec, the U-Net-like decoder on the backbone's stages;
- :mod:`~hpc_reid.methods.san.model`: ``model.head: san`` (the baseline's head plus the decoder's
  outputs ``texture`` and ``decoder.1`` .. ``decoder.4``) and :func:`decoding`, which turns the
  decoder on in eval mode;
- :mod:`~hpc_reid.methods.san.losses`: ``loss.texture`` (L1 reconstruction) and
  ``loss.decoder_triplet`` (the triplet ReID constraints on the decoder's blocks);
- :mod:`~hpc_reid.methods.san.textures`: the target textures as the batch fields ``texture`` and
  ``texture_valid`` (``data.textures``), and the writer of ``hpc-reid textures``' output;
- the decoder's own learning rate and AMSGrad: ``optimizer.decoder_lr``, ``optimizer.amsgrad``
  (:mod:`hpc_reid.engine.optim`).

Implementation notes from the released code: ../shared/methods/san.md.
"""

from __future__ import annotations

# importing registers model.head "san", loss.texture, loss.decoder_triplet and the texture fields
from hpc_reid.methods.san import losses, model, textures  # noqa: F401
from hpc_reid.methods.san.model import SanHead, decoding

__all__ = ["SanHead", "decoding"]
