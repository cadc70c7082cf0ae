"""Feature extraction for evaluation: one pass of a model over a test loader, in loader order.

Each image gives one row: every retrieval part the model declares, flattened and concatenated
(:mod:`~hpc_reid.evaluation.parts`; :func:`~hpc_reid.evaluation.parts.retrieval_layout` says
where each lies).

Tracklets (video sets) give one row each too: the test loader yields their dense clips
(:mod:`hpc_reid.data.loaders.tracklets`: batches (N, T, C, H, W) with each clip's tracklet index
``indices``), the model gives a row per clip (flip-averaged per clip with ``flip``), and a
tracklet's row is the mean of its clips' rows, the video ReID references' dense evaluation. The
means are accumulated as the batches come (float64 sums per tracklet, O(tracklets x W) memory,
never every clip's row: MARS's gallery has about 10^5 clips), so a tracklet whose clips straddle
two batches is handled, and the result does not depend on where the batches split.

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
from hpc_reid.models import inferring


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

    A loader of dense clips (batches (N, T, C, H, W) with ``indices``, each clip's tracklet index
    0..n-1) gives one row per tracklet, in index order: the mean of its clips' rows (each
    flip-averaged with ``flip``), and the tracklet's pid and camid (module docstring).
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


class TrackletMeans:
    """Per-tracklet means of clip rows that arrive batch by batch: float64 sums and clip counts
    indexed by tracklet, grown as larger indices come (the clips of a tracklet may come in any
    batches, in any order), and each tracklet's pid and camid."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.pids = np.zeros(0, np.int64)
        self.camids = np.zeros(0, np.int64)

    def add(self, owners: torch.Tensor, rows: torch.Tensor, pids, camids) -> None:
        """Add the clip rows ``rows`` (N, W) of tracklets ``owners`` (N,)."""
        owners = owners.to(rows.device).long().reshape(-1)
        if len(owners) != len(rows):
            raise ValueError(f"{len(owners)} tracklet indices for a batch of {len(rows)} clips")
        if not len(owners):
            return
        if int(owners.min()) < 0:
            raise ValueError(f"negative tracklet index {int(owners.min())} in a clip batch")
        need = int(owners.max()) + 1
        if self.sums is None:
            self.sums = rows.new_zeros(0, rows.shape[1], dtype=torch.float64)
            self.counts = rows.new_zeros(0, dtype=torch.float64)
        if need > len(self.sums):
            size = max(need, 2 * len(self.sums))
            self.sums = torch.cat(
                [self.sums, self.sums.new_zeros(size - len(self.sums), rows.shape[1])]
            )
            self.counts = torch.cat([self.counts, self.counts.new_zeros(size - len(self.counts))])
            self.pids = np.concatenate([self.pids, np.full(size - len(self.pids), -1, np.int64)])
            self.camids = np.concatenate(
                [self.camids, np.full(size - len(self.camids), -1, np.int64)]
            )
        self.sums.index_add_(0, owners, rows.double())
        self.counts.index_add_(0, owners, torch.ones_like(owners, dtype=torch.float64))
        at = owners.cpu().numpy()
        self.pids[at] = _as_numpy(pids).reshape(-1)
        self.camids[at] = _as_numpy(camids).reshape(-1)

    def means(
        self, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Rows (n, W) of ``dtype``, pids and camids of tracklets 0..n-1 (n: the largest index +
        1); a tracklet below n without a clip is an error naming it."""
        n = int(torch.nonzero(self.counts).max()) + 1
        counts = self.counts[:n]
        missing = (counts == 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(
                f"tracklets {missing[:10]} of 0..{n - 1} got no clip from the test loader; "
                "expected the dense clips of every tracklet (data.loaders.tracklets.clip_plan)"
            )
        rows = (self.sums[:n] / counts[:, None]).to(dtype)
        return rows, self.pids[:n].copy(), self.camids[:n].copy()


def _extract(model, loader, device, flip: bool, keep_plain: bool):
    feats: list[torch.Tensor] = []
    plain: list[torch.Tensor] = []
    pids: list[np.ndarray] = []
    camids: list[np.ndarray] = []
    clips = {"feats": TrackletMeans(), "plain": TrackletMeans()}  # used by clip batches only
    layout = None
    with inferring(model):
        for batch in loader:
            images, batch_pids, batch_camids = _unpack(batch)
            images = images.to(device, non_blocking=True)
            f, layout = _rows(model, images, layout)
            p = f.clone() if keep_plain else None
            if flip:
                flipped, _ = _rows(model, torch.flip(images, dims=[-1]), layout)
                f = f.add_(flipped).mul_(0.5)
            if images.dim() == 5:  # dense clips of tracklets: rows are averaged per tracklet
                owners = _clip_owners(batch)
                clips["feats"].add(owners, f, batch_pids, batch_camids)
                if keep_plain:
                    clips["plain"].add(owners, p, batch_pids, batch_camids)
                continue
            feats.append(f)
            if keep_plain:
                plain.append(p)
            pids.append(_as_numpy(batch_pids).reshape(-1))
            camids.append(_as_numpy(batch_camids).reshape(-1))
    if clips["feats"].sums is not None:
        if feats:
            raise ValueError("the test loader yielded both image batches and clip batches")
        f, tracklet_pids, tracklet_camids = clips["feats"].means()
        kept = clips["plain"].means()[0] if keep_plain else None
        return f, kept, tracklet_pids, tracklet_camids
    if not feats:
        raise ValueError("the test loader yielded no batch; nothing to extract")
    kept = torch.cat(plain) if keep_plain else None
    return torch.cat(feats), kept, np.concatenate(pids), np.concatenate(camids)


def _clip_owners(batch: Any) -> torch.Tensor:
    """Each clip's tracklet index in a batch of dense clips (the test loader's ``indices``)."""
    if not isinstance(batch, Mapping) or "indices" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(
            "a batch of clips (N, T, C, H, W) needs 'indices', each clip's tracklet index, to "
            f"average a tracklet's clips; the batch has {keys}"
        )
    return torch.as_tensor(batch["indices"])
