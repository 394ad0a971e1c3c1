"""Versions, torch devices, the LIBERO install and the headless rendering backend in use.

Examples:
  rsd info                 human-readable report
  rsd info --json          the same as JSON
  rsd info --check         exit 1 unless LIBERO is set up and a headless renderer works (used by setup.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from typing import Any

import rsd
from rsd.errors import RendererUnavailableError, SimSetupError

HELP = "versions, devices and the headless rendering backend in use"

# distribution name -> label shown
_PACKAGES: tuple[tuple[str, str], ...] = (
    ("torch", "torch"), ("transformers", "transformers"), ("numpy", "numpy"), ("einops", "einops"),
    ("safetensors", "safetensors"), ("mujoco", "mujoco"), ("robosuite", "robosuite"), ("bddl", "bddl"),
    ("hf-libero", "libero (hf-libero)"), ("pillow", "pillow"),
)
NOT_INSTALLED = "not installed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless LIBERO is set up and a headless renderer renders")
    parser.add_argument("--reprobe", action="store_true",
                        help="probe the GL backends again instead of using the cached choice in $RSD_HOME")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "rsd": rsd.__version__}
    for dist, label in _PACKAGES:
        try:
            out[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[label] = NOT_INSTALLED
    return out


def _devices() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"torch": NOT_INSTALLED}
    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "cuda_version": torch.version.cuda,
                            "num_threads": torch.get_num_threads()}
    if info["cuda_available"]:
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        info["devices"] = ["cpu"]
    return info


def _libero() -> dict[str, Any]:
    from rsd.sim import setup as sim_setup

    try:
        root = sim_setup.libero_package_root()
        config_dir = sim_setup.ensure_libero_config()  # checks the assets too
    except SimSetupError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, "package": str(root), "assets": str((root / "assets").resolve()),
            "config": str(config_dir / "config.yaml")}


def _renderer(reprobe: bool) -> dict[str, Any]:
    from rsd.sim import setup as sim_setup

    try:
        chosen = sim_setup.describe_renderer(use_cache=not reprobe)  # a preset MUJOCO_GL is probed there
    except RendererUnavailableError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": chosen.ok, "backend": chosen.backend, "source": chosen.source, "gl_vendor": chosen.vendor,
            "gl_renderer": chosen.renderer, "gl_version": chosen.version, "error": chosen.error,
            "MUJOCO_GL": os.environ.get("MUJOCO_GL"), "PYOPENGL_PLATFORM": os.environ.get("PYOPENGL_PLATFORM")}


def collect(reprobe: bool = False) -> dict[str, Any]:
    """Everything ``rsd info`` reports, as plain data."""
    return {"versions": _versions(), "torch_devices": _devices(), "libero": _libero(), "renderer": _renderer(reprobe),
            "platform": platform.platform(), "executable": sys.executable}


def _print_human(report: dict[str, Any]) -> None:
    print("versions:")
    for k, v in report["versions"].items():
        print(f"  {k:<20} {v}")
    dev = report["torch_devices"]
    print(f"torch devices:         {', '.join(dev.get('devices', [])) or dev}"
          + (f" (CUDA {dev['cuda_version']})" if dev.get("cuda_available") else ""))
    lib = report["libero"]
    print(f"libero:                {'ok ' + lib['package'] if lib['ok'] else 'NOT READY: ' + lib['error']}")
    if lib["ok"]:
        print(f"  assets               {lib['assets']}")
        print(f"  config               {lib['config']}")
    r = report["renderer"]
    if r["ok"]:
        print(f"renderer:              MUJOCO_GL={r['backend']} ({r['source']})")
        print(f"  GL                   {r['gl_vendor']} | {r['gl_renderer']} | {r['gl_version']}")
    else:
        print(f"renderer:              NOT WORKING: {r['error']}")
    print(f"platform:              {report['platform']}")
    print(f"python:                {report['executable']}")


def run(args: argparse.Namespace) -> int:
    report = collect(reprobe=args.reprobe)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_human(report)
    if args.check and not (report["libero"]["ok"] and report["renderer"]["ok"]):
        print("rsd info --check: FAILED (see above); fix: bash scripts/setup.sh", file=sys.stderr)
        return 1
    return 0
