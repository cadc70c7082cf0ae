"""A saved model: the model of a checkpoint with its data set on every launched rank
(:func:`saved_model`, what eval, extract, export, search and visualize start from), and its
evaluation on the test split (:func:`evaluate_checkpoint`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from hpc_reid.config import Config, ModelConfig
from hpc_reid.data.build import dataset_on_ranks
from hpc_reid.engine.checkpoint import load_checkpoint
from hpc_reid.engine.errors import CheckpointError
from hpc_reid.engine.evaluate import FeatureCache, evaluate_model, metrics_line
from hpc_reid.engine.trainer import model_meta, select_device
from hpc_reid.launch.distributed import choose_backend, cleanup, detect_env, init_distributed
from hpc_reid.models import build_model


def without_initial_weights(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` without the files a model's initial weights are read from (ImageNet weights,
    FGReID's second trunk): a checkpoint holds every weight, so evaluating, extracting or exporting
    it must not need files that were only read when its training began."""
    fgreid = cfg.fgreid.model_copy(update={"second_init_from": None})
    return cfg.model_copy(update={"pretrained": None, "fgreid": fgreid})


@contextlib.contextmanager
def saved_model(path: str | Path, config: Config | None = None):
    """The model saved at ``path`` with its data set, on every launched rank:
    ``(config, env, device, dataset, model)``, distributed set up for the ``with`` block.

    ``config`` defaults to the resolved config stored in the checkpoint; a checkpoint of another
    model than ``config`` builds is refused. The classifier is built with the checkpoint's number
    of classes, not the data set's: the weights are the checkpoint's, and a model trained on one
    set runs on another's images (cross-domain evaluation; SAN-PG's textures for a real set).
    """
    state = load_checkpoint(path)
    config = config or Config.model_validate(state["config"])
    env = detect_env()
    device = select_device(config.engine.device, env.local_rank)
    init_distributed(
        env, choose_backend(config.distributed.backend, device), config.distributed.timeout_s
    )
    try:
        dataset = dataset_on_ranks(config.data, env.rank == 0)
        classes = state["model_meta"].get("num_classes", dataset.num_train_pids)
        model = build_model(without_initial_weights(config.model), classes)
        model = model.to(device)
        meta = model_meta(config, classes, model)
        if state["model_meta"] != meta:
            raise CheckpointError(
                f"checkpoint {path} holds {state['model_meta']}, the config builds {meta}"
            )
        model.load_state_dict(state["strategy"]["model"])
        yield config, env, device, dataset, model
    finally:
        cleanup()


def evaluate_checkpoint(
    path: str | Path,
    config: Config | None = None,
    out_dir: str | Path | None = None,
    cache: FeatureCache | None = None,
) -> dict[str, Any]:
    """Evaluate a saved model on its data set's test split (sharded over ranks if launched so).

    ``config`` defaults to the resolved config stored in the checkpoint; results and plots go to
    ``out_dir`` (default: ``eval/`` beside the checkpoint's run folder). ``cache`` keeps the test
    rows for the next evaluation of the same checkpoint (``eval --draws``).
    """
    with saved_model(path, config) as (config, env, device, dataset, model):
        out = Path(out_dir) if out_dir else Path(path).resolve().parent.parent / "eval"
        summary = evaluate_model(model, dataset, config, device, out_dir=out, cache=cache)
        if env.rank == 0:
            print(f"{path}: " + metrics_line(summary))
            print(
                f"results: {out / 'results.json'}; plots: {out / 'cmc.png'}, {out / 'ranked.png'}"
            )
        return summary
