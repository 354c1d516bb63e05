"""Where the kernels can run: the compiled extension, the target device, backend choice.

Every op asks `choose_implementation` once at trace time. It answers "cuda" or "xla" and,
when the caller insisted on "cuda", raises a ValueError that says exactly what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
from collections.abc import Iterator
from typing import Literal

import jax

Implementation = Literal["cuda", "xla"]

#: Environment switch for A/B debugging: a comma-separated list of op names (or "all")
#: that are sent to their XLA reference whatever `implementation` says.
FORCE_XLA_ENV = "JAX_FLASHMLA_FORCE_XLA"

#: Compute capabilities our kernels are compiled for (sm_90a: H100, H200, H800).
KERNEL_COMPUTE_CAPABILITIES = ("9.0",)

#: SM count assumed when sizing scheduler metadata for a platform without a GPU (an H200).
DEFAULT_NUM_SMS = 132


@dataclasses.dataclass(frozen=True)
class TargetDevice:
    """The device a traced computation is meant for."""

    platform: str  # "gpu", "cpu", "tpu", ...
    compute_capability: str | None  # e.g. "9.0" for GPUs, None otherwise
    num_sms: int  # multiprocessors of a GPU, DEFAULT_NUM_SMS elsewhere
    kind: str  # device_kind, e.g. "NVIDIA H200"


_assumed_device: TargetDevice | None = None


@contextlib.contextmanager
def assume_device(
    compute_capability: str = "9.0", num_sms: int = 132, kind: str = "NVIDIA H200"
) -> Iterator[TargetDevice]:
    """Trace as if for a given GPU, e.g. to lower for CUDA on a machine without one.

    Inside the block every op picks its kernel as it would on that GPU; combine with
    `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` to inspect the custom calls, or
    with `jax.export.export(jax.jit(f), platforms=["cuda"])`. The choice is made at trace time
    and jit caches traces per Python function: jit a function not yet traced outside the block.
    """
    global _assumed_device
    previous = _assumed_device
    _assumed_device = TargetDevice("gpu", compute_capability, num_sms, kind)
    try:
        yield _assumed_device
    finally:
        _assumed_device = previous


def target_device() -> TargetDevice:
    """The assumed device if any, else the first device of JAX's default backend."""
    if _assumed_device is not None:
        return _assumed_device
    device = jax.config.jax_default_device
    if device is None or isinstance(device, str):
        device = jax.devices(device)[0] if isinstance(device, str) else jax.devices()[0]
    if device.platform == "gpu":
        return TargetDevice(
            "gpu",
            str(getattr(device, "compute_capability", None)),
            int(getattr(device, "core_count", DEFAULT_NUM_SMS)),
            device.device_kind,
        )
    return TargetDevice(device.platform, None, DEFAULT_NUM_SMS, device.device_kind)


@functools.cache
def _load_extension() -> tuple[object | None, str]:
    """Import the compiled module and register its FFI targets with XLA, once."""
    try:
        from jax_flashmla import _C  # type: ignore[attr-defined]
    except ImportError as error:
        return None, (
            "jax_flashmla was installed without its CUDA extension "
            f"({error}); reinstall with a CUDA 12.5+ nvcc on PATH to build the kernels"
        )
    for name, capsule in _C.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    return _C, ""


def extension() -> object | None:
    """The compiled extension module, or None when the package is pure Python."""
    return _load_extension()[0]


def extension_unavailable_reason() -> str:
    """Why the CUDA extension cannot be used ("" when it can)."""
    return _load_extension()[1]


def device_unsupported_reason(device: TargetDevice | None = None) -> str:
    """Why our kernels cannot run on `device` ("" when they can)."""
    device = device or target_device()
    if device.platform != "gpu":
        return f"the kernels need an NVIDIA Hopper GPU (sm_90), but the device is {device.kind}"
    if device.compute_capability not in KERNEL_COMPUTE_CAPABILITIES:
        return (
            f"the kernels are built for compute capability 9.0 (H100/H200/H800), but "
            f"{device.kind} has compute capability {device.compute_capability}"
        )
    return ""


def _forced_to_xla(op: str) -> bool:
    names = {n.strip() for n in os.environ.get(FORCE_XLA_ENV, "").split(",") if n.strip()}
    return "all" in names or op in names


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def choose_implementation(
    op: str, implementation: str | None, kernel_unsupported_reason: str = ""
) -> Implementation:
    """Pick "cuda" or "xla" for one call of `op`.

    implementation: None (the kernel when it supports the inputs and device, else the
    reference), "cuda" (the kernel, or a ValueError saying why not) or "xla".
    kernel_unsupported_reason: why the kernel cannot take these inputs ("" when it can).
    """
    if implementation not in (None, "cuda", "xla"):
        raise ValueError(
            f"{op}: implementation must be None, 'cuda' or 'xla'; got {implementation!r}"
        )
    if implementation == "xla" or _forced_to_xla(op):
        return "xla"
    device_reason = device_unsupported_reason()
    reason = device_reason or extension_unavailable_reason() or kernel_unsupported_reason
    if not reason:
        return "cuda"
    if implementation == "cuda":
        raise ValueError(f"{op}: implementation='cuda' is unavailable: {reason}")
    if not device_reason:
        # On a Hopper GPU the reference is slow, not wrong: say so once per reason.
        _warn_once(f"jax_flashmla: {op} runs its XLA reference: {reason}")
    return "xla"
