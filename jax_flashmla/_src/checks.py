"""Trace-time input checks. Every message names the op, the argument, the rule and the value."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np


def dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


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
    """A static softmax scale: None means `default`; else a finite positive Python float."""
    if value is None:
        return float(default)
    if _is_array(value) or isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{op}: {name} must be a Python float or None; got {value!r}")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{op}: {name} must be finite and > 0; got {value}")
    return float(value)


def check_bool(op: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{op}: {name} must be a Python bool; got {value!r}")
    return bool(value)


FLOAT16_TYPES = (jnp.bfloat16, jnp.float16)
INT32 = (jnp.int32,)
FLOAT32 = (jnp.float32,)
