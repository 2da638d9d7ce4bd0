"""Triton kernels, one op per file, each with its launcher and torch reference."""

from .dequant import dequantize

__all__ = ["dequantize"]
