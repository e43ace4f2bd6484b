"""The GPT-2 architecture, written out module by module."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pipeline.errors import InputError
from pipeline.model.architecture import GPTConfig
from pipeline.model.attention import attend_to_cache, build_attention, merge_heads, split_heads
from pipeline.model.head_loss import linear_cross_entropy, target_logprobs


class KVCache:
    """Keys and values of the tokens a model has already seen, one pair per layer.

    With a cache, each forward pass only feeds the new tokens: their positions continue from
    `length`, and each layer appends its new keys and values before attending over all of them.
    """

    def __init__(self, n_layer: int) -> None:
        self.keys: list[Tensor | None] = [None] * n_layer
        self.values: list[Tensor | None] = [None] * n_layer

    @property
    def n_layer(self) -> int:
        return len(self.keys)

    @property
    def length(self) -> int:
        """Number of tokens cached (in the first layer, which is updated first)."""
        return self.layer_length(0)

    def layer_length(self, layer: int) -> int:
        """Tokens cached in one layer; 0 tells that layer its call is the prefill."""
        k = self.keys[layer]
        return 0 if k is None else k.shape[-2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's (B, H, T, D) keys and values; return everything cached so far."""
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None and old_v is not None:
            k = torch.cat([old_k, k], dim=-2)
            v = torch.cat([old_v, v], dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def reset(self) -> None:
        """Forget everything, e.g. before reusing the cache for another prompt."""
        self.keys = [None] * self.n_layer
        self.values = [None] * self.n_layer


class SelfAttention(nn.Module):
    """Multi-head causal self-attention: fused qkv projection, a pluggable backend, output proj."""

    def __init__(self, config: GPTConfig, layer_idx: int, attention: str) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx
        self.attn_dropout = config.attn_dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.backend = build_attention(
            attention,
            context_length=config.context_length,
            attn_dropout=config.attn_dropout,
        )

    def forward(self, x: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        qkv = self.qkv(x)
        if kv_cache is None:
            return self.proj(self.backend.attend_packed(qkv, self.n_head))
        q, k, v = split_heads(qkv, self.n_head)
        prefill = kv_cache.layer_length(self.layer_idx) == 0
        k, v = kv_cache.update(self.layer_idx, k, v)
        if prefill:
            y = self.backend(q, k, v)
        else:
            dropout_p = self.attn_dropout if self.training else 0.0
            y = attend_to_cache(q, k, v, dropout_p=dropout_p)
        return self.proj(merge_heads(y))


class MLP(nn.Module):
    """Position-wise feed-forward: expand 4x, GELU (tanh approximation, as GPT-2), project back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + drop(attn(ln_1(x))), then x + drop(mlp(ln_2(x)))."""

    def __init__(self, config: GPTConfig, layer_idx: int, attention: str) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = SelfAttention(config, layer_idx, attention)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), kv_cache))
        x = x + self.drop(self.mlp(self.ln_2(x)))
        return x


class GPT(nn.Module):
    """GPT-2: token + position embeddings, n_layer blocks, final LayerNorm, tied LM head.

    `attention` names the backend the layers run (no weights: `set_attention` switches it);
    it is a run-time choice, not part of the architecture or of a checkpoint.
    """

    def __init__(self, config: GPTConfig, attention: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.attention, self.attention_reason = attention, ""
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.context_length, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i, attention) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: each residual projection's std shrinks with depth, so the residual stream's
        # variance does not grow with the number of additions (2 per block).
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            assert isinstance(block, Block)
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: Tensor,
        kv_cache: KVCache | None = None,
        *,
        targets: Tensor | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        """Logits (B, T, vocab_size) for token ids (B, T); with a cache, T new tokens only.

        With `targets` (B, T), the LM head's loss instead, fused with the head's matmul so the
        logits are never materialised (`head_loss`); it is computed here, in `forward`, so that
        DDP, FSDP and torch.compile, which wrap only `forward`, see it.
        """
        hidden = self.hidden_states(idx, kv_cache)
        if targets is not None:
            return self.head_loss(hidden, targets, reduction)
        return self.lm_head(hidden)

    def head_loss(self, hidden: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        """The tied LM head's cross-entropy on final hidden states (B, T, n_embd), targets
        IGNORE_INDEX where not learned. ``"mean"``: mean −log p(target) over learned targets
        (NaN if none); ``"none"``: log p(target) per position (B, T), 0 where ignored."""
        if reduction == "mean":
            return linear_cross_entropy(hidden, self.lm_head.weight, targets)
        if reduction == "none":
            return target_logprobs(hidden, self.lm_head.weight, targets)
        raise InputError(f"reduction must be 'mean' or 'none', got {reduction!r}")

    def hidden_states(self, idx: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """The final-LayerNorm outputs (B, T, n_embd) that the LM head (or a task head) reads."""
        if idx.dim() != 2:
            raise InputError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
        t = idx.shape[1]
        ctx = self.config.context_length
        past = 0
        if kv_cache is not None:
            if kv_cache.n_layer != self.config.n_layer:
                raise InputError(
                    f"KV cache has {kv_cache.n_layer} layers, model has {self.config.n_layer}"
                )
            past = kv_cache.length
        if past + t > ctx:
            if past:
                raise InputError(
                    f"KV cache holds {past} tokens; {t} more would exceed context_length "
                    f"{ctx}; rebuild the cache from the last {ctx} tokens"
                )
            raise InputError(
                f"sequence length {t} exceeds context_length {ctx}; "
                f"crop the input to the last {ctx} tokens"
            )
        pos = torch.arange(past, past + t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x, kv_cache)
        return self.ln_f(x)

    def num_parameters(self, exclude_position_embeddings: bool = False) -> int:
        """Parameter count with the tied LM head counted once (as OpenAI and HF report it)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_position_embeddings:
            n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token: 6N + 12·L·C·T, for MFU.

        N excludes the position embeddings (a lookup, not a matmul) as in nanoGPT and PaLM;
        the tied token embedding counts because it is the LM head's matmul. T defaults to
        context_length.
        """
        t = self.config.context_length if seq_len is None else seq_len
        n = self.num_parameters(exclude_position_embeddings=True)
        return float(6 * n + 12 * self.config.n_layer * self.config.n_embd * t)

    def set_attention(self, name: str, reason: str = "") -> None:
        """Switch every layer to another attention backend (`reason`: why it was chosen, for
        the run's records); weights are untouched."""
        self.attention, self.attention_reason = name, reason
        device = self.tok_emb.weight.device
        for block in self.blocks:
            assert isinstance(block, Block)
            backend = build_attention(
                name,
                context_length=self.config.context_length,
                attn_dropout=self.config.attn_dropout,
            )
            block.attn.backend = backend.to(device).train(block.attn.training)
