"""Feature extraction for evaluation: one pass of a model over a test loader, in loader order.

Each image gives one row: every retrieval part the model declares, flattened and concatenated
(:mod:`~hpc_reid.evaluation.parts`; :func:`~hpc_reid.evaluation.parts.retrieval_layout` says
where each lies).

The features stay on the model's device: a GPU run ranks them there (the fused kernel of
:mod:`~hpc_reid.evaluation.ranking_cuda`); whoever needs them on the host (HDF5 files, plots)
copies them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from hpc_reid.evaluation.parts import RowLayout, part_features, retrieval_layout


def _unpack(batch: Any) -> tuple[torch.Tensor, Any, Any]:
    if isinstance(batch, Mapping):
        missing = [k for k in ("images", "pids", "camids") if k not in batch]
        if missing:
            raise KeyError(f"test batch lacks keys {missing}; it has {sorted(batch)}")
        return batch["images"], batch["pids"], batch["camids"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 3:
        return batch[0], batch[1], batch[2]
    raise TypeError(
        "a test batch must be a dict with 'images', 'pids', 'camids' or a tuple "
        f"(images, pids, camids, ...), got {type(batch).__name__}"
    )


def _as_numpy(x: Any) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _rows(model: torch.nn.Module, images: torch.Tensor, layout: RowLayout | None) -> torch.Tensor:
    """The images' rows, and the layout (from these outputs when not given yet)."""
    outputs = model(images)
    layout = layout or retrieval_layout(model, outputs)
    return layout.rows(part_features(model, outputs)), layout


def extract_features(
    model: torch.nn.Module,
    loader: Iterable[Any],
    device: torch.device | str,
    flip: bool = False,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Rows (N, W) float32 on ``device`` (where the model runs: on a GPU run they stay on the
    GPU for evaluation), pids (N,) and camids (N,) as numpy arrays, in the loader's order.

    The model runs in eval mode under ``torch.inference_mode`` (its previous mode is restored) and
    returns a dict of outputs; a row holds every retrieval part it declares
    (``model.retrieval_parts``, laid out as :func:`~hpc_reid.evaluation.parts.retrieval_layout`
    says). A model without ``retrieval_parts`` has one: ``model.retrieval_feature(outputs)`` when
    it defines that, else ``outputs["bn"]`` (the BNNeck feature; Luo et al., "Bag of Tricks and a
    Strong Baseline for Deep Person Re-identification", CVPRW 2019). With ``flip`` each part is the
    average of the image's and its horizontal flip's (halving is exact in floating point, so a
    cosine or euclidean ranking is that of their sum, as before parts existed).
    """
    feats, _, pids, camids = _extract(model, loader, device, flip, keep_plain=False)
    return feats, pids, camids


def extract_flip_and_plain(
    model: torch.nn.Module, loader: Iterable[Any], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """The flip-averaged rows and the plain ones (image only) from one pass, then pids and
    camids: :func:`extract_features` with ``flip`` and without, for the cost of the first (papers
    report both protocols)."""
    feats, plain, pids, camids = _extract(model, loader, device, flip=True, keep_plain=True)
    return feats, plain, pids, camids


def _extract(model, loader, device, flip: bool, keep_plain: bool):
    was_training = model.training
    model.eval()
    feats: list[torch.Tensor] = []
    plain: list[torch.Tensor] = []
    pids: list[np.ndarray] = []
    camids: list[np.ndarray] = []
    layout = None
    try:
        with torch.inference_mode():
            for batch in loader:
                images, batch_pids, batch_camids = _unpack(batch)
                images = images.to(device, non_blocking=True)
                f, layout = _rows(model, images, layout)
                if keep_plain:
                    plain.append(f.clone())
                if flip:
                    flipped, _ = _rows(model, torch.flip(images, dims=[-1]), layout)
                    f = f.add_(flipped).mul_(0.5)
                feats.append(f)
                pids.append(_as_numpy(batch_pids).reshape(-1))
                camids.append(_as_numpy(batch_camids).reshape(-1))
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("the test loader yielded no batch; nothing to extract")
    kept = torch.cat(plain) if keep_plain else None
    return torch.cat(feats), kept, np.concatenate(pids), np.concatenate(camids)
