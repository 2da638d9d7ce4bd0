"""The engine: models, weight loading, KV cache, scheduler, sampler, LLM API, CLI."""
