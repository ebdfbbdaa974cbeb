"""Triton kernels, installed as ``llip_scale.kernels``."""
