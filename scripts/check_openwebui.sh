#!/usr/bin/env bash
# Open WebUI 0.12.4 itself against ChatStream: a chat typed into its page in Chromium gets the
# model's answer, with Open WebUI's default settings (checks/openwebui_chat.py does the run).
#   bash scripts/check_openwebui.sh                  the embedded SmolLM2 (transformers engine)
#   bash scripts/check_openwebui.sh --engine mock    the mock engine: the protocol only, faster
# Open WebUI gets a venv of its own, outside the repository (about 3 GB, made once, ~10 min):
# $OPENWEBUI_VENV, default ~/.cache/chatstream/openwebui-venv. torch 2.13.0 goes in first, so
# that Open WebUI's dependencies cannot pull a multi-GB CUDA build of torch.
# Needs the project's venv (bash scripts/setup.sh --test: Playwright, Debian's Chromium).
# Writes test-artifacts/openwebui/: report.json, requests.json, logs, screenshots.
set -euo pipefail
cd "$(dirname "$0")/.."

OPENWEBUI_VERSION=0.12.4
venv=${OPENWEBUI_VENV:-$HOME/.cache/chatstream/openwebui-venv}
project_python=${CHATSTREAM_PYTHON:-.venv/bin/python}

if [[ ! -x "$project_python" ]]; then
  echo "no project venv at $project_python: run 'bash scripts/setup.sh --test' first" \
       "(or set CHATSTREAM_PYTHON to a python with the project's test extra)" >&2
  exit 2
fi

# The marker is written only after a complete install, so an interrupted one is redone.
marker="$venv/.chatstream-open-webui-$OPENWEBUI_VERSION"
if [[ ! -f "$marker" ]]; then
  python=${PYTHON:-python3.11}
  command -v "$python" >/dev/null || python=python3
  echo "==> making Open WebUI's venv at $venv (once; about 3 GB)"
  "$python" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  echo "==> installing torch 2.13.0 first (pinned: a looser spec pulls a multi-GB CUDA build)"
  "${pip[@]}" torch==2.13.0
  echo "==> installing open-webui==$OPENWEBUI_VERSION"
  "${pip[@]}" "open-webui==$OPENWEBUI_VERSION"
  touch "$marker"
fi

exec timeout --signal=INT --kill-after=60 "${CHECK_TIMEOUT_S:-1500}" \
  "$project_python" checks/openwebui_chat.py --openwebui "$venv/bin/open-webui" "$@"
