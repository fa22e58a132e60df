"""Configuration precedence (arguments > OOD_ environment > config file > defaults), validation, API keys, CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.__main__ import parse_args
from service.auth import ApiKeys
from service.errors import AuthenticationRequiredError, ForbiddenError
from service.settings import load_settings


def test_environment_overrides_file_and_arguments_override_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max_batch_size": 4, "max_wait_ms": 9, "log_level": "DEBUG"}))
    monkeypatch.setenv("OOD_CONFIG", str(path))
    monkeypatch.setenv("OOD_MAX_WAIT_MS", "2.5")
    settings = load_settings(log_level="WARNING")
    assert (settings.max_batch_size, settings.max_wait_ms, settings.log_level) == (4, 2.5, "WARNING")
    monkeypatch.delenv("OOD_CONFIG")
    assert load_settings().max_batch_size == 32  # read when called, not at import


def test_yaml_models_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "models:\n  - {name: ../evil, architecture: resnet18, num_classes: 2, input_size: 8, nodes: {logits: fc}}\n"
    )
    with pytest.raises(ValidationError, match="invalid model name"):
        load_settings(path)
    path.write_text(
        "models:\n  - {name: ok, architecture: r, num_classes: 2, labels: [a], input_size: 8, nodes: {logits: fc}}\n"
    )
    with pytest.raises(ValidationError, match="1 labels given for 2 classes"):
        load_settings(path)
    path.write_text("unknown_knob: 1\n")
    with pytest.raises(ValidationError, match="unknown_knob"):
        load_settings(path)


def test_limits_must_be_consistent() -> None:
    with pytest.raises(ValidationError, match="max_queue"):
        load_settings(max_images_per_request=10, max_queue=5)


def test_api_keys_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# ops\nfile-key\n\n")
    monkeypatch.setenv("OOD_API_KEYS", "a-key, b-key")
    monkeypatch.setenv("OOD_API_KEYS_FILE", str(keys_file))
    keys = ApiKeys.from_settings(load_settings())
    assert keys.matches("a-key") and keys.matches("b-key") and keys.matches("file-key")
    assert not keys.matches("a-ke") and not keys.matches("")
    keys.check("Bearer file-key")
    with pytest.raises(AuthenticationRequiredError):
        keys.check(None)
    with pytest.raises(ForbiddenError):
        keys.check("Bearer x")


def test_a_key_is_generated_and_logged_once_when_none_is_configured(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service.auth"):
        keys = ApiKeys.from_settings(load_settings())
    generated = [r for r in caplog.records if getattr(r, "api_key", None)]
    assert len(generated) == 1
    key = generated[0].api_key  # type: ignore[attr-defined]
    assert len(key) >= 32 and keys.matches(key)


def test_cli_arguments() -> None:
    args = parse_args(["--host", "0.0.0.0", "--port", "9000", "--config", "x.yaml"])
    assert (args.host, args.port, args.config) == ("0.0.0.0", 9000, "x.yaml")
