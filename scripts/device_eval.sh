#!/usr/bin/env bash
# Run `rsd eval` ON the GPU machine from the carried .bundle (built here by scripts/device_bundle.sh).
#
#   bash scripts/device_eval.sh --suite libero_object --policy expert --no-render --workers 14 --out runs/device/obj
#
# Every argument goes to `python3 -m rsd.cli eval` unchanged (RSD_DEVICE_COMMAND=render-demos or train-policy runs
# that command instead, with the same install and GL set-up; steps 3-4 then print and copy nothing). This script
#  1. checks .bundle against its MANIFEST.json (SHA-256 of every file) and installs it once per bundle into
#     $RSD_DEVICE_DIR/<bundle_id>/site (default /tmp/rsd-device): wheels with pip --no-index, the trimmed
#     robosuite + hf-libero tree, and the WebP textures turned back into PNGs (each decoded image's pixel hash
#     and the PNG's other chunks, e.g. sRGB, must match the ones recorded here); a warm machine skips this;
#  2. --no-render: MUJOCO_GL=disabled (no GL library is loaded at all); rendered: unpacks the carried GL loader
#     .debs (dpkg -x, ldconfig) and uses MUJOCO_GL=egl on the NVIDIA EGL vendor library;
#  3. runs the eval with PYTHONPATH=<repo>:<site>, RSD_HOME=$RSD_DEVICE_DIR/home (rsd writes LIBERO's config
#     there), one BLAS/OpenMP thread per process; prints episodes/s and env steps/s of the episodes it ran;
#  4. if $OUT is set and --out lies outside it, copies episodes.jsonl, run.json, summary.json, summary.png to
#     $OUT/<basename of --out>/ (4 files per eval: the tool returns at most 8 files per call). An --out under the
#     git-ignored runs/ stays on a warm machine, so a later call can pass --resume.
# RSD_EVAL_TIME_LIMIT_S=540: interrupt the eval (SIGINT) after that many seconds so that it still writes its
# summary and step 4 still copies the results before the device call's own limit kills everything.
# Exit status: rsd eval's (1 when an episode errored); 124 when RSD_EVAL_TIME_LIMIT_S interrupted it (rerun with
# --resume); 3 when the bundle is missing or corrupt.
# Local dry run (this box, its .venv already has the wheels' packages):
#   RSD_DEVICE_PYTHON=.venv/bin/python RSD_DEVICE_SKIP_WHEELS=1 bash scripts/device_eval.sh ...
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUNDLE="${RSD_BUNDLE:-$ROOT/.bundle}"
PY="${RSD_DEVICE_PYTHON:-python3}"
BASE="${RSD_DEVICE_DIR:-/tmp/rsd-device}"
NVIDIA_EGL_VENDOR=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json

die() { printf 'device_eval.sh: error: %s\n' "$*" >&2; exit "${2:-3}"; }
[[ -f "$BUNDLE/MANIFEST.json" ]] || die "$BUNDLE/MANIFEST.json missing: build it here with \`bash scripts/device_bundle.sh\` and carry .bundle"
mkdir -p "$BASE"

# ---------------------------------------------------------------- 1. install the bundle (once per bundle id)
t0=$(date +%s.%N)
SITE="$("$PY" - "$BUNDLE" "$BASE" "$ROOT/scripts" <<'EOF'
import concurrent.futures as cf
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, sys.argv[3])  # scripts/: _png.py, shared with device_bundle.sh
from _png import png_chunks, with_chunks  # noqa: E402

bundle, base = Path(sys.argv[1]), Path(sys.argv[2])
manifest = json.loads((bundle / "MANIFEST.json").read_text())
dest = base / manifest["bundle_id"]


def log(msg):
    print(f"device_eval: {msg}", file=sys.stderr, flush=True)


if (dest / ".complete").is_file():
    log(f"bundle {manifest['bundle_id']} already installed in {dest}")
    print(dest / "site")
    sys.exit(0)

t = time.perf_counter()
for name, meta in manifest["files"].items():
    p = bundle / name
    if not p.is_file():
        log(f"{p} missing (bundle {manifest['bundle_id']}): rebuild with scripts/device_bundle.sh and carry .bundle")
        sys.exit(3)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != meta["sha256"]:
        log(f"{p} does not match MANIFEST.json (truncated copy?): rebuild/re-carry .bundle")
        sys.exit(3)
tmp = base / f"{manifest['bundle_id']}.partial"
shutil.rmtree(tmp, ignore_errors=True)
tmp.mkdir(parents=True)
site = tmp / "site"
wheels = sorted(str(bundle / n) for n in manifest["files"] if n.startswith("wheels/"))
if os.environ.get("RSD_DEVICE_SKIP_WHEELS") != "1":
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--disable-pip-version-check", "--target", str(site), *wheels],
                   check=True, stdout=sys.stderr)
with tarfile.open(bundle / "site.tar.xz") as tar:
    tar.extractall(tmp, filter="data")
with tarfile.open(bundle / "textures.tar") as tar:
    tar.extractall(tmp / "webp", filter="data")
textures = json.loads((bundle / "textures.json").read_text())


def decode(item):
    from PIL import Image

    rel, meta = item
    src = tmp / "webp" / (rel + ".webp")
    im = Image.open(src)
    im.load()
    if im.mode != meta["mode"]:  # WebP drops an all-opaque alpha channel; the pixel hash below checks the result
        im = im.convert(meta["mode"])
    if im.mode != meta["mode"] or list(im.size) != meta["size"] or \
            hashlib.sha256(im.tobytes()).hexdigest() != meta["pixels_sha256"]:
        return f"{rel}: decoded WebP differs from the PNG it was made from (mode {im.mode}, size {im.size})"
    # Pillow encodes IHDR + IDAT of a fresh image (no .info); the original's other chunks (sRGB, gAMA, iCCP,
    # pHYs, text...) go back in their places around IDAT (Pillow's pnginfo would drop pHYs and eXIf)
    buf = io.BytesIO()
    Image.frombytes(meta["mode"], im.size, im.tobytes()).save(buf, "PNG", compress_level=1)
    data = with_chunks(buf.getvalue(), meta["chunks"])
    out = site / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    check = Image.open(out)
    check.load()
    if check.mode != meta["mode"] or hashlib.sha256(check.tobytes()).hexdigest() != meta["pixels_sha256"]:
        return f"{rel}: the restored PNG does not decode to the original pixels"
    ihdr, chunks = png_chunks(data)
    if ihdr[:10].hex() != meta["ihdr_head"] or chunks != meta["chunks"]:
        return f"{rel}: restored PNG header/chunks differ from the original's"
    return None


from PIL import features  # noqa: E402

if not features.check("webp"):
    log("this Pillow has no WebP support: cannot restore the textures")
    sys.exit(3)
import multiprocessing  # noqa: E402

with cf.ProcessPoolExecutor(max_workers=min(len(textures) or 1, os.cpu_count() or 1),
                             mp_context=multiprocessing.get_context("fork")) as pool:
    errors = [e for e in pool.map(decode, sorted(textures.items())) if e]
if errors:
    log("texture check failed: " + "; ".join(errors))
    sys.exit(3)
missing = [a for a in manifest["assets"] if not (site / a).is_file()]
if missing:
    log(f"{len(missing)} asset files missing after install, e.g. {missing[:3]}")
    sys.exit(3)
shutil.rmtree(tmp / "webp")
# byte-compile once here: spawned workers then neither race to compile nor each print robosuite's SyntaxWarning
subprocess.run([sys.executable, "-W", "ignore::SyntaxWarning", "-m", "compileall", "-q", "-j", "0", str(site)],
               check=True, stdout=sys.stderr)
(tmp / ".complete").write_text(json.dumps({"bundle_id": manifest["bundle_id"], "suites": manifest["suites"]}))
shutil.rmtree(dest, ignore_errors=True)
os.replace(tmp, dest)
log(f"installed bundle {manifest['bundle_id']} ({len(wheels)} wheels, {len(manifest['assets'])} asset files, "
    f"{len(textures)} textures restored) into {dest} in {time.perf_counter() - t:.1f} s")
print(dest / "site")
EOF
)" || die "installing the bundle failed (see above)" $?

# ---------------------------------------------------------------- 2. GL: none for --no-render, EGL otherwise
RENDER=1
OUT_DIR=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --no-render) RENDER=0 ;;
        --render) RENDER=1 ;;
        --out) OUT_DIR="${args[i+1]:-}" ;;
        --out=*) OUT_DIR="${args[i]#--out=}" ;;
    esac
done
if [[ $RENDER == 0 ]]; then
    export MUJOCO_GL=disabled
    unset PYOPENGL_PLATFORM
else
    if ! ldconfig -p 2>/dev/null | grep 'libEGL.so.1' >/dev/null; then  # (grep -q would SIGPIPE ldconfig)
        for f in "$BUNDLE"/gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
    fi
    export MUJOCO_GL=egl PYOPENGL_PLATFORM=egl
    if [[ -f "$NVIDIA_EGL_VENDOR" ]]; then export __EGL_VENDOR_LIBRARY_FILENAMES="$NVIDIA_EGL_VENDOR"; fi
fi

# ---------------------------------------------------------------- 3. the eval (or RSD_DEVICE_COMMAND)
COMMAND="${RSD_DEVICE_COMMAND:-eval}"
if [[ "$COMMAND" != eval ]]; then OUT_DIR=""; fi  # only an eval's --out holds results to report and copy
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export RSD_HOME="${RSD_HOME:-$BASE/home}" PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
t1=$(date +%s.%N)
before=0
if [[ -n "$OUT_DIR" && -f "$OUT_DIR/episodes.jsonl" ]]; then before=$(wc -l < "$OUT_DIR/episodes.jsonl"); fi
echo "device_eval: $(nproc --all) cores, $(nvidia-smi -L 2>/dev/null | head -1 || echo 'no GPU'), MUJOCO_GL=$MUJOCO_GL," \
     "set-up $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}') s; rsd $COMMAND $*"
rc=0
if [[ -n "${RSD_EVAL_TIME_LIMIT_S:-}" ]]; then
    # SIGINT at the limit: rsd eval stops its workers, writes the summary of what finished (exit 0, "rerun with
    # --resume"), and step 4 still copies the results; so a call never ends killed with nothing copied
    timeout --signal=INT --kill-after=60 "$RSD_EVAL_TIME_LIMIT_S" "$PY" -m rsd.cli "$COMMAND" "$@" || rc=$?
else
    "$PY" -m rsd.cli "$COMMAND" "$@" || rc=$?
fi
t2=$(date +%s.%N)

# ---------------------------------------------------------------- 4. throughput and results
if [[ -n "$OUT_DIR" && -f "$OUT_DIR/episodes.jsonl" ]]; then
    "$PY" - "$OUT_DIR/episodes.jsonl" "$before" "$(awk -v a="$t1" -v b="$t2" 'BEGIN {print b - a}')" <<'EOF'
import json, sys
lines = open(sys.argv[1]).read().splitlines()[int(sys.argv[2]):]
recs = [json.loads(x) for x in lines if x.strip()]
wall = float(sys.argv[3])
steps = sum(r["steps"] for r in recs)
ok = sum(r["success"] for r in recs)
errs = sum(r["error"] is not None for r in recs)
print(f"device_eval: {len(recs)} new episodes ({ok} successes, {errs} errors) in {wall:.1f} s wall = "
      f"{len(recs) / wall:.3f} episodes/s, {steps / wall:.0f} policy steps/s (settle steps not counted)")
EOF
fi
if [[ -n "$OUT_DIR" && -d "$OUT_DIR" && -n "${OUT:-}" ]]; then
    out_real="$(realpath -m "$OUT_DIR")"
    if [[ "$out_real" == "$(realpath -m "$OUT")"/* ]]; then
        rm -f "$OUT_DIR/.lock"  # the eval is over; keeps the files that come back to 4 per eval
    else
        dest="$OUT/$(basename "$out_real")"
        mkdir -p "$dest"
        for f in episodes.jsonl run.json summary.json summary.png; do
            if [[ -f "$OUT_DIR/$f" ]]; then cp "$OUT_DIR/$f" "$dest/"; fi
        done
        echo "device_eval: copied results to $dest"
    fi
fi
echo "device_eval: rsd $COMMAND exited $rc after $(awk -v a="$t1" -v b="$t2" 'BEGIN {printf "%.1f", b - a}') s"
exit $rc
