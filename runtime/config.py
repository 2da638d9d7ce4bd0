"""Model hyper-parameters, read from a GGUF file's metadata and validated once."""

from __future__ import annotations

from dataclasses import dataclass

from ggtriton.gguf import GGUFFile

from .models.architectures import ARCHITECTURES, Architecture


@dataclass
class RopeConfig:
    """Rotary embedding of one kind of layer: `dim` rotated dims with base `base` and a scaling variant."""

    dim: int
    base: float
    neox: bool
    scaling: str = "none"  # none | linear | yarn | llama3
    factor: float = 1.0
    original_context: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attn_factor: float = 1.0


@dataclass
class ModelConfig:
    arch: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    v_head_dim: int
    ffn: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope: RopeConfig
    rope_local: RopeConfig | None = None  # sliding-window layers' own RoPE (gemma3)
    sliding_window: int | None = None
    swa_layers: tuple[bool, ...] = ()  # per layer: attends through the sliding window
    attn_softcap: float | None = None
    final_softcap: float | None = None
    attn_scale: float = 0.0  # 0: 1 / sqrt(head_dim)
    embed_scale: float = 1.0
    # Mixture of experts (runtime/models/moe.py); n_expert 0: the dense FFN
    n_expert: int = 0
    n_expert_used: int = 0  # experts each token is routed to
    expert_ffn: int = 0  # rows of each expert's gate and up
    shared_expert_ffn: int = 0  # rows of the shared expert's gate and up (qwen2moe)
    expert_weights_norm: bool = False  # the chosen experts' weights divided by their sum
    expert_weights_scale: float = 1.0  # the chosen experts' weights times this

    def __post_init__(self) -> None:
        for name in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "v_head_dim", "ffn", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{self.arch}: {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.arch}: {self.n_heads} heads are not a multiple of {self.n_kv_heads} KV heads")
        if self.head_dim != self.v_head_dim:
            raise ValueError(f"{self.arch}: key length {self.head_dim} != value length {self.v_head_dim} is not supported")
        if not 0 < self.rope.dim <= self.head_dim or self.rope.dim % 2:
            raise ValueError(f"{self.arch}: rope dimension {self.rope.dim} must be even and <= head_dim {self.head_dim}")
        if self.n_expert:
            if not 0 < self.n_expert_used <= self.n_expert:
                raise ValueError(f"{self.arch}: {self.arch}.expert_used_count {self.n_expert_used} must be in "
                                 f"1..{self.arch}.expert_count ({self.n_expert})")
            if self.expert_ffn <= 0:
                raise ValueError(f"{self.arch}: {self.arch}.expert_feed_forward_length must be positive, "
                                 f"got {self.expert_ffn}")
        if len(self.swa_layers) != self.n_layers:
            self.swa_layers = (False,) * self.n_layers if not self.sliding_window else self.swa_layers
        if self.attn_scale == 0.0:
            self.attn_scale = self.head_dim**-0.5

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.arch]

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> ModelConfig:
        md = f.metadata
        arch = md.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"{f.path}: architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
            )
        spec = ARCHITECTURES[arch]

        def get(key: str, default=None, kind=int):
            value = md.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"{f.path}: metadata key {arch}.{key} is missing")
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{f.path}: {arch}.{key} must be {kind.__name__}, got {value!r}")
            return value

        hidden, n_heads = get("embedding_length"), get("attention.head_count")
        if not isinstance(md.get(f"{arch}.attention.head_count_kv", 0), int):
            raise ValueError(f"{f.path}: per-layer head counts are not supported")
        head_dim = get("attention.key_length", hidden // n_heads if n_heads else 0)
        tokens = md.get("tokenizer.ggml.tokens")
        vocab = md.get(f"{arch}.vocab_size", len(tokens) if isinstance(tokens, list) else 0)
        rope = RopeConfig(
            dim=get("rope.dimension_count", head_dim),
            base=get("rope.freq_base", 10000.0, float),
            neox=spec.rope_neox,
            # llama3 scaling arrives as a `rope_freqs` tensor of per-frequency factors, applied by the model
            scaling=md.get(f"{arch}.rope.scaling.type", "none"),
            factor=get("rope.scaling.factor", 1.0, float),
            original_context=get("rope.scaling.original_context_length", 0),
            beta_fast=get("rope.scaling.yarn_beta_fast", 32.0, float),
            beta_slow=get("rope.scaling.yarn_beta_slow", 1.0, float),
            attn_factor=get("rope.scaling.attn_factor", 1.0, float),
        )
        if rope.scaling not in ("none", "linear", "yarn"):
            raise ValueError(f"{f.path}: rope scaling {rope.scaling!r} is not supported (none, linear, yarn)")
        window = get("attention.sliding_window") if spec.swa_pattern else None  # required, as llama.cpp does
        n_layers = get("block_count")
        swa = tuple(bool(window) and spec.swa_pattern > 0 and i % spec.swa_pattern < spec.swa_pattern - 1
                    for i in range(n_layers))
        rope_local = None
        if spec.rope_local_base and window:
            rope_local = RopeConfig(dim=rope.dim, base=spec.rope_local_base, neox=rope.neox)
        ffn = get("feed_forward_length")
        moe = {}
        n_expert = get("expert_count") if spec.moe == "always" else get("expert_count", 0) if spec.moe else 0
        if spec.moe == "always" and n_expert <= 0:
            raise ValueError(f"{f.path}: {arch}.expert_count must be positive, got {n_expert}")
        if n_expert:
            n_used = get("expert_used_count")
            norm = md.get(f"{arch}.expert_weights_norm", spec.moe_normalize)
            if not isinstance(norm, bool):
                raise ValueError(f"{f.path}: {arch}.expert_weights_norm must be bool, got {norm!r}")
            moe = dict(
                n_expert=n_expert,
                n_expert_used=n_used,
                # as llama.cpp reads it: Mixtral's experts have the dense FFN's width; the MoE architectures' have
                # their own, or split the dense one among the experts used
                expert_ffn=ffn if spec.moe == "optional" else get("expert_feed_forward_length",
                                                                  ffn // n_used if n_used > 0 else 0),
                shared_expert_ffn=get("expert_shared_feed_forward_length", ffn) if spec.shared_expert else 0,
                expert_weights_norm=norm,
                expert_weights_scale=get("expert_weights_scale", 0.0, float) or 1.0,  # 0, as absent, means 1
            )
        return cls(
            arch=arch,
            n_layers=n_layers,
            hidden=hidden,
            n_heads=n_heads,
            n_kv_heads=get("attention.head_count_kv", n_heads),
            head_dim=head_dim,
            v_head_dim=get("attention.value_length", head_dim),
            ffn=ffn,
            vocab_size=vocab,
            context_length=get("context_length", 2048),
            rms_eps=get("attention.layer_norm_rms_epsilon", 1e-6, float),
            rope=rope,
            rope_local=rope_local,
            sliding_window=window or None,
            swa_layers=swa,
            attn_softcap=md.get(f"{arch}.attn_logit_softcapping") if spec.softcaps else None,
            final_softcap=md.get(f"{arch}.final_logit_softcapping") if spec.softcaps else None,
            embed_scale=float(hidden) ** 0.5 if spec.scale_embeddings else 1.0,
            attn_scale=(hidden // n_heads) ** -0.5
            if n_layers == spec.hidden_scaled_layers and 0 < n_heads <= hidden else 0.0,
            **moe,
        )
