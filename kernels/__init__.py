"""Triton kernels of fromage_fused (installed as ``fromage_fused.kernels``)."""
