#!/usr/bin/env python
"""Pack what a LIBERO suite needs into one tarball for a machine with no network (the GPU machine).

That machine has PyTorch, numpy, scipy, numba, OpenCV, matplotlib and Pillow, but not LIBERO: it
gets robosuite, bddl, LIBERO's Python package (BDDL files, init states) and the few pure-Python
packages they import, and only the scene asset files that the suite's compiled MJCF scenes
reference (all of LIBERO's assets are 405 MB; libero_object's scenes reference ~75 MB of them).
MuJoCo is a compiled wheel: download it for the target's Python separately, e.g.

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        -d .devpack mujoco==3.8.1

Usage (here, with LIBERO installed):

    python scripts/pack_libero.py --suites libero_object --out .devpack/libero_pack.tar.xz

There: ``tar -xJf libero_pack.tar.xz -C /tmp/lp`` gives ``/tmp/lp/site`` (put on PYTHONPATH) and
``/tmp/lp/assets`` (``LIBERO_ASSETS_DIR``). The referenced files are read from each task env's
compiled XML (``model.get_xml()``), not guessed; XML files under the asset folders travel whole
(LIBERO's Python side parses object XMLs of objects a scene does not contain).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import re
import sys
import tarfile
import time
from pathlib import Path

# Pure-Python packages LIBERO/robosuite import that the GPU machine's image lacks.
PURE_PACKAGES = ("bddl", "gymnasium", "OpenGL", "easydict", "future", "past", "libfuturize", "libpasteurize",
                 "termcolor", "farama_notifications", "robosuite", "libero")
SKIP_DIRS = {"__pycache__"}
SMALL_SUFFIXES = {".py", ".xml", ".json", ".yaml", ".yml", ".txt", ".bddl", ".pruned_init", ".typed", ".cfg"}


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin) if spec.origin else None


def referenced_files(suites: list[str]) -> set[Path]:
    from pytest_duquant.libero import sim_setup

    sim_setup.prepare()
    from pytest_duquant.libero.episode import LiberoEnv
    from pytest_duquant.libero.protocol import SUITE_TASKS, ProtocolSettings

    out: set[Path] = set()
    for suite in suites:
        for task in range(SUITE_TASKS[suite]):
            env = LiberoEnv(suite, task, ProtocolSettings())
            xml = env.env.env.model.get_xml()
            env.close()
            out.update(Path(f).resolve() for f in re.findall(r'file="([^"]+)"', xml))
            print(f"{suite} task {task}: {len(out)} files referenced so far", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", default="libero_object", help="comma list (default libero_object)")
    p.add_argument("--out", default=".devpack/libero_pack.tar.xz")
    args = p.parse_args(argv)
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    t0 = time.perf_counter()
    refs = referenced_files(suites)
    from pytest_duquant.libero import sim_setup

    assets = sim_setup.assets_dir().resolve()
    members: dict[str, Path] = {}
    for name in PURE_PACKAGES:
        root = package_dir(name)
        if root is None:
            print(f"note: {name} not installed here, skipped", file=sys.stderr)
            continue
        if root.is_file():
            members[f"site/{root.name}"] = root
            continue
        for f in root.rglob("*"):
            if not f.is_file() or SKIP_DIRS & set(f.parts):
                continue
            rel = f.relative_to(root.parent)
            heavy = f.suffix.lower() not in SMALL_SUFFIXES
            if name == "robosuite" and heavy and "assets" in f.parts and f.resolve() not in refs:
                continue  # robosuite's meshes/textures: only those a scene references
            if name == "libero" and f.suffix == ".pruned_init" and not any(s in f.parts for s in suites):
                continue
            members[f"site/{rel}"] = f
    for f in assets.rglob("*"):
        if f.is_file() and (f.suffix.lower() in SMALL_SUFFIXES or f.resolve() in refs):
            members[f"assets/{f.relative_to(assets)}"] = f
    missing = [r for r in refs if not r.is_file()]
    if missing:
        print(f"warning: {len(missing)} referenced files do not exist, e.g. {missing[:3]}", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = sum(f.stat().st_size for f in members.values())
    with tarfile.open(out, "w:xz", preset=6) as tar:
        for arc, f in sorted(members.items()):
            tar.add(f, arcname=arc)
        manifest = "\n".join(sorted(members)).encode()
        info = tarfile.TarInfo("MANIFEST.txt")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    print(f"wrote {out}: {len(members)} files, {raw / 2**20:.1f} MiB raw, {out.stat().st_size / 2**20:.1f} MiB "
          f"packed, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
