"""One module per kernel family, each holding one `KernelPrimitive` (see _src/primitive.py)."""
