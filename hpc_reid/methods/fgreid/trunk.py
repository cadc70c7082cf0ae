"""FGReID's second trunk (the reference's ``base_mars``): built and started from another run.

The reference starts its second ResNet-50 from a MARS-trained video model (the keys of
``mars_sota.pth.tar`` containing "base", with "base." stripped; for VeRi the ``base_mars`` of a
VehicleID-trained model, and the other way round). Here it is any hpc-reid checkpoint
(``model.fgreid.second_init_from``: a file, a run or checkpoints folder, ``best.pt``, an
``export-weights`` file): its ``backbone.*`` weights, which must be exactly the second trunk's keys
and shapes, else a :class:`~hpc_reid.engine.errors.CheckpointError` naming the file and the keys
that differ. Without one, the trunk takes ``model.pretrained`` (ImageNet) when it is
``model.backbone``'s architecture, as the reference's ``base`` does, else its fresh
initialisation.

Loaded when the model is built, as ``model.pretrained`` is: a trained FGReID checkpoint holds the
second trunk's weights itself, so evaluating or resuming one whose source run is gone needs
``--set model.fgreid.second_init_from=null``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from hpc_reid.config import ModelConfig
from hpc_reid.models.backbones import build_backbone

log = logging.getLogger(__name__)

#: The first trunk's keys in a ReidModel checkpoint (hpc_reid.models.ReidModel.backbone).
PREFIX = "backbone."
_SHOWN = 5


def second_trunk_name(cfg: ModelConfig) -> str:
    """The second trunk's backbone: ``model.fgreid.second_backbone``, else ``model.backbone``."""
    return cfg.fgreid.second_backbone or cfg.backbone


def build_second_trunk(cfg: ModelConfig) -> nn.Module:
    """The second trunk ``cfg`` describes (last stride, non-local blocks, zero-init residual as
    the first), with its weights from ``model.fgreid.second_init_from`` or ``model.pretrained``
    (module docstring)."""
    name = second_trunk_name(cfg)
    source = cfg.fgreid.second_init_from
    imagenet = cfg.pretrained if source is None and name == cfg.backbone else None
    trunk = build_backbone(
        name,
        cfg.last_stride,
        imagenet,
        zero_residual=cfg.zero_init_residual,
        non_local=cfg.non_local,
    )
    if source is not None:
        log.info(load_trunk_weights(trunk, source, name))
    return trunk


def _shown(keys: list[str]) -> str:
    more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def load_trunk_weights(trunk: nn.Module, path: str | Path, name: str) -> str:
    """Load the ``backbone.*`` weights of the hpc-reid checkpoint ``path`` names into ``trunk``
    (backbone ``name``), all or nothing; returns a line naming the file. A file that is no
    hpc-reid checkpoint, one without ``backbone.*`` keys (another toolkit's, a plain state dict)
    or whose trunk differs in keys or shapes is a CheckpointError naming it and what differs.
    A DeepSpeed run's 16-bit checkpoint gives its fp32 master weights, as ``model.init_from``."""
    # engine composes models: imported here, when a model is built with a second_init_from
    from hpc_reid.engine import stages
    from hpc_reid.engine.checkpoint import load_checkpoint
    from hpc_reid.engine.errors import CheckpointError

    what = f"model.fgreid.second_init_from={path}"
    try:
        file = stages.resolve_checkpoint(path)
        state = load_checkpoint(file)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{what}: {exc}; expected a checkpoint written by hpc-reid train (a file, its run or "
            "checkpoints folder, best.pt) or hpc-reid export-weights, whose backbone.* weights "
            "start the second trunk"
        ) from None
    weights = state["strategy"]["model"]
    if stages._is_16bit_deepspeed(state):  # init_weights_from's own consolidation, reused
        weights = stages._fp32_master_weights(file)
    theirs = {k[len(PREFIX) :]: v for k, v in weights.items() if k.startswith(PREFIX)}
    stored = (state.get("model_meta") or {}).get("backbone")
    of_run = f" (its model.backbone: {stored})" if stored else ""
    if not theirs:
        raise CheckpointError(
            f"{what}: {file} holds no {PREFIX}* weights{of_run}; its keys start "
            f"{_shown(sorted({k.split('.')[0] + '.' for k in weights}))}. Expected the checkpoint "
            "of a model with one backbone (model.members: 1)"
        )
    own = trunk.state_dict()
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [
        f"{k} {list(theirs[k].shape)} vs {list(v.shape)}"
        for k, v in own.items()
        if k in theirs and theirs[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{what}: the {PREFIX}* weights of {file}{of_run} do not fit the second trunk {name}"
        ]
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_shown(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_shown(unexpected)}")
        if shapes:
            parts.append(
                f"{len(shapes)} shape mismatch(es) (checkpoint vs trunk): {_shown(shapes)}"
            )
        raise CheckpointError("; ".join(parts))
    trunk.load_state_dict(theirs)
    return f"{what}: the second trunk {name} from the {PREFIX}* weights of {file.resolve()}"
