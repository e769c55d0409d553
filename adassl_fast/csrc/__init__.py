"""The CUDA C++ sources of the cuda backend, shipped as package data (installed as adassl_fast.csrc).

No Python here: this file makes the folder a package, so adassl_fast/_cuda_build.py finds the sources
with importlib.resources in a wheel install, an editable install and a source checkout alike.
"""
