"""Service configuration: pydantic-settings with the ``OOD_`` prefix plus an optional YAML/JSON file.

Precedence (highest first): arguments to :func:`load_settings`, environment variables (``OOD_...``), the config
file (``--config`` or ``OOD_CONFIG``), defaults. Nothing is read at import; :func:`load_settings` reads when the
app is created. With no ``models`` configured the embedded digits demo is served.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from service.config_file import ConfigFileError, read_config_file
from service.model_config import (
    Autocast,
    HeadsConfig,
    ModelConfig,
    NodesConfig,
    PreprocessConfig,
    Size,
    repeated_layer,
)
from service.names import NAME_MAX_LENGTH, NAME_PATTERN, NAME_REGEX, check_name, is_valid_name

__all__ = [  # the names and model configs live in their own modules; imported from here too
    "NAME_MAX_LENGTH",
    "NAME_PATTERN",
    "NAME_REGEX",
    "Autocast",
    "ConfigFileError",
    "HeadsConfig",
    "ModelConfig",
    "NodesConfig",
    "PreprocessConfig",
    "Settings",
    "Size",
    "check_name",
    "default_state_dir",
    "is_valid_name",
    "load_settings",
    "read_config_file",
    "repeated_layer",
]


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "ood-serve" / "states"


_FILE_VALUES: ContextVar[dict[str, Any] | None] = ContextVar("ood_config_file_values", default=None)


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Values from the YAML/JSON config file chosen in :func:`load_settings`."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return (_FILE_VALUES.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_VALUES.get() or {})  # unknown keys fail validation (extra="forbid"): typos are errors


class Settings(BaseSettings):
    """Every knob of the service (environment: ``OOD_<NAME>``)."""

    model_config = SettingsConfigDict(env_prefix="OOD_", extra="forbid", use_attribute_docstrings=True)

    models: list[ModelConfig] = Field(default_factory=list)
    """Served networks; empty: the embedded digits demo."""
    state_dir: Path = Field(default_factory=default_state_dir)
    """Detector states, fit jobs and upload spools (``$XDG_STATE_HOME/ood-serve/states`` by default)."""
    device: str | None = None
    """``cuda``, ``cuda:1``, ``cpu``...; default CUDA when present."""
    autocast: Autocast = False
    """Forward in reduced precision: ``bfloat16`` / ``float16``, ``true`` (float16 on CUDA, bfloat16 on CPU) or
    ``false``; the detectors always get float32 outputs."""
    channels_last: bool = True
    """Run 4-D (convolutional) networks in ``channels_last`` memory format (faster with oneDNN and tensor cores)."""
    cudnn_benchmark: bool = True
    """CUDA: let cuDNN pick the fastest kernels per shape (batches are padded to a few sizes, all warmed up)."""
    compile: bool = False
    """``torch.compile`` the feature extractor (dynamic batch size), compiled and warmed up before ``/readyz``."""
    max_batch_size: int = Field(default=32, gt=0)
    """Images per model forward (the batcher pads to a few sizes up to this)."""
    max_wait_ms: float = Field(default=0.0, ge=0)
    """0 (adaptive): a batch starts at once when the worker is idle and takes what queued while it was busy; > 0:
    an idle worker also waits up to this long after the oldest item for a fuller batch."""
    workers: int = Field(default=1, gt=0)
    """uvicorn worker processes (``ood-serve``), each with its own models and batchers, in sync through the state
    directory."""
    intra_op_threads: int = Field(default=0, ge=0)
    """CPU: PyTorch threads per operator in each model's batch worker; 0: measured on a full batch at warm-up, one
    unless torch's default is at least 1.25x faster (small networks run as fast on one)."""
    max_queue: int = Field(default=1024, gt=0)
    """Images waiting per model; a request that does not fit gets 429 (``Retry-After``)."""
    request_timeout_s: float = Field(default=30.0, gt=0)
    """A request whose images wait longer than this in the queue gets 504."""
    api_keys: str | None = None
    """Comma-separated API keys (``Authorization: Bearer KEY``)."""
    api_keys_file: Path | None = None
    """File with one API key per line (blank lines and ``#`` comments ignored)."""
    require_auth_for_read: bool = False
    """Reads (scoring, listings, ``/metrics``) need an API key too; the schema and docs pages are then not served."""
    max_body_mb: float = Field(default=32.0, gt=0)
    """Request bodies (images, fits); detector state uploads have their own limit, ``max_state_mb``."""
    max_state_mb: float = Field(default=1024.0, gt=0)
    """Detector state uploads (``PUT``): a KNN state holds its whole ID feature bank (50,000 x 512 is 100 MB)."""
    max_images_per_request: int = Field(default=64, gt=0)
    """Images in one ``/score`` or ``/segment`` request (413 beyond)."""
    max_pixels: int = Field(default=25_000_000, gt=0)
    """Refuse an image whose header announces more pixels than this, before decoding it."""
    max_map_pixels: int = Field(default=2048 * 2048, gt=0)
    """Pixels of one segmentation map in an answer (``?size=``; the default size is the model's input size)."""
    max_response_mb: float = Field(default=64.0, gt=0)
    """Estimated size of one ``/segment`` answer, refused with 413 before any work when over."""
    max_fit_images: int = Field(default=5000, gt=0)
    """Images per ``/fit`` request sent as ``files`` parts or JSON ``instances`` (archives: no count limit)."""
    fit_calibration_share: float = Field(default=0.1, gt=0, lt=1)
    """Default share of a fit job's ID images held out for calibration (stratified by class)."""
    max_fit_upload_mb: float = Field(default=10240.0, gt=0)
    """Body of a fit job (an archive or a safetensors of outputs), spooled to the state volume while it arrives."""
    fit_data_root: Path | None = None
    """Folder whose sub-paths a fit job may name as ``{"source": "relative/path"}`` (unset: refused)."""
    max_queued_fit_jobs: int = Field(default=4, ge=0)
    """Fit jobs waiting per model behind its running one; more are refused with 429."""
    keep_jobs: int = Field(default=100, ge=1)
    """Finished fit jobs kept listed (their records in ``<state_dir>/.jobs/``)."""
    state_keep: int = Field(default=3, ge=1)
    """Versions of each detector state kept on disk (the active one included), for ``.../rollback``."""
    max_connections: int = Field(default=512, gt=0)
    """Open HTTP connections; past it a new one gets a 503 and is closed at once (keeps file descriptors free)."""
    header_timeout_s: float = Field(default=10.0, gt=0)
    """Time for a request's line and headers to arrive, from their first byte (408 and close otherwise)."""
    max_header_bytes: int = Field(default=32 * 1024, gt=0)
    """Bytes of a request's line and headers (431 beyond)."""
    max_headers: int = Field(default=100, gt=0)
    """Headers of one request (431 beyond)."""
    keep_alive_s: float = Field(default=5.0, gt=0)
    """An idle keep-alive connection is closed after this long."""
    body_grace_s: float = Field(default=15.0, gt=0)
    """Seconds a body may take whatever its size (see ``body_min_rate_kib_s``)."""
    body_min_rate_kib_s: float = Field(default=256.0, gt=0)
    """A body must arrive within ``body_grace_s + size / body_min_rate_kib_s`` of the request's start (408)."""
    auth_failures_per_minute: int = Field(default=30, gt=0)
    """Failed authentications per client address and minute before its requests get 429 (``Retry-After``)."""
    state_sync_s: float = Field(default=10.0, ge=0)
    """Seconds between syncs with the state directory, which other replicas may write too (0: no sync)."""
    drift_window: int = Field(default=1000, gt=0, le=100_000)
    """Last scored images per model and detector whose p-values the drift tests look at (``/drift``)."""
    drift_alpha: float = Field(default=0.01, gt=0, lt=1)
    """A detector is ``drifting`` when one of its drift tests' p-values is below this."""
    drift_refresh_s: float = Field(default=1.0, ge=0)
    """The drift tests are recomputed at most this often while images arrive (0: at every reading)."""
    log_level: str = "INFO"
    """``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``."""
    log_json: bool = True
    """One JSON object per log line (``false``: plain text)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _ConfigFileSource(settings_cls), file_secret_settings

    @model_validator(mode="after")
    def _unique_models(self) -> Settings:
        names = [m.name for m in self.models]
        if len(names) != len(set(names)):
            raise ValueError(f"model names must be unique, got {names}")
        return self

    @model_validator(mode="after")
    def _images_fit_queue(self) -> Settings:
        if self.max_images_per_request > self.max_queue:
            raise ValueError(
                f"max_images_per_request ({self.max_images_per_request}) must not exceed max_queue ({self.max_queue}): "
                "such a request could never be admitted"
            )
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_response_bytes(self) -> int:
        return int(self.max_response_mb * 1024 * 1024)

    @property
    def max_state_bytes(self) -> int:
        return int(self.max_state_mb * 1024 * 1024)

    @property
    def max_fit_upload_bytes(self) -> int:
        return int(self.max_fit_upload_mb * 1024 * 1024)


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build :class:`Settings` from ``overrides``, the environment and the config file (``OOD_CONFIG`` if
    ``config_file`` is not given)."""
    path = config_file if config_file is not None else os.environ.get("OOD_CONFIG") or None
    token = _FILE_VALUES.set(read_config_file(path) if path else {})
    try:
        return Settings(**overrides)
    finally:
        _FILE_VALUES.reset(token)
