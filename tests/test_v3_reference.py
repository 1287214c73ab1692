"""DreamerV3 configs against the authors' code pinned in tests/data/dreamerv3_reference.yaml.

Every value of config/model/dreamer_v3.yaml, config/optimization/dreamer_v3.yaml and the DMC presets must equal the
pinned reference (or be one of its recorded deviations); a failure names our key and the authors' config name.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from utils.config import CONFIG_DIR, compose_config

REFERENCE_PATH = Path(__file__).resolve().parent / "data" / "dreamerv3_reference.yaml"
V3_GROUPS = ("model=dreamer_v3", "optimization=dreamer_v3")
# The keys chosen by `model.size`.
SIZE_KEYS = ("deter_dim", "rssm_hidden_dim", "stoch_classes", "cnn_depth", "units")
SIZES_TO_RESOLVE = ("1m", "12m", "25m", "50m", "100m", "200m", "400m")
ABSENT = object()


@functools.cache
def reference() -> dict[str, Any]:
    """The pinned reference, parsed once."""
    return yaml.safe_load(REFERENCE_PATH.read_text())


@functools.cache
def composed(*overrides: str) -> DictConfig:
    """The project's config with ``overrides``, composed once per set of overrides."""
    return compose_config(*overrides)


def same(actual: object, expected: object) -> bool:
    """Equal values of the same kind: a bool never equals a number, an int equals the float of the same value."""
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(actual) is type(expected) and actual == expected
    return actual == expected


def mismatches(cfg: DictConfig, entries: dict[str, dict[str, Any]]) -> list[str]:
    """One line per key of ``entries`` whose composed value differs from the reference's ``value``."""
    lines = []
    for key, entry in entries.items():
        node = OmegaConf.select(cfg, key, default=ABSENT)
        actual = OmegaConf.to_object(node) if OmegaConf.is_config(node) else node
        if actual is ABSENT:
            lines.append(f"{key}: missing (authors' {entry['authors']} = {entry['value']!r})")
        elif not same(actual, entry["value"]):
            lines.append(f"{key} = {actual!r}, but the authors' {entry['authors']} = {entry['value']!r}")
    return lines


def leaf_keys(config_file: Path, section: str) -> set[str]:
    """``section.key`` for every top-level key of one config-group file."""
    return {f"{section}.{key}" for key in yaml.safe_load(config_file.read_text())}


def test_the_reference_pins_one_commit() -> None:
    source = reference()["source"]
    assert source["repository"] == "https://github.com/danijar/dreamerv3"
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"]), source["commit"]
    assert re.fullmatch(r"[0-9a-f]{40}", source["configs_yaml_changed_in"]), source["configs_yaml_changed_in"]
    assert source["commit_date"] >= source["configs_yaml_changed_date"]


def test_every_default_equals_the_reference() -> None:
    problems = mismatches(composed(*V3_GROUPS), reference()["values"])
    assert not problems, "DreamerV3 defaults drifted from the pinned reference:\n" + "\n".join(problems)


def test_deviations_are_ours_and_recorded() -> None:
    cfg = composed(*V3_GROUPS)
    for key, entry in reference()["deviations"].items():
        actual = OmegaConf.select(cfg, key)
        assert same(actual, entry["ours"]), f"{key} = {actual!r}, recorded deviation says ours is {entry['ours']!r}"
        assert not same(entry["ours"], entry["value"]), f"{key}: recorded as a deviation but equals the authors'"


def test_every_key_is_pinned() -> None:
    """No key of the two config files escapes the reference (size-derived keys are checked by the size tests)."""
    ref = reference()
    keys = leaf_keys(CONFIG_DIR / "model" / "dreamer_v3.yaml", "model") | leaf_keys(
        CONFIG_DIR / "optimization" / "dreamer_v3.yaml", "optimization"
    )
    pinned = set(ref["values"]) | set(ref["deviations"]) | set(ref["ours_only"])
    pinned |= {"model.sizes"} | {f"model.{key}" for key in SIZE_KEYS}
    assert not keys - pinned, f"keys without a pinned reference value: {sorted(keys - pinned)}"
    assert not pinned - keys, f"reference keys missing from the configs: {sorted(pinned - keys)}"


def test_the_named_sizes_are_the_authors() -> None:
    cfg = composed(*V3_GROUPS)
    ours = OmegaConf.to_container(cfg.model.sizes)
    for size, expected in reference()["sizes"].items():
        assert ours.get(size) == expected, f"model.sizes.{size} = {ours.get(size)!r}, authors' size{size} = {expected}"
    assert set(ours) == set(reference()["sizes"]), f"model.sizes has {sorted(ours)}"


@pytest.mark.parametrize("size", SIZES_TO_RESOLVE)
def test_model_size_resolves_to_the_reference_size(size: str) -> None:
    cfg = composed(*V3_GROUPS, f"model.size={size}")
    expected = reference()["sizes"][size]
    for key in SIZE_KEYS:
        actual = cfg.model[key]
        assert actual == expected[key], f"model.size={size}: model.{key} = {actual!r}, authors' = {expected[key]!r}"


@pytest.mark.parametrize("preset", ["dreamer_v3_dmc_proprio", "dreamer_v3_dmc_vision"])
def test_each_preset_equals_the_reference(preset: str) -> None:
    ref = reference()
    entries = {**ref["values"], **ref["presets"][preset]["values"]}
    cfg = composed(f"experiment={preset}")
    problems = mismatches(cfg, entries)
    size = ref["presets"][preset]["values"]["model.size"]["value"]
    for key in SIZE_KEYS:
        if cfg.model[key] != ref["sizes"][size][key]:
            problems.append(
                f"model.{key} = {cfg.model[key]!r}, but the authors' size{size} has {ref['sizes'][size][key]}"
            )
    assert not problems, (
        f"experiment={preset} drifted from the authors' {ref['presets'][preset]['authors_block']}:\n"
        + ("\n".join(problems))
    )


def test_a_drifted_value_is_named() -> None:
    """The checker itself: a changed value, a bool standing in for a number and a missing key are each reported."""
    cfg = composed(*V3_GROUPS, "optimization.lr=1e-4", "model.blocks=true", "~model.unimix")
    problems = mismatches(cfg, reference()["values"])
    assert any(line.startswith("optimization.lr = 0.0001, but the authors' agent.opt.lr") for line in problems)
    assert any(line.startswith("model.blocks = True") for line in problems)
    assert any(line.startswith("model.unimix: missing") for line in problems)
    assert len(problems) == 3, problems
