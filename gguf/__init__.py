"""The GGUF file format: reader, ggml type table, metadata value types and file types."""

from .reader import GGUFError, GGUFFile, TensorInfo
from .types import TYPE_TRAITS, GGMLType, GGUFValueType, LlamaFileType, file_type_name

__all__ = [
    "TYPE_TRAITS",
    "GGMLType",
    "GGUFError",
    "GGUFFile",
    "GGUFValueType",
    "LlamaFileType",
    "TensorInfo",
    "file_type_name",
]
