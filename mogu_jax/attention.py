"""Attention: the reference einsum/softmax path and the fused kernels, chosen by ``model.attention``.

* ``xla``: the reference (:func:`reference_attention`): an einsum for the scores, fp32 softmax, an einsum
  for the values. Exact (parity with transformers), takes every mask, ALiBi bias and sliding window; it
  materialises the full ``[B, H, T, S]`` score tensor.
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (cuDNN flash attention, GPU, bf16/fp16).
* ``splash``: the Pallas splash-attention kernel (TPU), causal with segment ids for padding, inside a
  ``shard_map`` over the mesh of the active activation sharding (batch over data x fsdp, heads over tensor).
* ``auto``: ``splash`` on TPU, ``cudnn`` on GPU with a 16-bit compute dtype, else ``xla``.

The kernels take cache-free forwards (training, and a forward over whole prompts); a forward with a KV cache
(decoding) uses the reference. A model whose attention a kernel cannot take (an ALiBi bias, a sliding window)
uses the reference and says so once.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp

from mogu_jax import numerics
from mogu_jax.config import ModelConfig
from mogu_jax.errors import MoguError

Array = Any
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_SAID: set = set()


def reference_attention(cfg: ModelConfig, q: Array, k: Array, v: Array, mask: Array,
                        bias: Optional[Array] = None) -> Array:
    """q [B,T,H,Dh], k/v [B,KVH,S,Dh], mask [B,1,T,S] bool, bias (ALiBi) None or [B,H,1,S] fp32 added to the
    scaled scores -> [B,T,H*Dh] fp32. GQA without repeating k/v (query head h uses kv head h // (H/KVH))."""
    b, t, h, d = q.shape
    kvh = k.shape[1]
    g = h // kvh
    q = q.reshape(b, t, kvh, g, d)
    scores = numerics.einsum(cfg, "btkgd,bksd->bkgts", q, k) * (1.0 / math.sqrt(d))
    if bias is not None:
        scores = scores + bias.reshape(bias.shape[0], kvh, g, 1, bias.shape[-1])
    scores = jnp.where(mask[:, :, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = numerics.einsum(cfg, "bkgts,bksd->btkgd", probs, v)
    return out.reshape(b, t, h * d)


def _say_once(cfg: ModelConfig, wanted: str, why: str) -> None:
    key = (cfg.model_type, wanted, why)
    if key not in _SAID:
        _SAID.add(key)
        print(f"mogu-jax: note: model.attention={wanted}: the {wanted} kernel cannot take this model's {why}; "
              "using the reference attention (xla)", file=sys.stderr)


def _platform() -> str:
    from mogu_jax.sharding import active_mesh

    mesh = active_mesh()
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def implementation(cfg: ModelConfig, cached: bool = False) -> str:
    """The path a forward of ``cfg`` takes: ``xla``, ``cudnn`` or ``splash`` (see the module docstring)."""
    wanted = cfg.attention
    if wanted not in IMPLEMENTATIONS:
        raise MoguError(f"unknown model.attention {wanted!r}; one of {', '.join(IMPLEMENTATIONS)}")
    if wanted == "xla" or cached:
        return "xla"
    platform = _platform()
    if wanted == "auto":
        if platform == "tpu":
            wanted = "splash"
        elif platform in ("gpu", "cuda") and cfg.compute_dtype in (jnp.bfloat16, jnp.float16):
            wanted = "cudnn"
        else:
            return "xla"
    why = "ALiBi bias" if cfg.alibi else ("sliding window" if cfg.sliding_window else "")
    if why:
        _say_once(cfg, wanted, why)
        return "xla"
    return wanted


def attend(cfg: ModelConfig, q: Array, k: Array, v: Array, mask: Array, bias: Optional[Array],
           cached: bool) -> Array:
    """The model's attention (shapes as :func:`reference_attention`; ``cached``: k/v come from a KV cache)."""
    impl = implementation(cfg, cached)
    if impl == "splash" and cfg.attention == "auto" and q.shape[1] % 128:
        impl = "xla"  # auto: the kernel tiles by 128; a shorter or odd length (a small model's bucket) takes the reference
    if impl == "cudnn":
        return dot_product_attention(cfg, q, k, v, mask, "cudnn")
    if impl == "splash":
        # cache-free, no sliding window: the last query row of the causal mask is the key padding mask
        return splash_attention(cfg, q, k, v, mask[:, 0, -1, :])
    return reference_attention(cfg, q, k, v, mask, bias)


def dot_product_attention(cfg: ModelConfig, q: Array, k: Array, v: Array, mask: Array, kernel: str) -> Array:
    """``jax.nn.dot_product_attention`` (``kernel``: ``cudnn``, or ``xla`` to check the plumbing on CPU):
    causal, with the model's padding mask.

    Self-attention over right-padded rows (every training batch) passes the kernel each row's key length instead
    of the mask: cuDNN then skips the padded tiles and needs no bias tensor (measured on an H200: about 2x faster
    than the same call with the mask as a bias). Whether the rows are right-padded is checked on the device
    (``lax.cond``), so any other mask (left padding) still takes the masked call and the result is exact
    either way."""
    b, t, h, d = q.shape
    s = k.shape[2]
    dt = cfg.compute_dtype
    args = (q.astype(dt), k.transpose(0, 2, 1, 3).astype(dt), v.transpose(0, 2, 1, 3).astype(dt))

    def call(args, **how):
        out = jax.nn.dot_product_attention(*args, is_causal=True, scale=1.0 / math.sqrt(d), implementation=kernel,
                                           **how)
        return out.astype(jnp.float32).reshape(b, t, h * d)

    if t != s or mask.shape[0] != b:  # a cache or a shared mask: the masked call
        return call(args, mask=mask)
    key_mask = mask[:, 0, -1, :]  # the last query row of a cache-free causal mask is the key padding mask
    lengths = jnp.sum(key_mask, axis=-1, dtype=jnp.int32)
    # (a row without any key, which the reference answers with a uniform average, also takes the masked call)
    right_padded = jnp.all(key_mask == (jnp.arange(s)[None, :] < lengths[:, None])) & jnp.all(lengths > 0)
    return jax.lax.cond(right_padded, lambda a: call(a, key_value_seq_lengths=lengths),
                        lambda a: call(a, mask=mask), args)


def _splash_kernel(heads: int, t: int, mqa: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    block = next((b for b in (512, 256, 128) if t % b == 0), t)  # tiles must divide the sequence
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(heads)])
    make = sk.make_splash_mqa_single_device if mqa else sk.make_splash_mha_single_device
    return make(mask=mask, block_sizes=sizes, interpret=interpret), sk.SegmentIds


def splash_attention(cfg: ModelConfig, q: Array, k: Array, v: Array, kv_mask: Array,
                     interpret: bool = False) -> Array:
    """The Pallas splash-attention kernel: causal, padding by segment ids (valid tokens 1, padding 0: a valid
    query sees exactly the valid keys at or before it, as in the reference). GQA: each kv head serves its
    group of query heads (the MQA kernel, vmapped over kv heads). Under an active activation sharding it runs
    in a ``shard_map`` (batch over data x fsdp, kv heads over tensor when they divide)."""
    from mogu_jax.sharding import active_mesh, activation_spec

    b, t, h, d = q.shape
    kvh = k.shape[1]
    if t % 128 and not interpret:
        raise MoguError(f"model.attention=splash needs a sequence length that is a multiple of 128, got {t}; "
                        "use data.buckets of multiples of 128 or model.attention=xla")
    g = h // kvh
    dt = cfg.compute_dtype
    qh = (q * (1.0 / math.sqrt(d))).astype(dt).reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4)  # [B,KVH,G,T,D]
    kh, vh = k.astype(dt), v.astype(dt)  # [B,KVH,S,D]
    seg = kv_mask.astype(jnp.int32)
    kernel, segment_ids = _splash_kernel(g, t, True, interpret)

    def local(qh, kh, vh, seg):
        def one(qb, kb, vb, sb):  # qb [KVH,G,T,D], kb/vb [KVH,S,D], sb [S]
            ids = segment_ids(q=sb, kv=sb)
            return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=ids))(qb, kb, vb)
        return jax.vmap(one)(qh, kh, vh, seg)

    mesh = active_mesh()
    if mesh is not None:
        from jax.sharding import PartitionSpec as P

        spec = activation_spec(("batch", "kv_heads", None, None), kh.shape)
        qspec = P(spec[0], spec[1], None, None, None)
        local = jax.shard_map(local, mesh=mesh, in_specs=(qspec, spec, spec, P(spec[0], None)), out_specs=qspec,
                              check_vma=False)
    out = local(qh, kh, vh, seg)  # [B,KVH,G,T,D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * d).astype(jnp.float32)

