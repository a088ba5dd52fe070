"""ChatStream's config and requests in vLLM's terms, and vLLM's outputs in ChatStream's: pure
functions (no vLLM import), so the mapping is tested without the engine."""

from __future__ import annotations

from typing import Any

from serve_app.config import ChatStreamConfig
from serve_app.engines.hf_loading import cpu_dtype
from serve_app.model_contract import (
    AnswerChunk,
    FinishReason,
    GenerationRequest,
    TokenLogprob,
    TopLogprob,
)

_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length"}


def engine_kwargs(
    config: ChatStreamConfig, model_dir: str, *, on_cpu: bool, native_bf16: bool = False
) -> dict[str, Any]:
    """`AsyncEngineArgs` keywords for `config` (`model_dir`: what vllm_weights resolved;
    `native_bf16`: the CPU multiplies bfloat16 natively, see hf_loading.cpu_has_fast_bf16)."""
    if config.quantization != "none":
        # ChatStream's int8 is its own CPU path for transformers; vLLM reads a quantized
        # model's method from the model's own config.
        raise ValueError(
            f"quantization={config.quantization!r} is the transformers engine's; with "
            "engine=vllm serve a quantized model (vLLM reads its method from the model)"
        )
    kwargs: dict[str, Any] = {
        "model": model_dir,
        "tokenizer": config.tokenizer or None,
        # On a CPU, "auto" is the default engine's rule; vLLM's own would be bfloat16 on any
        # CPU, emulated (4-5x as long to the first token) where it has no native bfloat16.
        "dtype": cpu_dtype(config.dtype, native_bf16) if on_cpu else config.dtype,
        "max_num_seqs": config.max_ongoing_requests,
        # On a CPU, compiled graphs gave wrong text (../shared/notes/vllm-on-cpu.md).
        "enforce_eager": on_cpu if config.enforce_eager is None else config.enforce_eager,
        "enable_prefix_caching": True,
        "enable_chunked_prefill": True,
        # llguidance, the grammar library of the transformers engine too, and compact JSON:
        # with free whitespace a small model can loop on newlines until its budget runs out,
        # and the answer is then cut, not valid (seen in the load test's structured task).
        "structured_outputs_config": {"backend": "guidance", "disable_any_whitespace": True},
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "seed": 0,
    }
    if config.max_context_tokens:
        kwargs["max_model_len"] = config.max_context_tokens
    if config.revision:
        kwargs["revision"] = config.revision
        if not config.tokenizer:  # a separate tokenizer is another repository
            kwargs["tokenizer_revision"] = config.revision
    if config.tensor_parallel_size > 1:
        # Workers go into the replica's placement group (builder.model_deployment_options).
        kwargs["distributed_executor_backend"] = "ray"
    return kwargs


def engine_env(config: ChatStreamConfig, *, on_cpu: bool, threads: int) -> dict[str, str]:
    """Environment vLLM reads at start: the CPU KV cache size and the CPU's compute threads."""
    if not on_cpu:
        return {}
    gib = config.cpu_kv_cache_gib
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(int(gib) if float(gib).is_integer() else gib),
        "OMP_NUM_THREADS": str(threads),
    }


def sampling_kwargs(request: GenerationRequest) -> dict[str, Any]:
    """`SamplingParams` keywords for `request` (structured outputs are added by the engine).

    Stop strings stay out: the model deployment cuts them (engines/stop_strings.py), the same
    for every engine. Special tokens are skipped in text, as the other engines do.
    """
    params = request.params
    kwargs: dict[str, Any] = {
        "n": 1,
        "temperature": params.temperature,
        "top_k": params.top_k,  # 0: off, in both
        "top_p": params.top_p,
        "max_tokens": params.max_new_tokens,
        "seed": request.seed,
        "ignore_eos": request.ignore_eos,
        "min_tokens": request.min_tokens,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "skip_special_tokens": True,
    }
    if request.logit_bias:
        kwargs["logit_bias"] = dict(request.logit_bias)
    if request.logprobs is not None:
        kwargs["logprobs"] = request.logprobs
    return kwargs


def structured_kwargs(request: GenerationRequest) -> dict[str, Any] | None:
    """`StructuredOutputsParams` keywords for the request's constraint (None: none)."""
    constraint = request.constraint
    if constraint is None:
        return None
    if constraint.kind == "json_object":
        return {"json_object": True}
    return {"json": constraint.schema_json}


def finish_reason(reason: str | None) -> FinishReason:
    """vLLM's finish reason as ChatStream's (`abort` for anything but stop/length)."""
    return _FINISH_REASONS.get(reason or "", "abort")


def token_logprobs(
    token_ids: tuple[int, ...], positions: list[dict[int, Any]] | None, top: int
) -> tuple[TokenLogprob, ...]:
    """One `TokenLogprob` per generated token from vLLM's per-position {token_id: Logprob}
    (the chosen token plus the `top` most likely, each with its rank and decoded text)."""
    if positions is None:
        return ()
    result = []
    for token_id, candidates in zip(token_ids, positions, strict=True):
        chosen = candidates[token_id]
        best = sorted(candidates.items(), key=lambda item: item[1].rank)[:top]
        result.append(
            TokenLogprob(
                token_id=token_id,
                token=chosen.decoded_token or "",
                logprob=float(chosen.logprob),
                top=tuple(
                    TopLogprob(tid, lp.decoded_token or "", float(lp.logprob)) for tid, lp in best
                ),
            )
        )
    return tuple(result)


def answer_chunk(completion: Any, finished: bool, logprobs: int | None) -> AnswerChunk:
    """A DELTA `CompletionOutput` of vLLM as ChatStream's chunk."""
    token_ids = tuple(completion.token_ids)
    return AnswerChunk(
        text=completion.text,
        num_tokens=len(token_ids),
        token_ids=token_ids,
        finish_reason=finish_reason(completion.finish_reason) if finished else None,
        logprobs=token_logprobs(token_ids, completion.logprobs, logprobs or 0)
        if logprobs is not None
        else (),
    )
