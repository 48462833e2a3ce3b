"""Capture and restore every random number generator a training run draws from.

The state is a plain dict of tensors, ints, floats and strings, so it can be saved
and loaded with ``torch.load(weights_only=True)`` and copied without pickling:

- ``"python"``: ``random.getstate()`` as ``{"version": int, "state": int64 tensor [625],
  "gauss_next": float | None}``;
- ``"torch"``: ``torch.get_rng_state()``, a uint8 tensor;
- ``"cuda"``: ``torch.cuda.get_rng_state_all()``, a list of uint8 tensors, present only
  when CUDA has been initialised (reading it would otherwise initialise CUDA);
- ``"numpy"``: NumPy's legacy global generator as ``{"bit_generator": str, "key": int64
  tensor [624], "pos": int, "has_gauss": int, "cached_gaussian": float}``, present
  only when ``numpy`` has been imported.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["capture_rng_state", "restore_rng_state"]


def _python_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}


def _numpy_state(numpy: Any) -> dict[str, Any]:
    name, key, pos, has_gauss, cached_gaussian = numpy.random.get_state(legacy=True)
    return {
        "bit_generator": str(name),
        "key": torch.from_numpy(key.astype(numpy.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def capture_rng_state() -> dict[str, Any]:
    """Return the current state of the Python, torch, CUDA and NumPy generators (see the module doc)."""
    state: dict[str, Any] = {"python": _python_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        state["numpy"] = _numpy_state(numpy)
    return state


def _restore_python(state: Mapping[str, Any]) -> None:
    internal = tuple(int(value) for value in state["state"].tolist())
    gauss_next = state["gauss_next"]
    random.setstate((int(state["version"]), internal, None if gauss_next is None else float(gauss_next)))


def _restore_numpy(state: Mapping[str, Any]) -> None:
    import numpy

    key = state["key"].numpy().astype(numpy.uint32)
    numpy.random.set_state(
        (state["bit_generator"], key, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"]))
    )


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the generators to a state returned by ``capture_rng_state``.

    Generators missing from ``state`` are left as they are. A ``"cuda"`` entry is
    restored only when CUDA is available, for as many devices as both sides have.

    Raises:
        ValueError: ``state`` lacks the ``"python"`` or ``"torch"`` entry, or an entry
            has the wrong form.
    """
    missing = [name for name in ("python", "torch") if name not in state]
    if missing:
        raise ValueError(f"RNG state is missing {missing}; expected a dict from capture_rng_state()")
    try:
        _restore_python(state["python"])
        torch.set_rng_state(state["torch"])
        if "numpy" in state:
            _restore_numpy(state["numpy"])
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"RNG state has the wrong form: {error!r}; expected a dict from capture_rng_state()"
        ) from error
    if "cuda" in state and torch.cuda.is_available():
        # NOTE: written for multi-GPU hosts but only exercised on CPU-only machines so far.
        count = min(len(state["cuda"]), torch.cuda.device_count())
        for index in range(count):
            torch.cuda.set_rng_state(state["cuda"][index], device=index)
