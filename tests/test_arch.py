"""More base architectures through the one decoder: Falcon (7B multi-query / parallel, new_decoder_architecture,
ALiBi), Baichuan2-7B (W_pack, NormHead) and Baichuan2-13B-style ALiBi. Logits parity (fp32, <= 1e-4) with
Hugging Face PyTorch or an independent torch statement, left padding, both drivers, cached decoding, bit-exact
round trips, and MoGU (PEFT LoRA on Falcon's ``dense``, ``transformer.routers.*``) on Falcon."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, FalconConfig, LlamaConfig, LlamaForCausalLM

from mogu_jax import api
from mogu_jax import generate as G
from mogu_jax import mogu as mogu_lib
from mogu_jax.config import ModelConfig
from mogu_jax.convert import mogu_artifacts as art
from mogu_jax.convert.hf import params_from_source
from mogu_jax.convert.sources import HFDirSource
from mogu_jax.errors import MoguError
from mogu_jax.model import forward, forward_unrolled, unstack_layers
from tiny_models import assert_bit_exact, hf_tensors

TOL = 1e-4
VOCAB = 128

FALCON_BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                   initializer_range=0.1)
FALCONS = {
    # Falcon-7B: multi-query, parallel attention + MLP with one LayerNorm, rotary, no biases, tied head
    "falcon7b": dict(multi_query=True, parallel_attn=True, new_decoder_architecture=False, alibi=False, bias=False,
                     tie_word_embeddings=True),
    # Falcon-40B style: GQA (2 kv heads, grouped fused qkv), ln_attn / ln_mlp; biases and an untied head
    "falcon_new": dict(new_decoder_architecture=True, num_kv_heads=2, alibi=False, bias=True,
                       tie_word_embeddings=False),
    # Falcon-RW style: ALiBi, full multi-head (per-head [q, k, v] fused), sequential, biases; 6 heads (not a
    # power of two: the extra slopes)
    "falcon_alibi": dict(alibi=True, multi_query=False, parallel_attn=False, new_decoder_architecture=False,
                         bias=True, hidden_size=96, num_attention_heads=6, tie_word_embeddings=True),
}


def _perturb(model):
    """Random norms and biases so that a wrong mapping cannot hide behind ones and zeros."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or ".ln_" in n or "ln_f" in n or n.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))


def _load(d):
    src = HFDirSource(d)
    cfg = ModelConfig.from_hf(src.hf_config())
    return cfg, params_from_source(src, cfg, finish=lambda _, a: jnp.asarray(a))


@pytest.fixture(scope="module")
def falcons(tmp_path_factory):
    """name -> (dir, HF model (SDPA attention: transformers' default for Falcon), cfg, params)."""
    root = tmp_path_factory.mktemp("falcon")
    out = {}
    for seed, (name, over) in enumerate(FALCONS.items()):
        torch.manual_seed(seed)
        hcfg = FalconConfig(**{**FALCON_BASE, **over})
        hcfg._attn_implementation = "sdpa"
        hf = AutoModelForCausalLM.from_config(hcfg).eval()
        _perturb(hf)
        d = str(root / name)
        hf.save_pretrained(d)
        out[name] = (d, hf, *_load(d))
    return out


def _batches(seed=1, t=14):
    tokens = np.random.RandomState(seed).randint(4, VOCAB, size=(2, t)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[0, :5] = 0
    padded = tokens.copy()
    padded[0, :5] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return tokens, padded, mask, positions


def _check_ours(name, cfg, params, tokens, padded, mask, positions, ref_full, ref_pad):
    """Both drivers against the reference, on a full and a left-padded batch (real positions only)."""
    real = mask.astype(bool)
    full = np.asarray(forward(cfg, params, jnp.asarray(tokens)).logits)
    pad = np.asarray(forward(cfg, params, jnp.asarray(padded), jnp.asarray(positions), jnp.asarray(mask)).logits)
    un = np.asarray(forward_unrolled(cfg, unstack_layers(params, cfg.num_layers), jnp.asarray(padded),
                                     jnp.asarray(positions), jnp.asarray(mask)).logits)
    diffs = (np.abs(full - ref_full).max(), np.abs(pad[real] - ref_pad[real]).max(),
             np.abs(un[real] - ref_pad[real]).max())
    print(f"\n{name}: max abs logit diff full {diffs[0]:.2e}, left-padded {diffs[1]:.2e}, unrolled {diffs[2]:.2e}")
    assert max(diffs) <= TOL, (name, diffs)






# ------------------------------------------------------------------------------------------- Falcon
@pytest.mark.parametrize("name", sorted(FALCONS))
def test_falcon_parity_and_round_trip(falcons, tmp_path, name):
    d, hf, cfg, params = falcons[name]
    assert cfg.norm == "layer" and not cfg.gated_mlp and cfg.mlp_act == "gelu"
    assert cfg.num_kv_heads == {"falcon7b": 1, "falcon_new": 2, "falcon_alibi": 6}[name]
    assert bool(cfg.alibi) == (name == "falcon_alibi")
    assert set(params["layers"]["attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}  # fused qkv was split
    tokens, padded, mask, positions = _batches()
    with torch.no_grad():
        ref_full = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        ref_pad = hf(torch.tensor(padded, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.numpy()
    _check_ours(name, cfg, params, tokens, padded, mask, positions, ref_full, ref_pad)

    # HF -> ours -> HF: bit-exact (fused tensors joined back), loads in transformers, same logits
    ck, back = str(tmp_path / "ck"), str(tmp_path / "hf2")
    api.convert_hf_to_jax(d, ck)
    api.convert_jax_to_hf(ck, back)
    assert_bit_exact(d, back)
    reloaded = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(torch.tensor(tokens, dtype=torch.long)).logits.numpy(), ref_full, atol=1e-6)


def test_falcon_alibi_follows_sdpa_not_the_eager_double_bias(falcons):
    """transformers' eager Falcon ALiBi path adds the bias twice (in the mask and in the attention); SDPA (the
    default) and the original Falcon-RW add it once. We follow SDPA; document that eager differs."""
    d, hf, cfg, params = falcons["falcon_alibi"]
    eager = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    tokens = _batches()[0]
    with torch.no_grad():
        e = eager(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        s = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(e - s).max() > 1e-2


def test_falcon_config_flags():
    base = dict(model_type="falcon", vocab_size=32, hidden_size=16, num_attention_heads=4, num_hidden_layers=1)
    c = ModelConfig.from_hf(base)  # FalconConfig defaults: Falcon-7B
    assert (c.num_kv_heads, c.parallel_residual, c.shared_norm, c.tie_word_embeddings, c.intermediate_size) == \
        (1, True, True, True, 64)
    c = ModelConfig.from_hf({**base, "new_decoder_architecture": True, "num_kv_heads": 2,
                             "num_ln_in_parallel_attn": 1})
    assert (c.num_kv_heads, c.shared_norm) == (2, True)
    with pytest.raises(MoguError, match="parallel_attn"):
        ModelConfig.from_hf({**base, "new_decoder_architecture": True, "parallel_attn": False})
    with pytest.raises(MoguError, match="activation"):
        ModelConfig.from_hf({**base, "activation": "relu"})


# ------------------------------------------------------------------------------------------- Baichuan
def _baichuan_dir(out_dir, alibi, seed):
    """A Baichuan-named checkpoint (W_pack, NormHead lm_head with rows of varied norms, Baichuan's config keys)
    made from a random transformers Llama. Returns (the Llama with the equivalent plain, row-normalised head,
    the Baichuan state dict)."""
    torch.manual_seed(seed)
    hidden, heads = (96, 6) if alibi else (64, 4)
    lc = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                     rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.1, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0)
    lc._attn_implementation = "eager"
    llama = LlamaForCausalLM(lc).eval()
    _perturb(llama)
    sd = {k: v.detach().clone() for k, v in llama.state_dict().items()}
    w = sd["lm_head.weight"]
    row_norms = torch.exp(torch.randn(w.shape[0]))  # 0.1 .. 10: the NormHead must remove them
    sd["lm_head.weight"] = w / w.norm(dim=1, keepdim=True) * row_norms[:, None]
    for i in range(lc.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        sd[p + "W_pack.weight"] = torch.cat([sd.pop(p + n + ".weight") for n in ("q_proj", "k_proj", "v_proj")], 0)
    os.makedirs(out_dir)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    hf_cfg = {
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        "model_type": "baichuan", "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.1,
        "intermediate_size": 128, "model_max_length": 256, "num_attention_heads": heads,
        "num_hidden_layers": 2, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32",
        "use_cache": True, "vocab_size": VOCAB, "z_loss_weight": 0, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0, "tokenizer_class": "BaichuanTokenizer",
        "alibi": alibi,  # a tiny model is none of the released shapes: say which kind it is
    }
    if not alibi:
        hf_cfg["max_position_embeddings"] = 256  # Baichuan2-7B's config has it, Baichuan2-13B's does not
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f)
    with torch.no_grad():
        llama.lm_head.weight.copy_(torch.nn.functional.normalize(sd["lm_head.weight"]))
    return llama, sd


@pytest.fixture(scope="module")
def baichuans(tmp_path_factory):
    root = tmp_path_factory.mktemp("baichuan")
    out = {}
    for name, alibi, seed in (("baichuan7b", False, 10), ("baichuan13b", True, 11)):
        d = str(root / name)
        llama, sd = _baichuan_dir(d, alibi, seed)
        out[name] = (d, llama, sd, *_load(d))
    return out


def test_baichuan2_7b_parity_and_round_trip(baichuans, tmp_path):
    d, llama, sd, cfg, params = baichuans["baichuan7b"]
    assert cfg.model_type == "baichuan" and cfg.norm_head and not cfg.alibi
    # the stored head is the checkpoint's, unnormalised: normalisation happens in the model at use
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]).T, sd["lm_head.weight"].numpy())
    tokens, padded, mask, positions = _batches(seed=3)
    with torch.no_grad():
        ref_full = llama(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        ref_pad = llama(torch.tensor(padded, dtype=torch.long), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(positions)).logits.numpy()
    _check_ours("baichuan2_7b", cfg, params, tokens, padded, mask, positions, ref_full, ref_pad)
    # export writes the Baichuan names back, bit for bit
    ck, back = str(tmp_path / "ck"), str(tmp_path / "hf2")
    api.convert_hf_to_jax(d, ck)
    api.convert_jax_to_hf(ck, back)
    assert_bit_exact(d, back)
    assert "model.layers.1.self_attn.W_pack.weight" in hf_tensors(back)
    assert json.load(open(os.path.join(back, "config.json")))["model_type"] == "baichuan"


def _get_interleave(n):
    """Baichuan-13B's modelling code, verbatim: the ALiBi slopes."""
    def _get_interleave_power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio ** i for i in range(n)]

    if math.log2(n).is_integer():
        return _get_interleave_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (_get_interleave_power_of_2(closest_power_of_2)
            + _get_interleave(2 * closest_power_of_2)[0::2][: n - closest_power_of_2])


def _gen_alibi_mask(n_head, max_pos):
    """Baichuan-13B's modelling code, verbatim: causal -inf mask + slope * key index, [H, T, T]."""
    slopes = torch.Tensor(_get_interleave(n_head))
    position_point = torch.arange(max_pos) - max_pos + 1
    position_point = position_point.unsqueeze(0).unsqueeze(0).expand(n_head, -1, -1)
    diag = torch.diag(position_point[0])
    position_point = position_point - diag.unsqueeze(0).unsqueeze(0).transpose(-1, -2)
    alibi = slopes.unsqueeze(1).unsqueeze(1) * position_point
    alibi = alibi.view(n_head, 1, max_pos)
    alibi_mask = torch.triu(torch.zeros([max_pos, max_pos]).float().fill_(float("-inf")), 1)
    return alibi_mask.unsqueeze(0) + alibi


def baichuan13b_reference(sd, heads, eps, tokens, mask=None):
    """An independent torch statement of Baichuan2-13B's forward (eval): RMSNorm, W_pack attention with the
    ALiBi mask (and its padding expansion) of the released modelling code, SwiGLU, NormHead."""
    tokens = torch.tensor(tokens, dtype=torch.long)
    b, t = tokens.shape
    d = sd["model.embed_tokens.weight"].shape[1]
    hd = d // heads

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    alibi_mask = _gen_alibi_mask(heads, t)
    if mask is not None:
        m = torch.tensor(mask, dtype=torch.float32)
        expanded = torch.tril(torch.gt(m[:, :, None] * m[:, None, :], 0)) * torch.eq(m[:, :, None] - m[:, None, :], 0)
        inverted = 1.0 - expanded.unsqueeze(1).to(torch.float32)
        attn_mask = inverted.masked_fill(inverted.to(torch.bool), -1e20) + alibi_mask.unsqueeze(0)
    else:
        attn_mask = alibi_mask.unsqueeze(0)
    x = sd["model.embed_tokens.weight"][tokens]
    n_layers = len({k.split(".")[2] for k in sd if k.startswith("model.layers.")})
    for i in range(n_layers):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        proj = h @ sd[p + "self_attn.W_pack.weight"].T
        proj = proj.unflatten(-1, (3, d)).unsqueeze(0).transpose(0, -2).squeeze(-2)
        q, k, v = (proj[j].view(b, t, heads, hd).transpose(1, 2) for j in range(3))
        w = q @ k.transpose(2, 3) / math.sqrt(hd) + attn_mask
        w = torch.max(w, torch.tensor(torch.finfo(w.dtype).min))
        o = (torch.softmax(w, dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + o @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"])
    return (x @ torch.nn.functional.normalize(sd["lm_head.weight"]).T).numpy()


def test_baichuan2_13b_alibi_parity(baichuans, tmp_path):
    d, _, sd, cfg, params = baichuans["baichuan13b"]
    assert cfg.alibi == "baichuan" and cfg.norm_head and cfg.num_heads == 6
    tokens, padded, mask, positions = _batches(seed=4)
    with torch.no_grad():
        ref_full = baichuan13b_reference(sd, 6, 1e-6, tokens)
        ref_pad = baichuan13b_reference(sd, 6, 1e-6, padded, mask)
    _check_ours("baichuan2_13b_alibi", cfg, params, tokens, padded, mask, positions, ref_full, ref_pad)
    ck, back = str(tmp_path / "ck"), str(tmp_path / "hf2")
    api.convert_hf_to_jax(d, ck)
    api.convert_jax_to_hf(ck, back)
    assert_bit_exact(d, back)


def test_baichuan_rotary_or_alibi_decision():
    base = dict(model_type="baichuan", vocab_size=125696, intermediate_size=11008, hidden_act="silu",
                rms_norm_eps=1e-6)
    seven = ModelConfig.from_hf({**base, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                                 "max_position_embeddings": 4096})
    thirteen = ModelConfig.from_hf({**base, "hidden_size": 5120, "num_hidden_layers": 40,
                                    "num_attention_heads": 40, "intermediate_size": 13696,
                                    "model_max_length": 4096})
    assert (seven.alibi, seven.norm_head) == ("", True)
    assert (thirteen.alibi, thirteen.norm_head, thirteen.max_position_embeddings) == ("baichuan", True, 4096)
    tiny = {**base, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    with pytest.raises(MoguError, match='"alibi"'):
        ModelConfig.from_hf(tiny)
    assert ModelConfig.from_hf({**tiny, "alibi": True}).alibi == "baichuan"
    # Baichuan 1 (vocabulary 64000) has a plain head; an explicit key wins
    assert not ModelConfig.from_hf({**tiny, "alibi": False, "vocab_size": 64000}).norm_head
    assert not ModelConfig.from_hf({**tiny, "alibi": False, "norm_head": False}).norm_head


# ------------------------------------------------------------------------------------------- decoding
PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [7, 7, 120], [33]]


@pytest.mark.parametrize("which", ["falcon7b", "falcon_alibi", "baichuan13b"])
def test_cached_decoding_equals_full_recomputation(falcons, baichuans, which):
    cfg, params = (falcons[which] if which in falcons else baichuans[which])[-2:]
    n = 6
    drivers = {"unrolled": None}
    if which == "falcon_alibi":
        drivers["scan"] = G.scan_forward(cfg)
    for driver, fwd in drivers.items():
        out = G.generate(cfg, params, PROMPTS, max_new_tokens=n, eos_ids=(), return_logits=True, forward=fwd)
        worst = 0.0
        for prompt, toks, logits in zip(PROMPTS, out.tokens, out.logits):
            seq = jnp.asarray([prompt + toks], jnp.int32)
            full = np.asarray(forward(cfg, params, seq).logits[0])
            want = full[len(prompt) - 1: len(prompt) - 1 + n]
            worst = max(worst, float(np.abs(logits - want).max()))
            assert toks == [int(i) for i in want.argmax(-1)]
        print(f"\n{which} ({driver} driver): cached vs full recomputation, max abs logit diff {worst:.2e}")
        assert worst <= TOL, (which, driver, worst)


# ------------------------------------------------------------------------------------------- MoGU on Falcon
def test_mogu_on_falcon_glad_equals_peft_and_router_keys_round_trip(falcons, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    d, _, cfg, base = falcons["falcon7b"]
    torch.manual_seed(5)
    # PEFT matches target names by suffix ".dense", so "dense" adapts self_attention.dense and not
    # mlp.dense_h_to_4h / dense_4h_to_h; asserted below on the saved keys
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(d).eval(),
                        LoraConfig(r=8, lora_alpha=16, target_modules=["dense"], lora_dropout=0.0, bias="none",
                                   task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    glad_dir = str(tmp_path / "glad")
    pm.save_pretrained(glad_dir)
    from safetensors.torch import load_file
    keys = sorted(load_file(os.path.join(glad_dir, "adapter_model.safetensors")))
    assert keys and all(".self_attention.dense.lora_" in k for k in keys), keys
    assert "base_model.model.transformer.h.1.self_attention.dense.lora_A.weight" in keys

    tokens = _batches(seed=6)[0]
    with torch.no_grad():
        ref = pm(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    cfg2, parts = api.load_mogu_parts(cfg, glad=glad_dir)
    params = {"base": base, **jax.tree_util.tree_map(jnp.asarray, parts)}
    glad = np.asarray(forward(cfg2, params, jnp.asarray(tokens), mode="glad").logits)
    diff = float(np.abs(glad - ref).max())
    print(f"\nfalcon7b glad mode vs PeftModel: max abs logit diff {diff:.2e}")
    assert diff <= TOL
    # a PEFT-loadable export of our branch reproduces it too
    out = str(tmp_path / "glad_out")
    art.write_peft_adapter(out, jax.tree_util.tree_map(np.asarray, parts["glad"]), cfg2)
    pm2 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d).eval(), out)
    with torch.no_grad():
        np.testing.assert_allclose(pm2(torch.tensor(tokens, dtype=torch.long)).logits.numpy(), ref, atol=1e-6)

    # the published Falcon router keys: transformer.routers.{i}.{alpha_,beta_}.linear_{0,1,2}
    k = jax.random.split(jax.random.PRNGKey(7), 2)
    router = mogu_lib.init_router(cfg, k[0])
    router = jax.tree_util.tree_map(lambda x: np.asarray(x + 0.3 * jax.random.normal(k[1], x.shape)), router)
    tensors = dict(art.router_tensors(router, cfg))
    assert all(name.startswith("transformer.routers.") for name in tensors)
    assert tensors["transformer.routers.0.alpha_.linear_0.weight"].shape == (512, 64)
    assert "transformer.routers.1.beta_.linear_2.bias" in tensors
    path = str(tmp_path / "router.pth")
    torch.save({name: torch.from_numpy(np.array(v)) for name, v in tensors.items()}, path)
    back, ids, hidden = art.read_router(path, cfg)
    assert ids == (0, 1) and hidden == 512
    for a, b in zip(jax.tree_util.tree_leaves(router), jax.tree_util.tree_leaves(back)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()

    # routed mode on the parallel-residual decoder: both drivers agree
    full = {"base": base, "glad": params["glad"], "unwilling": params["glad"],
            "router": jax.tree_util.tree_map(jnp.asarray, back)}
    r1 = forward(cfg2, full, jnp.asarray(tokens), mode="routed")
    r2 = forward_unrolled(cfg2, unstack_layers(full, cfg2.num_layers), jnp.asarray(tokens), mode="routed")
    np.testing.assert_allclose(np.asarray(r2.logits), np.asarray(r1.logits), atol=1e-5)
    assert float(jnp.std(r1.alphas)) > 1e-3
