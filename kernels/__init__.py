"""Triton kernels that read block tables (installed as ``hf_paged.kernels``)."""
