"""Tiny random Hugging Face models (PyTorch) saved to disk, and a tiny tokenizer, for parity tests."""

from __future__ import annotations

import os

import numpy as np

VOCAB = 128

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=VOCAB,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (transformers config class name, overrides)
CONFIGS = {
    "llama_mha": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama_gqa": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_mqa_tied": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama3_rope": ("LlamaConfig", dict(num_key_value_heads=2, rope_theta=500000.0,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 16})),
    "llama_linear_rope_bias": ("LlamaConfig", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                                                   rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False)),
    "mistral_window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=8)),
    "qwen2_bias_tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_bias_untied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "smollm2_like": ("LlamaConfig", dict(num_key_value_heads=1, head_dim=32, num_attention_heads=3,
                                          hidden_size=96, tie_word_embeddings=True, rope_theta=100000.0)),
}


def hf_config(name: str):
    import transformers
    cls_name, over = CONFIGS[name]
    kw = dict(BASE)
    kw.update(over)
    return getattr(transformers, cls_name)(**kw)


def make_hf_model(name: str, seed: int = 0, dtype=None):
    """A random transformers causal LM (eval mode, eager attention) for config ``name``."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = hf_config(name)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg).eval()
    # random norms so a wrong norm mapping cannot hide behind all-ones weights
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    return model


def make_tokenizer():
    """A tiny word-level fast tokenizer over VOCAB ids with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = [f"w{i}" for i in range(VOCAB - len(specials))]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}w1 {% endif %}")
    return tok


def save_hf(name: str, out_dir: str, seed: int = 0, dtype=None, tokenizer: bool = True,
            safe_serialization: bool = True, max_shard_size=None):
    model = make_hf_model(name, seed, dtype)
    kw = {}
    if max_shard_size is not None:
        kw["max_shard_size"] = max_shard_size
    if safe_serialization:
        model.save_pretrained(out_dir, **kw)
    else:
        # transformers v5 writes safetensors only; write the PyTorch .bin layout ourselves
        import torch
        os.makedirs(out_dir, exist_ok=True)
        model.config.save_pretrained(out_dir)
        sd = {k: v for k, v in model.state_dict().items()
              if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
        torch.save(sd, os.path.join(out_dir, "pytorch_model.bin"))
    if tokenizer:
        make_tokenizer().save_pretrained(out_dir)
    return model


def random_tokens(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(4, VOCAB, size=(batch, length)).astype(np.int32)


def cli_fails(capsys, argv, *needles) -> str:
    """Run the CLI on ``argv``: it must exit 2 with exactly one ``mogu-jax: error:`` line naming ``needles``."""
    from mogu_jax.cli import main
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "mogu-jax: error:" in ln]
    assert code == 2, err
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def hf_tensors(d: str) -> dict:
    from mogu_jax.convert.sources import HFDirSource
    src = HFDirSource(d)
    return {k: src.get(k) for k in src.keys()}


def assert_bit_exact(a_dir: str, b_dir: str) -> None:
    """Two HF folders hold the same tensors, bit for bit."""
    a, b = hf_tensors(a_dir), hf_tensors(b_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"
