"""Cache shapes of the op benchmarks (presets of published VLMs) and synthetic caches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..constants import TEXT, VISION


@dataclass(frozen=True)
class Shape:
    """Cache shape of one benchmark: L layers of [B, Hkv, N, D], T guidance rows, V vision slots."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tokens: int
    vision_tokens: int
    text_tokens: int
    batch: int = 1

    def check(self) -> None:
        for f in ("layers", "heads", "kv_heads", "head_dim", "tokens", "batch"):
            if getattr(self, f) < 1:
                raise ValueError(f"--{f.replace('_', '-')} must be >= 1, got {getattr(self, f)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"--heads ({self.heads}) must be a multiple of --kv-heads ({self.kv_heads})")
        if self.vision_tokens < 0 or self.text_tokens < 0:
            raise ValueError("--vision-tokens and --text-tokens must be >= 0")
        if self.vision_tokens + self.text_tokens > self.tokens:
            raise ValueError(f"--vision-tokens + --text-tokens ({self.vision_tokens} + "
                             f"{self.text_tokens}) must be <= --tokens ({self.tokens})")

    @property
    def prefix(self) -> int:
        return self.tokens - self.vision_tokens - self.text_tokens


# Architecture of the presets (decoder of the VLM) and a typical single-image prompt:
# N = system/user prefix + image tokens + T guidance tokens (question + assistant tag).
PRESETS: dict[str, Shape] = {
    # LLaVA-1.5-7B (Vicuna-7B): 336px CLIP -> 24x24 = 576 image tokens
    "llava-1.5-7b": Shape(32, 32, 32, 128, 640, 576, 40),
    # LLaVA-NeXT-7B (Mistral-7B, GQA 32/8): anyres 672x672 -> 2928 image tokens (5 tiles + newlines)
    "llava-next-7b": Shape(32, 32, 8, 128, 3000, 2928, 40),
    # Qwen2.5-VL-7B (GQA 28/4): a 896x896 image -> (896/28)^2 = 1024 tokens
    "qwen2.5-vl-7b": Shape(28, 28, 4, 128, 1100, 1024, 40),
    # the tiny test architecture
    "tiny": Shape(4, 4, 2, 32, 96, 64, 16, 2),
}
# the op shapes of the argument-less run: small enough for seconds on 2 CPU cores
DEFAULT_OPS_SHAPE = Shape(8, 16, 8, 64, 320, 256, 32, 2)


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0):
    """Random post-RoPE keys/values/guidance queries and the modality map of a synthetic prompt.

    Layout of every sample: ``prefix`` text slots, ``vision_tokens`` vision slots, then
    ``text_tokens`` guidance text slots. Returns (k_cache, v_cache, queries, q_pos, modality).
    """
    shape.check()
    g = torch.Generator().manual_seed(seed)
    L, Hq, Hkv, D = shape.layers, shape.heads, shape.kv_heads, shape.head_dim
    B, N, V, T = shape.batch, shape.tokens, shape.vision_tokens, shape.text_tokens
    P = shape.prefix
    mod = torch.full((B, N), TEXT, dtype=torch.int8)
    mod[:, P:P + V] = VISION
    if V > 0:
        q_pos = torch.arange(P + V, N, dtype=torch.int64).expand(B, T).contiguous()
    else:
        q_pos = torch.full((B, 0), -1, dtype=torch.int64)
    Tq = q_pos.shape[1]

    def rnd(*s):
        return torch.randn(*s, generator=g).to(dtype=dtype).to(device)

    k_cache = [rnd(B, Hkv, N, D) for _ in range(L)]
    v_cache = [rnd(B, Hkv, N, D) for _ in range(L)]
    queries = [rnd(B, Hq, Tq, D) for _ in range(L)]
    return k_cache, v_cache, queries, q_pos.to(device), mod.to(device)

