"""`pytest -m libero --ckpt DIR` (a space, as README and docs write it) keeps the project's rootdir and
pyproject settings, whatever DIR is (pytest_duquant/rootdir.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(args, cwd, **env):
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "pytest", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=600)


def test_the_missions_command_as_typed_keeps_the_projects_rootdir_and_configfile(tmp_path):
    ckpt = tmp_path / "some" / "ckpt"
    ckpt.mkdir(parents=True)
    proc = _run(["-m", "libero", "--ckpt", str(ckpt), "--duquant-preset=B", "--co", "-p", "no:cacheprovider"],
                cwd=REPO)
    out = proc.stdout
    assert proc.returncode in (0, 5), out + proc.stderr
    assert f"rootdir: {REPO}\n" in out, out[:2000]
    assert "configfile: pyproject.toml" in out, out[:2000]


def test_space_form_applies_addopts_testpaths_and_markers_of_the_project(tmp_path):
    proj = tmp_path / "proj"
    (proj / "t").mkdir(parents=True)
    (proj / "pyproject.toml").write_text(
        "[tool.pytest.ini_options]\n"
        'testpaths = ["t"]\n'
        'addopts = "-ra --strict-markers"\n'
        'markers = ["mine: a marker of this project"]\n'
    )
    record = tmp_path / "seen.json"
    (proj / "t" / "test_probe.py").write_text(
        "import json, pytest\n"
        "@pytest.mark.mine\n"
        "def test_probe(request, duquant_ckpt):\n"
        "    c = request.config\n"
        f"    open({str(record)!r}, 'w').write(json.dumps({{'root': str(c.rootpath), 'ini': str(c.inipath),\n"
        "        'strict': c.option.strict_markers, 'chars': c.option.reportchars, 'ckpt': str(duquant_ckpt),\n"
        "        'golden': str(c.rootpath / 'golden')}))\n"
    )
    ckpt = tmp_path / "elsewhere" / "ckpt"
    ckpt.mkdir(parents=True)
    proc = _run(["--ckpt", str(ckpt), "-p", "no:cacheprovider"], cwd=proj)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads(record.read_text())
    assert seen["root"] == str(proj) and seen["ini"] == str(proj / "pyproject.toml")
    assert seen["strict"] is True and "a" in seen["chars"]  # the project's addopts are in force
    assert seen["ckpt"] == str(ckpt) and seen["golden"] == str(proj / "golden")
    # the equals form gives the same answer (it never needed the fix)
    record.unlink()
    proc = _run([f"--ckpt={ckpt}", "-p", "no:cacheprovider"], cwd=proj)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(record.read_text()) == seen
