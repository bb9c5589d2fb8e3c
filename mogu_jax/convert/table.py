"""Declarative conversion tables: our parameter path <-> Hugging Face tensor name + transform.

One table per architecture, run forwards by the importer and backwards by the exporter, so the
two can never disagree. ``{i}`` in a Hugging Face name marks a per-layer tensor; those are
stacked on the leading ``layers`` axis of our parameter.
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
class Rule:
    path: tuple[str, ...]
    hf: str
    transform: Transform = IDENTITY

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def hf_key(self, i: int | None = None) -> str:
        return self.hf.format(i=i) if self.per_layer else self.hf


def llama_rules(cfg: ModelConfig) -> list[Rule]:
    """Llama-2/3, Vicuna, Dolphin, Mistral, Qwen2/2.5, SmolLM2 (transformers' LlamaForCausalLM layout)."""
    layer = "model.layers.{i}."
    rules = [
        Rule(("embedding",), "model.embed_tokens.weight"),
        Rule(("layers", "input_norm", "scale"), layer + "input_layernorm.weight"),
        Rule(("layers", "post_attn_norm", "scale"), layer + "post_attention_layernorm.weight"),
    ]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
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


# Hugging Face tensors that carry no parameters of ours (buffers, tied copies).
IGNORED = [re.compile(r".*rotary_emb\.inv_freq$")]

TABLES: dict[str, Callable[[ModelConfig], list[Rule]]] = {
    "llama": llama_rules,
    "mistral": llama_rules,
    "qwen2": llama_rules,
}


def rules_for(cfg: ModelConfig) -> list[Rule]:
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
}
ROUTER_PREFIXES: dict[str, str] = {"llama": "model.", "mistral": "model.", "qwen2": "model."}


def branch_target(cfg: ModelConfig) -> str:
    return BRANCH_TARGETS[cfg.model_type]


def router_prefix(cfg: ModelConfig) -> str:
    return ROUTER_PREFIXES[cfg.model_type]
