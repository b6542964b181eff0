"""Compression while distilling: pruning and quantization-aware training as Lightning callbacks,
the compression report and the deployable artifacts (see ``kd.compress.base`` for the contract)."""
