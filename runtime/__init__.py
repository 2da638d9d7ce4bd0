"""The engine: models, weight loading, KV cache, scheduler, sampler, LLM API, CLI."""

from .llm import LLM
from .sampling_params import RequestOutput, SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
