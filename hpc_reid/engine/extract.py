"""``hpc-reid extract``: a checkpoint's query and gallery features to HDF5 feature files.

A row holds every retrieval part the model declares (AlignedReID: ``global`` and ``local``), and
the files record their layout, so ``hpc-reid eval --distance`` can rank with any of them.

Under torchrun (or srun) each rank extracts its contiguous shard of the query and the gallery and
writes it to a part file; after a barrier the main process joins the parts, in rank order, into
``query.h5`` and ``gallery.h5`` (streaming, written under a temporary name then renamed) and removes
them. No collective follows the main process's work, so a failure there cannot leave a rank waiting.
See :mod:`hpc_reid.evaluation.feature_files` for the format.

A video set's files hold one row per tracklet, as its evaluation ranks them: the mean of the
tracklet's dense clips' rows (:func:`~hpc_reid.engine.evaluate.shard_features`), its pid and camid,
and its first frame as its path; the attribute ``records`` says "tracklets" (else "images").
"""

from __future__ import annotations

import json
from pathlib import Path

from hpc_reid.config import Config
from hpc_reid.data.datasets.base import are_tracklets
from hpc_reid.engine.evaluate import evaluation_distance, shard_features, shown_image
from hpc_reid.engine.saved import saved_model
from hpc_reid.evaluation.feature_files import concatenate_feature_files, write_feature_file
from hpc_reid.evaluation.parts import probe_layout
from hpc_reid.evaluation.sharded import shard_range
from hpc_reid.launch.distributed import barrier


def extract_checkpoint(
    path: str | Path, out_dir: str | Path, config: Config | None = None
) -> dict[str, Path]:
    """Write ``out_dir/query.h5`` and ``out_dir/gallery.h5`` from the model saved at ``path``.

    ``config`` defaults to the resolved config stored in the checkpoint. Returns the two paths.
    """
    out = Path(out_dir)
    with saved_model(path, config) as (config, env, device, dataset, model):
        evaluation_distance(model, config, device)  # the hints below must name parts it has
        layout = probe_layout(model, config.data.height, config.data.width, device)
        out.mkdir(parents=True, exist_ok=True)
        ev = config.evaluation
        attrs = {"metric": ev.metric, "model": config.model.backbone, "distance": ev.distance}
        attrs.update(distance_weights=json.dumps(ev.distance_weights))
        attrs.update(config=config.name, checkpoint=str(Path(path).resolve()))
        attrs.update(records="tracklets" if are_tracklets(dataset.query) else "images")
        splits = {"query": dataset.query, "gallery": dataset.gallery}
        parts: dict[str, list[Path]] = {}
        for split, records in splits.items():
            shard = shard_range(len(records), env.rank, env.world_size)
            mine = records[shard.start : shard.stop]
            feats = shard_features(model, records, config, device).cpu()  # to the HDF5 file
            parts[split] = [
                out / f".{split}.part{r}-of-{env.world_size}.h5" for r in range(env.world_size)
            ]
            write_feature_file(
                parts[split][env.rank],
                feats,
                [r.pid for r in mine],
                [r.camid for r in mine],
                [shown_image(r) for r in mine],
                layout=layout,
                split=split,
                **attrs,
            )
        barrier()
        files = {split: out / f"{split}.h5" for split in splits}
        if env.rank == 0:
            for split, part_files in parts.items():
                concatenate_feature_files(part_files, files[split])
                for p in part_files:
                    p.unlink()
                print(f"wrote {files[split]} ({len(splits[split])} {attrs['records']})")
        return files
