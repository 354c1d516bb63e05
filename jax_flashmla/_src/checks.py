"""Trace-time input checks. Every message names the op, the argument, the rule and the value."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np


def dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def _is_array(x: Any) -> bool:
    # Scalar types such as np.float32 carry `shape` and `dtype` descriptors: not arrays.
    return not isinstance(x, type) and hasattr(x, "shape") and hasattr(x, "dtype")


def check_array(
    op: str,
    name: str,
    x: Any,
    *,
    ndim: int | None = None,
    dtypes: Sequence[Any] | None = None,
    shape: Sequence[int | None] | None = None,
    shape_doc: str | None = None,
) -> None:
    """Check an array argument. `shape` may hold None for dims that are free.

    Raises TypeError for a non-array or a wrong dtype, ValueError for a wrong rank or shape.
    """
    if not _is_array(x):
        raise TypeError(f"{op}: {name} must be a JAX array; got {type(x).__name__}")
    doc = f" {shape_doc}" if shape_doc else ""
    if dtypes is not None and np.dtype(x.dtype) not in [np.dtype(d) for d in dtypes]:
        allowed = " or ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype {allowed}; got {dtype_name(x.dtype)}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{op}: {name} must have rank {ndim}{doc}; got shape {tuple(x.shape)}")
    if shape is not None and (
        x.ndim != len(shape)
        or any(want is not None and got != want for got, want in zip(x.shape, shape, strict=True))
    ):
        want_str = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{op}: {name} must have shape {want_str}{doc}; got {tuple(x.shape)}")


def check_int(op: str, name: str, value: Any, *, minimum: int | None = None) -> int:
    """A static Python integer (numpy integers accepted) with an optional lower bound."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{op}: {name} must be a Python int; got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}; got {value}")
    return int(value)


def check_scale(op: str, name: str, value: Any, default: float) -> float:
    """A static softmax scale: None means `default`; else any Python float that is finite in
    float32 (zero and negative scales included, as FlashMLA accepts them)."""
    if value is None:
        return float(default)
    if _is_array(value) or isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{op}: {name} must be a Python float or None; got {value!r}")
    # Past float32's range a value becomes inf (an int too large for a float raises instead).
    with np.errstate(over="ignore"), contextlib.suppress(OverflowError):
        if np.isfinite(np.float32(value)):
            return float(value)
    raise ValueError(f"{op}: {name} must be finite in float32; got {value}")


def check_dtype(op: str, name: str, value: Any, allowed: Sequence[Any]) -> np.dtype:
    """A static dtype argument (a dtype, a scalar type or a string naming one) among `allowed`.

    Raises TypeError naming the op and the argument for anything else: unknown strings, None
    (which NumPy would read as float64), arrays, and dtypes outside `allowed`.
    """
    dtype = None
    if value is not None and not isinstance(value, bool) and not _is_array(value):
        with contextlib.suppress(TypeError, ValueError):  # not a dtype: reported below
            dtype = np.dtype(value)
    names = " or ".join(dtype_name(d) for d in allowed)
    if dtype is None or dtype not in [np.dtype(d) for d in allowed]:
        raise TypeError(f"{op}: {name} must be {names}; got {value!r}")
    return dtype


def check_choice(op: str, name: str, value: Any, choices: Sequence[str]) -> str:
    """A static string among `choices`: TypeError for a non-string, ValueError naming the
    choices for an unknown string."""
    listed = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise TypeError(f"{op}: {name} must be a string, one of {listed}; got {value!r}")
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {listed}; got {value!r}")
    return value


def check_bool(op: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{op}: {name} must be a Python bool; got {value!r}")
    return bool(value)


FLOAT16_TYPES = (jnp.bfloat16, jnp.float16)
INT32 = (jnp.int32,)
FLOAT32 = (jnp.float32,)
