"""README's test command is exactly what .ci/run runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_readme_test_command_verbatim():
    _main_job, test_cmd = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    marker = "# --- README test command (keep identical to README.md) ---\n"
    assert marker in ci
    assert ci.split(marker, 1)[1].strip().splitlines()[0] == test_cmd


def test_ci_installs_with_the_torch_constraint():
    ci = (ROOT / ".ci" / "run").read_text()
    installs = [line for line in ci.splitlines() if "pip install" in line]
    assert installs and all("-c constraints.txt" in line for line in installs)
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()


def test_ci_checks_the_model_goldens_under_every_preset():
    """CI runs one preset for the whole suite, but the model goldens under all of them (issue 15)."""
    _main_job, test_cmd = readme_commands()
    assert "--duquant-golden-presets=all" in test_cmd
