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
