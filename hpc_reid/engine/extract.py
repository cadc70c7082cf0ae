"""``hpc-reid extract``: a checkpoint's query and gallery features to HDF5 feature files.

Under torchrun (or srun) each rank extracts its contiguous shard of the query and the gallery and
writes it to a part file; after a barrier the main process joins the parts, in rank order, into
``query.h5`` and ``gallery.h5`` (streaming, written under a temporary name then renamed) and removes
them. No collective follows the main process's work, so a failure there cannot leave a rank waiting.
See :mod:`hpc_reid.evaluation.feature_files` for the format.
"""

from __future__ import annotations

from pathlib import Path

from hpc_reid.config import Config
from hpc_reid.data.build import dataset_from_config
from hpc_reid.engine.checkpoint import load_checkpoint
from hpc_reid.engine.errors import CheckpointError
from hpc_reid.engine.evaluate import shard_features
from hpc_reid.engine.trainer import model_meta, select_device
from hpc_reid.evaluation.feature_files import concatenate_feature_files, write_feature_file
from hpc_reid.evaluation.sharded import shard_range
from hpc_reid.launch.distributed import (
    barrier,
    choose_backend,
    cleanup,
    detect_env,
    init_distributed,
)
from hpc_reid.models import build_model


def extract_checkpoint(
    path: str | Path, out_dir: str | Path, config: Config | None = None
) -> dict[str, Path]:
    """Write ``out_dir/query.h5`` and ``out_dir/gallery.h5`` from the model saved at ``path``.

    ``config`` defaults to the resolved config stored in the checkpoint. Returns the two paths.
    """
    state = load_checkpoint(path)
    config = config or Config.model_validate(state["config"])
    env = detect_env()
    device = select_device(config.engine.device, env.local_rank)
    init_distributed(
        env, choose_backend(config.distributed.backend, device), config.distributed.timeout_s
    )
    out = Path(out_dir)
    try:
        if env.rank == 0:
            dataset = dataset_from_config(config.data)
        barrier()
        if env.rank != 0:
            dataset = dataset_from_config(config.data, announce=lambda _: None)
        model = build_model(config.model, dataset.num_train_pids).to(device)
        meta = model_meta(config, dataset.num_train_pids, model.feature_dim)
        if state["model_meta"] != meta:
            raise CheckpointError(
                f"checkpoint {path} holds {state['model_meta']}, the config builds {meta}"
            )
        model.load_state_dict(state["strategy"]["model"])
        out.mkdir(parents=True, exist_ok=True)
        attrs = {"metric": config.evaluation.metric, "model": config.model.backbone}
        attrs.update(config=config.name, checkpoint=str(Path(path).resolve()))
        splits = {"query": dataset.query, "gallery": dataset.gallery}
        parts: dict[str, list[Path]] = {}
        for split, records in splits.items():
            shard = shard_range(len(records), env.rank, env.world_size)
            mine = records[shard.start : shard.stop]
            feats = shard_features(model, records, config, device)
            parts[split] = [
                out / f".{split}.part{r}-of-{env.world_size}.h5" for r in range(env.world_size)
            ]
            write_feature_file(
                parts[split][env.rank],
                feats,
                [r.pid for r in mine],
                [r.camid for r in mine],
                [r.path for r in mine],
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
                print(f"wrote {files[split]} ({len(splits[split])} images)")
        return files
    finally:
        cleanup()
