"""Shared test settings.

Hypothesis profiles: "fast" (default, a few dozen examples per property) and
"thorough" (many examples), chosen with `JAX_POSENC_HYPOTHESIS_PROFILE=thorough`.
"""

import os
import subprocess
import sys

from hypothesis import HealthCheck, settings

# The suite is dominated by XLA:CPU compile time on small shapes (hundreds of small
# programs, each compiled in 15-50 ms), so tests compile with the backend's optimisation
# passes off and with the CPU backend's older elemental fusion code generator, which
# compiles about twice as fast (test_transformations.py on 2 workers: 124 s -> 70 s).
# Both are supported code paths that change speed, not semantics; the tolerances of the
# tests hold on either. XLA aborts the process on a flag it does not know, so the flags
# are probed once in a subprocess (the pytest-xdist controller sets the variable before
# it starts its workers, which inherit it), and a jaxlib without the generator's flag
# gets the optimisation flag alone. A user's own XLA_FLAGS are left as they are.
_FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
    "--xla_backend_optimization_level=0",
)


def _accepted(flags):
    probe = "import jax.numpy as jnp; jnp.exp(jnp.ones(3)).block_until_ready()"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = next((f for f in _FAST_COMPILE_FLAGS if _accepted(f)), "")

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
