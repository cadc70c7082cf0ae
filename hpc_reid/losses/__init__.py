"""Re-identification losses: loss terms registered by name, and their weighted sum.

Each section of ``loss.*`` is one term, registered under the section's name with
:func:`register_loss`: the model outputs it reads, and a factory building it from its section.
BoT's objective (Luo et al., CVPRW 2019, Eq. 7) is three of them: label-smoothed cross-entropy on
the classifier's logits (``ce``), the batch-hard triplet loss (``triplet``) and the center loss
(``center``) on the global feature before the BNNeck. Methods register theirs from their own
package (AlignedReID's ``local_triplet``: hpc_reid/methods/alignedreid/). A term reading an output
the model does not produce is a config error at start naming both (:func:`check_loss_inputs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hpc_reid.config import ConfigError, LossConfig
from hpc_reid.losses.center import CenterLoss
from hpc_reid.losses.cross_entropy import label_smoothing_cross_entropy
from hpc_reid.losses.triplet import (
    all_gather_with_grad,
    batch_hard_triplet_loss,
    cross_rank_batch_hard_triplet_loss,
    pairwise_euclidean,
)

__all__ = [
    "CenterLoss",
    "LossTerm",
    "ReidLoss",
    "all_gather_with_grad",
    "available_losses",
    "batch_hard_triplet_loss",
    "check_loss_inputs",
    "cross_rank_batch_hard_triplet_loss",
    "label_smoothing_cross_entropy",
    "pairwise_euclidean",
    "register_loss",
]

#: ``term(outputs, pids) -> scalar``: a callable, or an ``nn.Module`` (its parameters and state are
#: then the criterion's, under the section's name, e.g. ``center.centers``).
Term = Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LossTerm:
    """A registered loss term: ``inputs``, the model outputs it reads (or a function of its config
    section giving them, for a term whose input is configurable: ``loss.anchor.feature``);
    ``build(section, num_classes, feature_dim)``, the term for its config section
    (``loss.<name>``)."""

    name: str
    inputs: frozenset[str] | Callable[[object], Iterable[str]]
    build: Callable[[object, int, int], Term]
    batch_fields: frozenset[str] = frozenset()

    def inputs_of(self, section) -> frozenset[str]:
        """The model outputs the term reads under its config section ``section``."""
        return frozenset(self.inputs(section) if callable(self.inputs) else self.inputs)


_LOSSES: dict[str, LossTerm] = {}


def register_loss(
    name: str,
    inputs: set[str] | frozenset[str] | tuple[str, ...] | Callable[[object], Iterable[str]],
    batch_fields: set[str] | frozenset[str] | tuple[str, ...] = (),
):
    """Register ``build(section, num_classes, feature_dim) -> term`` as the term of ``loss.<name>``
    (a section of :class:`hpc_reid.config.LossConfig` with a ``weight``), reading the model
    outputs ``inputs`` (or ``inputs(section)``, when they depend on its section). A term with
    ``batch_fields`` (:mod:`hpc_reid.data.fields`) is called as ``term(outputs, pids, batch)``,
    the batch holding those fields; the others ``term(outputs, pids)``."""

    def add(build: Callable[[object, int, int], Term]):
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        fixed = inputs if callable(inputs) else frozenset(inputs)
        _LOSSES[name] = LossTerm(name, fixed, build, frozenset(batch_fields))
        return build

    return add


def _load_methods() -> None:
    import hpc_reid.methods  # noqa: F401  (each method registers its terms on import)


def available_losses() -> list[str]:
    _load_methods()
    return sorted(_LOSSES)


def active_terms(cfg: LossConfig) -> list[LossTerm]:
    """The registered terms of the sections of ``cfg`` with a weight above 0, in config order."""
    _load_methods()
    terms = []
    for name in type(cfg).model_fields:
        if getattr(cfg, name).weight > 0:
            if name not in _LOSSES:
                raise ConfigError(f"loss.{name}: no loss term is registered under {name!r}")
            terms.append(_LOSSES[name])
    return terms


def check_loss_inputs(cfg: LossConfig, output_keys, head: str = "") -> None:
    """A ConfigError naming the term and the output when an active term reads an output the model
    does not produce (``output_keys``; ``head``: the model.head name, for the message)."""
    problems = [
        f"loss.{t.name} reads the model output {key!r}, which "
        f"{f'model.head {head!r}' if head else 'the model'} does not produce "
        f"(it produces: {', '.join(sorted(output_keys))})"
        for t in active_terms(cfg)
        for key in sorted(t.inputs_of(getattr(cfg, t.name)) - set(output_keys))
    ]
    if problems:
        raise ConfigError("; ".join(problems))


@register_loss("ce", inputs=lambda section: ("logits", *section.also))
def _ce(section, num_classes: int, feature_dim: int) -> Term:
    keys = ("logits", *section.also)

    def ce(outputs, pids):
        # the mean over the branches (FGReID's L_id = (CE(y1) + CE(y2)) / 2): weight 1 keeps the
        # scale of one classifier's loss
        losses = [
            label_smoothing_cross_entropy(outputs[k], pids, section.label_smoothing) for k in keys
        ]
        return sum(losses[1:], start=losses[0]) / len(losses)

    return ce


@register_loss("triplet", inputs=("global",))
def _triplet(section, num_classes: int, feature_dim: int) -> Term:
    def triplet(outputs, pids):
        distributed = dist.is_available() and dist.is_initialized()
        mine = (
            cross_rank_batch_hard_triplet_loss
            if section.cross_rank and distributed
            else batch_hard_triplet_loss
        )
        features = outputs["global"]
        if section.normalize:
            # on the unit sphere (CACE-Net's triplet, margin 0.5): each rank normalises its own
            # rows before any gather, so cross_rank mines the same distances
            features = F.normalize(features, dim=1)
        return mine(features, pids, section.margin, section.distance)

    return triplet


class _Center(CenterLoss):
    """The center loss on the ``global`` output (its centers have their own SGD optimizer:
    :func:`hpc_reid.engine.optim.build_center_optimizer`)."""

    def forward(self, outputs, pids):  # type: ignore[override]
        return super().forward(outputs["global"], pids)


@register_loss("center", inputs=("global",))
def _center(section, num_classes: int, feature_dim: int) -> Term:
    return _Center(num_classes, feature_dim)


class ReidLoss(nn.Module):
    """total = sum over the active sections of ``loss.*`` of weight x term(outputs, pids).

    A term with weight 0 is neither built nor computed (and its input need not exist).
    ``parts`` (the second return value) holds each computed term, unweighted and detached, for
    logging. ``self.center`` is the center loss (None when its weight is 0); its centers need their
    own optimizer (:func:`hpc_reid.engine.optim.build_center_optimizer`). With ``output_keys`` (the
    model's), a term reading an output the model lacks is a ConfigError here, at start.

    A model of several members (``model.members``, mutual learning:
    :class:`hpc_reid.methods.alignedreid.mutual.MutualModel`) returns one flat dict of tensors:
    member 0's outputs under their own keys, member i's under ``members.<i>.<key>``
    (:meth:`member_key`); ``output_keys`` names them all, which is how the number of members is
    known here. Every term is then applied to each member's outputs and the values summed, so
    each member trains with the whole recipe, as in the reference (huanghoujing's train_ml.py); a
    term with state (the center loss's centers) is built once per member, because the members'
    feature spaces differ and one set of centers would pull them together, a coupling no
    reference has. A term with ``reads_members`` set (the ``mutual_*`` terms) is called once with
    the list of every member's outputs. ``parts`` holds each term summed over the members.
    """

    def __init__(
        self,
        cfg: LossConfig,
        num_classes: int,
        feat_dim: int,
        output_keys=None,
        head: str = "",
    ):
        super().__init__()
        terms = active_terms(cfg)
        if not terms:
            raise ValueError(
                "every loss weight is 0 ("
                + ", ".join(f"loss.{n}.weight" for n in type(cfg).model_fields)
                + "): nothing to train"
            )
        if output_keys is not None:
            check_loss_inputs(cfg, output_keys, head)
        self.cfg = cfg
        self.members = 1
        if output_keys is not None:
            self.members = len(self.member_outputs(dict.fromkeys(output_keys)))
        self._terms: dict[str, tuple[float, Term]] = {}
        self._inputs = {t.name: t.inputs_of(getattr(cfg, t.name)) for t in terms}
        for t in terms:
            section = getattr(cfg, t.name)
            term = t.build(section, num_classes, feat_dim)
            if getattr(term, "reads_members", False) and output_keys is not None:
                self._check_peers(t.name, self.members)
            elif isinstance(term, nn.Module) and self.members > 1:
                more = [t.build(section, num_classes, feat_dim) for _ in range(self.members - 1)]
                term = _EachMember([term, *more])
            if isinstance(term, nn.Module):
                self.add_module(t.name, term)
            self._terms[t.name] = (section.weight, term)
        self._link_terms()
        if "center" not in self._modules:
            self.center = None
        #: the batch fields the active terms read (:mod:`hpc_reid.data.fields`), sorted: what the
        #: trainer adds to each batch
        self.batch_fields = sorted(set().union(*(t.batch_fields for t in terms)))

    def _link_terms(self) -> None:
        """Hand each term that reads another term's state (``reads_terms``, names of terms: OSM's
        class-aware attention reads the center loss's centers, hpc_reid/methods/fgreid) those
        built terms, ``term.link({name: term})``, member by member for a model of several; a
        ConfigError naming both when a term it reads is off."""
        for name, (_, term) in self._terms.items():
            each = list(term) if isinstance(term, _EachMember) else [term]
            for i, t in enumerate(each):
                wanted = tuple(getattr(t, "reads_terms", ()))
                for other in wanted:
                    if other not in self._terms:
                        raise ConfigError(
                            f"loss.{name} reads the state of loss.{other}, whose weight is 0 (so "
                            f"it is not built): turn loss.{other} on or set loss.{name}.weight=0"
                        )
                if wanted:
                    peers = [(w, self._terms[w][1]) for w in wanted]
                    t.link({w: p[i] if isinstance(p, _EachMember) else p for w, p in peers})

    def refresh(
        self,
        epoch: int,
        step: int,
        epoch_start: bool,
        class_means: Callable[
            [Sequence[tuple[str, bool]]], Mapping[tuple[str, bool], torch.Tensor]
        ],
    ) -> list[str]:
        """Refresh the terms whose state is computed from the model over the training set (the
        anchor loss's class anchors), those due at this point; returns their names.

        The trainer calls it on every rank before every training step (``epoch_start`` before an
        epoch's first batch); due-ness is a function of (epoch, step) and the terms' saved state,
        so the ranks agree, and a resumed run refreshes exactly where an uninterrupted one did. A
        refreshable term has ``class_mean_request`` (a model output key and whether to average
        it with the flip), ``refresh_due(epoch, step, epoch_start)`` and
        ``set_class_means(means, epoch, step)``; for member i of a multi-member model it reads
        that member's output (:meth:`member_key`). ``class_means(requests)`` computes every
        requested output's per-class means in one pass over the training set
        (:func:`hpc_reid.engine.class_means.class_means`)."""
        due = []
        for name, (_, term) in self._terms.items():
            each = list(term) if isinstance(term, _EachMember) else [term]
            for i, t in enumerate(each):
                if hasattr(t, "refresh_due") and t.refresh_due(epoch, step, epoch_start):
                    key, flip = t.class_mean_request
                    due.append((name, (self.member_key(i, key), flip), t))
        if not due:
            return []
        means = class_means(sorted({request for _, request, _ in due}))
        for _, request, t in due:
            t.set_class_means(means[request], epoch, step)
        return sorted({name for name, _, _ in due})

    @staticmethod
    def member_key(member: int, key: str) -> str:
        """The key of member ``member``'s output ``key`` in a model's outputs dict."""
        return key if member == 0 else f"members.{member}.{key}"

    @staticmethod
    def member_outputs(outputs: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Each member's outputs dict, in member order (``[outputs]`` for a model of one)."""
        by_member: dict[int, dict[str, torch.Tensor]] = {0: {}}
        for key, value in outputs.items():
            member, own = 0, key
            if key.startswith("members."):
                index, _, own = key.removeprefix("members.").partition(".")
                if not (index.isdigit() and own):
                    raise ValueError(f"model output {key!r}: expected members.<index>.<key>")
                member = int(index)
            by_member.setdefault(member, {})[own] = value
        if sorted(by_member) != list(range(len(by_member))):
            raise ValueError(f"model outputs of members {sorted(by_member)}: expected 0..K-1")
        return [by_member[i] for i in range(len(by_member))]

    @staticmethod
    def _check_peers(name: str, members: int) -> None:
        if members < 2:
            raise ConfigError(
                f"loss.{name} is mutual learning, but the model has {members} member "
                f"(model.members={members}); set model.members >= 2 or loss.{name}.weight=0"
            )

    @staticmethod
    def _input(outputs: Mapping[str, torch.Tensor], key: str, loss: str) -> None:
        if key not in outputs:
            raise KeyError(
                f"{loss} needs the model output {key!r}; the model returned {sorted(outputs)}"
            )

    def forward(
        self,
        outputs: Mapping[str, torch.Tensor],
        pids: torch.Tensor,
        batch: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``batch``: the loader's batch with :attr:`batch_fields` added (terms registered with
        ``batch_fields`` receive it as their third argument)."""
        members = self.member_outputs(outputs)
        weighted: list[torch.Tensor] = []
        parts: dict[str, torch.Tensor] = {}
        for name, (weight, term) in self._terms.items():
            for i, member in enumerate(members):
                for key in self._inputs[name]:
                    self._input(member, key, f"loss.{name}" + (f" (member {i})" if i else ""))
            if getattr(term, "reads_members", False):
                self._check_peers(name, len(members))
                parts[name] = term(members, pids)
            else:
                if isinstance(term, nn.Module):  # state: one instance a member (_EachMember)
                    each = list(term) if isinstance(term, _EachMember) else [term]
                else:
                    each = [term] * len(members)
                if len(each) != len(members):
                    raise ValueError(
                        f"loss.{name} keeps state for {len(each)} member(s), the model returned "
                        f"{len(members)} members' outputs (build ReidLoss with its output_keys)"
                    )
                fields = _LOSSES[name].batch_fields
                if fields:
                    missing = sorted(fields - set(batch or {}))
                    if missing:
                        raise KeyError(f"loss.{name} needs the batch field(s) {missing}")
                    extra = (batch,)
                else:
                    extra = ()
                values = [t(member, pids, *extra) for t, member in zip(each, members, strict=True)]
                parts[name] = sum(values[1:], start=values[0])
            weighted.append(weight * parts[name])
        total = sum(weighted[1:], start=weighted[0])
        return total, {k: v.detach() for k, v in parts.items()}


class _EachMember(nn.ModuleList):
    """One instance of a term with state per member of the model (:class:`ReidLoss`)."""
