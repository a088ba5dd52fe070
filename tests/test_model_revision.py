"""The model revision pin (`revision`, the CRD's `spec.model.revision`) reaches both engines'
loaders: transformers' `from_pretrained(..., revision=)` and vLLM's `revision` /
`tokenizer_revision`. No download: the loaders are recorded, not run."""

from __future__ import annotations

from typing import Any

import pytest
import transformers
from pydantic import ValidationError

from serve_app.config import ChatStreamConfig
from serve_app.engines import hf_loading
from serve_app.engines.vllm_options import engine_kwargs

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Loaded(Exception):
    """Raised by the recording loader: what it was called with is all the test needs."""


def _recorder(calls: list[tuple[str, dict[str, Any]]]):
    def from_pretrained(source: str, **kwargs: Any) -> Any:
        calls.append((source, kwargs))
        raise _Loaded

    return from_pretrained


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, dict[str, Any]]]:
    recorded: list[tuple[str, dict[str, Any]]] = []
    for cls in (transformers.AutoTokenizer, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", _recorder(recorded))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _recorder(recorded))
    return recorded


def test_transformers_loads_the_pinned_revision(calls):
    config = ChatStreamConfig(model="org/model", revision=COMMIT, device="cpu")
    for load in (hf_loading.load_tokenizer, hf_loading.context_length, hf_loading.load_model):
        with pytest.raises(_Loaded):
            load(config)
    assert [source for source, _ in calls] == ["org/model"] * 3
    assert all(kwargs.get("revision") == COMMIT for _, kwargs in calls)


def test_a_separate_tokenizer_is_not_given_the_models_revision(calls):
    config = ChatStreamConfig(model="org/model", tokenizer="org/tok", revision=COMMIT)
    with pytest.raises(_Loaded):
        hf_loading.load_tokenizer(config)
    assert calls == [("org/tok", {})]


def test_no_revision_means_the_default_branch(calls):
    with pytest.raises(_Loaded):
        hf_loading.load_tokenizer(ChatStreamConfig(model="org/model"))
    assert calls == [("org/model", {})]


def test_vllm_gets_the_revision_for_the_model_and_its_tokenizer():
    pinned = engine_kwargs(ChatStreamConfig(revision="v1.2"), "org/model", on_cpu=True)
    assert (pinned["revision"], pinned["tokenizer_revision"]) == ("v1.2", "v1.2")
    separate = ChatStreamConfig(tokenizer="org/tok", revision="v1.2")
    kwargs = engine_kwargs(separate, "org/model", on_cpu=True)
    assert kwargs["revision"] == "v1.2" and "tokenizer_revision" not in kwargs
    unpinned = engine_kwargs(ChatStreamConfig(), "org/model", on_cpu=True)
    assert "revision" not in unpinned and "tokenizer_revision" not in unpinned


@pytest.mark.parametrize("bad", ["main branch", "a;b", "x" * 256])
def test_a_revision_that_is_no_git_ref_is_refused(bad):
    with pytest.raises(ValidationError, match="revision"):
        ChatStreamConfig(revision=bad)
