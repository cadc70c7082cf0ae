"""``hpc-reid eval --checkpoint RUN --draws N``: one checkpoint on N test draws of a protocol that
redraws only its gallery (VehicleID: one random image of each test vehicle is its gallery image,
``data.options.split_id`` the draw), and the mean and std (n - 1) over the draws, as the protocol
reports them.

Each draw is a full evaluation (``evaluate_checkpoint``) with ``data.options.split_id = s`` for
s = 0..N-1, its results in ``OUT/draw_S/``; the draws share one
:class:`~hpc_reid.engine.evaluate.FeatureCache`, so every test image is extracted once (the first
draw), not N times; ``OUT/results.json`` holds every scalar metric's mean
(under its own name, so tools reading ``rank-1`` get the protocol's number), its std as
``std/<metric>`` and the draws one by one. A set whose training split changes with ``split_id``
(VIPeR, PRID, CUHK01: each split is a train/test partition) is refused: a checkpoint trained on one
split has seen the other splits' test identities.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpc_reid.bench.report import write_json_atomic
from hpc_reid.config import Config, ConfigError, config_with_overrides
from hpc_reid.launch.distributed import choose_backend, detect_env, process_group

__all__ = ["draw_configs", "evaluate_draws", "summarise_draws"]


def _train_key(dataset) -> list[tuple]:
    from hpc_reid.engine.evaluate import record_key

    return [(record_key(r), r.pid) for r in dataset.train]


def draw_configs(config: Config, draws: int) -> list[Config]:
    """``config`` with ``data.options.split_id`` = 0..draws-1; a ConfigError when the data set's
    training split is not the same for every draw (then the draws are train/test splits)."""
    from hpc_reid.data.build import dataset_from_config

    if draws < 2:
        raise ConfigError(f"eval --draws {draws}: give at least 2 draws (the protocol: 10)")
    where = f"eval --draws of data set {config.data.dataset!r}"
    configs = [
        config_with_overrides(config.to_dict(), [f"data.options.split_id={s}"], where)
        for s in range(draws)
    ]
    quiet = lambda *_: None  # noqa: E731 - the two probes need no announcement
    first, second = (_train_key(dataset_from_config(c.data, quiet)) for c in configs[:2])
    if first != second:
        raise ConfigError(
            f"eval --draws: data set {config.data.dataset!r} trains on a different split for each "
            f"data.options.split_id (its splits partition train and test identities), so a "
            f"checkpoint trained on one has seen the others' test identities; --draws is for "
            f"protocols that redraw only the gallery (vehicleid). Evaluate each split's own "
            f"checkpoint instead (bench/real_data.py)"
        )
    return configs


def summarise_draws(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std (n - 1) of every scalar metric the draws share, and the draws themselves."""
    keys = [k for k, v in results[0].items() if isinstance(v, (int, float)) and k != "final"]
    keys = [k for k in keys if all(isinstance(r.get(k), (int, float)) for r in results)]
    summary: dict[str, Any] = {k: statistics.fmean(r[k] for r in results) for k in keys}
    summary.update({f"std/{k}": statistics.stdev(r[k] for r in results) for k in keys})
    summary["draws"] = [{"split_id": s, **{k: r[k] for k in keys}} for s, r in enumerate(results)]
    return summary


def evaluate_draws(checkpoint: str | Path, config: Config, draws: int, out: str | Path) -> dict:
    """Every draw of ``checkpoint`` evaluated into ``out/draw_S``; the summary into
    ``out/results.json`` (rank 0), also returned."""
    from hpc_reid.engine.evaluate import FeatureCache
    from hpc_reid.engine.saved import evaluate_checkpoint
    from hpc_reid.engine.trainer import select_device

    out, cache = Path(out), FeatureCache()  # every draw ranks the same images: extracted once
    env = detect_env()
    device = select_device(config.engine.device, env.local_rank)
    backend = choose_backend(config.distributed.backend, device)
    with process_group(env, backend, config.distributed.timeout_s):  # one for all the draws
        results = [
            evaluate_checkpoint(checkpoint, c, out / f"draw_{s}", cache=cache)
            for s, c in enumerate(draw_configs(config, draws))
        ]
    summary = summarise_draws(results)
    if env.rank == 0:  # the launcher's rank (torchrun or srun), group or not
        write_json_atomic(out / "results.json", summary)
        shown = ", ".join(
            f"{k} {100 * summary[k]:.2f} ± {100 * summary['std/' + k]:.2f}"
            for k in ("rank-1", "rank-5", "mAP")
            if k in summary
        )
        print(f"{checkpoint}: {draws} draws: {shown} (mean ± std); {out / 'results.json'}")
    return summary
