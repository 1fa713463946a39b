"""Constraint profiles: built-ins load and agree with the schema; every error path is a ProfileError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxdgh.errors import EXIT_BAD_INPUT, ProfileError
from onnxdgh.profile import (
    DEFAULT_PROFILE,
    SCHEMA_VERSION,
    Profile,
    builtin_profile_names,
    builtin_profiles,
    load_profile,
    profile_from_dict,
)

BUILTINS = ("generic-pot-int8", "strict-pot-int8", "pot-w4a8", "pot-lowbit")


def _generic_dict() -> dict:
    return load_profile("generic-pot-int8").to_dict()


def _write(tmp_path: Path, data: object, name: str = "p.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_builtins_present_and_named_by_file() -> None:
    names = builtin_profile_names()
    assert set(BUILTINS) <= set(names)
    assert DEFAULT_PROFILE in names
    profiles = builtin_profiles()
    for name in BUILTINS:
        assert profiles[name].name == name
        assert profiles[name].schema_version == SCHEMA_VERSION


def test_builtin_contents_match_their_promise() -> None:
    p = builtin_profiles()
    assert p["generic-pot-int8"].weight_bits == (8,) and p["generic-pot-int8"].per_channel_weights
    assert not p["strict-pot-int8"].per_channel_weights
    assert p["pot-w4a8"].weight_bits == (4, 8) and p["pot-w4a8"].activation_bits == (8,)
    assert p["pot-lowbit"].weight_bits == (2, 4, 8) and p["pot-lowbit"].activation_bits == (4, 8)
    for profile in p.values():
        assert profile.power_of_two_scales and profile.zero_point_zero and profile.bias_bits == 32
        assert "Concat" in profile.shared_scale_ops


def test_profile_is_frozen_and_hashable() -> None:
    profile = load_profile("generic-pot-int8")
    with pytest.raises(AttributeError):
        profile.weight_bits = (4,)  # type: ignore[misc]
    assert hash(profile) == hash(load_profile("generic-pot-int8"))


def test_queries() -> None:
    profile = load_profile("generic-pot-int8")
    assert profile.is_fused("Conv", "Relu")
    assert not profile.is_fused("Relu", "Conv")
    assert profile.allows_op("QuantizeLinear") and profile.allows_op("Conv")
    assert not profile.allows_op("BatchNormalization")
    assert load_profile("pot-lowbit").max_weight_bits == 8
    assert "W8 A8" in profile.summary() and "per-channel" in profile.summary()
    assert "per-tensor" in load_profile("strict-pot-int8").summary()


def test_roundtrip_through_file(tmp_path: Path) -> None:
    data = _generic_dict()
    data["name"] = "mine"
    path = _write(tmp_path, data)
    profile = load_profile(path)
    assert profile.name == "mine"
    assert profile.fused_patterns == load_profile("generic-pot-int8").fused_patterns
    assert load_profile(str(path)) == profile
    assert load_profile(profile) is profile


def test_unknown_name() -> None:
    with pytest.raises(ProfileError, match="unknown profile 'nope'") as info:
        load_profile("nope")
    assert "generic-pot-int8" in info.value.hint
    assert info.value.exit_code == EXIT_BAD_INPUT


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "absent.json")


def test_folder(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="is a folder"):
        load_profile(tmp_path)


def test_bad_json(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"schema_version": 1,}')
    with pytest.raises(ProfileError, match="not valid JSON.*line 1"):
        load_profile(path)


def test_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="not a JSON object"):
        load_profile(_write(tmp_path, [1, 2]))


@pytest.mark.parametrize("version", [3, 0, "1", None])
def test_schema_version(tmp_path: Path, version: object) -> None:
    data = _generic_dict()
    if version is None:
        del data["schema_version"]
    else:
        data["schema_version"] = version
    with pytest.raises(ProfileError, match="schema_version"):
        load_profile(_write(tmp_path, data))


def test_unknown_key(tmp_path: Path) -> None:
    data = _generic_dict()
    data["weight_bitz"] = [8]
    with pytest.raises(ProfileError, match="unknown key 'weight_bitz'") as info:
        load_profile(_write(tmp_path, data))
    assert "weight_bits" in info.value.hint


def test_missing_field(tmp_path: Path) -> None:
    data = _generic_dict()
    del data["allowed_ops"]
    with pytest.raises(ProfileError, match="lacks allowed_ops"):
        load_profile(_write(tmp_path, data))


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("weight_bits", 8, "weight_bits must be a list"),
        ("weight_bits", [8.0], "weight_bits entry must be an integer"),
        ("weight_bits", [], "weight_bits is empty"),
        ("weight_bits", [1], "outside 2..16"),
        ("weight_bits", [8, 8], "twice"),
        ("activation_bits", [True], "must be an integer"),
        ("per_channel_weights", 1, "per_channel_weights must be true or false"),
        ("power_of_two_scales", "yes", "must be true or false"),
        ("weight_signedness", ["positive"], "'positive'"),
        ("bias_bits", 64, "bias_bits 64"),
        ("name", 3, "name must be a string"),
        ("name", " ", "empty name"),
        ("allowed_ops", ["Conv", "conv"], "'conv', which is not an ONNX operator"),
        ("allowed_ops", ["Conv", "MyCustomOp"], "'MyCustomOp'"),
        ("fused_patterns", [["Conv"]], "fewer than two ops"),
        ("fused_patterns", [["Conv", "Sin"]], "'Sin', which allowed_ops does not list"),
        ("fused_patterns", [["Conv", "Rellu"]], "not an ONNX operator"),
        ("fused_patterns", ["Conv"], r"fused_patterns\[0\] must be a list"),
        ("shared_scale_ops", ["Concatenate"], "not an ONNX operator"),
        ("opset_min", 22, "above opset_max"),
        ("opset_max", 0, "positive opset"),
        ("min_output_sqnr_db", "15", "min_output_sqnr_db must be null or a number"),
        ("min_output_sqnr_db", 500, "between -100 and 200, got 500"),
        ("min_top1_agreement", 1.5, "min_top1_agreement must be null or a number between 0 and 1"),
        ("min_top1_agreement", True, "got true"),
    ],
)
def test_field_errors(tmp_path: Path, key: str, value: object, pattern: str) -> None:
    data = _generic_dict()
    data[key] = value
    with pytest.raises(ProfileError, match=pattern) as info:
        load_profile(_write(tmp_path, data))
    assert info.value.hint


def test_constructing_invalid_profile_directly_fails() -> None:
    data = _generic_dict()
    with pytest.raises(ProfileError):
        profile_from_dict({**data, "activation_signedness": []})
    fields = profile_from_dict(data).__dict__.copy()
    fields["weight_bits"] = 8
    with pytest.raises(ProfileError, match="weight_bits must be a list, got 8"):
        Profile(**fields)
    # Lists from Python callers are frozen into tuples.
    fields["weight_bits"] = [4, 8]
    fields["fused_patterns"] = [["Conv", "Relu"]]
    made = Profile(**fields)
    assert made.weight_bits == (4, 8) and made.fused_patterns == (("Conv", "Relu"),)


def test_builtins_have_floors() -> None:
    for profile in builtin_profiles().values():
        assert profile.min_output_sqnr_db is not None and profile.min_top1_agreement is not None
    p = builtin_profiles()
    # A lower-bit target cannot promise more than a wider one.
    assert p["pot-lowbit"].min_output_sqnr_db <= p["pot-w4a8"].min_output_sqnr_db <= p["generic-pot-int8"].min_output_sqnr_db


def test_null_floors_are_no_floors(tmp_path: Path) -> None:
    data = {**_generic_dict(), "min_output_sqnr_db": None, "min_top1_agreement": None}
    profile = load_profile(_write(tmp_path, data))
    assert profile.min_output_sqnr_db is None and profile.min_top1_agreement is None


def test_schema_1_files_still_load_without_floors(tmp_path: Path) -> None:
    data = _generic_dict()
    data["schema_version"] = 1
    del data["min_output_sqnr_db"], data["min_top1_agreement"]
    profile = load_profile(_write(tmp_path, data))
    assert profile.schema_version == 1 and profile.min_output_sqnr_db is None
    assert profile.to_dict() == data  # written back in its own schema
    with pytest.raises(ProfileError, match="unknown key 'min_output_sqnr_db'"):
        load_profile(_write(tmp_path, {**data, "min_output_sqnr_db": 10}))
    fields = profile.__dict__.copy()
    fields["min_top1_agreement"] = 0.5
    with pytest.raises(ProfileError, match="floors need schema_version 2"):
        Profile(**fields)


def test_schema_2_needs_the_floor_keys(tmp_path: Path) -> None:
    data = _generic_dict()
    del data["min_top1_agreement"]
    with pytest.raises(ProfileError, match="lacks min_top1_agreement"):
        load_profile(_write(tmp_path, data))
