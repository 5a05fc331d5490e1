"""TIES' arithmetic on the CPU as one compiled loop (numba) (docs/merging.md, "CPU loops").

TIES on the CPU in torch takes some twenty passes over each chunk (subtract, trim, check, elect,
compare, accumulate, divide); on a full-size SDXL merge that arithmetic, not the disk, set the pace.
`ties` does it in a few passes over fp32 chunks that stay in cache: trim each delta at its threshold
(non-finite deltas dropped), elect the sign by weighted mass, write base + alpha · the disjoint mean —
the same rules as `methods.ties`' torch code, which stays the reference (tests compare the two) and
the path for other devices.

This module imports numba and numpy, so its users import it where they need it, not at the top
(half a second that commands which never merge should not pay). The loops are compiled on first use
(about a second; cached on disk afterwards) and release the GIL, so the executor's workers run them
side by side. Results match the torch code up to the rounding of the fused multiply-adds torch uses
for `add(alpha=)`, `addcmul` and `addcdiv` (a unit or two in the last place).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np
import torch

SMALLEST_FLOAT = np.float32(2.0 ** -149)  # as methods.SMALLEST_FLOAT: dividing by it keeps an empty sum 0
LARGEST_FLOAT = np.float32(3.4028234663852886e38)  # float32's largest finite value



def _jit(function: Any) -> Any:
    """Compiled without the GIL, cached on disk where numba finds a writable place (beside this file or
    in the user's cache); where it finds none, compiled anew in each process rather than failing."""
    try:
        return numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:  # numba: "cannot cache function …: no locator available"
        return numba.njit(nogil=True)(function)


@_jit
def _trimmed(delta: Any, threshold: Any) -> Any:
    """delta if it is finite and its magnitude reaches the threshold, else 0."""
    keep = abs(delta) >= threshold and abs(delta) <= LARGEST_FLOAT
    return delta if keep else np.float32(0.0)


@_jit
def _ties(base: Any, models: Any, thresholds: Any, weights: Any, alpha: Any, out: Any,
          elected: Any, total: Any, weight: Any) -> None:
    # Model by model over the whole chunk (loops without branches vectorise), summing in the models'
    # order as the torch code does.
    elected[:] = 0.0
    total[:] = 0.0
    weight[:] = 0.0
    for j in range(len(models)):
        model, threshold, w = models[j], thresholds[j], weights[j]
        for i in range(base.size):
            elected[i] += w * _trimmed(model[i] - base[i], threshold)
    for j in range(len(models)):
        model, threshold, w = models[j], thresholds[j], weights[j]
        for i in range(base.size):
            delta = _trimmed(model[i] - base[i], threshold)
            agrees = delta * elected[i] > 0
            total[i] += w * delta if agrees else np.float32(0.0)
            weight[i] += w if agrees else np.float32(0.0)
    for i in range(base.size):
        out[i] = base[i] + alpha * (total[i] / max(weight[i], SMALLEST_FLOAT))


def ties(base: torch.Tensor, models: Sequence[torch.Tensor], thresholds: Sequence[float],
         weights: Sequence[float], alpha: float) -> torch.Tensor:
    """TIES of fp32 CPU tensors of one shape with the given magnitude thresholds (methods.ties' rules),
    as a new fp32 tensor."""
    flat = [t.reshape(-1).numpy() for t in (base, *models)]
    out = torch.empty(base.shape, dtype=torch.float32)
    scratch = np.empty((3, flat[0].size), dtype=np.float32)
    _ties(flat[0], tuple(flat[1:]), np.asarray(thresholds, dtype=np.float32), np.asarray(weights, dtype=np.float32),
          np.float32(alpha), out.view(-1).numpy(), *scratch)
    return out

