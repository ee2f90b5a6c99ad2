"""jax_posenc: positional encodings for transformers in JAX and Flax.

The public API is re-exported here; import from `jax_posenc`, never from submodules.
NNX modules live in the `jax_posenc.nnx` namespace.

The public names and the modules that define them are listed in `jax_posenc/_api.py`.
Importing jax takes a second or more, so they are imported on first use (PEP 562):
`import jax_posenc`, `jax_posenc.__version__` and `jax-posenc --help` do not import jax.
"""

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from jax_posenc._api import *  # noqa: F403
    from jax_posenc._api import __all__ as __all__


def _import_public_api() -> list[str]:
    api = importlib.import_module("jax_posenc._api")
    globals().update({name: getattr(api, name) for name in api.__all__}, __all__=api.__all__)
    return api.__all__


def __getattr__(name: str) -> Any:
    # A submodule (`from jax_posenc import nnx`, `cli`, `_checks`) is imported on its own;
    # any other public name loads the whole API once.
    if name != "__all__" and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "__all__" or not name.startswith("_"):
        _import_public_api()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_import_public_api()})
