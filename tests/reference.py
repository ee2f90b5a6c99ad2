"""NumPy float64 references written from the papers' formulas, independent of the package."""

import numpy as np


def sinusoidal_reference(positions, dim, base=10000.0, layout="interleaved"):
    """Vaswani et al. (2017): PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(same)."""
    positions = np.asarray(positions, dtype=np.float64)
    out = np.zeros((*positions.shape, dim), dtype=np.float64)
    for i in range(dim // 2):
        angle = positions / base ** (2.0 * i / dim)
        if layout == "interleaved":
            out[..., 2 * i] = np.sin(angle)
            out[..., 2 * i + 1] = np.cos(angle)
        else:
            out[..., i] = np.sin(angle)
            out[..., dim // 2 + i] = np.cos(angle)
    return out
