"""The Triton backend: fused kernels split by stage (docs/architecture.md, section 1). It imports nothing of
adassl_fast; the dispatch table (adassl_fast/_library.py) hands it the index vectors it needs."""
