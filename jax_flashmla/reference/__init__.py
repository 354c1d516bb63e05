"""Plain-JAX references of every op, with the exact semantics of the kernels.

They are the `implementation="xla"` backend, the lowering of each kernel primitive on
platforms without the kernel, and the oracle of the GPU tests. Readable first, fast second.
"""
