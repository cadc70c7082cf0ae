"""Search space files: parsing, the schema check of every key (with the config's did-you-mean),
bounds and choices that must give valid configs, log/int ranges, and constraints (linear ones for
Ax, products such as P*K checked per suggestion)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_reid.config import Config, ConfigError, load_config
from hpc_reid.tune.space import ChoiceParam, RangeParam, load_space, parse_space

REPO = Path(__file__).resolve().parents[2]
BASE = Config()


def space(parameters, constraints=()):
    return parse_space({"parameters": parameters, "constraints": list(constraints)}, BASE, "s.yaml")


def test_shipped_search_spaces_load_against_their_configs():
    for config, space_file in [
        ("configs/synthetic/bot.yaml", "configs/search/bot_synthetic.yaml"),
        ("configs/market/bot_r50.yaml", "configs/search/bot_market.yaml"),
    ]:
        base = load_config(REPO / config)
        s = load_space(REPO / space_file, base)
        assert {"optimizer.lr", "sampler.num_identities", "schedule.warmup_epochs"} <= set(s.params)
        assert s.params["optimizer.lr"].log
        assert [c.linear for c in s.constraints] == [False]  # P*K: checked per suggestion


def test_ranges_choices_and_fixed_values_are_parsed_with_their_types():
    s = space(
        {
            "optimizer.lr": {"type": "range", "bounds": [1e-4, 1e-2], "log": True},
            "schedule.warmup_epochs": {"type": "range", "bounds": [0, 5], "int": True},
            "sampler.num_instances": {"type": "choice", "values": [2, 4, 8]},
            "optimizer.name": {"type": "choice", "values": ["adam", "sgd"]},
            "loss.triplet.margin": {"type": "choice", "values": [0.2, 1]},  # ints become floats
            "engine.seed": 3,
        }
    )
    assert s.params["optimizer.lr"] == RangeParam("optimizer.lr", 1e-4, 1e-2, log=True)
    assert s.params["schedule.warmup_epochs"] == RangeParam(
        "schedule.warmup_epochs", 0, 5, False, True
    )
    assert s.params["sampler.num_instances"] == ChoiceParam(
        "sampler.num_instances", (2, 4, 8), True
    )
    assert s.params["optimizer.name"].ordered is False
    assert s.params["loss.triplet.margin"].values == (0.2, 1.0)
    assert s.fixed == {"engine.seed": 3}
    kinds = {p.name: (p.parameter_type, getattr(p, "scaling", None)) for p in s.ax_parameters()}
    assert kinds["optimizer.lr"] == ("float", "log")
    assert kinds["schedule.warmup_epochs"] == ("int", "linear")
    assert kinds["optimizer.name"] == ("str", None)
    config = s.config(BASE.to_dict(), {"optimizer.lr": 1e-3, "optimizer.name": "sgd"})
    assert (config.optimizer.lr, config.optimizer.name, config.engine.seed) == (1e-3, "sgd", 3)


def test_an_unknown_key_fails_naming_it_with_a_suggestion():
    with pytest.raises(
        ConfigError, match=r"optimizer\.lrr: unknown key \(did you mean 'optimizer\.lr'"
    ):
        space({"optimizer.lrr": {"type": "range", "bounds": [1e-4, 1e-2]}})
    with pytest.raises(ConfigError, match=r"samplr: unknown key \(did you mean 'sampler'"):
        space({"samplr.num_instances": {"type": "choice", "values": [2, 4]}})


def test_an_unknown_key_in_a_file_fails_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("parameters:\n  loss.triplet.margn: {type: range, bounds: [0.1, 0.5]}\n")
    with pytest.raises(
        ConfigError, match=r"(?s)bad\.yaml.*loss\.triplet\.margn: unknown key \(did you mean"
    ):
        load_space(bad, BASE)


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ({"type": "range", "bounds": [0.0, 1.5]}, r"label_smoothing.*less than 1"),
        ({"type": "range", "bounds": [0.2, 0.1]}, r"need low < high"),
        ({"type": "range", "bounds": [0.0, 0.1], "log": True}, r"log range needs low > 0"),
        ({"type": "range", "bounds": [0.0, 0.5], "int": True}, r"int range needs integer"),
        ({"type": "range", "bounds": [0.1]}, r"'bounds' must be \[low, high\]"),
        ({"type": "range", "bounds": [0.0, 0.1], "lgo": True}, r"unknown field 'lgo'.*'log'"),
        ({"type": "choice", "values": [0.1]}, r"at least two choices"),
        ({"type": "choice", "values": [0.1, "x"]}, r"of one kind"),
        ({"type": "grid", "values": [0.1, 0.2]}, r"not 'range' or 'choice'"),
    ],
)
def test_malformed_entries_and_invalid_bounds_are_errors(entry, error):
    with pytest.raises(ConfigError, match=error):
        space({"loss.ce.label_smoothing": entry})


def test_bounds_that_break_a_cross_key_check_are_errors():
    # warm-up must stay below the epochs (ScheduleConfig's own check), at the range's high end
    with pytest.raises(ConfigError, match=r"warmup_epochs=200.*must be smaller than"):
        space({"schedule.warmup_epochs": {"type": "range", "bounds": [0, 200], "int": True}})


def test_constraints_linear_go_to_ax_and_products_are_checked_here():
    s = space(
        {
            "optimizer.lr": {"type": "range", "bounds": [1e-4, 1e-2]},
            "optimizer.weight_decay": {"type": "range", "bounds": [0.0, 1e-2]},
            "sampler.num_identities": {"type": "choice", "values": [4, 8, 16]},
            "sampler.num_instances": {"type": "choice", "values": [2, 4, 8]},
        },
        [
            "optimizer.weight_decay <= 2 * optimizer.lr",
            "sampler.num_identities * sampler.num_instances <= 64",
        ],
    )
    assert s.ax_constraints() == ["optimizer.weight_decay <= 2 * optimizer.lr"]
    ok = {"optimizer.lr": 1e-3, "optimizer.weight_decay": 1e-3}
    ok.update({"sampler.num_identities": 16, "sampler.num_instances": 4})
    assert s.violated(ok) == []
    assert s.violated({**ok, "sampler.num_instances": 8}) == [
        "sampler.num_identities * sampler.num_instances <= 64"
    ]
    assert s.violated({**ok, "optimizer.weight_decay": 5e-3}) == [
        "optimizer.weight_decay <= 2 * optimizer.lr"
    ]


@pytest.mark.parametrize(
    ("constraint", "error"),
    [
        ("optimizer.lr < 0.1", r"only <= and >="),
        ("optimizer.lr", r"one comparison"),
        (
            "optimizer.lrr <= 0.1",
            r"optimizer\.lrr is not a parameter \(did you mean 'optimizer\.lr'",
        ),
        ("engine.seed <= 3", r"engine\.seed is fixed, not searched"),
        ("optimizer.lr ** 2 <= 0.1", r"only keys, numbers"),
        ("optimizer.lr <= (", r"not an expression"),
    ],
)
def test_bad_constraints_are_errors(constraint, error):
    with pytest.raises(ConfigError, match=error):
        space(
            {"optimizer.lr": {"type": "range", "bounds": [1e-4, 1e-2]}, "engine.seed": 1},
            [constraint],
        )


def test_unknown_sections_and_empty_spaces_are_errors():
    with pytest.raises(
        ConfigError, match=r"unknown section 'parameter' \(did you mean 'parameters'"
    ):
        parse_space({"parameter": {}}, BASE, "s.yaml")
    with pytest.raises(ConfigError, match=r"no range or choice parameter"):
        space({"engine.seed": 1})
