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

# model_type -> architecture family handled by mogu_jax.model.Decoder
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

_DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
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
    rms_norm_eps: float
    rope_theta: float
    # rope scaling as a sorted tuple of (key, value) pairs so the config stays hashable
    rope_scaling: tuple = ()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    pad_token_id: int | None = None
    # MoGU: LoRA rank / alpha of both branches (scaling s = alpha / rank), router hidden width, and the
    # layers that get a router (empty = every layer, as published; a subset = MoGU v2)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    router_hidden: int = 512
    router_layers: tuple = ()
    # numerics / execution (not part of the checkpoint; chosen at load time)
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype for matmuls; accumulation is always fp32
    remat: bool = False

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
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
            pad_token_id=hf.get("pad_token_id"),
        )
        if n_heads % n_kv:
            raise MoguError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
        return cfg.replace(**overrides) if overrides else cfg


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
