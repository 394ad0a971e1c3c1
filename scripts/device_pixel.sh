#!/usr/bin/env bash
# The pixel policy's pipeline ON the GPU machine, in device calls that each carry at most 64 MiB (docs/pixel-policy.md):
#
#   bash scripts/device_pixel.sh stash DIR...          copy carried .bundle pieces and demo files to $RSD_PIXEL_DIR
#                                                      (default /tmp/rsd-pixel): bundle/ and demos/ (*.xz unpacked;
#                                                      NAME.part-* appended to bundle/NAME in the order stashed: a file
#                                                      split with `split -b 16M NAME NAME.part-` over several calls)
#   bash scripts/device_pixel.sh render [ARGS]         rsd render-demos on every demos/*.hdf5 (all cores, EGL),
#                                                      fixture poses from demos/fixtures.json; resumable
#   bash scripts/device_pixel.sh train OUT [ARGS]      rsd train-policy --backbone pixel on every demos/*.hdf5
#                                                      (their views files), on CUDA
#   bash scripts/device_pixel.sh eval [ARGS]           rsd eval (scripts/device_eval.sh) with the stashed bundle
#
# A warm machine keeps $RSD_PIXEL_DIR between calls (30 s idle), so the calls chain: stash (textures + part of the
# demos), stash (the rest) + render, train, eval. Everything runs through scripts/device_eval.sh (bundle install,
# EGL set-up, PYTHONPATH, one thread per process).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DIR="${RSD_PIXEL_DIR:-/tmp/rsd-pixel}"
export RSD_BUNDLE="$DIR/bundle"
step="${1:?usage: device_pixel.sh stash|render|train|eval ...}"
shift

demo_files() { ls "$DIR"/demos/*.hdf5 | grep -v '\.views[0-9]*\.hdf5$'; }

case "$step" in
    stash)
        mkdir -p "$DIR/bundle" "$DIR/demos"
        for src in "$@"; do
            for f in "$src"/*; do
                case "$f" in
                    *.hdf5.xz) xz -dc "$f" > "$DIR/demos/$(basename "${f%.xz}")" ;;
                    *.hdf5) cp "$f" "$DIR/demos/" ;;
                    */fixtures.json) cp "$f" "$DIR/demos/" ;;
                    *.part-*) cat "$f" >> "$DIR/bundle/$(basename "${f%.part-*}")" ;;  # split -b pieces, in order
                    *) cp -r "$f" "$DIR/bundle/" ;;
                esac
            done
        done
        echo "device_pixel: stashed: $(ls "$DIR/bundle" | tr '\n' ' ')| demos: $(ls "$DIR/demos" | tr '\n' ' ')"
        ;;
    render)
        RSD_DEVICE_COMMAND=render-demos bash scripts/device_eval.sh --demos $(demo_files) \
            --fixtures "$DIR/demos/fixtures.json" --workers "$(nproc)" --no-progress "$@"
        ;;
    train)
        out="${1:?train OUT [ARGS]}"
        shift
        RSD_DEVICE_COMMAND=train-policy bash scripts/device_eval.sh --backbone pixel --demos $(demo_files) \
            --out "$out" --no-progress "$@"
        ;;
    eval)
        bash scripts/device_eval.sh "$@"
        ;;
    *)
        echo "device_pixel.sh: unknown step $step (stash, render, train, eval)" >&2
        exit 2
        ;;
esac
