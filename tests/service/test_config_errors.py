"""Configuration mistakes described in one line (``service.config_errors``): misspelt keys with their closest known
key at any depth, bad values with their place and variable, unparsable files, and missing files named by key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config_errors import ConfigPathError, check_paths, describe_config_error
from service.settings import ConfigFileError, NodesConfig, load_settings, read_config_file

MODEL = "{name: m, architecture: resnet18, num_classes: 2, input_size: 8, nodes: {logits: fc}"


def _error(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises((ValidationError, ConfigFileError)) as caught:
        load_settings(path)
    message = describe_config_error(caught.value)
    assert "\n" not in message
    return message


def test_misspelt_keys_name_the_closest_known_key_at_every_depth(tmp_path: Path) -> None:
    message = _error(
        tmp_path,
        f"state_dri: /x\nmodels:\n  - {MODEL}, preprocessing: {{mode: L, men: [0.5], std: [1]}}}}\n",
    )
    assert "state_dri: unknown setting (did you mean 'state_dir'?)" in message
    assert "models[0].preprocessing.men: unknown key (did you mean 'mean'?)" in message


def test_an_unknown_key_without_a_close_match_lists_the_known_ones(tmp_path: Path) -> None:
    model = MODEL.replace("nodes: {logits: fc}", "nodes: {logits: fc, zzz: 1}")
    message = _error(tmp_path, f"models:\n  - {model}}}\n")
    known = ", ".join(NodesConfig.model_fields)  # logits, features, feature_maps, ...
    assert message == f"models[0].nodes.zzz: unknown key (known keys: {known})"


def test_bad_values_say_where_which_variable_and_what_was_given(tmp_path: Path) -> None:
    message = _error(tmp_path, "max_batch_size: 0\nmodels:\n  - {name: m, architecture: r, num_classes: 2}\n")
    assert "max_batch_size (OOD_MAX_BATCH_SIZE): Input should be greater than 0 (got 0)" in message
    assert "models[0].input_size: required, missing" in message
    assert "models[0].nodes: required, missing" in message
    labels = _error(tmp_path, "models:\n  - " + MODEL + ", labels: [a]}\n")
    assert labels == "models[0]: 1 labels given for 2 classes"  # a model-level check, without pydantic's prefix


def test_an_environment_value_is_named_by_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OOD_AUTOCAST", "maybe")
    with pytest.raises(ValidationError) as caught:
        load_settings()
    message = describe_config_error(caught.value)
    assert message.startswith("autocast (OOD_AUTOCAST): Input should be a valid boolean")
    assert "or Input should be 'bfloat16' or 'float16' (got 'maybe')" in message  # both branches of the union


def test_unparsable_or_unreadable_files_say_where(tmp_path: Path) -> None:
    bad_json = tmp_path / "c.json"
    bad_json.write_text('{"max_batch_size": 4,\n "x": }')
    with pytest.raises(ConfigFileError, match=r"c\.json is not valid JSON: Expecting value: line 2 column 7"):
        read_config_file(bad_json)
    with pytest.raises(ConfigFileError, match=r"cannot read config file \S+missing\.yaml: No such file or directory"):
        read_config_file(tmp_path / "missing.yaml")
    assert _error(tmp_path, "- 1\n- 2\n").endswith("must hold a mapping at the top level")
    tabbed = _error(tmp_path, "a:\n\tb: 1\n")
    assert "is not valid YAML at line 2, column 1: found character '\\t' that cannot start any token" in tabbed


def test_missing_paths_are_named_by_their_config_key(tmp_path: Path) -> None:
    weights = tmp_path / "ok.safetensors"
    weights.write_bytes(b"x")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"models:\n  - {MODEL}, weights: {weights}}}\n  - {MODEL.replace('name: m', 'name: n')}, weights: {tmp_path}}}\n"
    )
    settings = load_settings(config, api_keys_file=tmp_path / "keys", fit_data_root=weights)
    with pytest.raises(ConfigPathError) as caught:
        check_paths(settings)
    assert str(caught.value) == (
        f"models[1].weights (model 'n'): not a file: {tmp_path}; "
        f"api_keys_file (OOD_API_KEYS_FILE): no such file: {tmp_path / 'keys'}; "
        f"fit_data_root (OOD_FIT_DATA_ROOT): not a folder: {weights}"
    )
    (tmp_path / "keys").write_text("k\n")
    config.write_text(f"models:\n  - {MODEL}, weights: {weights}}}\n")
    check_paths(load_settings(config, api_keys_file=tmp_path / "keys", fit_data_root=tmp_path))  # all there
