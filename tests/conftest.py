"""Shared test settings.

Hypothesis profiles: "fast" (default, a few dozen examples per property) and
"thorough" (many examples), chosen with `JAX_POSENC_HYPOTHESIS_PROFILE=thorough`.
"""

import os

# The suite is dominated by XLA compile time on small shapes; the backend's optimisation
# passes do not change results, only speed, so skip them for tests.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

from hypothesis import HealthCheck, settings

settings.register_profile(
    "fast",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("JAX_POSENC_HYPOTHESIS_PROFILE", "fast"))
