from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from tuner.errors import SpaceError
from tuner.space import (
    SpaceLimits,
    build_space,
    load_space_file,
    parse_param_option,
    powers_of_two,
)

LIMITS = SpaceLimits(context_length=32768, block_count=26, physical_cores=8, has_gpu=True,
                     min_ctx=1500, variants=("gemma3:1b", "gemma3:1b-it-q8_0"))


def test_powers_of_two() -> None:
    assert powers_of_two(512, 4096) == [512, 1024, 2048, 4096]
    assert powers_of_two(1500, 8192) == [2048, 4096, 8192]
    assert powers_of_two(5000, 4096) == []


def test_default_space_from_model_limits() -> None:
    s = build_space(LIMITS).to_dict()
    assert s["variant"] == ["gemma3:1b", "gemma3:1b-it-q8_0"]
    assert s["num_ctx"] == [2048, 4096, 8192, 16384, 32768]
    assert s["num_batch"] == [32, 64, 128, 256, 512, 1024, 2048]
    assert s["num_gpu"] == list(range(-1, 28))
    assert s["num_thread"] == list(range(0, 9))


def test_param_parsing() -> None:
    assert parse_param_option("num_ctx=2048,4096") == ("num_ctx", [2048, 4096])
    assert parse_param_option("num_thread=2..4") == ("num_thread", [2, 3, 4])
    assert parse_param_option("num_gpu=auto,27") == ("num_gpu", [-1, 27])
    assert parse_param_option("kv_cache_type=Q8_0") == ("kv_cache_type", ["q8_0"])
    with pytest.raises(SpaceError, match="choose from auto, on, off"):
        parse_param_option("flash_attention=maybe")
    with pytest.raises(SpaceError, match="low is above high"):
        parse_param_option("num_thread=4..2")


def test_one_value_fixes_a_parameter_and_it_is_not_searched() -> None:
    s = build_space(LIMITS, {"num_gpu": [27], "num_ctx": [2048, 4096]})
    assert s.fixed["num_gpu"] == 27
    trial = optuna.create_study().ask()
    cfg = s.suggest(trial)
    assert cfg["num_gpu"] == 27 and "num_gpu" not in trial.params
    assert cfg["num_ctx"] in (2048, 4096)


def test_validation_messages() -> None:
    with pytest.raises(SpaceError, match="below the 1500 tokens the workload needs"):
        build_space(LIMITS, {"num_ctx": [1024]})
    with pytest.raises(SpaceError, match="num_thread=-1 is invalid"):
        build_space(LIMITS, {"num_thread": [-1]})
    with pytest.raises(SpaceError, match="num_batch=0 is invalid"):
        build_space(LIMITS, {"num_batch": [0]})
    with pytest.raises(SpaceError, match="not supported by this engine without a managed server"):
        build_space(LIMITS, {"flash_attention": ["on"]})


def test_space_file(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text('[params]\nnum_ctx = [2048, 4096]\nnum_gpu = 27\nnum_thread = { min = 1, max = 4 }\n'
                 'num_batch = { values = [256, 512] }\n')
    assert load_space_file(f) == {"num_ctx": [2048, 4096], "num_gpu": [27], "num_thread": [1, 2, 3, 4],
                                  "num_batch": [256, 512]}
    f.write_text("[params]\nnum_ctx = []\n")
    with pytest.raises(SpaceError, match="empty value list"):
        load_space_file(f)


def test_shipped_presets_are_valid() -> None:
    presets = sorted(Path(__file__).parent.parent.joinpath("studies").glob("*.toml"))
    assert presets
    for p in presets:
        build_space(LIMITS, load_space_file(p))


def test_fingerprint_changes_with_the_space() -> None:
    a = build_space(LIMITS, {"num_ctx": [2048]})
    b = build_space(LIMITS, {"num_ctx": [4096]})
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == build_space(LIMITS, {"num_ctx": [2048]}).fingerprint()
