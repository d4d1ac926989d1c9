"""Application settings: defaults, overridden by environment variables and then by CLI flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from core.builtin import BUILTIN_PREFIX, DEFAULT_BUILTIN

ENV_PREFIX = "LORASTUDIO_"


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=lambda: Path("lorastudio_data"))
    models_path: Path | None = None  # default: data_dir/models
    db_url: str | None = None  # default: a SQLite file in data_dir
    artifact_url: str = ""  # fsspec URL shared by every host (s3://..., file://...); empty: artifacts_dir alone
    base_model: str = f"{BUILTIN_PREFIX}{DEFAULT_BUILTIN}"
    base_model_config: str | None = None  # diffusers folder giving the configs of a single-file checkpoint
    device: str = "auto"
    dtype: str = "auto"
    host: str = "127.0.0.1"
    port: int = 7860
    auth: str | None = None  # "user:password"
    share: bool = False
    worker_id: str | None = None
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 5.0
    poll_seconds: float = 0.5

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.data_dir / 'catalog.db').resolve()}"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def models_dir(self) -> Path:
        return self.models_path or self.data_dir / "models"

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        if f"{ENV_PREFIX}HOME" in env:
            values["data_dir"] = Path(env[f"{ENV_PREFIX}HOME"]).expanduser()
        if f"{ENV_PREFIX}MODELS" in env:
            values["models_path"] = Path(env[f"{ENV_PREFIX}MODELS"]).expanduser()
        simple = {"DB_URL": "db_url", "ARTIFACT_URL": "artifact_url", "BASE_MODEL": "base_model",
                  "BASE_MODEL_CONFIG": "base_model_config", "DEVICE": "device", "DTYPE": "dtype", "HOST": "host",
                  "AUTH": "auth", "WORKER_ID": "worker_id"}
        for key, attr in simple.items():
            if f"{ENV_PREFIX}{key}" in env:
                values[attr] = env[f"{ENV_PREFIX}{key}"]
        numbers = (("PORT", "port", int), ("LEASE_SECONDS", "lease_seconds", float),
                   ("HEARTBEAT_SECONDS", "heartbeat_seconds", float), ("POLL_SECONDS", "poll_seconds", float))
        for key, attr, conv in numbers:
            if f"{ENV_PREFIX}{key}" in env:
                try:
                    values[attr] = conv(env[f"{ENV_PREFIX}{key}"])
                except ValueError:
                    raise ValueError(f"{ENV_PREFIX}{key} must be a number, got {env[ENV_PREFIX + key]!r}") from None
        return cls(**values)  # type: ignore[arg-type]


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """``"user:pass"`` → ``("user", "pass")``; a clear error for anything else."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("auth must look like 'user:password' (both parts non-empty)")
    return user, password
