"""Search spaces over config keys (``configs/search/*.yaml``), validated before any trial starts.

A space file maps config key paths to what the search may set them to::

    parameters:
      optimizer.lr: {type: range, bounds: [1.0e-4, 1.0e-2], log: true}
      schedule.warmup_epochs: {type: range, bounds: [0, 10], int: true}
      sampler.num_instances: {type: choice, values: [2, 4, 8]}
      engine.seed: 0                                  # fixed for every trial
    derived:                                          # set from the searched values
      loss.triplet.weight: "1 - loss.osm.weight"
    constraints:
      - "schedule.warmup_epochs <= 0.5 * schedule.epochs"     # linear: Ax enforces it
      - "sampler.num_identities * sampler.num_instances <= 64"  # a derived key: checked here

Every key must exist in the :class:`~hpc_reid.config.Config` schema (an unknown key is the same
error, with the same did-you-mean, as ``--set``), and every bound and choice must give a valid
config. A linear constraint over range parameters goes to Ax as a parameter constraint; any other
(products such as P*K, or choice parameters) is checked on each suggestion, and a suggestion that
breaks it is abandoned in Ax and replaced. A derived key is set on every trial from the searched
values (keys, numbers, +, - and *), for parameters a method ties together: FGReID's objective
weighs its triplet term by 1 - beta and its OSM term by beta, so one searched value sets both; it
is checked against the schema with the parameters at their extremes like a searched key.
"""

from __future__ import annotations

import ast
import copy
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hpc_reid.config import Config, ConfigError, build_config, did_you_mean

Value = int | float | str | bool
_RANGE_FIELDS = ("type", "bounds", "log", "int")
_CHOICE_FIELDS = ("type", "values", "ordered")
_COMPARE = {ast.LtE: operator.le, ast.GtE: operator.ge}
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


@dataclass(frozen=True)
class RangeParam:
    key: str
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def extremes(self) -> tuple[Value, Value]:
        return self.low, self.high

    def contains(self, value: Any) -> bool:
        if self.integer and (isinstance(value, bool) or value != int(value)):
            return False
        return self.low <= value <= self.high


@dataclass(frozen=True)
class ChoiceParam:
    key: str
    values: tuple[Value, ...]
    ordered: bool = True

    def extremes(self) -> tuple[Value, ...]:
        return self.values

    def contains(self, value: Any) -> bool:
        return value in self.values


Param = RangeParam | ChoiceParam


@dataclass(frozen=True)
class Constraint:
    """``lhs <= rhs`` (or ``>=``) over searched keys; ``linear`` ones are passed to Ax."""

    text: str
    tree: ast.Expression
    keys: tuple[str, ...]
    linear: bool

    def holds(self, values: dict[str, Any]) -> bool:
        return bool(_evaluate(self.tree.body, values))


@dataclass(frozen=True)
class Derived:
    """``key = expression`` over searched keys, set on every trial from the suggested values."""

    key: str
    text: str
    tree: ast.Expression
    keys: tuple[str, ...]

    def value(self, values: dict[str, Any]) -> Any:
        return _evaluate(self.tree.body, values)


@dataclass
class SearchSpace:
    """The parameters a search sets, the values fixed for every trial, the values derived from
    the searched ones, and the constraints."""

    source: str
    params: dict[str, Param]
    fixed: dict[str, Any] = field(default_factory=dict)
    constraints: list[Constraint] = field(default_factory=list)
    derived: dict[str, Derived] = field(default_factory=dict)

    def ax_parameters(self) -> list:
        from ax import ChoiceParameterConfig, RangeParameterConfig

        out = []
        for p in self.params.values():
            if isinstance(p, RangeParam):
                out.append(
                    RangeParameterConfig(
                        name=p.key,
                        bounds=(p.low, p.high),
                        parameter_type="int" if p.integer else "float",
                        scaling="log" if p.log else "linear",
                    )
                )
            else:
                out.append(
                    ChoiceParameterConfig(
                        name=p.key,
                        values=list(p.values),
                        parameter_type=_choice_type(p.values),
                        is_ordered=p.ordered,
                    )
                )
        return out

    def ax_constraints(self) -> list[str]:
        return [c.text for c in self.constraints if c.linear]

    def violated(self, values: dict[str, Any]) -> list[str]:
        """The constraints ``values`` (one suggestion) breaks, Ax's own included."""
        return [c.text for c in self.constraints if not c.holds(values)]

    def outside(self, values: dict[str, Any]) -> list[str]:
        """``key=value`` for each value that lies outside its parameter's bounds or choices."""
        known = self.params
        return [f"{k}={v!r}" for k, v in values.items() if k in known and not known[k].contains(v)]

    def derived_values(
        self, values: dict[str, Any], base: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Each derived key's value from ``values`` (one suggestion); a searched key missing
        from ``values`` is read from ``base`` (a config dict), as a trial would leave it."""
        out = {}
        for key, derived in self.derived.items():
            inputs = {}
            for k in derived.keys:
                if k in values:
                    inputs[k] = values[k]
                elif base is not None:
                    inputs[k] = get_key(base, k)
                else:
                    raise KeyError(f"{self.source}: derived {key} needs {k}, not in {values}")
            out[key] = derived.value(inputs)
        return out

    def config(self, base: dict[str, Any], values: dict[str, Any], source: str = "") -> Config:
        """The base config (a ``Config.to_dict()``) with the fixed, the suggested and the derived
        values."""
        data = copy.deepcopy(base)
        for key, value in {**self.fixed, **values}.items():
            set_key(data, key, value)
        for key, value in self.derived_values(values, data).items():
            set_key(data, key, value)
        return build_config(data, source or self.source)


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating sections (the schema then judges the key)."""
    *sections, last = key.split(".")
    node = data
    for i, part in enumerate(sections):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {'.'.join(sections[: i + 1])} is a value, not a section")
        node = child
    node[last] = value


def get_key(data: dict[str, Any], key: str) -> Any:
    """The value at ``a.b.c`` of a nested dict; a missing one is a :class:`ConfigError`."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{key}: not in the config")
        node = node[part]
    return node


def load_space(path: str | Path, base: Config) -> SearchSpace:
    """Read and validate a space file against ``base`` (the experiment config being searched).

    Raises :class:`ConfigError` naming the file, the key and what is wrong: an unknown key (with a
    suggestion), a malformed entry, a bound or choice that makes the config invalid, or a
    constraint that is not an inequality over searched keys.
    """
    return parse_space(read_space(path), base, str(path))


def read_space(path: str | Path) -> Any:
    """A space file's YAML (checked by :func:`parse_space`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file {path} not found")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def parse_space(raw: Any, base: Config, source: str = "<space>") -> SearchSpace:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with 'parameters' (and 'constraints')")
    sections = ["parameters", "derived", "constraints"]
    unknown = set(raw) - set(sections)
    if unknown:
        name = sorted(unknown)[0]
        hint = did_you_mean(name, sections)
        raise ConfigError(f"{source}: unknown section {name!r}{hint}")
    entries = raw.get("parameters") or {}
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"{source}: 'parameters' must map config keys to ranges or choices")
    params: dict[str, Param] = {}
    fixed: dict[str, Any] = {}
    for key, spec in entries.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: parameter name {key!r} must be a config key path")
        if isinstance(spec, dict) and "type" in spec:
            params[key] = _parse_param(key, spec, source)
        else:
            fixed[key] = spec
    if not params:
        raise ConfigError(f"{source}: no range or choice parameter to search")
    space = SearchSpace(source, params, fixed)
    derived = raw.get("derived") or {}
    if not isinstance(derived, dict):
        raise ConfigError(f"{source}: 'derived' must map config keys to expressions")
    space.derived = {k: _parse_derived(k, text, space) for k, text in derived.items()}
    space.constraints = [_parse_constraint(c, space) for c in raw.get("constraints") or []]
    _validate_against_schema(space, base.to_dict())
    return space


def _parse_param(key: str, spec: dict[str, Any], source: str) -> Param:
    where = f"{source}: {key}"
    kind = spec["type"]
    allowed = {"range": _RANGE_FIELDS, "choice": _CHOICE_FIELDS}.get(kind)
    if allowed is None:
        raise ConfigError(f"{where}: type {kind!r} is not 'range' or 'choice'")
    for name in spec:
        if name not in allowed:
            raise ConfigError(f"{where}: unknown field {name!r}{did_you_mean(name, allowed)}")
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or len(values) < 2:
            raise ConfigError(f"{where}: 'values' must list at least two choices (got {values!r})")
        if not all(isinstance(v, Value) for v in values) or len(set(map(type, values))) > 1:
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                raise ConfigError(
                    f"{where}: choices must be numbers, strings or booleans of one kind "
                    f"(got {values!r})"
                )
            values = [float(v) for v in values]
        if len(set(values)) != len(values):
            raise ConfigError(f"{where}: repeated choices in {values!r}")
        ordered = spec.get("ordered", _choice_type(values) in ("int", "float"))
        return ChoiceParam(key, tuple(values), bool(ordered))
    bounds = spec.get("bounds")
    if not (
        isinstance(bounds, list)
        and len(bounds) == 2
        and all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
    ):
        raise ConfigError(f"{where}: 'bounds' must be [low, high] numbers (got {bounds!r})")
    low, high = bounds
    integer, log = bool(spec.get("int", False)), bool(spec.get("log", False))
    if not low < high:
        raise ConfigError(f"{where}: bounds [{low}, {high}] need low < high")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0 (got {low})")
    if integer and (low != int(low) or high != int(high)):
        raise ConfigError(f"{where}: an int range needs integer bounds (got [{low}, {high}])")
    if integer:
        return RangeParam(key, int(low), int(high), log, True)
    return RangeParam(key, float(low), float(high), log, False)


def _choice_type(values) -> str:
    first = values[0]
    if isinstance(first, bool):
        return "bool"
    if isinstance(first, int):
        return "int"
    return "float" if isinstance(first, float) else "str"


def _parse_constraint(text: Any, space: SearchSpace) -> Constraint:
    where = f"{space.source}: constraint {text!r}"
    if not isinstance(text, str):
        raise ConfigError(f"{where}: must be a string such as 'a.b + c.d <= 1'")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ConfigError(f"{where}: not an expression") from None
    body = tree.body
    if not (isinstance(body, ast.Compare) and len(body.ops) == 1):
        raise ConfigError(f"{where}: must be one comparison, 'lhs <= rhs' or 'lhs >= rhs'")
    if type(body.ops[0]) not in _COMPARE:
        raise ConfigError(f"{where}: only <= and >= are allowed (Ax's parameter constraints)")
    keys: list[str] = []
    degree = max(_degree(side, keys, where) for side in (body.left, body.comparators[0]))
    for key in keys:
        if key not in space.params:
            known = list(space.params)
            reason = "is fixed, not searched" if key in space.fixed else "is not a parameter"
            hint = "" if key in space.fixed else did_you_mean(key, known)
            raise ConfigError(f"{where}: {key} {reason}{hint}")
    linear = degree <= 1 and all(isinstance(space.params[k], RangeParam) for k in keys)
    return Constraint(text, tree, tuple(dict.fromkeys(keys)), linear)


def _parse_derived(key: Any, text: Any, space: SearchSpace) -> Derived:
    where = f"{space.source}: derived {key!r}"
    if not isinstance(key, str):
        raise ConfigError(f"{where}: must be a config key path")
    if key in space.params or key in space.fixed:
        kind = "searched" if key in space.params else "fixed"
        raise ConfigError(f"{where}: {key} is already {kind}; a key is set one way")
    if not isinstance(text, str):
        raise ConfigError(
            f"{where}: {text!r} must be an expression over searched keys, such as "
            "'1 - loss.osm.weight' (a constant is a fixed value: put it under parameters)"
        )
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ConfigError(f"{where}: {text!r} is not an expression") from None
    keys: list[str] = []
    _degree(tree.body, keys, f"{where}: {text!r}")
    if not keys:
        raise ConfigError(f"{where}: {text!r} reads no searched key (a constant is a fixed value)")
    for k in keys:
        if k not in space.params:
            reason = "is fixed, not searched" if k in space.fixed else "is not a parameter"
            hint = "" if k in space.fixed else did_you_mean(k, list(space.params))
            raise ConfigError(f"{where}: {k} {reason}{hint}")
    return Derived(key, text, tree, tuple(dict.fromkeys(keys)))


def _key_of(node: ast.AST) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _degree(node: ast.AST, keys: list[str], where: str) -> int:
    """Polynomial degree of an arithmetic expression in the keys (collecting them)."""
    key = _key_of(node)
    if key is not None:
        keys.append(key)
        return 1
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return 0
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return _degree(node.operand, keys, where)
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        left, right = _degree(node.left, keys, where), _degree(node.right, keys, where)
        return left + right if isinstance(node.op, ast.Mult) else max(left, right)
    raise ConfigError(f"{where}: only keys, numbers, +, - and * are allowed")


def _evaluate(node: ast.AST, values: dict[str, Any]) -> Any:
    key = _key_of(node)
    if key is not None:
        return values[key]
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp):
        return -_evaluate(node.operand, values)
    if isinstance(node, ast.BinOp):
        return _ARITH[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values))
    assert isinstance(node, ast.Compare)
    op = _COMPARE[type(node.ops[0])]
    # a small tolerance: Ax's optimiser puts points on a constraint's boundary up to rounding
    lhs, rhs = _evaluate(node.left, values), _evaluate(node.comparators[0], values)
    return op(lhs, rhs) or math.isclose(lhs, rhs, rel_tol=1e-9, abs_tol=1e-12)


def _validate_against_schema(space: SearchSpace, base: dict[str, Any]) -> None:
    """Each key, alone at each of its extremes, and all keys at once at their low and at their
    high ends, must give a valid config: so a typo or an impossible bound fails here, before Ray
    starts, and not in the middle of a search."""
    space.config(base, {}, f"{space.source} (its fixed values)")
    for key, param in space.params.items():
        for value in param.extremes():
            space.config(base, {key: value}, f"{space.source} with {key}={value!r}")
    for end in (0, -1):
        values = {k: p.extremes()[end] for k, p in space.params.items()}
        if all(c.holds(values) for c in space.constraints):
            label = "low" if end == 0 else "high"
            space.config(base, values, f"{space.source} with every parameter at its {label} end")
