"""Start-up and logs in-process: ready only after models, states and the warm-up batch; a generated API key when
none is configured; JSON log lines carrying the request id, also from work done in worker threads. And the first
hour through the real entry point: ``--help`` / ``--version``, broken configs stop with one line, the README's curl
upload, ``/metrics`` with the standard collectors behind a key."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from ood_core.detector import EnergyBased
from ood_core.state import save_detector
from service.app import create_app
from service.context import ServiceContext
from service.settings import Settings
from tests.service.conftest import API_KEY, AUTH, ROOT, AppRunner, digit_png, subprocess_server

pytestmark = pytest.mark.timeout(120)
STATE = {"Content-Type": "application/octet-stream"}


def test_ready_only_after_models_states_and_warm_up(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    load_model = ServiceContext._load_model

    def held_load(self: ServiceContext, config):  # type: ignore[no-untyped-def]
        release.wait(60)
        return load_model(self, config)

    monkeypatch.setattr(ServiceContext, "_load_model", held_load)
    app = create_app(make_settings())

    async def scenario() -> tuple[list[httpx.Response], httpx.Response, str]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
                paths = ("/healthz", "/readyz", "/v1/models", "/v1/models/digits/score")
                early = [await client.get(p) for p in paths[:3]]
                early.append(await client.post(paths[3], files=[("files", ("d.png", digit_png(0)))]))
                release.set()
                await app.state.context.wait_ready(120)
                return early, await client.get("/readyz"), (await client.get("/metrics")).text

    early, ready, metrics = asyncio.run(scenario())
    assert early[0].status_code == 200  # alive while starting
    for response in early[1:]:
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.headers["content-type"].startswith("application/problem+json")
    assert ready.status_code == 200 and ready.json()["models"] == ["digits", "digits-seg"]
    # no request was scored, yet each model already ran a full warm-up batch through its batcher
    for model in ("digits", "digits-seg"):
        match = re.search(rf'^ood_batch_size_sum{{model="{model}"}} (\S+)$', metrics, flags=re.M)
        assert match and float(match.group(1)) == 32.0


def test_generated_key_is_logged_once_and_guards_writes(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="service.auth"):
        runner = AppRunner(make_settings(api_keys=None))
    try:
        records = [r for r in caplog.records if hasattr(r, "api_key")]
        generated = [r.api_key for r in records]  # type: ignore[attr-defined]
        assert len(generated) == 1 and len(generated[0]) >= 32 and generated[0] in records[0].getMessage()
        url = "/v1/models/digits/detectors/guarded"
        data = save_detector(EnergyBased())
        assert runner.put(url, content=data, headers=STATE).status_code == 401
        assert runner.put(url, content=data, headers={**STATE, **AUTH}).status_code == 403  # the test key is not set
        key = {"Authorization": f"Bearer {generated[0]}"}
        assert runner.put(url, content=data, headers={**STATE, **key}).status_code == 201
        assert runner.delete(url, headers=key).status_code == 204
    finally:
        runner.close()


class _Lines(logging.Handler):
    """Formats records with the service's own (configured) formatter and keeps the lines."""

    def __init__(self, formatter: logging.Formatter | None) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_json_logs_carry_the_request_id(make_settings: Callable[..., Settings]) -> None:
    runner = AppRunner(make_settings(log_json=True))
    service_logger = logging.getLogger("service")
    lines = _Lines(service_logger.handlers[0].formatter)
    service_logger.addHandler(lines)
    try:
        headers = {**AUTH, **STATE, "X-Request-ID": "req-42"}
        put = runner.put("/v1/models/digits/detectors/logged", content=save_detector(EnergyBased()), headers=headers)
        assert put.status_code == 201 and put.headers["x-request-id"] == "req-42"
        generated = runner.get("/v1/models/nope")
    finally:
        service_logger.removeHandler(lines)
        runner.close()
    entries = [json.loads(line) for line in lines.lines]  # every line is one JSON object
    mine = [e for e in entries if e.get("request_id") == "req-42"]
    access = [e for e in mine if e["logger"] == "service.access"]
    assert len(access) == 1
    assert access[0]["status"] == 201 and access[0]["route"] == "/v1/models/{model}/detectors/{name}"
    assert access[0]["method"] == "PUT" and access[0]["duration_ms"] >= 0 and access[0]["level"] == "INFO"
    # logged from the thread pool that validated and stored the state: same request id
    assert any(e["message"] == "detector installed" and e["detector"] == "logged" for e in mine)
    other = [e for e in entries if e.get("request_id") == generated.headers["x-request-id"]]
    assert [e["status"] for e in other if e["logger"] == "service.access"] == [404]


# --- the first hour, through the real entry point (``python -m service``) -------------------------------------


def _ood_serve(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    variables = {k: v for k, v in os.environ.items() if not k.startswith("OOD_")}
    variables.update(env or {})
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "1", *args]
    return subprocess.run(command, cwd=ROOT, env=variables, capture_output=True, text=True, timeout=timeout)


def _shown(default: object) -> str:
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "true" if default else "false"
    return json.dumps(default) if isinstance(default, list) else str(default)


def test_help_lists_every_setting_with_its_variable_and_default_without_importing_torch() -> None:
    out = _ood_serve("--help")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("  ") and "OOD_" in line}
    for name, field in Settings.model_fields.items():
        assert name in rows, f"--help does not list {name}"
        default = _shown(field.get_default(call_default_factory=True))
        assert rows[name].split() == [name, f"OOD_{name.upper()}", "default:", default], rows[name]
    assert rows["max_batch_size"].endswith("default: 32") and rows["device"].endswith("default: unset")
    assert rows["require_auth_for_read"].endswith("default: false")
    assert "--config" in out.stdout and "OOD_CONFIG" in out.stdout
    code = "import sys, service.__main__ as m; m.parse_args(['--host', 'h']); print('torch' in sys.modules)"
    probe = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "False", probe.stderr  # --help / --version answer at once


def test_version_prints_the_package_version() -> None:
    out = _ood_serve("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"ood-serve {version('ood-serve')}"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("max_batch_size: 4\n  oops: [\n", r"config file \S+bad\.yaml is not valid YAML at line 2, column 7: "),
        ("max_bach_size: 4\n", r"max_bach_size: unknown setting \(did you mean 'max_batch_size'\?\)"),
        (
            "models:\n  - {name: m, architecture: resnet18, num_classes: 2, input_size: 8, nodes: {logits: fc},"
            " wieghts: /w.safetensors}\n",
            r"models\[0\]\.wieghts: unknown key \(did you mean 'weights'\?\)",
        ),
        (
            "models:\n  - {name: m, architecture: resnet18, num_classes: 2, input_size: 8, nodes: {logits: fc},"
            " weights: /nowhere/m.safetensors}\n",
            r"models\[0\]\.weights \(model 'm'\): no such file: /nowhere/m\.safetensors",
        ),
        ("max_wait_ms: soon\n", r"max_wait_ms \(OOD_MAX_WAIT_MS\): Input should be a valid number.*\(got 'soon'\)"),
    ],
    ids=["bad-yaml", "misspelt-key", "misspelt-nested-key", "missing-weights", "bad-value"],
)
def test_a_broken_config_file_stops_with_one_line(tmp_path: Path, config: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(config)
    started = time.monotonic()
    out = _ood_serve("--config", str(path), env={"OOD_STATE_DIR": str(tmp_path / "states")})
    assert out.returncode == 1
    assert out.stdout == "" and "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ood-serve: invalid configuration"), out.stderr
    assert re.search(expected, lines[0]), lines[0]
    assert time.monotonic() - started < 60  # it never started serving


def test_a_model_that_fails_to_build_stops_the_process_instead_of_answering_503(tmp_path: Path) -> None:
    weights = tmp_path / "m.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(weights))
    path = tmp_path / "models.yaml"
    path.write_text(
        f"models:\n  - {{name: m, architecture: resnet999, num_classes: 2, input_size: 8, nodes: {{logits: fc}},"
        f" weights: {weights}}}\nstate_dir: {tmp_path / 'states'}\napi_keys: k\nlog_json: true\n"
    )
    out = _ood_serve("--config", str(path), "--port", "0")
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.splitlines()[-1] == (
        "ood-serve: start-up failed: NetworkConfigError: torchvision has no architecture 'resnet999' "
        "(see torchvision.models.list_models())"
    )


@pytest.fixture(scope="module")
def guarded_server(demo_state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m service`` with the demo and ``OOD_REQUIRE_AUTH_FOR_READ=true``."""
    folder = tmp_path_factory.mktemp("guarded")
    shutil.copytree(demo_state_dir, folder / "states")
    with subprocess_server(folder / "states", folder / "server.log", OOD_REQUIRE_AUTH_FOR_READ="true") as (url, _):
        yield url


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_readme_curl_upload_works_as_written(guarded_server: str, tmp_path: Path) -> None:
    base = f"{guarded_server}/v1/models/digits/detectors"
    state = httpx.get(f"{base}/mahalanobis", headers=AUTH, timeout=30).content
    (tmp_path / "mahalanobis.safetensors").write_bytes(state)
    readme = (ROOT / "README.md").read_text()  # the service section's upload, as written
    (written,) = re.findall(r"^curl -s -X PUT .*?\\\n.*?(?=\s+#|$)", readme, flags=re.M)
    command = written.replace("localhost:8000", guarded_server.removeprefix("http://"))
    assert "--data-binary @mahalanobis.safetensors" in command and "Content-Type" not in command  # curl's default
    env = {**os.environ, "KEY": API_KEY}
    out = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    answer = json.loads(out.stdout)
    assert answer["name"] == "my-mahalanobis" and answer["version"] == 1, answer
    assert answer["sha256"] == hashlib.sha256(state).hexdigest()
    assert httpx.get(f"{base}/my-mahalanobis", headers=AUTH, timeout=30).content == state  # byte-identical
    form = {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}
    assert httpx.put(f"{base}/my-mahalanobis", content=b"a=1&b=2", headers=form, timeout=30).status_code == 422
    assert (
        httpx.get(f"{base}/my-mahalanobis", headers=AUTH, timeout=30).content == state
    )  # a bad upload changed nothing


def test_metrics_carry_the_process_and_python_collectors_and_need_the_key_when_reads_do(guarded_server: str) -> None:
    assert httpx.get(f"{guarded_server}/metrics", timeout=30).status_code == 401
    text = httpx.get(f"{guarded_server}/metrics", headers=AUTH, timeout=30).text
    values = {line.split(" ")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] not in "#"}
    assert values["process_resident_memory_bytes"] > 50e6  # a service with torch loaded
    assert values["process_cpu_seconds_total"] > 0 and values["process_open_fds"] >= 3
    assert values["process_start_time_seconds"] < time.time()
    python = sys.version_info
    assert f'python_info{{implementation="CPython",major="{python.major}",minor="{python.minor}"' in text
    assert values['python_gc_objects_collected_total{generation="0"}'] >= 0
    assert any(name.startswith("ood_http_requests_total{") for name in values)  # the service's own families stay
