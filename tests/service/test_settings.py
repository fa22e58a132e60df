"""Configuration precedence (arguments > OOD_ environment > config file > defaults), validation, API keys, CLI,
and the entry point: ``--host``/``--port``/``--config`` reach uvicorn and the app, settings read at app creation."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import uvicorn
from pydantic import ValidationError

import service.__main__ as entry
from service.__main__ import parse_args
from service.api.auth import ApiKeys
from service.app import create_app
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


def test_unreadable_keys_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="OOD_API_KEYS_FILE"):
        ApiKeys.from_settings(load_settings(api_keys_file=tmp_path / "missing"))


def test_keys_of_any_length_compare_without_error() -> None:
    keys = ApiKeys(["short", "a-much-longer-key-" * 8])
    assert keys.matches("short") and keys.matches("a-much-longer-key-" * 8)
    assert not keys.matches("shor") and not keys.matches("x" * 500) and not keys.matches("ключ")


def test_app_reads_the_environment_when_created_not_when_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("from-file\n")
    env = {
        "OOD_STATE_DIR": str(tmp_path / "states"),
        "OOD_DEVICE": "cpu",
        "OOD_MAX_BATCH_SIZE": "7",
        "OOD_MAX_IMAGES_PER_REQUEST": "3",
        "OOD_MAX_PIXELS": "4096",
        "OOD_MAX_BODY_MB": "0.5",
        "OOD_API_KEYS": "k1,k2",
        "OOD_API_KEYS_FILE": str(keys_file),
        "OOD_REQUIRE_AUTH_FOR_READ": "true",
        "OOD_LOG_JSON": "true",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    services = create_app().state.services  # service.app was imported long before these variables existed
    s = services.settings
    assert (s.state_dir, s.device, s.max_batch_size) == (tmp_path / "states", "cpu", 7)
    assert (s.max_images_per_request, s.max_pixels, s.max_body_bytes) == (3, 4096, 512 * 1024)
    assert s.require_auth_for_read and s.log_json
    assert all(services.keys.matches(k) for k in ("k1", "k2", "from-file")) and not services.keys.matches("k3")
    monkeypatch.setenv("OOD_MAX_BATCH_SIZE", "9")
    assert create_app().state.context.settings.max_batch_size == 9


def test_entry_point_passes_host_port_and_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(f"state_dir: {tmp_path / 'states'}\nmax_batch_size: 3\napi_keys: file-key\nlog_json: true\n")
    served: dict[str, object] = {}

    class FakeServer:
        started = True
        startup_failure = None

        def __init__(self, config: uvicorn.Config, catalog: object) -> None:
            served.update(app=config.app, host=config.host, port=config.port, config=config, catalog=catalog)

        def run(self) -> None:
            pass

    monkeypatch.setattr(entry, "StartupWatchingServer", FakeServer)
    monkeypatch.setattr(entry.signal, "signal", lambda *args: None)  # keep pytest's own SIGTERM handling
    entry.main(["--host", "0.0.0.0", "--port", "9123", "--config", str(config)])
    assert (served["host"], served["port"]) == ("0.0.0.0", 9123)
    uvicorn_config = served["config"]
    assert isinstance(uvicorn_config, uvicorn.Config) and uvicorn_config.server_header is False
    assert uvicorn_config.http.__name__ == "GuardedHttpToolsProtocol"  # type: ignore[union-attr]
    settings = served["app"].state.context.settings  # type: ignore[attr-defined]
    assert served["catalog"] is served["app"].state.context.catalog  # type: ignore[attr-defined]  # watched
    assert settings.max_batch_size == 3 and settings.state_dir == tmp_path / "states"
    assert served["app"].state.services.keys.matches("file-key")  # type: ignore[attr-defined]
    monkeypatch.setenv("OOD_CONFIG", str(config))  # the same file through the environment
    monkeypatch.setenv("OOD_PORT", "9124")
    entry.main([])
    assert served["port"] == 9124 and served["app"].state.context.settings.max_batch_size == 3  # type: ignore[attr-defined]


def test_ood_serve_console_script_is_the_entry_point() -> None:
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("ood-serve") == "service.__main__:main"


def test_entry_point_reports_a_bad_configuration_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(entry, "StartupWatchingServer", lambda *args, **kwargs: pytest.fail("must not serve"))
    with pytest.raises(SystemExit, match="invalid configuration.*missing.yaml"):
        entry.main(["--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_batch_size: 0\n")
    with pytest.raises(SystemExit, match="max_batch_size"):
        entry.main(["--config", str(bad)])


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_entry_point_makes_openmp_wait_passively_unless_told_otherwise(given: str | None, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, service.__main__; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
