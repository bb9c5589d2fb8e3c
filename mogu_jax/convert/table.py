"""Declarative conversion tables: our parameter path <-> Hugging Face tensor name + transform.

One table per architecture, run forwards by the importer and backwards by the exporter, so the
two can never disagree. ``{i}`` in a Hugging Face name marks a per-layer tensor; those are
stacked on the leading ``layers`` axis of our parameter.

A :class:`Rule` maps one Hugging Face tensor to one parameter of ours; a :class:`FusedRule` maps one
Hugging Face tensor to several (Falcon's ``query_key_value``, Baichuan's ``W_pack``: split into our
separate q/k/v kernels on import, joined back bit-exactly on export). Both expose the same list-valued
interface (``paths``, ``to_ours``, ``to_hf``, ``hf_shape``) that ``mogu_jax.convert.hf`` runs.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from mogu_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Transform:
    """to_ours(hf_array) -> our array; to_hf(our_array) -> hf array; hf_shape(our_shape) -> hf shape."""

    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple], tuple]


IDENTITY = Transform("identity", lambda a: a, lambda a: a, lambda s: tuple(s))
# PyTorch Linear weight [out, in] <-> our kernel [in, out]
LINEAR = Transform("linear", lambda a: np.ascontiguousarray(a.T), lambda a: np.ascontiguousarray(a.T),
                   lambda s: tuple(reversed(s)))


@dataclasses.dataclass(frozen=True)
class Fused:
    """One Hugging Face tensor <-> several arrays of ours (exact reshapes / slices / concatenations).

    split(hf_array) -> [our arrays]; join([our arrays]) -> hf array; hf_shape([our shapes]) -> hf shape."""

    name: str
    split: Callable[[np.ndarray], list]
    join: Callable[[list], np.ndarray]
    hf_shape: Callable[[list], tuple]


class _RuleBase:
    hf: str

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def hf_key(self, i: int | None = None) -> str:
        return self.hf.format(i=i) if self.per_layer else self.hf


@dataclasses.dataclass(frozen=True)
class Rule(_RuleBase):
    path: tuple[str, ...]
    hf: str
    transform: Transform = IDENTITY

    @property
    def paths(self) -> tuple[tuple[str, ...], ...]:
        return (self.path,)

    def to_ours(self, hf_array: np.ndarray) -> list:
        return [self.transform.to_ours(hf_array)]

    def to_hf(self, ours: list) -> np.ndarray:
        return self.transform.to_hf(ours[0])

    def hf_shape(self, our_shapes: list) -> tuple:
        return self.transform.hf_shape(our_shapes[0])


@dataclasses.dataclass(frozen=True)
class FusedRule(_RuleBase):
    paths: tuple[tuple[str, ...], ...]
    hf: str
    transform: Fused

    def to_ours(self, hf_array: np.ndarray) -> list:
        return self.transform.split(hf_array)

    def to_hf(self, ours: list) -> np.ndarray:
        return self.transform.join(ours)

    def hf_shape(self, our_shapes: list) -> tuple:
        return self.transform.hf_shape(our_shapes)


def fused_qkv(layout: str, num_heads: int, num_kv_heads: int, head_dim: int, kernel: bool) -> Fused:
    """Split / join a fused q/k/v weight (``kernel``: PyTorch [out, in] <-> our three kernels [in, out]) or
    bias ([out] <-> three [out]).

    ``layout``:
    * ``"stacked"``: rows = all of q, then all of k, then all of v (Baichuan ``W_pack``);
    * ``"grouped"``: rows = per kv head, its ``H/KVH`` query heads, then its key head, then its value head
      (Falcon ``query_key_value``: new_decoder_architecture; multi-query is the case of one group, and the
      original multi-head layout, per head [q, k, v], the case of one query per group)."""
    h, kvh, d = num_heads, num_kv_heads, head_dim
    g = h // kvh
    widths = (h * d, kvh * d, kvh * d)

    def split(a):
        rest = a.shape[1:]
        if layout == "stacked":
            parts = np.split(a, np.cumsum(widths)[:-1], axis=0)
        else:
            w = a.reshape(kvh, g + 2, d, *rest)
            parts = [w[:, :g].reshape(h * d, *rest), w[:, g].reshape(kvh * d, *rest), w[:, g + 1].reshape(kvh * d, *rest)]
        return [np.ascontiguousarray(p.T if kernel else p) for p in parts]

    def join(parts):
        parts = [np.asarray(p).T if kernel else np.asarray(p) for p in parts]
        rest = parts[0].shape[1:]
        if layout == "stacked":
            return np.ascontiguousarray(np.concatenate(parts, axis=0))
        q = parts[0].reshape(kvh, g, d, *rest)
        k = parts[1].reshape(kvh, 1, d, *rest)
        v = parts[2].reshape(kvh, 1, d, *rest)
        return np.ascontiguousarray(np.concatenate([q, k, v], axis=1).reshape(sum(widths), *rest))

    def hf_shape(shapes):
        for s, w in zip(shapes, widths):
            if (s[-1] if kernel else s[0]) != w:
                raise AssertionError(f"fused qkv part of shape {s} does not have width {w}")
        return (sum(widths), shapes[0][0]) if kernel else (sum(widths),)

    if layout not in ("stacked", "grouped"):
        raise ValueError(f"unknown fused qkv layout {layout!r}")
    return Fused(f"qkv_{layout}_{'kernel' if kernel else 'bias'}", split, join, hf_shape)


_QKV = ("q_proj", "k_proj", "v_proj")


def llama_rules(cfg: ModelConfig) -> list[Rule]:
    """Llama-2/3, Vicuna, Dolphin, Mistral, Qwen2/2.5, SmolLM2 (transformers' LlamaForCausalLM layout);
    Baichuan/Baichuan2 (the same names, but q/k/v fused in ``self_attn.W_pack`` [3*D, D], stacked; the
    lm_head is stored as is, a NormHead normalises it in the model)."""
    layer = "model.layers.{i}."
    rules = [
        Rule(("embedding",), "model.embed_tokens.weight"),
        Rule(("layers", "input_norm", "scale"), layer + "input_layernorm.weight"),
        Rule(("layers", "post_attn_norm", "scale"), layer + "post_attention_layernorm.weight"),
    ]
    if cfg.model_type == "baichuan":
        qkv = fused_qkv("stacked", cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, kernel=True)
        rules.append(FusedRule(tuple(("layers", "attn", n, "kernel") for n in _QKV), layer + "self_attn.W_pack.weight",
                               qkv))
        if cfg.qkv_bias:
            raise AssertionError("baichuan has no q/k/v bias")
        names = ("o_proj",)
    else:
        names = _QKV + ("o_proj",)
    for name in names:
        rules.append(Rule(("layers", "attn", name, "kernel"), layer + f"self_attn.{name}.weight", LINEAR))
        if (cfg.qkv_bias and name != "o_proj") or (cfg.o_bias and name == "o_proj"):
            rules.append(Rule(("layers", "attn", name, "bias"), layer + f"self_attn.{name}.bias"))
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules.append(Rule(("layers", "mlp", name, "kernel"), layer + f"mlp.{name}.weight", LINEAR))
        if cfg.mlp_bias:
            rules.append(Rule(("layers", "mlp", name, "bias"), layer + f"mlp.{name}.bias"))
    rules.append(Rule(("final_norm", "scale"), "model.norm.weight"))
    if not cfg.tie_word_embeddings:
        rules.append(Rule(("lm_head", "kernel"), "lm_head.weight", LINEAR))
    return rules


def falcon_rules(cfg: ModelConfig) -> list[Rule]:
    """transformers' FalconForCausalLM: ``query_key_value`` fused (grouped layout, split into q/k/v),
    ``dense`` = our o_proj (MoGU's branch target), GELU MLP ``dense_h_to_4h`` / ``dense_4h_to_h`` = our
    up_proj / down_proj, LayerNorms with bias: ``input_layernorm`` (+ ``post_attention_layernorm`` when
    sequential) or, new_decoder_architecture with two norms, ``ln_attn`` / ``ln_mlp``."""
    layer = "transformer.h.{i}."
    rules: list = [Rule(("embedding",), "transformer.word_embeddings.weight")]
    if cfg.parallel_residual and not cfg.shared_norm:
        norms = (("input_norm", "ln_attn"), ("mlp_norm", "ln_mlp"))
    elif cfg.parallel_residual:
        norms = (("input_norm", "input_layernorm"),)
    else:
        norms = (("input_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm"))
    for ours, theirs in norms:
        rules.append(Rule(("layers", ours, "scale"), layer + f"{theirs}.weight"))
        rules.append(Rule(("layers", ours, "bias"), layer + f"{theirs}.bias"))
    attn = layer + "self_attention."
    rules.append(FusedRule(tuple(("layers", "attn", n, "kernel") for n in _QKV), attn + "query_key_value.weight",
                           fused_qkv("grouped", cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, kernel=True)))
    if cfg.qkv_bias:
        rules.append(FusedRule(tuple(("layers", "attn", n, "bias") for n in _QKV), attn + "query_key_value.bias",
                               fused_qkv("grouped", cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, kernel=False)))
    rules.append(Rule(("layers", "attn", "o_proj", "kernel"), attn + "dense.weight", LINEAR))
    if cfg.o_bias:
        rules.append(Rule(("layers", "attn", "o_proj", "bias"), attn + "dense.bias"))
    for ours, theirs in (("up_proj", "dense_h_to_4h"), ("down_proj", "dense_4h_to_h")):
        rules.append(Rule(("layers", "mlp", ours, "kernel"), layer + f"mlp.{theirs}.weight", LINEAR))
        if cfg.mlp_bias:
            rules.append(Rule(("layers", "mlp", ours, "bias"), layer + f"mlp.{theirs}.bias"))
    rules.append(Rule(("final_norm", "scale"), "transformer.ln_f.weight"))
    rules.append(Rule(("final_norm", "bias"), "transformer.ln_f.bias"))
    if not cfg.tie_word_embeddings:
        rules.append(Rule(("lm_head", "kernel"), "lm_head.weight", LINEAR))
    return rules


# Hugging Face tensors that carry no parameters of ours (buffers, tied copies).
IGNORED = [re.compile(r".*rotary_emb\.inv_freq$")]

TABLES: dict[str, Callable[[ModelConfig], list[Rule]]] = {
    "llama": llama_rules,
    "mistral": llama_rules,
    "qwen2": llama_rules,
    "baichuan": llama_rules,
    "falcon": falcon_rules,
}


def rules_for(cfg: ModelConfig) -> list:
    return TABLES[cfg.model_type](cfg)


def ignored(key: str, cfg: ModelConfig) -> bool:
    if cfg.tie_word_embeddings and key == "lm_head.weight":
        return True
    return any(p.match(key) for p in IGNORED)


# Where MoGU's branches attach (the attention output projection) and where the routers live, per
# architecture, in the published PyTorch names. Our side is always layers/attn/o_proj.
BRANCH_TARGETS: dict[str, str] = {
    "llama": "model.layers.{i}.self_attn.o_proj",
    "mistral": "model.layers.{i}.self_attn.o_proj",
    "qwen2": "model.layers.{i}.self_attn.o_proj",
    "baichuan": "model.layers.{i}.self_attn.o_proj",
    "falcon": "transformer.h.{i}.self_attention.dense",
}
ROUTER_PREFIXES: dict[str, str] = {"llama": "model.", "mistral": "model.", "qwen2": "model.", "baichuan": "model.",
                                   "falcon": "transformer."}


def branch_target(cfg: ModelConfig) -> str:
    return BRANCH_TARGETS[cfg.model_type]


def router_prefix(cfg: ModelConfig) -> str:
    return ROUTER_PREFIXES[cfg.model_type]
