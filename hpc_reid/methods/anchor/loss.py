"""``loss.anchor``: each feature against its class anchor (the term and its refresh schedule).

The released scripts train stage 2 with plain cross-entropy plus ``F.mse_loss(f, a_y)`` (the mean
over the batch and the feature dimensions of (f - a_y)^2) on random batches; their code also has an
L1 form and an "intra-inter" form, a hinge on the distance to the own anchor minus the distance to
the nearest other anchor (a triplet whose positive and negative are anchors; margin ``m``, soft
margin with none). The anchors are fixed within a refresh period: no gradient flows into them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpc_reid.losses import register_loss

FORMS = ("mse", "l1", "intra_inter")


def anchor_loss(
    features: torch.Tensor,
    anchors: torch.Tensor,
    pids: torch.Tensor,
    form: str = "mse",
    margin: float | None = 0.3,
) -> torch.Tensor:
    """The anchor loss of ``features`` (B, D) with labels ``pids`` (B,) against ``anchors`` (C, D).

    mse: mean of (f - a_y)^2 over batch and dimensions; l1: mean |f - a_y|; intra_inter: mean over
    the batch of max(0, ||f - a_y|| - min_{c != y} ||f - a_c|| + margin) (euclidean distances;
    ``margin`` None: the soft margin log(1 + exp(.)))."""
    if form not in FORMS:
        raise ValueError(f"loss.anchor.form={form!r}: expected one of {', '.join(FORMS)}")
    if anchors.shape[1] != features.shape[1]:
        raise ValueError(
            f"anchors of width {anchors.shape[1]} for features of width {features.shape[1]}"
        )
    anchors = anchors.detach()
    if form == "mse":
        return F.mse_loss(features, anchors[pids])
    if form == "l1":
        return F.l1_loss(features, anchors[pids])
    if len(anchors) < 2:
        raise ValueError("loss.anchor.form=intra_inter needs at least 2 classes")
    # ||f||^2 + ||a||^2 - 2 f.a, clamped before the root (the root's gradient at 0 is infinite)
    sq = (
        features.pow(2).sum(1, keepdim=True)
        + anchors.pow(2).sum(1)[None, :]
        - 2.0 * features @ anchors.t()
    )
    dist = sq.clamp_min(1e-12).sqrt()
    own = dist.gather(1, pids[:, None]).squeeze(1)
    others = dist.scatter(1, pids[:, None], float("inf")).min(1).values
    if margin is None:
        return F.softplus(own - others).mean()
    return F.relu(own - others + margin).mean()


class AnchorLoss(nn.Module):
    """``loss.anchor`` on the output ``section.feature``, with its anchors as state.

    The anchors (C, D), and the epoch and step of their last refresh, are buffers: they are saved
    in the checkpoint with the criterion, so a resumed run continues with the anchors it had, and
    refreshes exactly where an uninterrupted run refreshed. Refreshes are due before the first
    step of every ``every_epochs``-th epoch (counted from the run's start: a stage-2 run starts at
    epoch 0), every ``every_steps`` optimizer steps if set, and before the first step ever.
    """

    def __init__(self, section, num_classes: int, feature_dim: int):
        super().__init__()
        self.key = section.feature
        self.form = section.form
        self.margin = section.margin
        self.every_epochs = section.every_epochs
        self.every_steps = section.every_steps
        #: what :meth:`hpc_reid.losses.ReidLoss.refresh` computes for this term
        self.class_mean_request = (section.feature, section.flip_average)
        self.register_buffer("anchors", torch.zeros(num_classes, feature_dim))
        self.register_buffer("refreshed", torch.tensor([-1, -1], dtype=torch.long))  # epoch, step
        # a host copy of ``refreshed``: refresh_due runs every step and must not sync a GPU
        self._refreshed = (-1, -1)
        self.register_load_state_dict_post_hook(_after_load)

    @property
    def refreshed_at(self) -> tuple[int, int]:
        """(epoch, step) of the last refresh; (-1, -1) before the first."""
        return self._refreshed

    def refresh_due(self, epoch: int, step: int, epoch_start: bool) -> bool:
        last_step = self._refreshed[1]
        if last_step < 0:
            return True
        if last_step == step:  # already refreshed for this step (a resume at that point)
            return False
        at_epoch = epoch_start and epoch % self.every_epochs == 0
        return at_epoch or (self.every_steps > 0 and step % self.every_steps == 0)

    def set_class_means(self, means: torch.Tensor, epoch: int, step: int) -> None:
        if means.shape != self.anchors.shape:
            raise ValueError(
                f"loss.anchor: class means of shape {tuple(means.shape)} for anchors of shape "
                f"{tuple(self.anchors.shape)} (classes x the {self.key!r} feature's width)"
            )
        self.anchors.copy_(means)
        self.refreshed.copy_(torch.tensor([epoch, step]))
        self._refreshed = (epoch, step)

    def forward(self, outputs, pids: torch.Tensor) -> torch.Tensor:
        if self._refreshed[1] < 0:
            raise RuntimeError(
                "loss.anchor: the anchors were never computed; the trainer computes them before "
                "the first step (ReidLoss.refresh)"
            )
        return anchor_loss(outputs[self.key], self.anchors, pids, self.form, self.margin)


def _after_load(module: AnchorLoss, incompatible) -> None:
    module._refreshed = tuple(int(v) for v in module.refreshed.tolist())


@register_loss("anchor", inputs=lambda section: {section.feature})
def _anchor(section, num_classes: int, feature_dim: int) -> AnchorLoss:
    return AnchorLoss(section, num_classes, feature_dim)
