"""The cluster-level anchor loss (Chen, Zhang and Fan, "Cluster-level Feature Alignment for Person
Re-identification", arXiv 2008.06810, 2020; code: github.com/qychen13/ClusterAlignReID).

A stage-2 method: a trained strong baseline (``model.init_from``) is fine-tuned for about 40 more
epochs with ``loss.anchor``, which pulls every feature towards its class anchor, the mean feature
of all the class's training images under the current model. The anchors are recomputed at the
start of every epoch (:meth:`hpc_reid.losses.ReidLoss.refresh`, over the training set sharded
across ranks: :mod:`hpc_reid.engine.class_means`) and saved in the checkpoint with the term's
state. It needs no head of its own: it reads the baseline's ``bn`` (or ``global``) output.
"""

from __future__ import annotations

from hpc_reid.methods.anchor.loss import AnchorLoss, anchor_loss

__all__ = ["AnchorLoss", "anchor_loss"]
