"""Model configuration, always derived from a checkpoint's Hugging Face ``config.json``.

``ModelConfig`` is a frozen, hashable dataclass so it can be closed over by jitted
functions; the original Hugging Face config dict travels beside it (never hand-copied)
so an export writes back exactly what was read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp

from mogu_jax.errors import MoguError

# model_type -> architecture family handled by mogu_jax.model.Decoder (one decoder, config flags)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "falcon", "baichuan")

# Baichuan checkpoints (trust_remote_code, not in transformers) do not say in config.json whether the model
# uses rotary positions (Baichuan-7B, Baichuan2-7B) or ALiBi (Baichuan-13B, Baichuan2-13B): the released
# modelling code differs per size. We decide by an explicit ``"alibi": true/false`` key in config.json (our
# extension; Baichuan's own code ignores it) and otherwise only for the released shapes below
# (hidden_size, num_hidden_layers, num_attention_heads) -> alibi; any other shape is an error.
BAICHUAN_RELEASED_SHAPES = {(4096, 32, 32): False, (5120, 40, 40): True}
# Baichuan 1 (vocabulary 64000) has a plain lm_head; Baichuan 2 a NormHead (rows L2-normalised at use).
# An explicit ``"norm_head": true/false`` key wins.
BAICHUAN1_VOCAB = 64000

_DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "float64": jnp.float64,  # compute only: float64 matmul accumulation (numerics.py), needs JAX_ENABLE_X64=1
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
    "float64": jnp.float64,  # numerics debugging only (needs JAX_ENABLE_X64)
}


def as_dtype(name: str | Any):
    if not isinstance(name, str):
        return jnp.dtype(name)
    try:
        return jnp.dtype(_DTYPES[name.lower()])
    except KeyError:
        raise MoguError(f"unknown dtype {name!r}; use one of {sorted(set(_DTYPES))}") from None


#: routed decoding after ``routed_tokens``: ``fixed`` (published) or ``router`` (ModelConfig.handoff)
HANDOFFS = ("fixed", "router")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float  # the epsilon of every norm (RMSNorm, or LayerNorm when norm == "layer")
    rope_theta: float
    # rope scaling as a sorted tuple of (key, value) pairs so the config stays hashable
    rope_scaling: tuple = ()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    # architecture flags (defaults = the Llama family; Falcon / Baichuan set some of them)
    norm: str = "rms"  # "rms": RMSNorm (scale); "layer": LayerNorm (scale and bias)
    parallel_residual: bool = False  # x + attn(n1(x)) + mlp(n2(x)) instead of two sequential residuals
    shared_norm: bool = False  # parallel_residual with ONE norm feeding both attention and MLP (Falcon-7B)
    mlp_act: str = "silu"  # silu | gelu (exact erf) | gelu_tanh
    gated_mlp: bool = True  # down(act(gate(x)) * up(x)) (SwiGLU); False: down(act(up(x))) (Falcon)
    alibi: str = ""  # "" = rotary positions; "falcon" / "baichuan" = ALiBi in that model's formulation
    norm_head: bool = False  # lm_head columns L2-normalised at use (Baichuan 2's NormHead)
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    pad_token_id: int | None = None
    # MoGU: LoRA rank / alpha of both branches (scaling s = alpha / rank), router hidden width, and the
    # layers that get a router (empty = every layer, as published; a subset = MoGU v2)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    router_hidden: int = 512
    router_layers: tuple = ()
    # routed decoding: how many new tokens the routed model produces before the base model takes over
    # (5 as published for safety-aligned bases; -1 = every token, for bases with no refusal of their own)
    routed_tokens: int = 5
    # after those tokens: "fixed" (published: every row continues with the base model) or "router" (a row whose
    # routers leaned unwilling over them stays routed to its end; mogu_jax.generate.RouterGatedHandoff)
    handoff: str = "fixed"  # one of HANDOFFS
    handoff_threshold: float = 0.2  # "router": the mean a over the routed tokens that keeps a row routed
    # numerics / execution (not part of the checkpoint; chosen at load time)
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype for matmuls; accumulation is always fp32
    remat: bool = False
    # what a rematerialised layer keeps for the backward pass: "nothing" (recompute the whole layer) or "dots"
    # (keep the outputs of the weight matmuls, recompute attention's batched dots and the elementwise ops)
    remat_policy: str = "nothing"
    # layers driven by nn.scan (one compiled layer body: fast compiles, the TPU/GPU default) or by an unrolled
    # loop (XLA:CPU copies the scan's stacked residuals every layer, ~40% of a training step here; unrolled,
    # the backward pass also stops below the lowest layer that has something to train)
    scan_layers: bool = True
    # training: the first N layers hold nothing that is trained (e.g. routers only in upper layers, branches
    # frozen). They run forward only, outside the differentiated layer stack: no backward pass, no remat
    # recompute below layer N. Set by the trainer per stage (train.frozen_layers); 0 for every other use.
    frozen_layers: int = 0
    # attention kernel (mogu_jax.attention): auto (splash on TPU, cuDNN on GPU with bf16/fp16, else the reference),
    # xla (the reference einsum path), cudnn, splash
    attention: str = "auto"

    # ------------------------------------------------------------------ helpers
    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling)

    @property
    def router_layer_ids(self) -> tuple:
        return tuple(self.router_layers) if self.router_layers else tuple(range(self.num_layers))

    @property
    def routers_everywhere(self) -> bool:
        return self.router_layer_ids == tuple(range(self.num_layers))

    @property
    def compute_dtype(self):
        return as_dtype(self.dtype)

    @property
    def weight_dtype(self):
        return as_dtype(self.param_dtype)

    def replace(self, **kw) -> "ModelConfig":
        if "rope_scaling" in kw and isinstance(kw["rope_scaling"], Mapping):
            kw["rope_scaling"] = _freeze(kw["rope_scaling"])
        if "router_layers" in kw:
            kw["router_layers"] = tuple(sorted(int(i) for i in kw["router_layers"] or ()))
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["router_layers"] = list(self.router_layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModelConfig":
        d = dict(d)
        d["rope_scaling"] = _freeze(d.get("rope_scaling") or {})
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        d["router_layers"] = tuple(d.get("router_layers") or ())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise MoguError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    # ------------------------------------------------------------ from HF config
    @classmethod
    def from_hf(cls, hf: Mapping, **overrides) -> "ModelConfig":
        """Build from a Hugging Face config dict (the content of ``config.json``)."""
        hf = dict(hf)
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise MoguError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if model_type == "falcon":
            cfg = _falcon_from_hf(cls, hf)
            return cfg.replace(**overrides) if overrides else cfg
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise MoguError(f"unsupported hidden_act {act!r} (only silu/SwiGLU)")
        hidden = int(hf["hidden_size"])
        n_heads = int(hf["num_attention_heads"])
        n_kv = int(hf.get("num_key_value_heads") or n_heads)
        head_dim = hf.get("head_dim") or hidden // n_heads
        rope_theta, rope_scaling = _rope_from_hf(hf)
        eos = hf.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())

        qkv_bias = o_bias = False
        sliding = None
        if model_type == "llama":
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        elif model_type == "qwen2":
            qkv_bias = True
            if hf.get("use_sliding_window", False):
                raise MoguError("qwen2 configs with use_sliding_window=true are not supported")
        elif model_type == "mistral":
            sliding = hf.get("sliding_window")
        alibi, norm_head = "", False
        if model_type == "baichuan":
            alibi, norm_head = _baichuan_flags(hf)
            if int(hf.get("num_key_value_heads") or n_heads) != n_heads:
                raise MoguError("baichuan configs with num_key_value_heads != num_attention_heads are not supported "
                                "(W_pack holds q, k and v of equal width)")
        if hf.get("pretraining_tp", 1) not in (1, None):
            pass  # tensor-parallel pretraining split only changes HF's compute order, not the maths
        cfg = cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=_freeze(rope_scaling),
            max_position_embeddings=int(hf.get("max_position_embeddings") or hf.get("model_max_length") or 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=int(sliding) if sliding else None,
            alibi=alibi,
            norm_head=norm_head,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
            pad_token_id=hf.get("pad_token_id"),
        )
        if n_heads % n_kv:
            raise MoguError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
        return cfg.replace(**overrides) if overrides else cfg


def _eos(hf: Mapping) -> tuple:
    eos = hf.get("eos_token_id")
    return tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())


def _baichuan_flags(hf: Mapping) -> tuple[str, bool]:
    """(alibi, norm_head) of a Baichuan config; see BAICHUAN_RELEASED_SHAPES for the rule."""
    if "alibi" in hf:
        alibi = bool(hf["alibi"])
    else:
        shape = (int(hf["hidden_size"]), int(hf["num_hidden_layers"]), int(hf["num_attention_heads"]))
        if shape not in BAICHUAN_RELEASED_SHAPES:
            raise MoguError(
                f"cannot tell whether this baichuan model uses rotary positions (7B) or ALiBi (13B): its shape "
                f"(hidden_size, num_hidden_layers, num_attention_heads) = {shape} is none of the released ones "
                f"{sorted(BAICHUAN_RELEASED_SHAPES)}; add \"alibi\": false (rotary, Baichuan-7B style) or "
                "\"alibi\": true (ALiBi, Baichuan-13B style) to its config.json")
        alibi = BAICHUAN_RELEASED_SHAPES[shape]
    if "norm_head" in hf:
        norm_head = bool(hf["norm_head"])
    else:
        norm_head = int(hf["vocab_size"]) != BAICHUAN1_VOCAB
    return ("baichuan" if alibi else ""), norm_head


_FALCON_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def _falcon_from_hf(cls, hf: Mapping) -> "ModelConfig":
    """transformers' FalconConfig (Falcon-7B/40B/180B, Falcon-RW with ALiBi) -> ModelConfig.

    Layouts: ``new_decoder_architecture`` (40B/180B): GQA with ``num_kv_heads``, parallel attention + MLP
    with two LayerNorms (``ln_attn``/``ln_mlp``; one if ``num_ln_in_parallel_attn == 1``); otherwise
    ``multi_query`` (7B: one kv head) or full multi-head (RW), parallel (one LayerNorm) or sequential."""
    hidden = int(hf.get("hidden_size") or hf["n_embed"])
    n_heads = int(hf.get("num_attention_heads") or hf["n_head"])
    n_layers = int(hf.get("num_hidden_layers") or hf["n_layer"])
    new_arch = bool(hf.get("new_decoder_architecture", False))
    multi_query = bool(hf.get("multi_query", True))
    parallel = bool(hf.get("parallel_attn", True))
    if new_arch:
        n_kv = int(hf.get("num_kv_heads") or n_heads)
        if not parallel:
            raise MoguError("falcon new_decoder_architecture with parallel_attn=false is not a valid Falcon "
                            "(transformers cannot run it either)")
        n_ln = hf.get("num_ln_in_parallel_attn") or 2
        shared = int(n_ln) == 1
    else:
        n_kv = 1 if multi_query else n_heads
        if parallel and hf.get("num_ln_in_parallel_attn") not in (None, 1):
            raise MoguError("falcon with num_ln_in_parallel_attn=2 needs new_decoder_architecture=true")
        shared = parallel
    if hidden % n_heads:
        raise MoguError(f"falcon hidden_size={hidden} is not a multiple of num_attention_heads={n_heads}")
    if n_heads % n_kv:
        raise MoguError(f"num_attention_heads={n_heads} is not a multiple of num_kv_heads={n_kv}")
    act = hf.get("activation") or "gelu"
    if act not in _FALCON_ACTS:
        raise MoguError(f"unsupported falcon activation {act!r}; supported: {', '.join(sorted(_FALCON_ACTS))}")
    alibi = bool(hf.get("alibi", False))
    rope_theta, rope_scaling = _rope_from_hf(hf)
    bias = bool(hf.get("bias", False))
    return cls(
        model_type="falcon",
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf.get("ffn_hidden_size") or 4 * hidden),
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=hidden // n_heads,
        rms_norm_eps=float(hf.get("layer_norm_epsilon") or 1e-5),
        rope_theta=float(rope_theta),
        rope_scaling=_freeze(rope_scaling),
        max_position_embeddings=int(hf.get("max_position_embeddings") or 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        norm="layer",
        parallel_residual=parallel,
        shared_norm=shared,
        mlp_act=_FALCON_ACTS[act],
        gated_mlp=False,
        alibi="falcon" if alibi else "",
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos(hf),
        pad_token_id=hf.get("pad_token_id"),
    )


def _freeze(d: Mapping) -> tuple:
    out = []
    for k, v in sorted(dict(d).items()):
        if isinstance(v, list):
            v = tuple(v)
        out.append((k, v))
    return tuple(out)


def _rope_from_hf(hf: Mapping) -> tuple[float, dict]:
    """Rope theta and scaling from either the transformers v5 ``rope_parameters`` or legacy keys."""
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_theta" in params:
        theta = params["rope_theta"]
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf.get("rope_scaling") or {})
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    scaling.pop("type", None)
    scaling["rope_type"] = rtype
    if rtype not in ("default", "linear", "llama3"):
        raise MoguError(f"unsupported rope scaling type {rtype!r}; supported: default, linear, llama3")
    if rtype == "default":
        scaling = {}
    return float(theta), scaling


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    path = os.path.join(os.fspath(hf_dir), "config.json")
    if not os.path.isfile(path):
        raise MoguError(f"missing config.json in {os.fspath(hf_dir)}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise MoguError(f"config.json in {os.fspath(hf_dir)} is not valid JSON: {e}") from None
