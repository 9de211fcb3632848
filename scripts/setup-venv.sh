#!/usr/bin/env bash
# Create .venv and install the project into it, editable.
#   bash scripts/setup-venv.sh        runtime dependencies only
#   bash scripts/setup-venv.sh dev    plus the test dependencies
# The install is skipped when pyproject.toml has not changed since the last one
# (a stamp file inside the venv records its hash), so a second run takes a second.
set -euo pipefail

extras="${1:-}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${REID_VENV:-$root/.venv}"
python="${PYTHON3:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating virtual environment in $venv"
    "$python" -m venv "$venv"
fi

target="$root"
stamp="$venv/.reid-install"
if [ -n "$extras" ]; then
    target="${root}[${extras}]"
    stamp="$venv/.reid-install-$extras"
fi

wanted="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    exit 0
fi

echo "setup: installing the project${extras:+ with its [$extras] extras} into $venv (first run takes a few minutes)"
"$venv/bin/python" -m pip install --quiet --editable "$target"
echo "$wanted" > "$stamp"
