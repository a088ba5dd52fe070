"""The vLLM engine's mappings (config -> engine args, request -> sampling params, outputs ->
chunks) and its deployment options: pure, no vLLM needed."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from serve_app.builder import model_deployment_options
from serve_app.config import ChatStreamConfig, GenerationParams
from serve_app.engines.features import unsupported_features
from serve_app.engines.vllm_options import (
    answer_chunk,
    engine_env,
    engine_kwargs,
    finish_reason,
    sampling_kwargs,
    structured_kwargs,
)
from serve_app.engines.vllm_weights import converted_dir
from serve_app.model_contract import GenerationRequest, OutputConstraint


def test_engine_args_follow_the_config() -> None:
    config = ChatStreamConfig(engine="vllm", max_ongoing_requests=12, max_context_tokens=2048)
    kwargs = engine_kwargs(config, "/m", on_cpu=True)
    assert kwargs["model"] == "/m" and kwargs["max_num_seqs"] == 12
    assert kwargs["max_model_len"] == 2048
    assert kwargs["enable_prefix_caching"] and kwargs["enable_chunked_prefill"]
    assert kwargs["enforce_eager"] is True  # CPU default
    assert engine_kwargs(config, "/m", on_cpu=False)["enforce_eager"] is False
    forced = config.model_copy(update={"enforce_eager": False})
    assert engine_kwargs(forced, "/m", on_cpu=True)["enforce_eager"] is False
    assert "max_model_len" not in engine_kwargs(ChatStreamConfig(engine="vllm"), "/m", on_cpu=True)
    tp = config.model_copy(update={"tensor_parallel_size": 2, "gpu_memory_utilization": 0.8})
    gpu = engine_kwargs(tp, "/m", on_cpu=False)
    assert gpu["tensor_parallel_size"] == 2 and gpu["distributed_executor_backend"] == "ray"
    assert gpu["gpu_memory_utilization"] == 0.8


def test_auto_dtype_on_a_cpu_follows_its_bfloat16_support() -> None:
    """`dtype=auto` on a CPU means what it means for the default engine: bfloat16 where the CPU
    multiplies it natively, else float32. vLLM's own "auto" is bfloat16 on any CPU, which on a
    CPU without AVX-512 BF16 or AMX took 4-5x as long to the first token (README)."""
    config = ChatStreamConfig(engine="vllm")
    assert engine_kwargs(config, "/m", on_cpu=True, native_bf16=False)["dtype"] == "float32"
    assert engine_kwargs(config, "/m", on_cpu=True, native_bf16=True)["dtype"] == "bfloat16"
    assert engine_kwargs(config, "/m", on_cpu=False)["dtype"] == "auto"  # vLLM's choice on GPUs
    chosen = config.model_copy(update={"dtype": "bfloat16"})
    assert engine_kwargs(chosen, "/m", on_cpu=True, native_bf16=False)["dtype"] == "bfloat16"


def test_int8_is_refused_for_vllm_by_name() -> None:
    with pytest.raises(ValueError, match="quantization='int8'"):
        engine_kwargs(ChatStreamConfig(engine="vllm", quantization="int8"), "/m", on_cpu=True)


def test_cpu_environment() -> None:
    config = ChatStreamConfig(engine="vllm", cpu_kv_cache_gib=1.5)
    assert engine_env(config, on_cpu=True, threads=2) == {
        "VLLM_CPU_KVCACHE_SPACE": "1.5",
        "OMP_NUM_THREADS": "2",
    }
    assert engine_env(ChatStreamConfig(), on_cpu=True, threads=1)["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert engine_env(config, on_cpu=False, threads=2) == {}


def test_tensor_parallel_replicas_ask_for_a_placement_group() -> None:
    single = model_deployment_options(ChatStreamConfig(engine="vllm", num_gpus=1))
    assert "placement_group_bundles" not in single
    options = model_deployment_options(
        ChatStreamConfig(engine="vllm", tensor_parallel_size=4, num_cpus=2)
    )
    assert options["placement_group_bundles"] == [{"CPU": 2.0}] + [{"GPU": 1.0}] * 4
    assert options["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0}
    assert options["placement_group_strategy"] == "STRICT_PACK"


def test_sampling_params_carry_every_control() -> None:
    request = GenerationRequest(
        [1, 2],
        GenerationParams(temperature=0.7, top_k=0, top_p=0.9, max_new_tokens=5),
        stop=("x",),
        seed=3,
        ignore_eos=True,
        min_tokens=2,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias=((7, -100.0),),
        logprobs=2,
    )
    kwargs = sampling_kwargs(request)
    assert kwargs["max_tokens"] == 5 and kwargs["seed"] == 3 and kwargs["top_k"] == 0
    assert kwargs["ignore_eos"] and kwargs["min_tokens"] == 2
    assert kwargs["presence_penalty"] == 0.5 and kwargs["frequency_penalty"] == -0.5
    assert kwargs["logit_bias"] == {7: -100.0} and kwargs["logprobs"] == 2
    assert "stop" not in kwargs  # the model deployment cuts stop strings
    plain = sampling_kwargs(GenerationRequest([1], GenerationParams()))
    assert "logprobs" not in plain and "logit_bias" not in plain
    assert structured_kwargs(GenerationRequest([1], GenerationParams())) is None
    json_object = GenerationRequest(
        [1], GenerationParams(), constraint=OutputConstraint("json_object")
    )
    assert structured_kwargs(json_object) == {"json_object": True}
    schema = GenerationRequest(
        [1], GenerationParams(), constraint=OutputConstraint("json_schema", '{"type":"object"}')
    )
    assert structured_kwargs(schema) == {"json": '{"type":"object"}'}


def test_vllm_honours_every_feature() -> None:
    request = GenerationRequest(
        [1],
        GenerationParams(),
        ignore_eos=True,
        min_tokens=1,
        presence_penalty=1.0,
        logit_bias=((1, 1.0),),
        logprobs=0,
        constraint=OutputConstraint("json_object"),
    )
    assert unsupported_features("vllm", request) == []
    assert unsupported_features("mock", request) == ["penalties", "logit_bias"]  # no logits


@dataclass
class _Logprob:
    logprob: float
    rank: int
    decoded_token: str | None


@dataclass
class _Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list | None = None


def test_outputs_become_chunks() -> None:
    completion = _Completion(
        "ab",
        [5, 6],
        "length",
        [
            {5: _Logprob(-0.1, 1, "a"), 9: _Logprob(-2.0, 2, "z")},
            {6: _Logprob(-3.0, 3, "b"), 8: _Logprob(-0.5, 1, "y"), 9: _Logprob(-1.0, 2, "z")},
        ],
    )
    chunk = answer_chunk(completion, True, 2)
    assert (chunk.text, chunk.num_tokens, chunk.token_ids) == ("ab", 2, (5, 6))
    assert chunk.finish_reason == "length"
    assert [lp.token for lp in chunk.logprobs] == ["a", "b"]
    assert chunk.logprobs[1].logprob == -3.0
    assert [t.token for t in chunk.logprobs[1].top] == ["y", "z"]  # by rank, the top 2
    assert answer_chunk(completion, False, None).finish_reason is None
    assert answer_chunk(completion, False, None).logprobs == ()
    only_chosen = answer_chunk(completion, False, 0).logprobs
    assert [lp.top for lp in only_chosen] == [(), ()]
    assert finish_reason("stop") == "stop" and finish_reason("abort") == "abort"
    assert finish_reason("error") == "abort"


def test_converted_weights_are_keyed_by_the_gguf_file(tmp_path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    first = converted_dir(gguf, tmp_path / "cache")
    assert first == converted_dir(gguf, tmp_path / "cache")
    assert first.name.startswith("m-")
    gguf.write_bytes(b"xy")  # replaced: converted again
    assert converted_dir(gguf, tmp_path / "cache") != first
