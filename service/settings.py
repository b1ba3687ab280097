"""Service settings: every option of ``lma serve`` also comes from the environment.

The environment names are the field names upper-cased with the ``LMA_SERVE_`` prefix; ``lma
serve`` sets them for its workers, and ``uvicorn service.main:app`` reads the same ones:

==============================  =======================================================  =========
variable                        meaning                                                  default
==============================  =======================================================  =========
``LMA_SERVE_MODELS``            bundle folders or model repositories, comma-separated    (none)
``LMA_SERVE_MODEL_REPOSITORY``  one more model repository (Triton / TF Serving layout)   (none)
``LMA_SERVE_BACKEND``           ``onnxruntime`` or ``torch``                              onnxruntime
``LMA_SERVE_DEVICE``            ``cpu``, ``cuda``, ``cuda:N`` or ``auto``                 cpu
``LMA_SERVE_HOST``              address to bind (``lma serve`` only)                     127.0.0.1
``LMA_SERVE_PORT``              port to bind (``lma serve`` only)                        8000
``LMA_SERVE_WORKERS``           worker processes, each loading every model              1
``LMA_SERVE_THREADS``           intra-op threads of each model (0: the library default)  0
``LMA_SERVE_WEIGHTS``           ``mmap``: weights mapped from weights.safetensors (pages  mmap
                                shared by workers); ``private``: read into each worker's
                                own memory (RSS = the whole weights per worker)
``LMA_SERVE_MAX_BATCH_ROWS``    rows per model call; larger requests are split           1024
``LMA_SERVE_MAX_WAIT_MS``       how long a batch waits for more rows (0: see below)      0
``LMA_SERVE_MAX_QUEUE_ROWS``    rows waiting per model before 503 + Retry-After          65536
``LMA_SERVE_TIMEOUT_MS``        default request deadline (504 past it)                   1000
``LMA_SERVE_MAX_BODY_BYTES``    request body limit (413), counted on the streamed body   16 MiB
``LMA_SERVE_MAX_ROWS``          rows (instances, candidates, tensor rows) per request    10000
``LMA_SERVE_MAX_STRING_BYTES``  longest categorical value accepted                       1024
``LMA_SERVE_IGNORE_UNKNOWN``    ignore unknown field names instead of answering 422      false
``LMA_SERVE_VERIFY_CHECKSUMS``  check every bundle file's sha256 at load                  true
``LMA_SERVE_WARMUP_ROWS``       rows of the warm-up batch run before readiness           64
``REDIS_URL``                   Redis for the feature store, prediction cache and reload  (none)
                                messages (``redis://``, ``rediss://`` for TLS, password
                                in the URL); also ``LMA_SERVE_REDIS_URL``
``LMA_SERVE_FEATURE_PROJECT``   feature-store key namespace (``lma features load          (schema)
                                --project``); default: each model's schema name
``LMA_SERVE_FEATURE_TIMEOUT_MS``
                                longest wait for one feature-store call; never past      50
                                the request's own deadline
``LMA_SERVE_FEATURES_REQUIRED`` 503 instead of a warning when the store cannot answer    false
                                a request naming entities
``LMA_ADMIN_TOKEN``             bearer token of the admin routes (reload, load, unload);  (off)
                                without it those routes answer 404
``LMA_SERVE_CACHE_TTL_S``       prediction cache in Redis: seconds an entry lives; 0 off   0
``LMA_SERVE_CACHE_TIMEOUT_MS``  longest wait for one cache call (capped by the deadline)  20
``LMA_SERVE_WATCH_INTERVAL_S``  poll the model folders for new versions every S s; 0 off  0
``LMA_SERVE_RELOAD_CHANNEL``    Redis pub/sub channel of reload messages (every replica   (off)
                                subscribed reloads the named model), e.g. ``lma:reload:v1``
``LMA_ORT_NATIVE_OPS``          onnxruntime on the CPU: the ai.lma nodes on the native    auto
                                ops library (``lma.ort_ops``): ``auto`` where it builds,
                                ``1`` required, ``0`` never (their ONNX functions)
``LMA_ORT_OPS_DIR``             where that library is built / found (prebuilt images)     (cache)
==============================  =======================================================  =========

With ``LMA_SERVE_MAX_WAIT_MS=0`` a request adds no wait of its own: batches form from the requests
that arrived while the model was busy with the previous batch (under load they grow by themselves).
A positive wait trades that much latency at low load for larger batches.

A request may set its own deadline with the ``X-Timeout-Ms`` header (v1 and v2) or the v2
request parameter ``timeout_ms``; it is capped at ``LMA_SERVE_TIMEOUT_MS`` * 10.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lma.bundle import DEFAULT_WEIGHTS

Backend = Literal["onnxruntime", "torch"]


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LMA_SERVE_", extra="ignore")

    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    model_repository: str | None = None
    backend: Backend = "onnxruntime"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    threads: int = Field(0, ge=0)
    weights: Literal["private", "mmap"] = DEFAULT_WEIGHTS  # lma.bundle.WEIGHT_MODES
    max_batch_rows: int = Field(1024, ge=1)
    max_wait_ms: float = Field(0.0, ge=0)
    max_queue_rows: int = Field(65536, ge=1)
    timeout_ms: float = Field(1000.0, gt=0)
    max_body_bytes: int = Field(16 << 20, ge=1)
    max_rows: int = Field(10000, ge=1)
    max_string_bytes: int = Field(1024, ge=1)
    ignore_unknown: bool = False
    verify_checksums: bool = True
    warmup_rows: int = Field(64, ge=1)
    # The conventional name first (compose, k8s and `lma features` use REDIS_URL); it may hold a
    # password, so it is a secret too.
    redis_url: SecretStr | None = Field(
        None, validation_alias=AliasChoices("REDIS_URL", "LMA_SERVE_REDIS_URL", "redis_url"))
    # The feature store (service.feature_store); None: each model's schema name, as `lma
    # features load` defaults to.
    feature_project: str | None = None
    feature_timeout_ms: float = Field(50.0, gt=0)
    features_required: bool = False
    # Not LMA_SERVE_-prefixed: a secret, kept apart from the options `lma serve` passes on.
    admin_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("LMA_ADMIN_TOKEN", "admin_token"))

    # Online state beyond the feature store (service.cache, service.reload); all off by default.
    cache_ttl_s: float = Field(0.0, ge=0)
    cache_timeout_ms: float = Field(20.0, gt=0)
    watch_interval_s: float = Field(0.0, ge=0)
    reload_channel: str = ""

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, v: object) -> object:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("feature_project")
    @classmethod
    def _check_project(cls, v: str | None) -> str | None:
        if v is not None and (not v or ":" in v):
            raise ValueError(f"feature_project must be non-empty without ':', got {v!r}")
        return v

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v not in ("cpu", "auto") and not (v == "cuda" or v.startswith("cuda:")):
            raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {v!r}")
        return v

    @model_validator(mode="after")
    def _need_models(self) -> ServeSettings:
        if not self.models and not self.model_repository:
            raise ValueError(
                "no model to serve: set LMA_SERVE_MODELS (bundle folders or model repositories, "
                "comma-separated) or LMA_SERVE_MODEL_REPOSITORY, or pass them to `lma serve`"
            )
        return self

    @model_validator(mode="after")
    def _redis_features_need_redis(self) -> ServeSettings:
        for on, what in ((self.cache_ttl_s > 0, "LMA_SERVE_CACHE_TTL_S > 0 (prediction cache)"),
                         (bool(self.reload_channel), "LMA_SERVE_RELOAD_CHANNEL (reload messages)")):
            if on and self.redis_url is None:
                raise ValueError(f"{what} needs REDIS_URL (or LMA_SERVE_REDIS_URL)")
        return self

    def model_paths(self) -> list[str]:
        return [*self.models, *([self.model_repository] if self.model_repository else [])]
