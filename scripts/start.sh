#!/usr/bin/env bash
# Start the service with the python on PATH (or $PYTHON). This is also the container's CMD.
#
# With REID_CHECKPOINT set, serve that checkpoint. Without it, build the demo once
# (a synthetic Market-1501 folder and a small HA-CNN trained on it) into
# ${REID_DEMO_DIR:-$REID_DATA_DIR/demo}, seed the gallery with the demo's test identities
# and serve the demo model. Extra arguments for `python -m training demo` come from
# REID_DEMO_ARGS (e.g. "--identities 16 --epochs 1").
set -euo pipefail

python="${PYTHON:-python}"

# An empty REID_* variable (docker compose writes FOO: ${FOO:-}) means "not set":
# drop it so that the service falls back to its default instead of reading "".
for name in $(compgen -e | grep '^REID_' || true); do
    if [ -z "${!name}" ]; then
        unset "$name"
    fi
done

data_dir="${REID_DATA_DIR:-data}"

if [ -z "${REID_CHECKPOINT:-}" ]; then
    demo_dir="${REID_DEMO_DIR:-$data_dir/demo}"
    checkpoint="$demo_dir/model.safetensors"
    if [ ! -f "$checkpoint" ] || [ ! -d "$demo_dir/data/bounding_box_test" ]; then
        if [ -e "$demo_dir" ] && [ -n "$(ls -A "$demo_dir")" ]; then
            echo "start: $demo_dir exists but holds no complete demo; move it away or set REID_DEMO_DIR" >&2
            exit 1
        fi
        # Build beside the target and rename when done, so an interrupted build
        # never looks finished; a leftover from an interrupted one is rebuilt.
        partial="$demo_dir.partial"
        rm -rf "$partial"
        mkdir -p "$(dirname "$demo_dir")"
        echo "start: building the demo model into $demo_dir (first run only; a few minutes)"
        # In the background so that a SIGTERM (docker stop) reaches the build too.
        # shellcheck disable=SC2086  # REID_DEMO_ARGS is a list of words on purpose
        "$python" -m training demo --out "$partial" ${REID_DEMO_ARGS:-} &
        build=$!
        trap 'kill -TERM "$build" 2> /dev/null; wait "$build"; exit 143' TERM INT
        wait "$build"
        trap - TERM INT
        if [ -e "$demo_dir" ]; then
            rmdir "$demo_dir"
        fi
        mv "$partial" "$demo_dir"
    fi
    export REID_CHECKPOINT="$checkpoint"
    "$python" -m service import "$demo_dir/data/bounding_box_test" --if-empty
fi

host="${REID_HOST:-127.0.0.1}"
port="${REID_PORT:-8000}"
shown_host="$host"
if [ "$host" = "0.0.0.0" ] || [ "$host" = "::" ]; then
    shown_host="localhost"
fi
echo "start: serving $REID_CHECKPOINT; open http://$shown_host:$port/ once it reports ready"
exec "$python" -m service --checkpoint "$REID_CHECKPOINT"
