"""Batched autoregressive generation with a KV cache, fully on device.

Two compiled functions per (model config, forward function):

* ``prefill``: runs the left-padded prompts through the model in one call, filling the KV cache (donated),
  and samples the first new token;
* ``decode``: a ``jax.lax.while_loop`` that feeds the previous token, samples the next one and stops when
  every row has emitted an EOS or ``max_new_tokens`` tokens exist. No host round-trip per token; the cache
  (donated) is updated in place.

Shapes are bucketed (batch and ``max_new_tokens`` round up to powers of two with a minimum, prompt length to
2^k or 3 x 2^(k-1): :func:`prompt_bucket`), and ``temperature``, ``top_p``, ``seed``, ``max_new_tokens``, the EOS
ids and the pad id are traced values, so calls that fit the same buckets reuse the compiled code.
:func:`generate_text` pads a call's batches to one even batch shape (:func:`even_batches`, :func:`call_buckets`),
so they compile once per prompt-length bucket they meet (prompts are batched by length). :data:`COMPILE_COUNTS`
counts traces (incremented in the Python bodies of the traced functions) for tests.

The model call is pluggable: ``forward(params, tokens, positions, kv_mask, cache, cache_index) ->
(logits, cache)`` with logits ``[B, T, V]`` (only the last position is used, so a forward may return
``[B, 1, V]``). A plain function uses the base model's stacked cache (:func:`mogu_jax.model.init_cache`);
a :class:`DecodeModel` also chooses its params layout (``prepare``) and cache (``init_cache``). MoGU's
routed modes plug in their own forward; keep the object stable across calls (compiled code is cached
per forward object, e.g. build it once per config with ``functools.lru_cache``).

The default, :func:`base_forward`, is the base decoder with its layers unrolled over per-layer weight
buffers and a per-layer [B, KVH, S, Dh] cache (:class:`UnrolledBase`): on CPU a ``scan`` over stacked
layers copies each layer's weight slice every step, which made decoding ~1.5-2x slower. The
scan-based model is still available as :func:`scan_forward` (same tokens; tests check it).

Layout: cache slots ``0..P-1`` hold the left-padded prompt (bucket length ``P``), slot ``P+i-1`` the
i-th generated token fed back. RoPE positions are ``cumsum(mask) - 1`` over the prompt (as in Hugging
Face), continuing with ``prompt_len + i`` for generated tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mogu_jax import model as model_lib
from mogu_jax.config import HANDOFFS, ModelConfig
from mogu_jax.errors import MoguError

Array = Any
Forward = Callable[..., tuple]

# Bucket minima: a prompt bucket of at least 32 tokens, in steps of 2^k and 3 x 2^(k-1) (32, 48, 64, 96, 128, ...:
# at most a third of a bucket is padding, against half with powers of two; each bucket is a compilation, ~3-7 s
# for SmolLM2 on 2 CPU cores, and the prefill of the padding costs more than that over a job's batches: the demo's
# ~44-token prompts (24 of them a shared system prompt) padded to 64 took 6.7 s per batch of 32 x 40 new tokens
# against 5.4 s at 48, fp32), at least
# 64 new tokens (the decode loop stops at max_new_tokens, a traced value; only the cache is sized by the bucket, so
# the demo's 24-token stage answers and 40-token evaluation share one compiled loop), batch a power of two.
MIN_PROMPT_BUCKET = 32
MIN_NEW_BUCKET = 64
MIN_BATCH_BUCKET = 1
MIN_EOS_BUCKET = 4
# generate_text prefills the tokens all its prompts start with (a chat template's system prompt) once per batch
# when there are at least this many
MIN_SHARED_PREFIX = 8

# Number of traces (= compilations) of each compiled function; tests read it to check for recompiles.
COMPILE_COUNTS: collections.Counter = collections.Counter()


# Analytic FLOPs of every generate() call so far (mogu_jax.flops.generation_flops): the demo reads the growth
# of this counter per phase.
FLOPS_DONE = [0]


def compile_count() -> int:
    """Total number of traces of the generation functions so far."""
    return sum(COMPILE_COUNTS.values())


def bucket(n: int, minimum: int) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


def prompt_bucket(n: int) -> int:
    """The prompt-length bucket of a batch whose longest prompt has ``n`` tokens: the smallest 2^k or 3 x 2^(k-1)
    that is >= max(n, :data:`MIN_PROMPT_BUCKET`)."""
    n = max(int(n), MIN_PROMPT_BUCKET)
    p = bucket(n, 1)
    return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p


@dataclasses.dataclass
class GenerationOutput:
    """``tokens[r]``: the new tokens of row r (its EOS included when hit, nothing after it).
    ``steps``: decoding steps run (the length of the longest row). ``logits``: when asked for, per row a
    ``[len(tokens[r]), V]`` array of the logits each token was chosen from."""

    tokens: list[list[int]]
    steps: int
    finished: list[bool] = dataclasses.field(default_factory=list)  # row hit an EOS
    logits: Optional[list[np.ndarray]] = None
    # routed decoding: per row {"a": [n_routed, R], "b": [n_routed, R]}, the router weights (unwilling a,
    # glad b) of each routed layer at the position that produced each routed token
    router: Optional[list[dict]] = None


# ------------------------------------------------------------------------------ forward functions
class DecodeModel:
    """What the generation loop runs: ``prepare`` turns the user's params into the layout ``__call__`` wants
    (once per params object), ``init_cache`` allocates the KV cache, ``__call__`` is the forward
    ``(params, tokens, positions, kv_mask, cache, cache_index) -> (logits [B, T or 1, V], cache)``.

    A plain function passed as ``forward`` is wrapped as a DecodeModel with identity ``prepare`` and the
    base model's stacked cache (:func:`mogu_jax.model.init_cache`)."""

    def __init__(self, cfg: ModelConfig, fn: Optional[Forward] = None):
        self.cfg = cfg
        self.fn = fn

    def prepare(self, params):
        return params

    def init_cache(self, batch: int, max_len: int):
        return model_lib.init_cache(self.cfg, batch, max_len)

    def __call__(self, params, tokens, positions, kv_mask, cache, cache_index, step=0, aux=0, live=None):
        """-> (logits, cache, extras): ``extras`` is a per-step pytree of [B, ...] arrays (router weights) or
        None. ``step``: index of the token this call produces (0 in the prefill); ``aux``: the traced
        number of routed tokens (used by :class:`RoutedHandoff`); ``live`` [B]: the rows still generating (used by
        :class:`RouterGatedHandoff`)."""
        out = self.fn(params, tokens, positions, kv_mask, cache, cache_index)
        return (out[0], out[1], None) if len(out) == 2 else out

    def extras_shape(self, batch: int):
        """Shapes of the per-step extras (for the buffers), or None."""
        return None

    def with_shared_head(self, head, cache):
        """``cache`` (B rows) holding ``head``, the cache of one row run over the prompts' shared tokens."""
        return jax.tree_util.tree_map(lambda h, c: jnp.broadcast_to(h, c.shape).astype(c.dtype), head, cache)


def _router_extras(cfg: ModelConfig, out) -> dict:
    """Router weights of the last position: {"a": [B, R], "b": [B, R]}."""
    return {"a": out.alphas[:, :, -1].T, "b": out.betas[:, :, -1].T}


class ScanBase(DecodeModel):
    """The decoder exactly as :func:`mogu_jax.model.forward` runs it (``nn.scan`` over stacked layers)."""

    def __init__(self, cfg: ModelConfig, mode: str = "base"):
        super().__init__(cfg)
        self.mode = mode

    def __call__(self, params, tokens, positions, kv_mask, cache, cache_index, step=0, aux=0, live=None):
        out = model_lib.forward(self.cfg, params, tokens, positions, kv_mask, cache, cache_index, last_only=True,
                                mode=self.mode)
        return out.logits, out.cache, (_router_extras(self.cfg, out) if self.mode == "routed" else None)

    def extras_shape(self, batch: int):
        r = len(self.cfg.router_layer_ids)
        return {"a": (batch, r), "b": (batch, r)} if self.mode == "routed" else None


class UnrolledBase(DecodeModel):
    """The decoder for decoding: :func:`mogu_jax.model.forward_unrolled` (the same ``DecoderLayer`` maths)
    over per-layer weight buffers and a per-layer KV cache. On CPU, XLA copies every weight slice a scan
    over stacked layers reads (and runs the fused dot slowly): a SmolLM2-135M decode step took ~1.5x as
    long at batch 1 and ~2x at batch 8 with long prompts; unrolled it is at the memory-bandwidth floor
    of reading the fp32 weights once.

    ``prepare`` splits the stacked ``layers`` params into a tuple of per-layer pytrees (a copy of the layer
    weights; :func:`generate` keeps the copy for the last params it saw, identified by their leaves, until
    :func:`clear_caches`). ``mode`` is the MoGU mode every token is decoded in."""

    def __init__(self, cfg: ModelConfig, mode: str = "base"):
        super().__init__(cfg)
        self.mode = mode

    def prepare(self, params):
        base, parts = model_lib.split_params(params)
        if isinstance(base.get("layers"), tuple):
            return params
        params = _unstack_layers(params, self.cfg.num_layers)
        if self.mode == "routed" and "router" in parts and "v" not in parts["router"]:
            params["router"] = _fold_router(parts["router"])  # exact: the heads are affine maps
        return params

    def init_cache(self, batch: int, max_len: int):
        return model_lib.init_cache_unrolled(self.cfg, batch, max_len)

    def __call__(self, params, tokens, positions, kv_mask, cache, cache_index, step=0, aux=0, live=None):
        out = model_lib.forward_unrolled(self.cfg, params, tokens, positions, kv_mask, cache, cache_index,
                                         last_only=True, mode=self.mode)
        return out.logits, out.cache, (_router_extras(self.cfg, out) if self.mode == "routed" else None)

    def extras_shape(self, batch: int):
        r = len(self.cfg.router_layer_ids)
        return {"a": (batch, r), "b": (batch, r)} if self.mode == "routed" else None


class RoutedHandoff(DecodeModel):
    """MoGU's routed decoding with the published handoff (MOGU_SPEC.md section 3): the first ``aux`` new
    tokens come from the routed model, the rest from the plain base model continuing from the prompt plus
    those tokens. Two KV caches: the routed one, and the base model's, which is fed the prompt and every
    routed token as they are produced, so after the handoff the base model continues exactly as it would
    from scratch on prompt + routed tokens, without re-reading them. ``lax.cond`` picks the phase per step
    (``aux`` is traced: changing it does not recompile).

    Both models read the same tokens, and below the lowest router (MoGU v2's routers in a subset of layers)
    every layer is the base layer: those ``trunk`` layers run once for both (:func:`mogu_jax.model.trunk_unrolled`,
    one KV cache), and only the layers from the lowest router up run twice. With SmolLM2's routers in layers
    18-29 the base model beside the routed one costs 12 layers per token instead of 30."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        # the shared layers; 0 (routers in every layer, or set so): two whole decode models, self.routed and
        # self.base, each over its own cache (a planner swaps in scanned ones)
        self.trunk = min(cfg.router_layer_ids)
        self.upper = cfg.replace(frozen_layers=self.trunk)  # forward_unrolled(hidden=...) starts there
        self.routed = UnrolledBase(cfg, "routed")
        self.base = UnrolledBase(cfg, "base")

    def prepare(self, params):
        return self.routed.prepare(params)

    def init_cache(self, batch: int, max_len: int):
        k = self.trunk
        if not k:
            return {"routed": self.routed.init_cache(batch, max_len), "base": self.base.init_cache(batch, max_len)}
        part = functools.partial(model_lib.init_cache_unrolled, self.cfg, batch, max_len)
        return {"trunk": part(layers=k), "routed": part(layers=self.cfg.num_layers - k),
                "base": part(layers=self.cfg.num_layers - k)}

    def extras_shape(self, batch: int):
        return self.routed.extras_shape(batch)

    def zero_extras(self, batch: int):
        return {k: jnp.zeros(v, jnp.float32) for k, v in self.extras_shape(batch).items()}

    def streams(self, params, tokens, positions, kv_mask, cache, cache_index, modes: Sequence[str]):
        """The trunk once, then the layers above it for each of ``modes`` (``routed`` and/or ``base``, each
        also its cache's key): ``({mode: (logits, extras)}, cache)``."""
        k, out = self.trunk, {}
        base_params = model_lib.split_params(params)[0]
        if not k:
            for mode in modes:
                dm = self.routed if mode == "routed" else self.base
                logits, c, extras = dm(base_params if mode == "base" else params, tokens, positions, kv_mask,
                                       cache[mode], cache_index)
                cache = {**cache, mode: c}
                out[mode] = (logits, extras)
            return out, cache
        hidden, trunk = model_lib.trunk_unrolled(self.cfg, params, tokens, positions, kv_mask, cache["trunk"],
                                                 cache_index, k)
        cache = {**cache, "trunk": trunk}
        for mode in modes:
            res = model_lib.forward_unrolled(self.upper, base_params if mode == "base" else params, tokens,
                                             positions, kv_mask, tuple(trunk) + cache[mode], cache_index,
                                             last_only=True, mode=mode, hidden=hidden)
            cache = {**cache, mode: res.cache[k:]}
            out[mode] = (res.logits, _router_extras(self.cfg, res) if mode == "routed" else None)
        return out, cache

    def __call__(self, params, tokens, positions, kv_mask, cache, cache_index, step=0, aux=0, live=None):
        args = (params, tokens, positions, kv_mask)

        def both(c):
            out, c = self.streams(*args, c, cache_index, ("routed", "base"))
            return out["routed"][0], c, out["routed"][1]

        def base_only(c):
            out, c = self.streams(*args, c, cache_index, ("base",))
            return out["base"][0], c, self.zero_extras(tokens.shape[0])

        return jax.lax.cond(step < aux, both, base_only, cache)


class RouterGatedHandoff(RoutedHandoff):
    """Routed decoding with a router-gated handoff (``handoff: router``; ours, not in the MoGU papers): the first
    ``aux`` new tokens are routed for every row, as in the published handoff; then a row whose routers leaned to
    the unwilling branch over those tokens (mean ``a`` over them and the router layers >= ``threshold``, default
    ``cfg.handoff_threshold``) stays routed to its end, and every other row continues with the base model. For a
    base with no refusal of its own (SmolLM2) the refusal started by the routed tokens then finishes, while the
    answers the routers read as benign are the base model's own after ``aux`` tokens. Both models run while a live
    row is still routed, then the base model alone; the cache counts those steps (``both_steps``) for the FLOP
    count."""

    def __init__(self, cfg: ModelConfig, threshold: Optional[float] = None):
        super().__init__(cfg)
        self.threshold = float(cfg.handoff_threshold if threshold is None else threshold)

    def init_cache(self, batch: int, max_len: int):
        return {**super().init_cache(batch, max_len), "a_sum": jnp.zeros((batch,), jnp.float32),
                "both_steps": jnp.zeros((), jnp.int32)}

    def with_shared_head(self, head, cache):
        kv = tuple(k for k in ("trunk", "routed", "base") if k in cache)
        merged = super().with_shared_head({k: head[k] for k in kv}, {k: cache[k] for k in kv})
        return {**cache, **merged}  # the gate's sums start from zero: the shared tokens produce no new token

    def __call__(self, params, tokens, positions, kv_mask, cache, cache_index, step=0, aux=0, live=None):
        args = (params, tokens, positions, kv_mask)
        live = jnp.ones(tokens.shape[:1], bool) if live is None else live
        keep = (aux > 0) & (cache["a_sum"] >= self.threshold * jnp.maximum(aux, 1))

        def both(c):
            out, c = self.streams(*args, c, cache_index, ("routed", "base"))
            (logits, extras), (base_logits, _) = out["routed"], out["base"]
            routed_now = (step < aux) | keep
            logits = jnp.where(routed_now[:, None, None], logits, base_logits)
            a_sum = c["a_sum"] + jnp.where(step < aux, jnp.mean(extras["a"], axis=-1), 0.0)
            return logits, {**c, "a_sum": a_sum, "both_steps": c["both_steps"] + 1}, extras

        def base_only(c):
            out, c = self.streams(*args, c, cache_index, ("base",))
            return out["base"][0], c, self.zero_extras(tokens.shape[0])

        return jax.lax.cond((step < aux) | jnp.any(keep & live), both, base_only, cache)


@jax.jit
def _fold_router(router):
    from mogu_jax.mogu import fold_router
    return fold_router(router)


@functools.partial(jax.jit, static_argnums=(1,))
def _unstack_layers(params, num_layers: int):
    return model_lib.unstack_layers(params, num_layers)


@functools.lru_cache(maxsize=None)
def base_forward(cfg: ModelConfig, mode: str = "base") -> DecodeModel:
    """The default decode model for ``cfg`` and MoGU ``mode`` (one stable object each): unrolled layers."""
    return UnrolledBase(cfg, mode)


@functools.lru_cache(maxsize=None)
def scan_forward(cfg: ModelConfig, mode: str = "base") -> DecodeModel:
    """The decoder through :func:`mogu_jax.model.forward` (stacked params and cache, ``nn.scan``)."""
    return ScanBase(cfg, mode)


def as_decode_model(cfg: ModelConfig, forward, mode: str = "base") -> DecodeModel:
    if forward is None:
        return base_forward(cfg, mode)
    if isinstance(forward, DecodeModel):
        return forward
    return _wrap_forward(cfg, forward)


@functools.lru_cache(maxsize=64)
def _wrap_forward(cfg: ModelConfig, fn: Forward) -> DecodeModel:
    return DecodeModel(cfg, fn)


# ------------------------------------------------------------------------------------- sampling
def sample_logits(logits: Array, key: Array, temperature: Array, top_p: Array) -> Array:
    """Next token ids [B] from last-position logits [B, V]: greedy when temperature == 0, otherwise
    temperature + nucleus (top-p) sampling. ``temperature``/``top_p`` are traced scalars; ``lax.cond``
    runs only the branch in use (greedy never pays for the vocabulary sort)."""
    logits = logits.astype(jnp.float32)

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        order = jnp.argsort(-scaled, axis=-1)  # descending
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the top token is always kept)
        drop = ((cum - probs) > top_p) & (top_p < 1.0)
        sorted_logits = jnp.where(drop, -jnp.inf, sorted_logits)
        choice = jax.random.categorical(key, sorted_logits, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, None)


def _is_eos(tok: Array, eos_ids: Array) -> Array:
    return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)


# ---------------------------------------------------------------------------- compiled functions
class _Compiled:
    """The jitted prefill and decode loop for one decode model (and the last params it prepared)."""

    def __init__(self, dm: DecodeModel):
        self.dm = dm
        self.prefill = jax.jit(self._prefill, donate_argnums=(3,), static_argnames=("n_new", "shared"))
        self.decode = jax.jit(self._decode, donate_argnums=(1,),
                              static_argnames=("n_new", "with_logits", "progress"))
        self._last = None  # (leaves of the params, prepared params): prepare once per params

    def prepared(self, params):
        leaves = jax.tree_util.tree_leaves(params)
        if (self._last is not None and len(self._last[0]) == len(leaves)
                and all(a is b for a, b in zip(self._last[0], leaves))):
            return self._last[1]
        self._last = None  # free the previous copy before making the next
        prepared = self.dm.prepare(params)
        self._last = (leaves, prepared)
        return prepared

    def _prefill(self, params, tokens, mask, cache, seed, temperature, top_p, eos_ids, pad_id, live, aux, forced,
                 n_forced, *, n_new, shared=0):
        """tokens/mask [B, P] (left-padded), cache with P + n_new slots -> (first token [B], done [B],
        its logits [B, V], cache). ``live`` [B] is False for the rows that only pad the batch bucket.
        ``forced`` [B, n_new], ``n_forced`` [B]: row r's first ``n_forced[r]`` tokens are ``forced[r]``'s, not
        the model's choice (the model reads them all the same).
        ``shared``: the first ``shared`` columns are the same tokens in every row (a chat template's system
        prompt; the rows' own tokens are left-padded after them): they run once, as one row, and the rows
        continue from their broadcast cache (causal attention: the prefix never sees the rows)."""
        COMPILE_COUNTS["prefill"] += 1
        b, p = tokens.shape
        positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
        # Causality over cache slots hides the slots after the prompt, so they may count as valid here.
        kv_mask = jnp.concatenate([mask.astype(bool), jnp.ones((b, n_new), bool)], axis=1)
        if shared:
            _, head, _ = self.dm(params, tokens[:1, :shared], positions[:1, :shared], kv_mask[:1],
                                 self.dm.init_cache(1, p + n_new), 0, step=0, aux=aux)
            cache = self.dm.with_shared_head(head, cache)
        logits, cache, extras = self.dm(params, tokens[:, shared:], positions[:, shared:], kv_mask, cache, shared,
                                        step=0, aux=aux, live=live)
        last = logits[:, -1].astype(jnp.float32)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
        tok = sample_logits(last, key, temperature, top_p)
        tok = jnp.where(n_forced > 0, forced[:, 0], tok)
        tok = jnp.where(live, tok, pad_id)
        done = _is_eos(tok, eos_ids) | ~live
        return tok, done, last, extras, cache

    def _decode(self, params, cache, mask, tok0, done0, last0, extras0, max_new, seed, temperature, top_p, eos_ids,
                pad_id, aux, forced, n_forced, *, n_new: int, with_logits: bool = False, progress: bool = False):
        """The decode loop. mask [B, P] is the prompt mask, ``n_new`` the (static) number of new-token slots.
        Returns (tokens [B, n_new], steps, logits [B, n_new, V] or None, cache); the cache is returned so its
        donated buffer is updated in place (and so a caller may continue from it)."""
        COMPILE_COUNTS["decode"] += 1
        b, p = mask.shape
        n = n_new
        # Causality over cache slots hides the generated slots not written yet, so the kv mask is fixed.
        kv_mask = jnp.concatenate([mask.astype(bool), jnp.ones((b, n), bool)], axis=1)
        start = jnp.sum(mask.astype(jnp.int32), axis=1)  # position of the first generated token
        base_key = jax.random.PRNGKey(seed)
        max_new = jnp.clip(max_new, 0, n)

        out = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok0)
        logit_buf = None
        if with_logits:
            logit_buf = jnp.zeros((b, n, last0.shape[-1]), jnp.float32).at[:, 0].set(last0)
        # per-step extras (router weights of each produced token): [B, n, ...] buffers
        ex_buf = None
        if extras0 is not None:
            ex_buf = jax.tree_util.tree_map(
                lambda x: jnp.zeros((b, n) + x.shape[1:], x.dtype).at[:, 0].set(x), extras0)

        def cond(state):
            i, _, _, _, done, _, _ = state
            return (i < max_new) & ~jnp.all(done)

        def body(state):
            i, cache, prev, out, done, logit_buf, ex_buf = state
            positions = (start + i - 1)[:, None]
            logits, cache, extras = self.dm(params, prev[:, None], positions, kv_mask, cache, p + i - 1, step=i,
                                            aux=aux, live=~done)
            if ex_buf is not None:
                ex_buf = jax.tree_util.tree_map(
                    lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x[:, None], i, axis=1), ex_buf, extras)
            last = logits[:, -1].astype(jnp.float32)
            tok = sample_logits(last, jax.random.fold_in(base_key, i), temperature, top_p)
            tok = jnp.where(i < n_forced, jax.lax.dynamic_index_in_dim(forced, i, axis=1, keepdims=False), tok)
            tok = jnp.where(done, pad_id, tok)
            out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
            if logit_buf is not None:
                logit_buf = jax.lax.dynamic_update_slice_in_dim(logit_buf, last[:, None], i, axis=1)
            done = done | _is_eos(tok, eos_ids)
            if progress:
                jax.debug.callback(_progress_tick, i + 1)
            return i + 1, cache, tok, out, done, logit_buf, ex_buf

        state = (jnp.asarray(1, jnp.int32), cache, tok0, out, done0, logit_buf, ex_buf)
        steps, cache, _, out, _, logit_buf, ex_buf = jax.lax.while_loop(cond, body, state)
        steps = jnp.minimum(steps, max_new)
        return out, steps, logit_buf, ex_buf, cache


_COMPILED: dict = {}


@functools.lru_cache(maxsize=None)
def handoff_forward(cfg: ModelConfig) -> DecodeModel:
    """The handoff decode model ``cfg.handoff`` names (one stable object per config)."""
    return RouterGatedHandoff(cfg) if cfg.handoff == "router" else RoutedHandoff(cfg)


# the fields only MoGU's parts read: a base-mode decode does not depend on them
_MOGU_FIELDS = ("lora_rank", "lora_alpha", "router_hidden", "router_layers", "routed_tokens", "handoff",
                "handoff_threshold")


def base_view(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with MoGU's fields at their defaults: the base model's decoding from a MoGU checkpoint then reuses
    the compilations of the same base model's (an evaluation's base answers after a data build's: ~7 s per
    prompt bucket on 2 CPU cores)."""
    return cfg.replace(**{f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in _MOGU_FIELDS})


def _compiled(cfg: ModelConfig, forward, mode: str = "base") -> _Compiled:
    dm = as_decode_model(cfg, forward, mode)
    if dm not in _COMPILED:
        _COMPILED[dm] = _Compiled(dm)
    return _COMPILED[dm]


def clear_caches() -> None:
    """Drop the compiled functions and the prepared (per-layer) params they keep."""
    _COMPILED.clear()


_PROGRESS_BAR = [None]


def _progress_tick(i):
    bar = _PROGRESS_BAR[0]
    if bar is not None and int(i) > bar.n:  # unordered callbacks: only move forward
        bar.update(int(i) - bar.n)


# ---------------------------------------------------------------------------------- public API
def resolve_eos(cfg: ModelConfig, eos_ids) -> tuple[int, ...]:
    if eos_ids is None:
        return tuple(int(e) for e in cfg.eos_token_ids)
    if isinstance(eos_ids, (int, np.integer)):
        return (int(eos_ids),)
    return tuple(int(e) for e in eos_ids)


def resolve_pad(cfg: ModelConfig, pad_id, eos: Sequence[int]) -> int:
    if pad_id is not None:
        return int(pad_id)
    if cfg.pad_token_id is not None:
        return int(cfg.pad_token_id)
    if cfg.eos_token_ids:
        return int(cfg.eos_token_ids[0])
    return int(eos[0]) if eos else 0


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, eos_ids=None, pad_id=None,
             progress: bool = False, forward: Optional[Forward] = None,
             return_logits: bool = False, mode: str = "base",
             routed_tokens: Optional[int] = None, min_batch: int = MIN_BATCH_BUCKET,
             shared_prefix: int = 0, forced: Optional[Sequence[Sequence[int]]] = None) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens after each prompt (lists of token ids), as one batch.

    Greedy when ``temperature == 0``, else temperature + top-p sampling from ``seed``. Each row stops at
    its first EOS (``eos_ids``: default the config's; ``()`` disables stopping); finished rows emit
    ``pad_id`` until all rows are done. ``forward`` replaces the base model (see the module doc).
    ``return_logits`` also returns the logits each token was chosen from (a separate compilation).
    ``mode``: the MoGU mode every token is decoded in (``params`` must hold the parts it needs).
    ``routed_tokens`` (with ``mode="routed"``): MoGU's handoff — only the first ``routed_tokens`` new tokens
    are routed, then the plain base model continues (None or >= max_new_tokens: every token routed).
    ``cfg.handoff`` says how: ``fixed`` (published: every row hands off) or ``router`` (a row whose routers
    leaned unwilling over the routed tokens stays routed: :class:`RouterGatedHandoff`).
    In routed mode the output carries the router weights of the routed tokens (``router``).
    ``min_batch``: the batch shape of a caller generating many batches (:func:`generate_text`): a short last
    batch is padded to it, so it takes the others' shape, hence their compilation. Without it (1) the batch is
    padded to a power of two.
    ``shared_prefix``: every prompt starts with the same first ``shared_prefix`` tokens (and has more after
    them; :func:`common_prefix`): they are prefilled once for the batch instead of once per row (the same
    tokens; the logits equal to rounding).
    ``forced``: per prompt, the first new tokens, given instead of decoded (at most ``max_new_tokens``; the model
    reads them as its own and continues after them): the continuation of prompt + forced tokens without another
    prompt bucket, so in the same compilations as the prompts alone.
    """
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        return GenerationOutput(tokens=[], steps=0, finished=[])
    forced = _check_inputs(cfg, prompts, forced, max_new_tokens, temperature, top_p)
    if max_new_tokens == 0:
        return GenerationOutput(tokens=[[] for _ in prompts], steps=0, finished=[False] * len(prompts))

    eos = resolve_eos(cfg, eos_ids)
    pad = resolve_pad(cfg, pad_id, eos)
    s = int(shared_prefix)
    if s and not 0 < s <= common_prefix(prompts):
        raise MoguError(f"shared_prefix={s}: the prompts share their first {common_prefix(prompts)} tokens "
                        "(and each needs one token after the shared ones)")
    n_rows = len(prompts)
    b = max(n_rows, min_batch) if min_batch > MIN_BATCH_BUCKET else bucket(n_rows, MIN_BATCH_BUCKET)
    p = prompt_bucket(max(len(x) for x in prompts))  # the shared tokens fill the first s slots
    n = bucket(max_new_tokens, MIN_NEW_BUCKET)
    e = bucket(len(eos), MIN_EOS_BUCKET)

    tokens, mask, forced_a, n_forced = _pack(prompts, forced, (b, p, n), s, pad if 0 <= pad < cfg.vocab_size else 0)
    live = np.arange(b) < n_rows
    eos_arr = np.full((e,), -1, np.int32)
    eos_arr[: len(eos)] = eos

    if forward is None:
        model_lib.mogu_inputs(cfg, mode, model_lib.split_params(params)[1])  # clear error for missing parts
    if routed_tokens is not None and routed_tokens < 0:
        raise MoguError(f"routed_tokens must be >= 0, got {routed_tokens}")
    if cfg.handoff not in HANDOFFS:
        raise MoguError(f"handoff must be one of {', '.join(HANDOFFS)}, got {cfg.handoff!r}")
    handoff = mode == "routed" and routed_tokens is not None and routed_tokens < max_new_tokens
    if handoff and forward is None:
        forward = handoff_forward(cfg)
    n_routed = (routed_tokens if handoff else max_new_tokens) if mode == "routed" else 0
    if mode == "base" and forward is None:  # the base model alone: shared with base checkpoints' decoding
        params = model_lib.split_params(params)[0]
        comp = _compiled(base_view(cfg), None, "base")
    else:
        comp = _compiled(cfg, forward, mode)
    run_params = comp.prepared(params)
    cache = comp.dm.init_cache(b, p + n)
    seed_a = np.asarray(seed, np.uint32) if seed >= 0 else np.asarray(seed & 0xFFFFFFFF, np.uint32)
    temp_a = np.asarray(temperature, np.float32)
    top_p_a = np.asarray(top_p, np.float32)
    pad_a = np.asarray(pad, np.int32)

    aux = np.asarray(n_routed, np.int32)
    tok0, done0, last0, extras0, cache = comp.prefill(run_params, tokens, mask, cache, seed_a, temp_a, top_p_a,
                                                      eos_arr, pad_a, live, aux, forced_a, n_forced, n_new=n,
                                                      shared=s)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_new_tokens, desc="tokens", unit="tok", leave=False)
        bar.update(1)
        _PROGRESS_BAR[0] = bar
    try:
        out, steps, logits, ex_buf, cache = comp.decode(run_params, cache, mask, tok0, done0, last0, extras0,
                                                        np.asarray(max_new_tokens, np.int32), seed_a, temp_a,
                                                        top_p_a, eos_arr, pad_a, aux, forced_a, n_forced, n_new=n,
                                                        with_logits=return_logits, progress=progress)
        out = np.asarray(out)
        steps = int(steps)
        routed_steps = n_routed if handoff else None
        if isinstance(cache, dict) and "both_steps" in cache:  # router-gated: both models ran this many steps
            routed_steps = int(cache["both_steps"])  # the prefill and the decode steps that ran both models
        del cache
    finally:
        if bar is not None:
            jax.effects_barrier()
            bar.close()
            _PROGRESS_BAR[0] = None

    from mogu_jax.flops import generation_flops
    FLOPS_DONE[0] += generation_flops(cfg, mode, b, p, p + n, steps, routed_steps, s)
    return _output(out[:n_rows, :steps], steps, set(eos), logits if return_logits else None,
                   ex_buf if mode == "routed" else None, n_routed)


def _check_inputs(cfg: ModelConfig, prompts: list, forced, max_new_tokens: int, temperature: float,
                  top_p: float) -> list[list[int]]:
    """:func:`generate`'s argument checks (one clear error each); returns ``forced`` as lists of ints per row."""
    if any(len(p) == 0 for p in prompts):
        raise MoguError("every prompt needs at least one token (an empty prompt has nothing to continue)")
    if max_new_tokens < 0:
        raise MoguError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise MoguError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise MoguError(f"top_p must be in (0, 1], got {top_p}")
    forced = [[] for _ in prompts] if forced is None else [list(map(int, f)) for f in forced]
    if len(forced) != len(prompts):
        raise MoguError(f"{len(forced)} rows of forced tokens for {len(prompts)} prompts")
    if any(len(f) > max_new_tokens for f in forced):
        raise MoguError(f"more forced tokens than max_new_tokens={max_new_tokens}")
    for p in prompts + forced:
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise MoguError(f"token id {bad[0]} is outside the vocabulary (size {cfg.vocab_size})")
    return forced


def _output(out: np.ndarray, steps: int, eos_set: set, logits, ex_buf, n_routed: int) -> GenerationOutput:
    """The live rows' tokens (``out`` ``[rows, steps]``), each cut after its first EOS, with the logits they were
    chosen from (``logits`` given) and the router weights of the routed tokens (``ex_buf`` given)."""
    rows, finished = [], []
    for r in range(out.shape[0]):
        row = out[r].tolist()
        hit = next((i for i, t in enumerate(row) if t in eos_set), None)
        rows.append(row if hit is None else row[: hit + 1])
        finished.append(hit is not None)
    logit_rows = None
    if logits is not None:
        logits = np.asarray(logits)
        logit_rows = [logits[r, : len(rows[r])] for r in range(len(rows))]
    router_rows = None
    if ex_buf is not None:
        ex = jax.tree_util.tree_map(np.asarray, ex_buf)
        router_rows = [{k: v[r, : min(len(rows[r]), n_routed)] for k, v in ex.items()} for r in range(len(rows))]
    return GenerationOutput(tokens=rows, steps=steps, finished=finished, logits=logit_rows, router=router_rows)


def _pack(prompts, forced, shape, shared: int, pad: int):
    """The batch arrays of :func:`generate`: ``tokens``/``mask`` [b, p] (the ``shared`` tokens first, each row's
    own tokens left-padded after them), ``forced`` [b, n] and ``n_forced`` [b]."""
    b, p, n = shape
    tokens = np.full((b, p), pad, np.int32)
    mask = np.zeros((b, p), bool)
    tokens[:, :shared] = prompts[0][:shared]
    mask[:, :shared] = True
    forced_a = np.zeros((b, n), np.int32)
    n_forced = np.zeros((b,), np.int32)
    for r, (x, f) in enumerate(zip(prompts, forced)):
        tokens[r, p - len(x) + shared:] = x[shared:]
        mask[r, p - len(x) + shared:] = True
        forced_a[r, :len(f)] = f
        n_forced[r] = len(f)
    return tokens, mask, forced_a, n_forced


# ------------------------------------------------------------------------------------ from text
def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all ``prompts`` share, leaving each at least one token of its own (the most a
    :func:`generate` call can take as ``shared_prefix``)."""
    if not prompts:
        return 0
    first, limit = prompts[0], min(len(x) for x in prompts) - 1
    n = 0
    while n < limit and all(x[n] == first[n] for x in prompts):
        n += 1
    return n


def even_batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """``order`` cut into the fewest batches of at most ``batch_size`` rows, as even as possible: 129 rows at 32
    are 5 batches of 26 (or 25), not 4 x 32 + 1, which would cost a fifth batch of 32 rows for one prompt
    (every batch of a call is padded to the largest one: :func:`call_buckets`)."""
    order = list(order)
    if not order:
        return []
    size = math.ceil(len(order) / math.ceil(len(order) / batch_size))
    return [order[i: i + size] for i in range(0, len(order), size)]


def call_buckets(batches: Sequence[Sequence[int]], prompts: Optional[Sequence[Sequence[int]]] = None,
                 batch_size: Optional[int] = None) -> dict:
    """The :func:`generate` batch shape that gives every batch of one call (:func:`even_batches`) the same
    shape: a short last batch costs a padding row or so instead of a compilation (~10 s on 2 CPU cores for
    SmolLM2). With the caller's ``batch_size``, a call of at least that many rows takes that shape, so the calls of
    one job (the stage files' lists, the evaluation) share their compilations. Prompt-length buckets stay per
    batch: padding every prompt to the longest one would cost prefill and cache in proportion to the longest
    prompt, without bound. With the call's ``prompts`` (token ids), also
    the ``shared_prefix`` of the whole call (one value: one compilation per prompt bucket): the tokens they all
    start with, when at least :data:`MIN_SHARED_PREFIX`."""
    if not batches:
        return {}
    rows = sum(len(b) for b in batches)
    out = {"min_batch": batch_size if batch_size and rows >= batch_size else max(len(b) for b in batches)}
    if prompts is not None:
        shared = common_prefix(prompts) if len(prompts) > 1 else 0
        out["shared_prefix"] = shared if shared >= MIN_SHARED_PREFIX else 0
    return out


def generate_text(cfg: ModelConfig, params, tokenizer, instructions: Sequence[str], template: Optional[str] = None,
                  system: Optional[str] = None, batch_size: int = 8, progress: bool = False, **kw) -> list[dict]:
    """Responses to instructions: format each prompt (:func:`mogu_jax.templates.format_prompt`), encode it,
    generate in batches of ``batch_size`` (prompts of similar length batched together: :func:`generate_ids`),
    decode. The tokens every prompt starts with (e.g. the template's system prompt) are prefilled once per batch
    (:func:`generate`'s ``shared_prefix``; pass ``shared_prefix=0`` to run them per row).

    Returns, in input order, ``{"response": str, "tokens": int, "finished": bool}`` (``tokens`` counts the
    generated tokens, EOS included; ``finished``: the model emitted an EOS; in routed mode also ``router``:
    the per-token, per-layer router weights of the routed tokens). Extra keyword arguments go to
    :func:`generate`; ``progress`` shows a bar over batches.
    """
    if batch_size < 1:
        raise MoguError(f"batch_size must be >= 1, got {batch_size}")
    encoded = encode_instructions(tokenizer, instructions, template, system)
    kw["eos_ids"] = text_eos(cfg, tokenizer, kw.get("eos_ids"))
    rows = generate_ids(cfg, params, encoded, batch_size=batch_size, progress=progress, **kw)
    return [decode_row(tokenizer, row, kw["eos_ids"]) for row in rows]


def encode_instructions(tokenizer, instructions: Sequence[str], template: Optional[str] = None,
                        system: Optional[str] = None) -> list[list[int]]:
    """The prompt token ids of each instruction (:func:`mogu_jax.templates.format_prompt`, then encoded)."""
    from mogu_jax.templates import encode_prompt, format_prompt

    return [encode_prompt(tokenizer, format_prompt(tokenizer, ins, template, system)) for ins in instructions]


def text_eos(cfg: ModelConfig, tokenizer, eos_ids=None) -> tuple[int, ...]:
    """The ids that end a row: ``eos_ids`` when given, else the config's and the tokenizer's EOS."""
    if eos_ids is not None:
        return resolve_eos(cfg, eos_ids)
    eos = set(resolve_eos(cfg, None))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(int(tokenizer.eos_token_id))
    return tuple(sorted(eos))


def decode_row(tokenizer, row: dict, eos_ids: Sequence[int]) -> dict:
    """One :func:`generate_ids` row as text: ``{"response", "tokens", "finished"}`` (and ``router``)."""
    ids = row["ids"]
    text_ids = ids[:-1] if ids and ids[-1] in set(eos_ids) else ids
    out = {"response": tokenizer.decode(text_ids, skip_special_tokens=True), "tokens": len(ids),
           "finished": row["finished"]}
    if "router" in row:
        out["router"] = row["router"]
    return out


def length_batches(encoded: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """The batches :func:`generate_ids` cuts ``encoded`` into: indices sorted by prompt length, even batches."""
    return even_batches(sorted(range(len(encoded)), key=lambda i: len(encoded[i])), batch_size)


def generate_ids(cfg: ModelConfig, params, encoded: Sequence[Sequence[int]], batch_size: int = 8,
                 progress: bool = False, **kw) -> list[dict]:
    """:func:`generate` over many prompts (token ids) in batches of ``batch_size``, prompts of similar length
    together, every batch of the call in one shape (:func:`call_buckets`; keyword arguments override it and go to
    :func:`generate`). Returns, in input order, ``{"ids": [...], "finished": bool}`` (EOS included when hit), in
    routed mode also ``router`` (``{"a": [n_routed, R], "b": ...}``). Sampling rows get seed ``seed + batch``.
    ``forced`` (a keyword argument) is per prompt, as ``encoded``."""
    if batch_size < 1:
        raise MoguError(f"batch_size must be >= 1, got {batch_size}")
    encoded = [list(x) for x in encoded]
    seed = int(kw.pop("seed", 0))
    batches = length_batches(encoded, batch_size)
    kw = {**call_buckets(batches, encoded, batch_size), **kw}
    results: list[Optional[dict]] = [None] * len(encoded)
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="generating", unit="batch")
    forced = kw.pop("forced", None)
    for bi, idx in enumerate(it):
        if forced is not None:
            kw["forced"] = [forced[i] for i in idx]
        out = generate(cfg, params, [encoded[i] for i in idx], seed=seed + bi, **kw)
        for j, (i, toks, fin) in enumerate(zip(idx, out.tokens, out.finished)):
            results[i] = {"ids": toks, "finished": fin}
            if out.router is not None:
                results[i]["router"] = out.router[j]  # {"a": [n_routed, R], "b": ...}
    return results  # type: ignore[return-value]


def decoding_mode(cfg, params, mode, routed_tokens, base_only, max_new_tokens):
    """(mode, routed_tokens) for generation (the CLI's and the evaluation's): explicit --mode wins; else routed
    decoding with handoff when the params hold every MoGU part, else the base model."""
    from mogu_jax.model import split_params
    parts = split_params(params)[1]
    has_mogu = all(k in parts for k in ("glad", "unwilling", "router"))
    if base_only:
        if mode not in (None, "base") or routed_tokens is not None:
            raise MoguError("--base-only excludes --mode and --routed-tokens")
        return "base", None
    if routed_tokens is not None:
        if mode not in (None, "routed"):
            raise MoguError("--routed-tokens goes with routed decoding, not --mode " + mode)
        mode = "routed"
    if mode is None:
        mode = "routed" if has_mogu else "base"
    if mode == "routed" and not has_mogu:
        missing = [k for k in ("glad", "unwilling", "router") if k not in parts]
        raise MoguError(f"routed decoding needs a MoGU checkpoint; this one has no {', '.join(missing)} "
                        "(train the stages or convert published artifacts with `convert mogu-to-jax`)")
    if mode != "routed":
        return mode, None
    if routed_tokens is None:
        m = cfg.routed_tokens
    elif str(routed_tokens).lower() == "all":
        m = -1
    else:
        try:
            m = int(routed_tokens)
        except ValueError:
            raise MoguError(f"--routed-tokens takes a number or 'all', got {routed_tokens!r}") from None
        if m < 0:
            raise MoguError(f"--routed-tokens must be >= 0 or 'all', got {m}")
    return "routed", (None if m < 0 or m >= max_new_tokens else m)
