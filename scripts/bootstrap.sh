#!/usr/bin/env bash
# Creates .venv from uv.lock (torch 2.11 + torchaudio 2.11, ray[serve], bitsandbytes, chatterbox-tts without its
# torch==2.6/gradio pins: see [tool.uv] override-dependencies in pyproject.toml). Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v uv >/dev/null 2>&1; then
  UV=uv
else
  if [ ! -x .tools/bin/uv ]; then
    echo ">> installing uv into .tools/ (no uv on PATH)"
    python3 -m venv .tools
    .tools/bin/pip install -q 'uv>=0.9,<0.10'
  fi
  UV=.tools/bin/uv
fi
PY=${PYTHON:-$(command -v python3.11 || command -v python3.12 || command -v python3)}
echo ">> uv sync (first run downloads torch with CUDA, ~3 GB)"
"$UV" sync --frozen --python "$PY"
# resemble-perth's watermarker silently becomes None when pkg_resources is missing: fail loudly instead.
.venv/bin/python - <<'PY'
import warnings
warnings.filterwarnings("ignore")
import perth
assert perth.PerthImplicitWatermarker is not None, "perth watermarker unavailable: setuptools<81 is required"
PY
touch .venv/.bootstrapped
