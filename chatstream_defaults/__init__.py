"""Defaults and formulas shared by the Serve application and the operator: one definition each.

Standard library only: the operator image installs this package beside `chatstream_operator`
without Ray, torch or transformers, and the serve image beside `serve_app`. Users set these
through `serve run serve_app:app key=value` (serve_app/config.py) or a ChatStream's spec (the
operator's `spec.DEFAULTS`, which the CRD's `default:` values must equal; a test checks both).
"""

from __future__ import annotations

from collections.abc import Mapping

# --- concurrency -------------------------------------------------------------------------------
# Generations at once per model replica (ChatStream's num_of_concurrent_executions).
MAX_ONGOING_REQUESTS = 32
# Requests waiting per ingress replica (max_queue_size); beyond it 429.
MAX_QUEUED_REQUESTS = 64
# Ongoing requests per model replica that autoscaling aims for (3/4 of the slots).
TARGET_ONGOING_REQUESTS = 24
INGRESS_REPLICAS = 1
# CPUs reserved per ingress replica (it mostly waits on the network and the model).
INGRESS_NUM_CPUS = 0.5
RETRY_AFTER_SEC = 1
STREAM_INTERVAL_MS = 0

# --- Ray Serve's throughput-optimized mode (Ray 2.56+) ----------------------------------------
# User code runs on each replica's own event loop (no thread hop per streamed item), replicas
# stream to each other over gRPC, request logs are buffered and the garbage collector frozen
# after start. Here it cut the stack's CPU per streamed token by a third at 8 and 16 streams
# and by 40 % at one (README, Performance). Every Ray process must see these, so they are
# environment variables, set where Ray starts unless already set (a variable set to 0 turns its
# part off). Direct ingress stays off: without Serve's proxy a client that leaves while its
# request waits for a slot is not noticed until the first chunk (outcome accounting needs it);
# replica logs stay on stderr (the mode would send them to files only).
RAY_SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_LOG_TO_STDERR": "1",
}

# --- generation defaults -----------------------------------------------------------------------
TEMPERATURE = 0.7
TOP_K = 50
TOP_P = 0.9
MAX_NEW_TOKENS = 256
# MB per model replica of sessions' KV caches kept between turns (transformers engine): 8
# conversations of ~2,800 tokens of SmolLM2-135M in bfloat16 (23,040 bytes a token).
PREFIX_CACHE_MB = 512

# --- sessions ----------------------------------------------------------------------------------
SESSION_STORE = "ray"
SESSION_COOKIE_NAME = "chatstream_session"
SESSION_TTL_SEC = 86400
SESSION_MAX_TURNS = 50
COOKIE_SECURE = False

# --- engines ---------------------------------------------------------------------------------
ENGINE = "transformers"
# vLLM (engine=vllm): the share of each GPU it may take, the GPUs one replica spans, and the
# KV cache on a CPU (VLLM_CPU_KVCACHE_SPACE; 2 GiB held 93,184 tokens of SmolLM2-135M here).
VLLM_GPU_MEMORY_UTILIZATION = 0.9
VLLM_TENSOR_PARALLEL_SIZE = 1
VLLM_CPU_KV_CACHE_GIB = 2.0

# --- mock engine -------------------------------------------------------------------------------
MOCK_MODE = "echo"

# --- draining: how long a replica that goes (scale-down, upgrade) may take ---------------------
# The longest answer the service allows is FIRST_TOKEN + max_new_tokens x TIME_PER_TOKEN.
DRAIN_FIRST_TOKEN_SEC = 10.0
DRAIN_TIME_PER_TOKEN_SEC = 0.25
DRAIN_POD_IDLE_TIMEOUT_SEC = 60
# Serve checks a draining replica every twentieth of its bound, within these limits.
MIN_WAIT_LOOP_S, MAX_WAIT_LOOP_S = 0.1, 2.0


def answer_seconds(
    max_new_tokens: int,
    first_token_sec: float = DRAIN_FIRST_TOKEN_SEC,
    time_per_token_sec: float = DRAIN_TIME_PER_TOKEN_SEC,
) -> float:
    """The longest answer: a model replica's graceful_shutdown_timeout_s (the ingress: twice)."""
    return round(first_token_sec + max_new_tokens * time_per_token_sec, 3)


def wait_loop_seconds(bound_s: float) -> float:
    """graceful_shutdown_wait_loop_s for a drain bound: a twentieth of it, 0.1 s to 2 s."""
    return round(min(MAX_WAIT_LOOP_S, max(MIN_WAIT_LOOP_S, bound_s / 20)), 2)


def ray_serve_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of RAY_SERVE_ENV that `environ` does not set already."""
    return {key: value for key, value in RAY_SERVE_ENV.items() if key not in environ}


# --- images ------------------------------------------------------------------------------------
# Registry-qualified: a bare name (`chatstream-serve:0.1.0`) resolves through each container
# runtime's own search list (CRI-O and Podman may ask another registry first, or refuse it).
# The chart's values and the CRD's default equal these (tests/helm/test_images.py checks).
IMAGE_REGISTRY = "docker.io/chatstream"
# The images' tag: the project's version (pyproject.toml) and the chart's appVersion.
IMAGE_TAG = "0.1.0"
OPERATOR_IMAGE_REPOSITORY = f"{IMAGE_REGISTRY}/chatstream-operator"  # Dockerfile.operator
SERVE_IMAGE_REPOSITORY = f"{IMAGE_REGISTRY}/chatstream-serve"  # Dockerfile.serve
VLLM_IMAGE_REPOSITORY = f"{IMAGE_REGISTRY}/chatstream-serve-vllm"  # Dockerfile.vllm (engine vllm)
# A ChatStream's spec.image by default, and the image `engine: vllm` needs instead.
SERVE_IMAGE = f"{SERVE_IMAGE_REPOSITORY}:{IMAGE_TAG}"
VLLM_IMAGE = f"{VLLM_IMAGE_REPOSITORY}:{IMAGE_TAG}"
