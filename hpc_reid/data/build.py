"""From the ``data`` section of a config to a parsed data set (generating the synthetic one)."""

from __future__ import annotations

import inspect
from pathlib import Path

from hpc_reid.config import SYNTHETIC, ConfigError, DataConfig, did_you_mean
from hpc_reid.data.datasets import ReidDataset, build_dataset
from hpc_reid.data.datasets.base import _REGISTRY


def synth_spec(data: DataConfig):
    """The generator spec of the config's synthetic data set."""
    from hpc_reid.data.synthetic import SynthSpec

    s = data.synthetic
    return SynthSpec(
        ids=s.ids,
        cams=s.cams,
        images_per_id=s.images_per_id,
        distractors=s.distractors,
        junk=s.junk,
        seed=s.seed,
        transit=s.transit,
    )


def tracklet_spec(data: DataConfig):
    """The generator spec of the config's synthetic tracklet set (``data.synthetic.tracklets``):
    ``distractors`` and ``junk`` count tracklets there; ``images_per_id`` is not used."""
    from hpc_reid.data.synthetic import TrackletSpec

    s = data.synthetic
    return TrackletSpec(
        ids=s.ids,
        cams=s.cams,
        tracklets_per_camera=s.tracklets_per_camera,
        min_frames=s.frames_per_tracklet[0],
        max_frames=s.frames_per_tracklet[1],
        distractors=s.distractors,
        junk=s.junk,
        seed=s.seed,
    )


def dataset_root(data: DataConfig, announce=print) -> tuple[str, Path]:
    """(registered parser name, root folder) of the config's data set.

    The synthetic set is generated on first use into its cache folder, which is announced so a
    user knows where the images are: Market-1501 images, or MARS tracklets with
    ``data.synthetic.tracklets``.
    """
    if data.dataset != SYNTHETIC:
        return data.dataset, Path(data.root).expanduser()
    if data.synthetic.tracklets:
        from hpc_reid.data.synthetic import ensure_tracklets

        root = ensure_tracklets(tracklet_spec(data), data.synthetic.cache_dir)
        announce(f"synthetic MARS-format tracklet set: {root}")
        return "mars", root
    from hpc_reid.data.synthetic import ensure_synthetic

    root = ensure_synthetic(synth_spec(data), data.synthetic.cache_dir)
    announce(f"synthetic Market-format data set: {root}")
    return "market1501", root


def check_options(name: str, options: dict) -> None:
    """Reject ``data.options`` keys the parser does not take, naming the key and the choices."""
    factory = _REGISTRY[name]
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    allowed = [p for p in params if p not in ("self", "root")]
    for key in options:
        if key not in allowed:
            hint = did_you_mean(key, allowed) if allowed else f"; {name} takes no options"
            raise ConfigError(f"data.options.{key}: unknown option for data set {name!r}{hint}")


def dataset_on_ranks(data: DataConfig, main: bool, announce=print) -> ReidDataset:
    """``dataset_from_config`` on every rank of a job: rank 0 (``main``) parses first, generating
    the synthetic set if needed; the others parse after a barrier, silently, and find it ready."""
    from hpc_reid.launch.distributed import barrier

    if main:
        dataset = dataset_from_config(data, announce=announce)
    barrier()
    if not main:
        dataset = dataset_from_config(data, announce=lambda _: None)
    return dataset


def dataset_from_config(data: DataConfig, announce=print) -> ReidDataset:
    """The config's data set; with ``data.validation.fraction`` > 0, its validation holdout (the
    query and gallery from held-out train identities, never the test split)."""
    name, root = dataset_root(data, announce)
    options = {} if data.dataset == SYNTHETIC else dict(data.options)
    if data.dataset == SYNTHETIC and data.options:
        raise ConfigError("data.options: the synthetic data set takes no options")
    check_options(name, options)
    dataset = build_dataset(name, root, **options)
    v = data.validation
    if v.fraction > 0:
        # after the parser: any registered set, folder or pack, images or tracklets
        from hpc_reid.data.holdout import ValidationHoldout

        dataset = ValidationHoldout(dataset, v.fraction, v.distractors, v.seed)
    return dataset
