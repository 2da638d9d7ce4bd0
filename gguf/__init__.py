"""The GGUF file format: reader, ggml type table, metadata value types and file types."""

from .quants import dequantize
from .reader import GGUFError, GGUFFile, TensorInfo
from .tokenizer import Tokenizer
from .types import TYPE_TRAITS, GGMLType, GGUFValueType, LlamaFileType, file_type_name

__all__ = [
    "TYPE_TRAITS",
    "GGMLType",
    "GGUFError",
    "GGUFFile",
    "GGUFValueType",
    "LlamaFileType",
    "TensorInfo",
    "Tokenizer",
    "dequantize",
    "file_type_name",
]
