"""The typed config: defaults, every shipped YAML, overrides and the errors users see."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hpc_reid.config import (
    Config,
    ConfigError,
    apply_override,
    load_config,
    read_yaml,
    save_resolved,
)

REPO = Path(__file__).resolve().parents[1]
# Experiment configs; the search spaces under configs/search/ are checked in tests/tune/.
# configs/search/ holds search spaces, and every real_data.yaml (configs/ablation/, methods/,
# video/) is a bench/real_data.py plan (checked in tests/bench/test_real_data.py), not a config
SHIPPED = sorted(
    p
    for p in (REPO / "configs").rglob("*.yaml")
    if p.parent.name != "search" and p.name != "real_data.yaml"
)


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_are_the_bot_recipe():
    c = Config()
    assert (c.sampler.num_identities, c.sampler.num_instances) == (16, 4)
    assert c.optimizer.name == "adam" and c.optimizer.lr == pytest.approx(3.5e-4)
    assert c.loss.ce.label_smoothing == pytest.approx(0.1)
    assert c.loss.triplet.margin == pytest.approx(0.3)
    assert c.schedule.milestones == [40, 70] and c.schedule.epochs == 120
    assert c.model.last_stride == 1 and c.model.neck == "bnneck"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_validates_and_round_trips(path):
    config = load_config(path)
    again = Config.model_validate(yaml.safe_load(config.to_yaml()))
    assert again == config


def test_shipped_configs_exist():
    names = {str(p.relative_to(REPO / "configs")) for p in SHIPPED}
    assert {"market/bot_r50.yaml", "synthetic/bot.yaml"} <= names


def test_typo_names_key_path_and_suggests_the_closest_key():
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/market/bot_r50.yaml", ["optimizer.lrr=1"])
    message = str(info.value)
    assert "optimizer.lrr" in message
    assert "did you mean 'optimizer.lr'" in message


def test_unknown_section_suggests_the_section(tmp_path):
    with pytest.raises(ConfigError, match=r"optimiser: unknown key \(did you mean 'optimizer'"):
        load_config(write(tmp_path / "c.yaml", {"optimiser": {"lr": 1.0}}))


def test_unrelated_unknown_key_lists_allowed_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"sampler\.zzzz: unknown key; allowed: .*num_instances"):
        load_config(None, ["sampler.zzzz=3"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"schedule\.epochs: .*integer.*'abc'"):
        load_config(None, ["schedule.epochs=abc"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("optimizer.lr=-1", r"optimizer\.lr: .*greater than 0"),
        ("sampler.num_instances=0", r"sampler\.num_instances"),
        ("schedule.milestones=[70,40]", r"schedule\.milestones=\[70, 40\] must be strictly"),
        ("schedule.milestones=[40,500]", r"must lie in 1\.\.schedule\.epochs=120"),
        (
            "evaluation.rerank.k2=30",
            r"evaluation\.rerank\.k2=30 must not exceed evaluation\.rerank\.k1=20",
        ),
        ("schedule.warmup_epochs=200", r"schedule\.warmup_epochs=200 must be smaller"),
        ("loader.augment.erasing_area=[0.5,0.1]", r"erasing_area: must satisfy"),
        ("model.backbone=resnet5", r"model\.backbone: unknown backbone 'resnet5' \(did you mean"),
        ("data.dataset=market", r"unknown data set 'market' \(did you mean 'market1501'"),
        ("engine.precision=fp8", r"engine\.precision: .*'fp32', 'bf16' or 'fp16'"),
        ("data.dataset=market1501", r"data\.root is required"),
        ("sampler.num_instances=1", r"sampler\.num_instances=1 leaves no positive pair"),
    ],
)
def test_impossible_values_are_named(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_soft_margin_triplet_without_positives_is_allowed_when_triplet_is_off():
    config = load_config(None, ["loss.triplet.weight=0", "sampler.num_instances=1"])
    assert config.sampler.num_instances == 1


def test_overrides_coerce_types():
    config = load_config(
        None,
        [
            "optimizer.lr=1e-3",
            "schedule.milestones=[10, 20]",
            "engine.compile=true",
            "loss.triplet.margin=null",
            "engine.grad_clip=5",
            "name=run 7",
        ],
    )
    assert config.optimizer.lr == pytest.approx(1e-3)
    assert config.schedule.milestones == [10, 20]
    assert config.engine.compile is True
    assert config.loss.triplet.margin is None
    assert config.engine.grad_clip == 5.0
    assert config.name == "run 7"


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match=r"expected KEY\.PATH=VALUE"):
        load_config(None, ["optimizer.lr"])
    data = {"optimizer": {"lr": 1.0}}
    with pytest.raises(ConfigError, match=r"optimizer\.lr is a value, not a section"):
        apply_override(data, "optimizer.lr.x=3")


def test_base_inheritance_merges_deeply(tmp_path):
    write(tmp_path / "base.yaml", {"optimizer": {"lr": 0.1, "name": "sgd"}, "name": "base"})
    child = write(tmp_path / "child.yaml", {"_base_": "base.yaml", "optimizer": {"lr": 0.2}})
    config = load_config(child)
    assert (config.optimizer.name, config.optimizer.lr, config.name) == ("sgd", 0.2, "base")


def test_base_cycle_and_missing_file_are_errors(tmp_path):
    write(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ConfigError, match="_base_ cycle"):
        read_yaml(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match=r"nope\.yaml not found"):
        load_config(tmp_path / "nope.yaml")


def test_non_mapping_and_invalid_yaml_are_errors(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_resolved_config_is_written_atomically_and_reloads(tmp_path):
    config = load_config(REPO / "configs/synthetic/bot.yaml", ["optimizer.lr=0.01"])
    path = save_resolved(config, tmp_path / "run")
    assert path.name == "config.yaml"
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary left
    assert load_config(path) == config


def test_a_batch_size_the_identity_sampler_would_ignore_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"sampler\.batch_size=32 with sampler\.kind=identity"):
        load_config(None, ["sampler.batch_size=32"])
    assert load_config(None, ["sampler.batch_size=64"]).sampler.batch_size == 64  # P x K: fine


@pytest.mark.parametrize(
    "sets",
    [["sampler.num_instances=2"], ["sampler.num_identities=1"], ["sampler.kind=random"]],
)
def test_san_fixed_decoder_triplets_need_identity_batches_of_p_ids_x_4(sets):
    base = ["loss.decoder_triplet.weight=1", "loss.triplet.weight=0"]
    with pytest.raises(ConfigError, match=r"mining=fixed .* P >= 2 identities x K=4"):
        load_config(None, [*base, *sets])
    assert load_config(None, base).loss.decoder_triplet.mining == "fixed"  # 16 x 4: fine
