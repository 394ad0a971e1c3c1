#!/usr/bin/env bash
# Queues of `rsd eval`s ON the GPU machine, in parallel lanes that outlive the device call that starts them, so that
# later calls only watch and collect (a device call lasts at most 10 minutes; a 500-episode rendered suite may not).
#
#   bash scripts/device_lanes.sh start LANEFILE...  one lane per file, started detached (setsid); a file holds one
#                                                   eval per line, "[VAR=value ...] ARGS" (ARGS go to
#                                                   `device_pixel.sh eval`, with --resume added); a lane runs its
#                                                   lines in turn; '#' lines are comments
#   bash scripts/device_lanes.sh watch SECONDS      print each eval's progress every 30 s until every lane is done
#                                                   or SECONDS have passed
#   bash scripts/device_lanes.sh stop               end every lane (SIGINT: each eval writes its summary)
#   bash scripts/device_lanes.sh collect            $OUT/lanes.tar: every eval's episodes.jsonl, run.json, summary.*,
#                                                   and the lane logs (the device tool returns at most 8 files)
#
# State (lane logs, pids, done markers) lives in $RSD_LANES_DIR (default /tmp/rsd-lanes); an eval's --out should lie
# under the repo's git-ignored runs/ so that it stays on a warm machine and a restarted lane resumes it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STATE="${RSD_LANES_DIR:-/tmp/rsd-lanes}"
step="${1:?usage: device_lanes.sh start LANEFILE... | watch SECONDS | stop | collect}"
shift

outs() { grep -v '^\s*#' "$STATE"/*.lane 2>/dev/null | grep -o -- '--out [^ ]*' | awk '{print $2}' || true; }

case "$step" in
    start)
        mkdir -p "$STATE"
        for lane in "$@"; do
            name="$(basename "${lane%.*}")"
            cp "$lane" "$STATE/$name.lane"
            rm -f "$STATE/$name.done"
            # each line: leading VAR=value words become the eval's environment, the rest its arguments
            setsid bash -c '
                state="$1"; name="$2"
                while IFS= read -r line || [[ -n "$line" ]]; do
                    [[ -z "${line// }" || "$line" == \#* ]] && continue
                    echo "=== $(date +%T) $line"
                    read -r -a words <<< "$line"
                    vars=()
                    while [[ ${#words[@]} -gt 0 && "${words[0]}" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do
                        vars+=("${words[0]}"); words=("${words[@]:1}")
                    done
                    env "${vars[@]}" bash scripts/device_pixel.sh eval "${words[@]}" --resume 2>&1 \
                        | sed -u "s/^/[$name] /" || true
                done < "$state/$name.lane"
                touch "$state/$name.done"' _ "$STATE" "$name" \
                > "$STATE/$name.log" 2>&1 < /dev/null &
            echo "$!" > "$STATE/$name.pid"
            echo "device_lanes: started lane $name (pid $!): $(grep -cv -e '^\s*#' -e '^\s*$' "$lane") evals"
        done
        ;;
    watch)
        limit="${1:?watch SECONDS}"
        t0=$(date +%s)
        while :; do
            line="$(date +%T)"
            for out in $(outs); do
                n=0; ok=0
                if [[ -f "$out/episodes.jsonl" ]]; then
                    n=$(wc -l < "$out/episodes.jsonl")
                    ok=$(grep -c '"success": true' "$out/episodes.jsonl" || true)
                fi
                line+=" | $(basename "$out") $ok/$n"
            done
            echo "$line"
            all=1
            for lane in "$STATE"/*.lane; do [[ -f "${lane%.lane}.done" ]] || all=0; done
            if [[ $all == 1 ]]; then echo "device_lanes: every lane is done"; break; fi
            if (( $(date +%s) - t0 + 30 > limit )); then echo "device_lanes: still running after ${limit} s"; break; fi
            sleep 30
        done
        ;;
    stop)
        for pidf in "$STATE"/*.pid; do
            pkill -INT -s "$(cat "$pidf")" 2>/dev/null || true
        done
        ;;
    collect)
        : "${OUT:?collect writes to \$OUT}"
        files=()
        for out in $(outs); do
            for f in episodes.jsonl run.json summary.json summary.png; do
                if [[ -f "$out/$f" ]]; then files+=("$out/$f"); fi
            done
        done
        tar -cf "$OUT/lanes.tar" "${files[@]}" -C "$STATE" $(cd "$STATE" && ls *.log *.lane)
        echo "device_lanes: collected ${#files[@]} result files and the lane logs into \$OUT/lanes.tar"
        ;;
    *)
        echo "device_lanes.sh: unknown step $step (start, watch, stop, collect)" >&2
        exit 2
        ;;
esac
