"""Domino speculative decoding engine."""

from .cpu import pin_mkl_avx2_on_amd

# Before the first BLAS call of the process; see cpu.py for the measured reason.
pin_mkl_avx2_on_amd()
