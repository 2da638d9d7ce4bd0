"""Triton kernels, one op per file, each with its launcher and torch reference."""

from .activations import gelu_mul, silu_mul
from .dequant import dequantize
from .flash_attention import flash_attention
from .kv_store import kv_store
from .moe import fused_moe
from .paged_decode import paged_decode
from .qmatmul import qmatmul, qmatmul_act, qmatmul_add_norm, qmatmul_many
from .rmsnorm import rmsnorm
from .rope import rope, rope_inv_freq
from .rope_kv_store import rope_kv_store

__all__ = [
    "dequantize",
    "flash_attention",
    "fused_moe",
    "gelu_mul",
    "kv_store",
    "paged_decode",
    "qmatmul",
    "qmatmul_act",
    "qmatmul_add_norm",
    "qmatmul_many",
    "rmsnorm",
    "rope",
    "rope_inv_freq",
    "rope_kv_store",
    "silu_mul",
]
