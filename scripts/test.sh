#!/usr/bin/env bash
# Run the test suite from a fresh clone:
#   bash scripts/test.sh [pytest arguments]
# Installs the Debian packages the tests drive when they are missing (Chromium and
# ChromeDriver for the page test, promtool, docker-compose and nginx for the packaging
# test, PostgreSQL's server binaries for the store and replica tests, which start a
# throw-away cluster of their own), sets up .venv with the dev extras, then runs pytest.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
command -v promtool > /dev/null || missing+=(prometheus)
command -v docker-compose > /dev/null || missing+=(docker-compose)
[ -x /usr/sbin/nginx ] || missing+=(nginx)
compgen -G '/usr/lib/postgresql/*/bin/initdb' > /dev/null || missing+=(postgresql)

if [ "${#missing[@]}" -gt 0 ]; then
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo > /dev/null; then
            echo "test: need root (or sudo) to install: ${missing[*]}" >&2
            exit 1
        fi
        sudo=(sudo)
    fi
    echo "test: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" < /dev/null
fi

bash scripts/setup-venv.sh dev
exec "$root/.venv/bin/python" -m pytest "$@"
