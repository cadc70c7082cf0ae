"""Retrieval rows: the features a model ranks with, one flat float32 row per image.

A model declares its retrieval parts, ``model.retrieval_parts``: part name -> a
:class:`~hpc_reid.models.heads.RetrievalPart` (the eval-mode output ``key`` holding it and its
``distance``: ``"metric"``, ``evaluation.metric`` on the flattened part, or the name of a part
distance registered with :func:`register_part_distance`, e.g. AlignedReID's ``"dmli"``). An image's
row is every part flattened, concatenated in declaration order; a :class:`RowLayout` records where
each part lies and its shape, so everything that moves rows (the all-gather across ranks, HDF5
blocks, query tiles) moves them unchanged, and only a distance looks inside them
(:class:`~hpc_reid.evaluation.distances.RowDistance`).

A model without ``retrieval_parts`` (older or test models) has one part, ``global``, read by
``model.retrieval_feature(outputs)`` when it defines it, else ``outputs["bn"]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from hpc_reid.config import ConfigError
from hpc_reid.models import inferring

__all__ = [
    "METRIC",
    "PartDistance",
    "PartLayout",
    "RowLayout",
    "check_distance",
    "declared_parts",
    "parse_distance",
    "part_distance",
    "part_features",
    "probe_layout",
    "register_part_distance",
    "registered_part_distances",
    "retrieval_layout",
    "takes_clips",
]

#: The built-in part distance: ``evaluation.metric`` (cosine or euclidean) on the flattened part.
METRIC = "metric"

#: ``fn(q, g) -> (tq, tg) float32``, with ``q`` (tq, *shape) and ``g`` (tg, *shape) a part's rows.
PartDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_PART_DISTANCES: dict[str, PartDistance] = {}


def register_part_distance(name: str, fn: PartDistance) -> PartDistance:
    """Register ``fn(q, g) -> (tq, tg) float32 tensor`` as part distance ``name``: the distance of
    ``tq`` query and ``tg`` gallery items from their part's rows ``q`` (tq, *shape) and
    ``g`` (tg, *shape), on their device. A part whose :class:`RetrievalPart` names ``name``
    ranks with it. A name is registered once (again with the same function: a no-op); "metric" is
    built in."""
    if not name.isidentifier() or name == METRIC:
        raise ValueError(f"part distance name {name!r}: expected an identifier other than 'metric'")
    if name in _PART_DISTANCES and _PART_DISTANCES[name] is not fn:
        raise ValueError(
            f"part distance {name!r} is already registered ({_PART_DISTANCES[name]!r})"
        )
    _PART_DISTANCES[name] = fn
    return fn


def registered_part_distances() -> list[str]:
    """The part distance names a retrieval part may use, "metric" included."""
    return sorted([METRIC, *_PART_DISTANCES])


def part_distance(name: str) -> PartDistance:
    """The registered part distance ``name``. Methods register theirs when :mod:`hpc_reid.methods`
    is imported, which a miss does first (a feature file may be evaluated in a process that never
    built a model)."""
    if name not in _PART_DISTANCES:
        import hpc_reid.methods  # noqa: F401  (registers the built-in methods' part distances)
    if name not in _PART_DISTANCES:
        raise ConfigError(
            f"part distance {name!r} is not registered (registered: "
            f"{', '.join(registered_part_distances())}); register it with "
            "hpc_reid.evaluation.register_part_distance"
        )
    return _PART_DISTANCES[name]


# --- the model's declaration ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Declared:
    key: str
    distance: str


def declared_parts(model: object) -> dict[str, _Declared]:
    """The model's retrieval parts, name -> (output key, distance), in declaration order.

    ``model.retrieval_parts`` values may be :class:`~hpc_reid.models.heads.RetrievalPart` or a
    bare output key (distance "metric"). Without it: one "global" part (the key is
    ``model.retrieval_key`` where there is one, "bn" otherwise; extraction reads it through
    ``model.retrieval_feature`` when the model defines that)."""
    parts = getattr(model, "retrieval_parts", None)
    if parts is None:
        return {"global": _Declared(getattr(model, "retrieval_key", "bn"), METRIC)}
    if not parts:
        raise ValueError(f"{type(model).__name__}.retrieval_parts is empty; declare at least one")
    return {
        name: _Declared(getattr(p, "key", p), getattr(p, "distance", METRIC))
        for name, p in parts.items()
    }


def part_features(model: object, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each declared part's features, (B, *shape), from the model's eval-mode ``outputs``."""
    if getattr(model, "retrieval_parts", None) is None:
        if hasattr(model, "retrieval_feature"):
            return {"global": model.retrieval_feature(outputs)}
        return {"global": outputs["bn"]}
    out = {}
    for name, part in declared_parts(model).items():
        if part.key not in outputs:
            raise KeyError(
                f"retrieval part {name!r} reads output {part.key!r}, which the model does not "
                f"return in eval mode (it returns {sorted(outputs)})"
            )
        out[name] = outputs[part.key]
    return out


# --- the layout of a row -------------------------------------------------------------------------


@dataclass(frozen=True)
class PartLayout:
    """One part of a row: columns ``[start, start + width)`` hold the part's (``*shape``) feature
    flattened; ``key`` is the model output it came from, ``distance`` how it is ranked."""

    name: str
    key: str
    distance: str
    shape: tuple[int, ...]
    start: int

    @property
    def width(self) -> int:
        return math.prod(self.shape)

    @property
    def stop(self) -> int:
        return self.start + self.width

    def of(self, rows: torch.Tensor) -> torch.Tensor:
        """This part of (N, W) ``rows``, as (N, *shape) (a copy where the columns are not
        contiguous)."""
        return rows[:, self.start : self.stop].reshape(len(rows), *self.shape)


@dataclass(frozen=True)
class RowLayout:
    """Where each retrieval part lies in a row, in declaration order (module docstring)."""

    parts: tuple[PartLayout, ...]

    def __post_init__(self) -> None:
        names = [p.name for p in self.parts]
        if not self.parts or len(set(names)) != len(names):
            raise ValueError(f"a row layout needs parts with distinct names, got {names}")
        start = 0
        for p in self.parts:
            if p.start != start or any(s < 1 for s in p.shape):
                raise ValueError(
                    f"part {p.name!r} of shape {p.shape} starts at column {p.start}; parts must be "
                    f"non-empty and follow one another (expected start {start})"
                )
            start = p.stop

    @property
    def width(self) -> int:
        return self.parts[-1].stop

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts)

    def part(self, name: str) -> PartLayout:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"no part {name!r} in the row layout (parts: {', '.join(self.names)})")

    @classmethod
    def build(cls, parts: Mapping[str, tuple[str, str, tuple[int, ...]]]) -> RowLayout:
        """From name -> (key, distance, shape), in order."""
        out, start = [], 0
        for name, (key, distance, shape) in parts.items():
            out.append(PartLayout(name, key, distance, tuple(int(s) for s in shape), start))
            start = out[-1].stop
        return cls(tuple(out))

    @classmethod
    def single(cls, width: int, name: str = "global", key: str = "bn") -> RowLayout:
        """One "metric" part filling the row: the layout of features written before layouts
        existed, and of a model without ``retrieval_parts``."""
        return cls.build({name: (key, METRIC, (width,))})

    def rows(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, width) float32 rows from each part's (B, *shape) features (:func:`part_features`)."""
        flat = []
        for p in self.parts:
            f = features[p.name]
            if tuple(f.shape[1:]) != p.shape:
                raise ValueError(
                    f"retrieval part {p.name!r} ({p.key!r}) has shape {tuple(f.shape[1:])} per "
                    f"image, the layout says {p.shape}"
                )
            flat.append(f.float().reshape(len(f), p.width))
        return torch.cat(flat, dim=1)

    def to_json(self) -> str:
        """The layout as JSON (HDF5 attribute ``layout``; :meth:`from_json` reads it)."""
        return json.dumps(
            {
                "parts": [
                    {
                        "name": p.name,
                        "key": p.key,
                        "distance": p.distance,
                        "shape": list(p.shape),
                        "columns": [p.start, p.stop],
                    }
                    for p in self.parts
                ]
            }
        )

    @classmethod
    def from_json(cls, text: str, source: str = "layout") -> RowLayout:
        """The layout :meth:`to_json` wrote; ValueError naming ``source`` when it is not one."""
        try:
            parts = json.loads(text)["parts"]
            layout = cls.build(
                {p["name"]: (p["key"], p["distance"], tuple(p["shape"])) for p in parts}
            )
            columns = [list(p["columns"]) for p in parts]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{source}: not a row layout ({exc}): {text[:200]!r}") from None
        if columns != [[p.start, p.stop] for p in layout.parts]:
            raise ValueError(f"{source}: part columns {columns} do not follow the parts' shapes")
        return layout


def retrieval_layout(model: object, outputs: Mapping[str, torch.Tensor]) -> RowLayout:
    """The layout of ``model``'s rows, from one batch of its eval-mode ``outputs``."""
    features = part_features(model, outputs)
    return RowLayout.build(
        {
            name: (part.key, part.distance, tuple(features[name].shape[1:]))
            for name, part in declared_parts(model).items()
        }
    )


def takes_clips(model: object) -> bool:
    """Whether ``model`` takes clips of frames (B, T, C, H, W) rather than images: its head pools
    over time (``temporal = True``, :mod:`hpc_reid.models.temporal`)."""
    return bool(getattr(getattr(model, "head", None), "temporal", False))


def probe_layout(
    model: torch.nn.Module, height: int, width: int, device: torch.device | str
) -> RowLayout:
    """The layout of ``model``'s rows, from its outputs on one blank (1, 3, height, width) image
    (eval mode, no gradients, its mode restored): known on every rank before extraction, an empty
    shard's included. A video model (:func:`takes_clips`) gets it as a clip of one frame (1, 1, 3,
    height, width): its rows are one per clip whatever T is."""
    shape = (1, 1, 3, height, width) if takes_clips(model) else (1, 3, height, width)
    with inferring(model):
        outputs = model(torch.zeros(*shape, device=device))
    return retrieval_layout(model, outputs)


# --- evaluation.distance -------------------------------------------------------------------------


def parse_distance(
    distance: str, weights: Mapping[str, float] | None = None
) -> list[tuple[str, float]]:
    """``evaluation.distance`` ("global", "global+local", ...) and ``evaluation.distance_weights``
    as (part, weight) pairs, weight 1 where none is given."""
    names = distance.split("+")
    if any(not n.isidentifier() for n in names) or len(set(names)) != len(names):
        raise ConfigError(
            f"evaluation.distance: {distance!r}: expected part names joined by '+', each once "
            "(global, local, global+local)"
        )
    weights = dict(weights or {})
    for name, w in weights.items():
        if name not in names:
            raise ConfigError(
                f"evaluation.distance_weights.{name}: {name!r} is not a part of evaluation."
                f"distance {distance!r}"
            )
        if not w >= 0:
            raise ConfigError(f"evaluation.distance_weights.{name}: {w} must be >= 0")
    return [(n, float(weights.get(n, 1.0))) for n in names]


def check_distance(
    distance: str,
    weights: Mapping[str, float] | None,
    declared: Mapping[str, str],
    source: str = "this model",
) -> list[tuple[str, float]]:
    """:func:`parse_distance`, each part checked against ``declared`` (part name -> its
    distance, in order) and each part distance against the registry: a ConfigError naming the
    key, the part and what ``source`` declares. The check evaluation runs before any extraction
    (a model without local features asked for ``local``)."""
    terms = parse_distance(distance, weights)
    listing = "; ".join(n if d == METRIC else f"{n} (distance {d})" for n, d in declared.items())
    for name, _ in terms:
        if name not in declared:
            raise ConfigError(
                f"evaluation.distance: {name!r} is not a retrieval part of {source} (it declares: "
                f"{listing}); use those part names, joined by '+' for a weighted sum"
            )
        if declared[name] != METRIC:
            try:
                part_distance(declared[name])
            except ConfigError as exc:
                raise ConfigError(
                    f"evaluation.distance: part {name!r} of {source} ranks with {exc}"
                ) from None
    return terms
