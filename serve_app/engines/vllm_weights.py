"""Weights vLLM can load: a Hugging Face id or directory as given, or a GGUF file (the embedded
SmolLM2 one included) converted once into a cache directory of safetensors.

vLLM wants Hugging Face weights; transformers reads the GGUF (de-quantized to float32) and writes
them. The conversion takes seconds, is logged, and happens once per GGUF file: later starts (and
other replicas on the node) reuse the directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

from serve_app.config import ChatStreamConfig
from serve_app.engines.hf_loading import resolve_model_source

logger = logging.getLogger(__name__)

CACHE_ENV = "CHATSTREAM_CACHE_DIR"
_COMPLETE = "chatstream-converted"  # written last: a directory without it is unfinished


def cache_root() -> Path:
    """Where converted weights go: $CHATSTREAM_CACHE_DIR, else ~/.cache/chatstream."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/chatstream").expanduser()


def converted_dir(gguf_path: Path, root: Path) -> Path:
    """The cache directory for one GGUF file, keyed by its path, size and modification time
    (a replaced file converts again)."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    return root / "vllm-weights" / f"{gguf_path.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def vllm_model_dir(config: ChatStreamConfig) -> str:
    """What vLLM's `model=` gets for `config`: the id/directory, or the GGUF's converted copy."""
    source, gguf_file = resolve_model_source(config)
    if gguf_file is None:
        return source
    gguf_path = Path(source) / gguf_file
    target = converted_dir(gguf_path, cache_root())
    if not (target / _COMPLETE).is_file():
        convert_gguf(gguf_path, target)
    return str(target)


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Write `gguf_path` as float32 safetensors plus its tokenizer into `target`.

    Written to a private temporary directory, then renamed into place: a replica that starts
    meanwhile never reads half a model (the loser of a race drops its copy).
    """
    import torch
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / _COMPLETE).is_file():
            return
        started = time.monotonic()
        logger.warning("converting %s to safetensors for vLLM in %s (once)", gguf_path, target)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        kwargs = {"gguf_file": gguf_path.name}
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), dtype=torch.float32, **kwargs
        )
        # The weights are de-quantized already: the GGUF quantization must not follow them.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs).save_pretrained(str(tmp))
        (tmp / _COMPLETE).write_text(str(gguf_path))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        logger.warning("converted %s in %.1f s", gguf_path.name, time.monotonic() - started)
