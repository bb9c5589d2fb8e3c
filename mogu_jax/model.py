"""The frozen base decoder (Llama family: Llama-2/3, Mistral, Qwen2, SmolLM2) as Flax Linen modules.

One readable file. Every parameter is declared once with its shape, dtype and *logical axis
names*; ``mogu_jax.sharding`` maps those names to mesh axes. Layers are stacked with
``nn.scan`` (leading ``layers`` axis on every per-layer parameter) and can be rematerialised.

Numerics: matmuls run in ``config.dtype`` (fp32 or bf16) with fp32 accumulation; norms,
RoPE, softmax and the residual stream are fp32. RoPE uses Hugging Face's half-split
("rotate_half") layout, so q/k weights load from HF checkpoints without permutation.

The KV cache is a fixed-shape pytree ``{"k": [L, B, S, KVH, Dh], "v": ...}``. Tokens passed
in one call are written at slots ``cache_index .. cache_index+T`` (the same for every row:
prompts are left-padded) and attend to every valid (``kv_mask``) slot at or before their own.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mogu_jax.config import ModelConfig

Array = Any

# Logical axis names of the KV cache (params carry theirs in the declarations below).
CACHE_AXES = ("layers", "batch", "cache_len", "kv_heads", "head_dim")


def _precision(cfg: ModelConfig):
    # fp32 compute means true fp32 matmuls on every backend (TPU/GPU would otherwise use bf16 passes).
    return jax.lax.Precision.HIGHEST if cfg.compute_dtype == jnp.float32 else None


# ----------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies exactly as transformers computes them (fp32), with rope scaling."""
    dim = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)))).astype(np.float32)
    sc = cfg.rope_scaling_dict
    rtype = sc.get("rope_type", "default")
    if rtype == "linear":
        inv = inv / np.float32(sc["factor"])
    elif rtype == "llama3":
        factor = sc["factor"]
        low, high = sc["low_freq_factor"], sc["high_freq_factor"]
        old_len = sc["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        inv_l = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, inv_l).astype(np.float32)
    return inv


def rope_cos_sin(cfg: ModelConfig, positions: Array) -> tuple[Array, Array]:
    """cos/sin of shape [B, T, head_dim] (half-split layout) for integer positions [B, T]."""
    inv = jnp.asarray(rope_inv_freq(cfg))
    freqs = positions.astype(jnp.float32)[..., None] * inv[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x: [B, T, heads, Dh]; rotate_half convention of transformers."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ------------------------------------------------------------------------ building blocks
def _init(axes, std=0.02):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


class Linear(nn.Module):
    """y = x @ kernel (+ bias); kernel [in, out] with logical axes; fp32 accumulation, fp32 result."""

    features: int
    axes: tuple[str, str]
    cfg: ModelConfig
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        kernel = self.param("kernel", _init(self.axes), (x.shape[-1], self.features), cfg.weight_dtype)
        cdt = cfg.compute_dtype
        y = jnp.einsum("...d,df->...f", x.astype(cdt), kernel.astype(cdt),
                       preferred_element_type=jnp.float32, precision=_precision(cfg))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                              (self.features,), cfg.weight_dtype)
            y = y + bias.astype(jnp.float32)
        return y


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.cfg.weight_dtype)
        x = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return scale.astype(jnp.float32) * (x * jax.lax.rsqrt(var + self.cfg.rms_norm_eps))


def dot_attention(cfg: ModelConfig, q: Array, k: Array, v: Array, mask: Array) -> Array:
    """q [B,T,H,Dh], k/v [B,S,KVH,Dh], mask [B,1,T,S] bool -> [B,T,H*Dh] fp32. GQA without repeating k/v."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    cdt = cfg.compute_dtype
    q = q.reshape(b, t, kvh, g, d).astype(cdt)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(cdt), preferred_element_type=jnp.float32,
                        precision=_precision(cfg)) * (1.0 / math.sqrt(d))
    scores = jnp.where(mask[:, :, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(cdt), v.astype(cdt), preferred_element_type=jnp.float32,
                     precision=_precision(cfg))
    return out.reshape(b, t, h * d)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv, cache_index):
        cfg = self.cfg
        b, t, _ = x.shape
        hd = cfg.head_dim
        q = Linear(cfg.num_heads * hd, ("embed", "heads"), cfg, cfg.qkv_bias, name="q_proj")(x)
        k = Linear(cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg, cfg.qkv_bias, name="k_proj")(x)
        v = Linear(cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg, cfg.qkv_bias, name="v_proj")(x)
        q = apply_rope(q.reshape(b, t, cfg.num_heads, hd), cos, sin)
        k = apply_rope(k.reshape(b, t, cfg.num_kv_heads, hd), cos, sin)
        v = v.reshape(b, t, cfg.num_kv_heads, hd)
        if kv is not None:
            ck, cv = kv
            k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
            new_kv = (k, v)
        else:
            new_kv = None
        attn = dot_attention(cfg, q, k, v, mask)  # the per-token attention output before o_proj
        out = Linear(cfg.hidden_size, ("heads", "embed"), cfg, cfg.o_bias, name="o_proj")(attn)
        return out, new_kv


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = Linear(cfg.intermediate_size, ("embed", "mlp"), cfg, cfg.mlp_bias, name="gate_proj")(x)
        up = Linear(cfg.intermediate_size, ("embed", "mlp"), cfg, cfg.mlp_bias, name="up_proj")(x)
        return Linear(cfg.hidden_size, ("mlp", "embed"), cfg, cfg.mlp_bias, name="down_proj")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv, cache_index):
        h, new_kv = Attention(self.cfg, name="attn")(RMSNorm(self.cfg, name="input_norm")(x), cos, sin, mask, kv,
                                                     cache_index)
        x = x + h
        x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="post_attn_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, new_kv


def attention_mask(cfg: ModelConfig, kv_mask: Array, t: int, cache_index) -> Array:
    """[B,1,T,S] bool: causal over cache slots, valid keys only, optional sliding window."""
    s = kv_mask.shape[1]
    q_slots = cache_index + jnp.arange(t)
    k_slots = jnp.arange(s)
    allowed = k_slots[None, :] <= q_slots[:, None]
    if cfg.sliding_window:
        allowed &= k_slots[None, :] > q_slots[:, None] - cfg.sliding_window
    return allowed[None, None] & kv_mask[:, None, None, :].astype(bool)


class Decoder(nn.Module):
    """tokens [B,T] -> logits [B,T,V] (fp32), and the updated KV cache when one is given."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: Array, positions: Optional[Array] = None, kv_mask: Optional[Array] = None,
                 cache: Optional[dict] = None, cache_index: Array | int = 0, last_only: bool = False):
        cfg = self.cfg
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if kv_mask is None:
            s = cache["k"].shape[2] if cache is not None else t
            kv_mask = jnp.ones((b, s), bool)
        embedding = self.param("embedding", _init(("vocab", "embed")), (cfg.vocab_size, cfg.hidden_size),
                               cfg.weight_dtype)
        x = jnp.take(embedding, tokens, axis=0).astype(jnp.float32)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        cos, sin = rope_cos_sin(cfg, positions)
        mask = attention_mask(cfg, kv_mask, t, cache_index)

        layer = DecoderLayer
        if cfg.remat:
            layer = nn.remat(DecoderLayer, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
        stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                        length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
        kv = (cache["k"], cache["v"]) if cache is not None else None
        x, new_kv = stack(cfg, name="layers")(x, cos, sin, mask, kv, cache_index)

        x = RMSNorm(cfg, name="final_norm")(x)
        if last_only:
            x = x[:, -1:]
        if cfg.tie_word_embeddings:
            logits = jnp.einsum("btd,vd->btv", x.astype(cfg.compute_dtype), embedding.astype(cfg.compute_dtype),
                                preferred_element_type=jnp.float32, precision=_precision(cfg))
        else:
            logits = Linear(cfg.vocab_size, ("embed", "vocab"), cfg, name="lm_head")(x)
        new_cache = {"k": new_kv[0], "v": new_kv[1]} if new_kv is not None else None
        return logits, new_cache


# ------------------------------------------------------------------------ functional API
def init_params(cfg: ModelConfig, rng: Array | int = 0) -> dict:
    """Random parameters (unboxed pytree) in the layout the converters produce."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    variables = Decoder(cfg).init(rng, jnp.zeros((1, 1), jnp.int32))
    return nn.meta.unbox(variables["params"])


def abstract_params(cfg: ModelConfig):
    """Shapes/dtypes of the params with their logical partitioning boxes, without allocating."""
    return jax.eval_shape(lambda: Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def param_logical_axes(cfg: ModelConfig):
    """Pytree of logical axis-name tuples (PartitionSpec of names), matching the params pytree."""
    return nn.get_partition_spec(abstract_params(cfg))


def apply(cfg: ModelConfig, params: dict, tokens: Array, positions: Optional[Array] = None,
          kv_mask: Optional[Array] = None, cache: Optional[dict] = None, cache_index: Array | int = 0,
          last_only: bool = False):
    """Pure forward: ``(logits, new_cache)``. Differentiable and vmappable over ``params``."""
    return Decoder(cfg).apply({"params": params}, tokens, positions, kv_mask, cache, cache_index, last_only)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    dtype = dtype or cfg.compute_dtype
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
