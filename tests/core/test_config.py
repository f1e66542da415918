import warnings

import pytest

from pytest_duquant.config import (
    DEFAULT_INCLUDE,
    DEFAULT_SCOPE,
    DuQuantConfigError,
    DuQuantConfigWarning,
    from_env,
    replace,
)

P = "OPENPI_DUQUANT_"


def test_internal_defaults_are_preset_a_and_the_expert_scope():
    cfg = from_env({})
    got = (cfg.preset, cfg.enabled, cfg.wbits_default, cfg.abits, cfg.block, cfg.permute)
    assert got == ("A", True, 4, 8, 16, True)
    got = (cfg.row_rot, cfg.act_pct, cfg.calib_steps, cfg.ls, cfg.effective_block_out)
    assert got == ("restore", 99.9, 32, 0.15, 16)
    assert cfg.scope == DEFAULT_SCOPE == "paligemma_with_expert.gemma_expert.model."
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert proj in DEFAULT_INCLUDE
    assert cfg.packdir == "./duquant_packed" and cfg.layers is None and not cfg.include_action_head


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("B", (4, 8, 64, False, "0", 98.0, 64)),
        ("b", (4, 8, 64, False, "0", 98.0, 64)),
        ("precision", (6, 8, 32, True, "restore", 99.9, 64)),
        ("SPEED", (4, 8, 128, False, "0", 98.0, 64)),
    ],
)
def test_presets_set_their_values(preset, expected):
    cfg = from_env({}, preset=preset)
    got = (cfg.wbits_default, cfg.abits, cfg.block, cfg.permute, cfg.row_rot, cfg.act_pct, cfg.calib_steps)
    assert got == expected
    assert cfg.source_of("block") == "preset"


def test_fp_preset_disables_quantization():
    assert from_env({}, preset="fp").enabled is False


def test_precedence_override_beats_env_beats_preset():
    env = {P + "BLOCK": "64", P + "PERMUTE": "0", P + "PRESET": "speed"}
    cfg = from_env(env, preset="A")  # explicit option beats OPENPI_DUQUANT_PRESET
    assert cfg.preset == "A" and cfg.block == 64 and cfg.permute is False and cfg.row_rot == "restore"
    assert cfg.source_of("block") == "env" and cfg.source_of("row_rot") == "preset"
    cfg2 = from_env(env, overrides={"block": 32})
    assert cfg2.preset == "speed" and cfg2.block == 32 and cfg2.source_of("block") == "override"
    assert cfg2.calib_steps == 64  # from preset speed via the env variable


def test_every_variable_is_parsed():
    env = {
        P + "DEBUG": "true", P + "SCOPE": "model.", P + "INCLUDE": "q_proj", P + "EXCLUDE": "norm",
        P + "LAYERS": "a.q_proj, b.k_proj", P + "INCLUDE_ACTION_HEAD": "1", P + "WBITS_DEFAULT": "6",
        P + "WBITS": "a.q_proj:8,b.k_proj:3", P + "ABITS": "0", P + "ACT_PCT": "99", P + "CALIB_STEPS": "5",
        P + "BLOCK": "32", P + "BLOCK_OUT": "8", P + "LS": "0.5", P + "PERMUTE": "false", P + "ROW_ROT": "propagate",
        P + "PACKDIR": "/tmp/p", P + "DRYRUN": "1", P + "ACT_DYNAMIC": "1", P + "ROTATION": "greedy", P + "TRITON": "1",
    }
    cfg = from_env(env)
    assert cfg.debug and cfg.scope == "model." and cfg.include == "q_proj" and cfg.exclude == "norm"
    assert cfg.layers == ("a.q_proj", "b.k_proj") and cfg.include_action_head and cfg.wbits_default == 6
    assert cfg.wbits_for("a.q_proj") == 8 and cfg.wbits_for("x.b.k_proj") == 3 and cfg.wbits_for("c") == 6
    assert cfg.abits == 0 and not cfg.act_quant_enabled and cfg.act_pct == 99.0 and cfg.calib_steps == 5
    assert cfg.block == 32 and cfg.effective_block_out == 8 and cfg.ls == 0.5 and cfg.permute is False
    assert cfg.row_rot == "propagate" and cfg.packdir == "/tmp/p" and cfg.dryrun and cfg.act_dynamic
    assert cfg.rotation == "greedy" and cfg.backend == "triton"


@pytest.mark.parametrize(
    "var, value, needle",
    [
        ("BLOCK", "48", "power of two"),
        ("BLOCK", "0", "BLOCK=0"),
        ("BLOCK", "abc", "integer"),
        ("BLOCK_OUT", "-4", "BLOCK_OUT=-4"),
        ("WBITS_DEFAULT", "1", "2..32"),
        ("ABITS", "1", "0 (off)"),
        ("ACT_PCT", "0", "(0, 100]"),
        ("ACT_PCT", "101", "(0, 100]"),
        ("LS", "1.5", "[0, 1]"),
        ("PERMUTE", "maybe", "boolean"),
        ("ROW_ROT", "sideways", "0, restore, propagate"),
        ("INCLUDE", "(", "regular expression"),
        ("WBITS", "layer8", "name:bits"),
        ("WBITS", "layer:x", "bit width"),
        ("CALIB_STEPS", "0", ">= 1"),
        ("ROTATION", "random", "svd, greedy"),
        ("LAYERS", " , ", "comma-separated"),
    ],
)
def test_bad_values_raise_one_clear_error_naming_variable_value_and_rule(var, value, needle):
    with pytest.raises(DuQuantConfigError) as err:
        from_env({P + var: value})
    msg = str(err.value)
    assert msg.startswith(f"{P}{var}={value}:") and needle in msg


def test_unknown_preset_is_an_error():
    with pytest.raises(DuQuantConfigError, match="unknown preset.*A, B, precision, speed, fp"):
        from_env({}, preset="turbo")
    with pytest.raises(DuQuantConfigError, match="OPENPI_DUQUANT_PRESET=turbo"):
        from_env({P + "PRESET": "turbo"})


def test_unknown_variable_is_warned_with_a_suggestion():
    with pytest.warns(DuQuantConfigWarning, match="OPENPI_DUQUANT_BLOK is not a DuQuant setting.*BLOCK"):
        cfg = from_env({P + "BLOK": "64"})
    assert cfg.block == 16


def test_row_rot_none_is_read_as_zero_with_a_warning():
    with pytest.warns(DuQuantConfigWarning, match="read as '0'"):
        assert from_env({P + "ROW_ROT": "none"}).row_rot == "0"


def test_known_variables_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_env({P + "BLOCK": "64", P + "PACKDIR": "x", P + "PRESET": "B"})


def test_replace_validates_and_marks_overrides():
    cfg = replace(from_env({}), block=64, abits="0")
    assert cfg.block == 64 and cfg.abits == 0 and cfg.source_of("block") == "override"
    with pytest.raises(DuQuantConfigError, match="BLOCK=3"):
        replace(cfg, block=3)
    with pytest.raises(DuQuantConfigError, match="not a DuQuant setting"):
        replace(cfg, blocksize=3)


def test_config_is_frozen_and_summary_names_sources():
    cfg = from_env({P + "BLOCK": "64"}, preset="A")
    with pytest.raises(AttributeError):
        cfg.block = 8
    rows = {env: (value, src) for env, value, src in cfg.summary_items()}
    assert rows["BLOCK"] == ("64", "env") and rows["PERMUTE"] == ("1", "preset")
    assert "BLOCK=64 (env)" in cfg.describe()
