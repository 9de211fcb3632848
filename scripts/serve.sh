#!/usr/bin/env bash
# One command from a fresh clone to a running service:
#   bash scripts/serve.sh
# Sets up .venv (skipped when nothing changed), then runs scripts/start.sh, which
# builds and caches the demo model on the first run, seeds the demo gallery and serves.
# Every REID_* setting (docs/service.md) passes through, e.g.
#   REID_CHECKPOINT=checkpoints/model.safetensors REID_PORT=9000 bash scripts/serve.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup-venv.sh
export PATH="$root/.venv/bin:$PATH"
export PYTHON="$root/.venv/bin/python"
exec bash scripts/start.sh "$@"
