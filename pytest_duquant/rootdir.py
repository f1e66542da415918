"""Keep pytest's rootdir and config file when a plugin option is written with a space (`--ckpt DIR`).

pytest chooses its rootdir and config file (pyproject.toml: addopts, markers, testpaths, filterwarnings)
from the positional arguments of a first parse that runs before any plugin is loaded. At that point
`--ckpt` is unknown, so in `pytest -m libero --ckpt /data/ckpt` the value `/data/ckpt` is taken for a test
path: the rootdir becomes the checkpoint folder, the project's settings are silently dropped, and
everything resolved from the rootdir (the project's golden/) is looked up beside the checkpoint. With
`--ckpt=/data/ckpt` (one token) the first parse gets it right.

`reroot` runs from the plugin's `pytest_load_initial_conftests` (the first hook after the plugin's
options are known, before conftests load and before the final parse): it repeats pytest's own
`determine_setup` with the positional arguments as the full parser sees them and, when the answer differs,
installs the right rootdir, config file and the config file's `addopts`. This reaches into pytest's
private Config state (`_rootpath`, `_inipath`, `_inicfg`/`inicfg`, `_inicache`); tests/core/test_rootdir.py
runs the space form in a subprocess, so a pytest release that changes that state fails there, loudly.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path


def _determine_setup(ns, invocation_dir: Path):
    from _pytest.config.findpaths import determine_setup

    params = inspect.signature(determine_setup).parameters
    kwargs = dict(inifile=ns.inifilename, args=list(ns.file_or_dir), rootdir_cmd_arg=ns.rootdir or None,
                  invocation_dir=invocation_dir)
    if "override_ini" in params:
        kwargs["override_ini"] = ns.override_ini
    out = determine_setup(**kwargs)
    return out[0], out[1], out[2]


def _ini_attr(config) -> str:
    return "_inicfg" if hasattr(config, "_inicfg") else "inicfg"


def reroot(early_config, args: list[str]) -> str | None:
    """Redo pytest's rootdir/config-file choice without plugin option values; fix `early_config` and `args`
    in place when it changes. Returns a one-line note of what changed (None when nothing did)."""
    ns = early_config.known_args_namespace
    if getattr(ns, "inifilename", None) or getattr(ns, "rootdir", None):
        return None  # the user chose them explicitly
    rootpath, inipath, inicfg = _determine_setup(ns, early_config.invocation_params.dir)
    if rootpath == early_config.rootpath and inipath == early_config.inipath:
        return None
    old_root, old_ini = early_config.rootpath, early_config.inipath
    old_addopts = list(early_config.getini("addopts")) if old_ini is not None else []
    if old_addopts and args[: len(old_addopts)] == old_addopts:
        del args[: len(old_addopts)]
    early_config._rootpath = rootpath
    early_config._inipath = inipath
    setattr(early_config, _ini_attr(early_config), inicfg)
    early_config._inicache.clear()
    parser = early_config._parser
    parser.extra_info["rootdir"] = str(rootpath)
    parser.extra_info["inifile"] = str(inipath)
    addopts = list(early_config.getini("addopts"))
    if addopts:
        args[:0] = early_config._validate_args(addopts, "via addopts config")
    old_cut = str(old_ini.parent) if old_ini is not None else str(old_root)
    new_ns = parser.parse_known_args(args, namespace=copy.copy(early_config.option))
    if ns.confcutdir is None or ns.confcutdir == old_cut:
        new_ns.confcutdir = str(inipath.parent) if inipath is not None else str(rootpath)
    else:
        new_ns.confcutdir = ns.confcutdir
    early_config.known_args_namespace = new_ns
    return f"rootdir {old_root} -> {rootpath} (configfile {inipath}): a plugin option's value was read as a path"
