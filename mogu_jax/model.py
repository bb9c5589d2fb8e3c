"""The frozen base decoder (Llama family: Llama-2/3, Mistral, Qwen2, SmolLM2; Falcon; Baichuan/Baichuan2) as
Flax Linen modules: ONE decoder whose architecture differences are config flags (``ModelConfig``):

* ``norm``: RMSNorm (``scale``) or LayerNorm (``scale`` + ``bias``);
* ``parallel_residual`` / ``shared_norm``: ``x + attn(n(x)) + mlp(n(x))`` (Falcon-7B: one norm; Falcon
  new_decoder_architecture: ``input_norm`` for attention and ``mlp_norm`` for the MLP) instead of the
  sequential ``input_norm`` / ``post_attn_norm`` pair;
* ``gated_mlp`` / ``mlp_act``: SwiGLU (``gate_proj``, ``up_proj``, ``down_proj``) or a plain GELU MLP
  (``up_proj``, ``down_proj``);
* ``alibi``: rotary positions (default) or an ALiBi bias on the attention scores (Falcon-RW, Baichuan-13B);
* ``norm_head``: the lm_head's columns (HF rows) L2-normalised at use (Baichuan 2's NormHead), so the
  stored weights stay exactly the checkpoint's.

Fused checkpoint tensors (Falcon ``query_key_value``, Baichuan ``W_pack``) are split by the conversion
table; the model always has separate ``q_proj`` / ``k_proj`` / ``v_proj`` kernels.

One readable file. Every parameter is declared once with its shape, dtype and *logical axis
names*; ``mogu_jax.sharding`` maps those names to mesh axes. Layers are stacked with
``nn.scan`` (leading ``layers`` axis on every per-layer parameter) and can be rematerialised.

Numerics: matmuls run in ``config.dtype`` (fp32 or bf16) with fp32 accumulation; norms,
RoPE, ALiBi, softmax and the residual stream are fp32. RoPE uses Hugging Face's half-split
("rotate_half") layout, so q/k weights load from HF checkpoints without permutation.

The KV cache is a fixed-shape pytree ``{"k": [L, B, KVH, S, Dh], "v": ...}`` (heads before slots, so
attention reads it as stored). Tokens passed in one call are written at slots
``cache_index .. cache_index+T`` (the same for every row: prompts are left-padded) and attend to every
valid (``kv_mask``) slot at or before their own.

MoGU (``mogu_jax.mogu``) lives in the attention output projection: ``mode`` selects ``base``, ``glad``,
``unwilling`` or ``routed``; the branch and router parameters are separate subtrees passed beside the
base parameters, so each training stage can differentiate exactly one of them.

Two drivers run the same ``DecoderLayer``: ``nn.scan`` over the stacked layers (training, init) and an
unrolled loop over per-layer parameters (:func:`forward_unrolled`, for decoding: on CPU a scan copies
each layer's weight slice every step).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mogu_jax import attention as attention_lib
from mogu_jax import mogu as mogu_lib
from mogu_jax import numerics
from mogu_jax.sharding import constrain
from mogu_jax.config import ModelConfig
from mogu_jax.errors import MoguError

Array = Any

# Logical axis names of the KV cache (params carry theirs in the declarations below).
CACHE_AXES = ("layers", "batch", "kv_heads", "cache_len", "head_dim")


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


# ----------------------------------------------------------------------------- ALiBi
def alibi_slopes(cfg: ModelConfig) -> np.ndarray:
    """Per-head ALiBi slopes [H] (fp32) as the reference implementations compute them: the geometric
    sequence ``2^(-8/n)^k`` for the closest power of two n, then every other slope of 2n for the rest."""
    h = cfg.num_heads
    p2 = 2 ** math.floor(math.log2(h))
    if cfg.alibi == "falcon":  # transformers' build_alibi_tensor: fp32 torch.pow of an fp32 base
        base = np.float32(2 ** (-(2 ** -(math.log2(p2) - 3))))
        slopes = [base ** np.float32(k) for k in range(1, p2 + 1)]
        if p2 != h:
            extra = np.float32(2 ** (-(2 ** -(math.log2(2 * p2) - 3))))
            slopes += [extra ** np.float32(k) for k in range(1, 1 + 2 * min(p2, h - p2), 2)]
        return np.asarray(slopes, np.float32)
    if cfg.alibi == "baichuan":  # Baichuan-13B's _get_interleave: Python floats, then an fp32 tensor
        def pow2(n):
            start = 2 ** (-(2 ** -(math.log2(n) - 3)))
            return [start * start ** i for i in range(n)]

        def interleave(n):
            if math.log2(n).is_integer():
                return pow2(n)
            c = 2 ** math.floor(math.log2(n))
            return pow2(c) + interleave(2 * c)[0::2][: n - c]

        return np.asarray(interleave(h), np.float32)
    raise MoguError(f"unknown alibi formulation {cfg.alibi!r} (falcon or baichuan)")


def alibi_bias(cfg: ModelConfig, kv_mask: Array) -> Array:
    """The ALiBi bias [B, H, 1, S] fp32, added to the scaled scores ``q.k / sqrt(Dh)``.

    A key's position is ``cumsum(kv_mask) - 1`` over the cache slots (0 on invalid slots, which the mask
    hides anyway), so left padding and the KV cache give each real key its position in its own row;
    only key positions enter (softmax is shift-invariant per query), as in both references.

    * ``falcon`` (transformers' Falcon, the SDPA path it uses by default, = the original Falcon-RW code):
      ``bf16(bf16(slope) * bf16(pos)) / sqrt(Dh)``: the product is formed in bfloat16, cast to fp32 and
      divided by sqrt(Dh) (Falcon adds ALiBi to the raw scores, then scales). Note: transformers' *eager*
      Falcon ALiBi path adds this bias twice (once in the mask, once in the attention), so it differs from
      SDPA and from the original model; we follow SDPA.
    * ``baichuan`` (Baichuan-13B): ``slope * pos`` in fp32, added after the 1/sqrt(Dh) scaling."""
    m = kv_mask.astype(jnp.int32)
    pos = (jnp.cumsum(m, axis=1) - 1) * m  # [B, S]
    slopes = alibi_slopes(cfg)
    if cfg.alibi == "falcon":
        s16 = slopes.astype(ml_dtypes.bfloat16).astype(np.float32)  # exact bf16 values, held in fp32
        # the product of two bf16 values is exact in fp32; round it to bf16 explicitly (XLA may otherwise keep
        # a bf16 multiply in excess precision)
        prod = _round_bf16(jnp.asarray(s16)[None, :, None] * _round_bf16(pos.astype(jnp.float32))[:, None, :])
        bias = prod / jnp.float32(math.sqrt(cfg.head_dim))
    else:
        bias = jnp.asarray(slopes)[None, :, None] * pos.astype(jnp.float32)[:, None, :]
    return bias[:, :, None, :]


def _round_bf16(x: Array) -> Array:
    """fp32 -> the nearest bfloat16 value (round half to even), kept in fp32; finite inputs."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def positional(cfg: ModelConfig, positions: Array, kv_mask: Array):
    """(cos, sin, bias): rotary tables for rotary models, the ALiBi bias for ALiBi models (others None)."""
    if cfg.alibi:
        return None, None, alibi_bias(cfg, kv_mask)
    cos, sin = rope_cos_sin(cfg, positions)
    return cos, sin, None


# ------------------------------------------------------------------------ building blocks
def _init(axes, std=0.02):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


class Linear(nn.Module):
    """y = x @ kernel (+ bias); kernel [in, out] with logical axes; fp32 accumulation, fp32 result."""

    features: int
    axes: tuple[str, str]
    cfg: ModelConfig
    use_bias: bool = False
    normalize: bool = False  # L2-normalise each output column of the kernel at use (Baichuan 2 NormHead)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        kernel = self.param("kernel", _init(self.axes), (x.shape[-1], self.features), cfg.weight_dtype)
        if self.normalize:  # torch.nn.functional.normalize over each HF row: w / max(||w||, 1e-12)
            k32 = kernel.astype(jnp.float32)
            kernel = k32 / jnp.maximum(jnp.sqrt(jnp.sum(k32 * k32, axis=0, keepdims=True)), 1e-12)
        y = numerics.einsum(cfg, "...d,df->...f", x, kernel)
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


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm: (x - mean) / sqrt(var + eps) * scale + bias, in fp32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,),
                           self.cfg.weight_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,),
                          self.cfg.weight_dtype)
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        xc = x - mean
        var = jnp.mean(jnp.square(xc), axis=-1, keepdims=True)
        return xc * jax.lax.rsqrt(var + self.cfg.rms_norm_eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def Norm(cfg: ModelConfig, name: Optional[str] = None) -> nn.Module:
    """The config's norm: RMSNorm (``norm == "rms"``) or LayerNorm (``"layer"``)."""
    if cfg.norm == "rms":
        return RMSNorm(cfg, name=name)
    if cfg.norm == "layer":
        return LayerNorm(cfg, name=name)
    raise MoguError(f"unknown norm {cfg.norm!r} (rms or layer)")


def dot_attention(cfg: ModelConfig, q: Array, k: Array, v: Array, mask: Array, bias: Optional[Array] = None) -> Array:
    """The reference attention (:func:`mogu_jax.attention.reference_attention`)."""
    return attention_lib.reference_attention(cfg, q, k, v, mask, bias)


class Attention(nn.Module):
    cfg: ModelConfig
    mode: str = "base"

    @nn.compact
    def __call__(self, x, cos, sin, mask, bias, kv, cache_index, mogu):
        cfg = self.cfg
        b, t, _ = x.shape
        hd = cfg.head_dim
        q = Linear(cfg.num_heads * hd, ("embed", "heads"), cfg, cfg.qkv_bias, name="q_proj")(x)
        k = Linear(cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg, cfg.qkv_bias, name="k_proj")(x)
        v = Linear(cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg, cfg.qkv_bias, name="v_proj")(x)
        q = constrain(q.reshape(b, t, cfg.num_heads, hd), ("batch", "length", "heads", "head_dim"))
        k = k.reshape(b, t, cfg.num_kv_heads, hd)
        if not cfg.alibi:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = k.transpose(0, 2, 1, 3)  # [B, KVH, T, Dh]
        v = v.reshape(b, t, cfg.num_kv_heads, hd).transpose(0, 2, 1, 3)
        if kv is not None:
            ck, cv = kv
            k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=2)
            v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=2)
            new_kv = (k, v)
        else:
            new_kv = None
        # the per-token attention output before o_proj
        attn = attention_lib.attend(cfg, q, k, v, mask, bias, cached=kv is not None)
        attn = constrain(attn, ("batch", "length", "heads"))
        out = Linear(cfg.hidden_size, ("heads", "embed"), cfg, cfg.o_bias, name="o_proj")(attn)
        out, a, b_ = mogu_lib.project(cfg, self.mode, attn, out, **mogu)
        return out, new_kv, (a, b_)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        act = _ACTS[cfg.mlp_act]
        if cfg.gated_mlp:
            gate = Linear(cfg.intermediate_size, ("embed", "mlp"), cfg, cfg.mlp_bias, name="gate_proj")(x)
            up = Linear(cfg.intermediate_size, ("embed", "mlp"), cfg, cfg.mlp_bias, name="up_proj")(x)
            h = act(gate) * up
        else:
            h = act(Linear(cfg.intermediate_size, ("embed", "mlp"), cfg, cfg.mlp_bias, name="up_proj")(x))
        h = constrain(h, ("batch", "length", "mlp"))
        return Linear(cfg.hidden_size, ("mlp", "embed"), cfg, cfg.mlp_bias, name="down_proj")(h)


_ACTS = {"silu": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
         "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


class DecoderLayer(nn.Module):
    """One decoder layer. ``mogu``: this layer's slices of the MoGU subtrees the mode needs
    (``glad``, ``unwilling``, ``router``, and ``routed``: whether this layer has a router)."""

    cfg: ModelConfig
    mode: str = "base"

    @nn.compact
    def __call__(self, x, cos, sin, mask, bias, kv, cache_index, mogu):
        cfg = self.cfg
        n = Norm(cfg, name="input_norm")(x)
        h, new_kv, ab = Attention(cfg, self.mode, name="attn")(n, cos, sin, mask, bias, kv, cache_index, mogu)
        if cfg.parallel_residual:  # Falcon: x + (mlp(n'(x)) + attn(n(x)))
            m = n if cfg.shared_norm else Norm(cfg, name="mlp_norm")(x)
            x = x + (MLP(cfg, name="mlp")(m) + h)
        else:
            x = x + h
            x = x + MLP(cfg, name="mlp")(Norm(cfg, name="post_attn_norm")(x))
        x = constrain(x, ("batch", "length", "embed"))
        return x, (new_kv, ab)


def attention_mask(cfg: ModelConfig, kv_mask: Array, t: int, cache_index) -> Array:
    """[B,1,T,S] bool: causal over cache slots, valid keys only, optional sliding window."""
    s = kv_mask.shape[1]
    q_slots = cache_index + jnp.arange(t)
    k_slots = jnp.arange(s)
    allowed = k_slots[None, :] <= q_slots[:, None]
    if cfg.sliding_window:
        allowed &= k_slots[None, :] > q_slots[:, None] - cfg.sliding_window
    return allowed[None, None] & kv_mask[:, None, None, :].astype(bool)


def embed(cfg: ModelConfig, embedding: Array, tokens: Array) -> Array:
    return jnp.take(embedding, tokens, axis=0).astype(jnp.float32)


def lm_head(cfg: ModelConfig, name: Optional[str] = None) -> Linear:
    """The untied output head (a NormHead when ``cfg.norm_head``)."""
    return Linear(cfg.vocab_size, ("embed", "vocab"), cfg, normalize=cfg.norm_head, name=name)


def tied_logits(cfg: ModelConfig, x: Array, embedding: Array) -> Array:
    return numerics.einsum(cfg, "btd,vd->btv", x, embedding)


REMAT_POLICIES = {"nothing": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_policy(cfg: ModelConfig):
    try:
        return REMAT_POLICIES[cfg.remat_policy]
    except KeyError:
        raise MoguError(f"unknown remat_policy {cfg.remat_policy!r}; one of {', '.join(REMAT_POLICIES)}") from None


def layer_class(cfg: ModelConfig):
    """``DecoderLayer``, rematerialised (nothing saved) when ``cfg.remat``; both layer drivers use it."""
    if cfg.remat:
        return nn.remat(DecoderLayer, prevent_cse=False, policy=remat_policy(cfg))
    return DecoderLayer


def layer_stack(cfg: ModelConfig, length: int):
    """``nn.scan`` of :func:`layer_class` over ``length`` stacked layers (leading ``layers`` axis)."""
    return nn.scan(layer_class(cfg), variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, 0),
                   length=length, metadata_params={nn.PARTITION_NAME: "layers"})


class Decoder(nn.Module):
    """tokens [B,T] -> (logits [B,T,V] fp32, new cache or None, (a, b) each [L,B,T]).

    ``mogu``: the MoGU subtrees the mode needs, each stacked over all L layers (see :func:`mogu_inputs`)."""

    cfg: ModelConfig
    mode: str = "base"

    @nn.compact
    def __call__(self, tokens: Array, positions: Optional[Array] = None, kv_mask: Optional[Array] = None,
                 cache: Optional[dict] = None, cache_index: Array | int = 0, last_only: bool = False,
                 mogu: Optional[dict] = None, logits_from: int = 0):
        cfg = self.cfg
        b, t = tokens.shape
        positions, kv_mask = _defaults(tokens, positions, kv_mask, cache["k"].shape[3] if cache is not None else t)
        embedding = self.param("embedding", _init(("vocab", "embed")), (cfg.vocab_size, cfg.hidden_size),
                               cfg.weight_dtype)
        x = constrain(embed(cfg, embedding, tokens), ("batch", "length", "embed"))
        cos, sin, bias = positional(cfg, positions, kv_mask)
        mask = attention_mask(cfg, kv_mask, t, cache_index)

        kv = (cache["k"], cache["v"]) if cache is not None else None
        stack = layer_stack(cfg, cfg.num_layers)(cfg, self.mode, name="layers")
        x, (new_kv, ab) = stack(x, cos, sin, mask, bias, kv, cache_index, mogu or {})

        x = Norm(cfg, name="final_norm")(x)
        x = _logit_rows(x, last_only, logits_from)
        if cfg.tie_word_embeddings:
            logits = tied_logits(cfg, x, embedding)
        else:
            logits = lm_head(cfg, name="lm_head")(x)
        logits = constrain(logits, ("batch", "length", "vocab"))
        new_cache = {"k": new_kv[0], "v": new_kv[1]} if new_kv is not None else None
        return logits, new_cache, ab


def _logit_rows(x: Array, last_only: bool, logits_from) -> Array:
    """The positions the LM head is applied to: the last one, or ``logits_from`` onwards (a static int:
    training skips the prompt positions no example takes a loss at; the head is ~20% of a small model's
    FLOPs per token), or per row the positions ``logits_from`` [B, W] (an int array: each row's response
    window, :func:`mogu_jax.data.loss_window`)."""
    if last_only:
        return x[:, -1:]
    if not isinstance(logits_from, (int, np.integer)):
        return jnp.take_along_axis(x, jnp.asarray(logits_from)[..., None], axis=1)
    return x[:, logits_from:] if logits_from else x


def _defaults(tokens, positions, kv_mask, s):
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if kv_mask is None:
        kv_mask = jnp.ones((b, s), bool)
    return positions, kv_mask


# ------------------------------------------------------------------------ functional API
class ModelOutput(NamedTuple):
    logits: Array  # [B, T, V] fp32 (T = 1 with last_only; T - logits_from with logits_from)
    cache: Any  # the updated KV cache, or None
    alphas: Array  # [R, B, T]: the unwilling weight a of each routed layer (zeros unless mode == "routed")
    betas: Array  # [R, B, T]: the glad weight b


def split_params(params: dict) -> tuple[dict, dict]:
    """A MoGU tree {"base", "glad", "unwilling", "router"} or a plain base tree -> (base, mogu parts)."""
    if "base" in params:
        return params["base"], {k: params[k] for k in mogu_lib.PARTS if k in params}
    return params, {}


def mogu_inputs(cfg: ModelConfig, mode: str, parts: dict) -> dict:
    """The per-layer MoGU inputs of ``mode``, stacked over all L layers (routers gathered to the layers
    that have one; ``routed`` marks those layers: with routers in a subset of layers, the MoGU layers, the only
    ones where a branch runs in any mode)."""
    if mode not in mogu_lib.MODES:
        raise MoguError(f"unknown mode {mode!r}; one of {', '.join(mogu_lib.MODES)}")
    need = {"base": (), "glad": ("glad",), "unwilling": ("unwilling",),
            "routed": ("glad", "unwilling", "router")}[mode]
    missing = [n for n in need if n not in parts]
    if missing:
        raise MoguError(f"mode {mode!r} needs the {', '.join(missing)} parameters, which these params lack")
    out = {n: parts[n] for n in need}
    ids = cfg.router_layer_ids
    if mode == "routed" and not cfg.routers_everywhere:
        index = np.zeros(cfg.num_layers, np.int32)
        index[list(ids)] = np.arange(len(ids))
        out["router"] = jax.tree_util.tree_map(lambda r: r[index], parts["router"])
    if mode == "routed" or (mode != "base" and not cfg.routers_everywhere):
        routed = np.zeros(cfg.num_layers, bool)
        routed[list(ids)] = True
        out["routed"] = jnp.asarray(routed)
    return out


def _router_rows(cfg: ModelConfig, mode: str, ab) -> tuple[Array, Array]:
    a, b = ab
    if mode == "routed" and not cfg.routers_everywhere:
        ids = np.asarray(cfg.router_layer_ids)
        return a[ids], b[ids]
    return a, b


def forward(cfg: ModelConfig, params: dict, tokens: Array, positions: Optional[Array] = None,
            kv_mask: Optional[Array] = None, cache: Optional[dict] = None, cache_index: Array | int = 0,
            last_only: bool = False, mode: str = "base", logits_from: int = 0,
            shared_prefix: Sequence[int] = (), hidden: Optional[Array] = None) -> ModelOutput:
    """Pure forward over the stacked layers (``nn.scan``; with ``cfg.scan_layers`` off and no cache, the
    same layers unrolled, :func:`forward_unrolled`). ``params``: a base tree, or a MoGU tree with the parts
    ``mode`` needs. Differentiable and vmappable over ``params``.

    ``shared_prefix`` (token ids, static; training): every row of ``tokens`` starts with these tokens (e.g. a
    chat template's system prompt). They are run once, not once per row, and the rows continue from their
    keys and values; logits and router weights are those of the plain forward (see :func:`_forward_shared`).

    ``hidden`` [B, T, D] (training, with ``cfg.frozen_layers = k > 0``): the residual stream entering layer k,
    as :func:`lower_hidden` computed it for these tokens; the embedding and layers below k are then skipped
    (they hold nothing trained, so their output is the same every epoch)."""
    if hidden is not None and not 0 < cfg.frozen_layers < cfg.num_layers:
        raise MoguError("hidden= needs 0 < cfg.frozen_layers < num_layers")
    if shared_prefix:
        if cache is not None:
            raise MoguError("shared_prefix is for cache-free forwards (training); decoding has its own cache")
        return _forward_shared(cfg, params, tokens, positions, kv_mask, mode, logits_from, tuple(shared_prefix),
                               hidden)
    if not cfg.scan_layers and cache is None:
        return forward_unrolled(cfg, params, tokens, positions, kv_mask, None, cache_index, last_only, mode,
                                logits_from, hidden)
    if cfg.scan_layers and 0 < cfg.frozen_layers < cfg.num_layers:
        return _forward_frozen_below(cfg, params, tokens, positions, kv_mask, cache, cache_index, last_only, mode,
                                     logits_from, hidden)
    base, parts = split_params(params)
    mogu = mogu_inputs(cfg, mode, parts)
    logits, new_cache, ab = Decoder(cfg, mode).apply({"params": base}, tokens, positions, kv_mask, cache,
                                                     cache_index, last_only, mogu, logits_from)
    return ModelOutput(logits, new_cache, *_router_rows(cfg, mode, ab))


def lower_hidden(cfg: ModelConfig, params: dict, tokens: Array, kv_mask: Optional[Array] = None,
                 shared_prefix: int = 0) -> Array:
    """The residual stream entering layer ``cfg.frozen_layers`` (fp32 [B, T, D]): the embedding and the plain
    base layers below it. Training computes it once per example when nothing below is trained
    (``train.cache_frozen_layers``) and hands it to :func:`forward` as ``hidden``. ``shared_prefix`` (static):
    every row starts with the same first ``shared_prefix`` tokens; they run once (one row) into a cache and the
    rows continue from it, broadcast (causal attention: the prefix never sees the rows): the same values for
    ~shared_prefix/T less work."""
    cfg = cfg.replace(remat=False)
    k = cfg.frozen_layers
    base, _ = split_params(params)
    b, t = tokens.shape
    positions, kv_mask = _defaults(tokens, None, kv_mask, t)
    stack = layer_stack(cfg, k)(cfg, "base")
    lower = jax.tree_util.tree_map(lambda a: a[:k], base["layers"])

    def run(tok, pos, mask, kv, index):
        x = embed(cfg, base["embedding"], tok)
        cos, sin, bias = positional(cfg, pos, mask)
        x, (kv, _) = stack.apply({"params": lower}, x, cos, sin, attention_mask(cfg, mask, tok.shape[1], index), bias,
                                 kv, index, {})
        return x.astype(jnp.float32), kv

    p = shared_prefix
    if not 0 < p < t:
        return run(tokens, positions, kv_mask, None, 0)[0]
    cache = init_cache(cfg, 1, t)
    head, kv = run(tokens[:1, :p], positions[:1, :p], jnp.ones((1, t), bool), (cache["k"][:k], cache["v"][:k]), 0)
    kv = jax.tree_util.tree_map(lambda c: jnp.broadcast_to(c, c.shape[:1] + (b,) + c.shape[2:]), kv)
    rest, _ = run(tokens[:, p:], positions[:, p:], kv_mask, kv, p)
    return jnp.concatenate([jnp.broadcast_to(head, (b,) + head.shape[1:]), rest], axis=1)


def _forward_frozen_below(cfg: ModelConfig, params: dict, tokens: Array, positions, kv_mask, cache, cache_index,
                          last_only: bool, mode: str, logits_from: int, hidden=None) -> ModelOutput:
    """:func:`forward` with the stacked layers cut at ``k = cfg.frozen_layers``: layers ``[0, k)`` hold nothing
    that is trained, so they run as a plain base stack (no remat, no MoGU inputs: below the lowest router a
    routed layer *is* the base layer) whose output enters the differentiated upper stack through
    ``stop_gradient``. The same values as the single scan; the backward pass (and remat's recompute) covers
    only the upper ``L - k`` layers, where a single scan carrying per-layer trained inputs differentiates all."""
    k = cfg.frozen_layers
    if mode != "base" and min(cfg.router_layer_ids) < k:
        raise MoguError(f"frozen_layers={k} would cut through the MoGU layers (the lowest is "
                        f"{min(cfg.router_layer_ids)}; model.router_layers)")
    base, parts = split_params(params)
    mogu = mogu_inputs(cfg, mode, parts)
    b, t = tokens.shape
    positions, kv_mask = _defaults(tokens, positions, kv_mask, cache["k"].shape[3] if cache is not None else t)
    x = embed(cfg, base["embedding"], tokens)
    cos, sin, bias = positional(cfg, positions, kv_mask)
    mask = attention_mask(cfg, kv_mask, t, cache_index)

    def cut(tree, lo, hi):
        return jax.tree_util.tree_map(lambda a: a[lo:hi], tree)

    kv_lo = (cache["k"][:k], cache["v"][:k]) if cache is not None else None
    kv_hi = (cache["k"][k:], cache["v"][k:]) if cache is not None else None
    if hidden is None:
        plain = cfg.replace(remat=False)
        x, (new_lo, _) = layer_stack(plain, k)(plain, "base").apply(
            {"params": cut(base["layers"], 0, k)}, x, cos, sin, mask, bias, kv_lo, cache_index, {})
    else:  # the lower layers' output, computed once (lower_hidden); their cache slots stay as they were
        x, new_lo = hidden.astype(jnp.float32), kv_lo
    x = jax.lax.stop_gradient(x)
    new_lo = jax.lax.stop_gradient(new_lo)
    x, (new_hi, (a, b_)) = layer_stack(cfg, cfg.num_layers - k)(cfg, mode).apply(
        {"params": cut(base["layers"], k, None)}, x, cos, sin, mask, bias, kv_hi, cache_index,
        cut(mogu, k, None))
    x = _logit_rows(Norm(cfg).apply({"params": base["final_norm"]}, x), last_only, logits_from)
    if cfg.tie_word_embeddings:
        logits = tied_logits(cfg, x, base["embedding"])
    else:
        logits = lm_head(cfg).apply({"params": base["lm_head"]}, x)
    new_cache = None
    if cache is not None:
        new_cache = {"k": jnp.concatenate([new_lo[0], new_hi[0]]), "v": jnp.concatenate([new_lo[1], new_hi[1]])}
    pad = jnp.zeros((k,) + a.shape[1:], a.dtype)  # layers below the cut have no router (dropped below)
    ab = (jnp.concatenate([pad, a]), jnp.concatenate([pad, b_]))
    return ModelOutput(logits, new_cache, *_router_rows(cfg, mode, ab))


def _forward_shared(cfg: ModelConfig, params: dict, tokens: Array, positions, kv_mask, mode: str,
                    logits_from: int, prefix: tuple, hidden=None) -> ModelOutput:
    """:func:`forward` of rows that all start with ``prefix`` (P tokens): the prefix runs once (batch 1) and
    fills a cache; the B rows run from position P on over that cache, broadcast to B rows. The same maths as
    the plain forward (causal attention: the prefix never sees the rows), so the same values and, through the
    broadcast cache, the same gradients, for ~P/T less work in every projection and MLP. The router weights
    of the prefix positions are broadcast to all rows, so per-position losses see every position.
    ``logits_from`` must be >= P (no logits are taken inside the prefix); ``kv_mask``/``positions`` cover all
    T positions (the prefix part of each row is taken as valid)."""
    b, t = tokens.shape
    p = len(prefix)
    if not 0 < p < t:
        raise MoguError(f"shared_prefix of {p} tokens needs rows longer than it; the rows have {t} tokens")
    if isinstance(logits_from, (int, np.integer)) and logits_from < p:
        raise MoguError(f"logits_from ({logits_from}) must not fall inside the shared prefix ({p} tokens)")
    positions, kv_mask = _defaults(tokens, positions, kv_mask, t)
    head_tokens = jnp.asarray(prefix, jnp.int32)[None]
    head_pos = positions[:1, :p]
    head_mask = jnp.ones((1, t), bool)
    if cfg.scan_layers:
        fwd, cache, axis = forward, init_cache(cfg, 1, t, jnp.float32), 1
    else:
        fwd, cache, axis = forward_unrolled, init_cache_unrolled(cfg, 1, t, jnp.float32), 0
    extra = {} if hidden is None else {"hidden": hidden[:1, :p]}
    head = fwd(cfg, params, head_tokens, head_pos, head_mask, cache, 0, True, mode, **extra)  # (logits unused)
    cache = jax.tree_util.tree_map(lambda c: jnp.broadcast_to(c, c.shape[:axis] + (b,) + c.shape[axis + 1:]),
                                   head.cache)
    extra = {} if hidden is None else {"hidden": hidden[:, p:]}
    rest = fwd(cfg, params, tokens[:, p:], positions[:, p:], kv_mask, cache, p, False, mode, logits_from - p,
               **extra)

    def grow(h, r):  # [R, 1, P] + [R, B, T - P] -> [R, B, T]
        return jnp.concatenate([jnp.broadcast_to(h, (h.shape[0], b, p)), r], axis=2)

    return ModelOutput(rest.logits, None, grow(head.alphas, rest.alphas), grow(head.betas, rest.betas))


def apply(cfg: ModelConfig, params: dict, tokens: Array, positions: Optional[Array] = None,
          kv_mask: Optional[Array] = None, cache: Optional[dict] = None, cache_index: Array | int = 0,
          last_only: bool = False, mode: str = "base"):
    """``(logits, new_cache)``: :func:`forward` without the router weights."""
    out = forward(cfg, params, tokens, positions, kv_mask, cache, cache_index, last_only, mode)
    return out.logits, out.cache


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Stacked per-layer leaves -> a tuple of per-layer pytrees (for :func:`forward_unrolled`)."""
    base, parts = split_params(params)
    out = {k: v for k, v in base.items() if k != "layers"}
    out["layers"] = tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], base["layers"]) for i in range(num_layers))
    if not parts:
        return out
    return {"base": out, **parts}


def forward_unrolled(cfg: ModelConfig, params: dict, tokens: Array, positions: Optional[Array] = None,
                     kv_mask: Optional[Array] = None, cache: Optional[tuple] = None, cache_index: Array | int = 0,
                     last_only: bool = False, mode: str = "base", logits_from: int = 0,
                     hidden: Optional[Array] = None) -> ModelOutput:
    """The same maths as :func:`forward` (the same ``DecoderLayer``), layer by layer over per-layer
    parameters (``params["layers"]`` a tuple, see :func:`unstack_layers`, or stacked) and a per-layer
    cache (a tuple of ``{"k", "v"}`` [B, KVH, S, Dh], see :func:`init_cache_unrolled`). ``hidden``: the
    residual stream entering layer ``cfg.frozen_layers`` (:func:`lower_hidden`); the layers below are skipped."""
    base, parts = split_params(params)
    mogu = mogu_inputs(cfg, mode, parts)
    b, t = tokens.shape
    positions, kv_mask = _defaults(tokens, positions, kv_mask, cache[0]["k"].shape[2] if cache is not None else t)
    start = cfg.frozen_layers if hidden is not None else 0
    x = embed(cfg, base["embedding"], tokens) if hidden is None else hidden.astype(jnp.float32)
    cos, sin, bias = positional(cfg, positions, kv_mask)
    mask = attention_mask(cfg, kv_mask, t, cache_index)
    new_cache = [cache[i] if cache is not None else None for i in range(start)]
    alphas, betas = [jnp.zeros((b, t), jnp.float32)] * start, [jnp.zeros((b, t), jnp.float32)] * start
    x, upper, ab = _unrolled_layers(cfg, mode, base["layers"], mogu, x, (cos, sin, mask, bias), cache, cache_index,
                                    range(start, cfg.num_layers))
    new_cache += upper
    alphas += ab[0]
    betas += ab[1]
    x = _logit_rows(Norm(cfg).apply({"params": base["final_norm"]}, x), last_only, logits_from)
    if cfg.tie_word_embeddings:
        logits = tied_logits(cfg, x, base["embedding"])
    else:
        logits = lm_head(cfg).apply({"params": base["lm_head"]}, x)
    ab = (jnp.stack(alphas), jnp.stack(betas))
    return ModelOutput(logits, tuple(new_cache) if cache is not None else None, *_router_rows(cfg, mode, ab))


def trunk_unrolled(cfg: ModelConfig, params: dict, tokens: Array, positions: Array, kv_mask: Array, cache: tuple,
                   cache_index: Array | int, stop: int) -> tuple[Array, tuple]:
    """The embedding and the plain base layers ``[0, stop)``, layer by layer over a per-layer ``cache`` of ``stop``
    entries: (the residual stream entering layer ``stop``, the updated cache). Below the lowest router every MoGU
    mode is the base model, so the routed and the base model fed the same tokens share this part
    (:class:`mogu_jax.generate.RoutedHandoff`); :func:`forward_unrolled` with ``hidden`` continues from it."""
    base, _ = split_params(params)
    x = embed(cfg, base["embedding"], tokens)
    cos, sin, bias = positional(cfg, positions, kv_mask)
    mask = attention_mask(cfg, kv_mask, tokens.shape[1], cache_index)
    x, new_cache, _ = _unrolled_layers(cfg, "base", base["layers"], None, x, (cos, sin, mask, bias), cache,
                                       cache_index, range(stop))
    return x, tuple(new_cache)


def _unrolled_layers(cfg: ModelConfig, mode: str, layers, mogu, x: Array, rope_mask: tuple, cache, cache_index,
                     ids) -> tuple[Array, list, tuple[list, list]]:
    """Layers ``ids`` one by one (per-layer params of ``layers``, a tuple or stacked; ``cache`` indexed by layer id):
    (x after them, their updated caches, (their a rows, their b rows))."""
    cos, sin, mask, bias = rope_mask
    layer, plain = layer_class(cfg)(cfg, mode), layer_class(cfg)(cfg, "base")
    routed_ids = set(cfg.router_layer_ids)
    new_cache, alphas, betas = [], [], []
    for i in ids:
        lp = layers[i] if isinstance(layers, (tuple, list)) else jax.tree_util.tree_map(lambda a: a[i], layers)
        kv = (cache[i]["k"], cache[i]["v"]) if cache is not None else None
        if mode != "base" and i not in routed_ids:
            # a layer without a router is the base layer in every mode (mogu.project's `routed` mask), known
            # statically here
            x, (kv, (a, b_)) = plain.apply({"params": lp}, x, cos, sin, mask, bias, kv, cache_index, {})
        else:
            m = {} if mogu is None else jax.tree_util.tree_map(lambda a: a[i], mogu)
            x, (kv, (a, b_)) = layer.apply({"params": lp}, x, cos, sin, mask, bias, kv, cache_index, m)
        new_cache.append({"k": kv[0], "v": kv[1]} if kv is not None else None)
        alphas.append(a)
        betas.append(b_)
    return x, new_cache, (alphas, betas)


def init_params(cfg: ModelConfig, rng: Array | int = 0) -> dict:
    """Random base parameters (unboxed pytree) in the layout the converters produce."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    variables = Decoder(cfg).init(rng, jnp.zeros((1, 1), jnp.int32))
    return nn.meta.unbox(variables["params"])


def abstract_params(cfg: ModelConfig):
    """Shapes/dtypes of the base params with their logical partitioning boxes, without allocating."""
    return jax.eval_shape(lambda: Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def param_logical_axes(cfg: ModelConfig):
    """Pytree of logical axis-name tuples (PartitionSpec of names), matching the base params pytree."""
    return nn.get_partition_spec(abstract_params(cfg))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """Stacked cache for :func:`forward`: ``{"k", "v"}`` of shape [L, B, KVH, S, Dh]."""
    dtype = dtype or cfg.compute_dtype
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def init_cache_unrolled(cfg: ModelConfig, batch: int, max_len: int, dtype=None, layers: Optional[int] = None) -> tuple:
    """Per-layer cache for :func:`forward_unrolled`: a tuple of ``{"k", "v"}`` [B, KVH, S, Dh], one per layer
    (``layers`` of them: default all)."""
    dtype = dtype or cfg.compute_dtype
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    n = cfg.num_layers if layers is None else layers
    return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(n))
