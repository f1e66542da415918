"""Root conftest: hypothesis profiles for the property suite.

`ci` (default): bounded examples, no deadline (shared CI machines are noisy), derandomized.
`dev`: many more examples. Pick with --hypothesis-profile=dev or HYPOTHESIS_PROFILE=dev.
"""

import os

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property suite needs the `test` extra; the plugin itself does not
    settings = None

if settings is not None:
    settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", max_examples=300, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---- no leftovers: a test that quantizes with the default PACKDIR would write ./duquant_packed ------------
# (the plugin's fixtures use a temporary folder; a test building its own config must too)
_WATCHED = ("duquant_packed",)
_BEFORE: dict = {}


def pytest_sessionstart(session):
    root = session.config.rootpath
    _BEFORE.update({name: (root / name).exists() for name in _WATCHED})


def pytest_sessionfinish(session, exitstatus):
    root = session.config.rootpath
    made = [name for name in _WATCHED if (root / name).exists() and not _BEFORE.get(name, True)]
    if made and exitstatus == 0 and not os.environ.get("OPENPI_DUQUANT_PACKDIR"):
        session.exitstatus = 1
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"FAILED: the test run left {', '.join(made)} in {root}; tests must use tmp paths",
                                red=True)
