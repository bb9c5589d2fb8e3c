"""Logits parity with Hugging Face PyTorch on tiny random configs (fp32, max abs diff <= 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mogu_jax import api
from mogu_jax.config import ModelConfig
from mogu_jax.convert.hf import params_from_source
from mogu_jax.convert.sources import HFDirSource
from mogu_jax.model import apply, param_logical_axes
from tiny_models import CONFIGS, random_tokens, save_hf

TOL = 1e-4


def _load(tmp_path, name, **over):
    hf = save_hf(name, str(tmp_path / name))
    src = HFDirSource(str(tmp_path / name))
    cfg = ModelConfig.from_hf(src.hf_config(), **over)
    params = params_from_source(src, cfg, finish=lambda _, a: jnp.asarray(a))
    return hf, cfg, params


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_hf(tmp_path, name):
    hf, cfg, params = _load(tmp_path, name)
    tokens = random_tokens(2, 24, seed=1)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours, _ = apply(cfg, params, jnp.asarray(tokens))
    diff = float(np.abs(np.asarray(ours) - ref).max())
    assert diff <= TOL, f"{name}: max abs diff {diff}"


def test_left_padded_batch_matches_hf(tmp_path):
    hf, cfg, params = _load(tmp_path, "llama_gqa")
    tokens = random_tokens(2, 12, seed=2)
    mask = np.ones_like(tokens)
    mask[0, :5] = 0
    tokens[0, :5] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()
    ours, _ = apply(cfg, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    real = mask.astype(bool)
    assert np.abs(np.asarray(ours)[real] - ref[real]).max() <= TOL


def test_remat_and_bf16(tmp_path):
    _, cfg, params = _load(tmp_path, "llama_gqa")
    tokens = jnp.asarray(random_tokens(2, 16))
    ref, _ = apply(cfg, params, tokens)
    remat, _ = apply(cfg.replace(remat=True), params, tokens)
    np.testing.assert_allclose(np.asarray(remat), np.asarray(ref), atol=1e-6)
    bf16, _ = apply(cfg.replace(dtype="bfloat16"), params, tokens)
    assert bf16.dtype == jnp.float32  # logits are accumulated in fp32
    err = float(jnp.abs(bf16 - ref).max())
    assert 0 < err < 0.05 * float(jnp.abs(ref).max()) + 0.05  # bf16 really ran, and stayed close


def test_every_param_has_logical_axes():
    cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2))
    axes = param_logical_axes(cfg)
    leaves = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert leaves and all(isinstance(s, jax.sharding.PartitionSpec) and len(s) > 0 for s in leaves)
    assert axes["layers"]["attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec("layers", "embed", "heads")
    assert axes["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")


def test_api_is_pure_grad_and_vmap(tmp_path):
    save_hf("llama_gqa", str(tmp_path / "m"))
    cfg, params, tok = api.load(str(tmp_path / "m"))
    assert tok is not None
    tokens = jnp.asarray(random_tokens(1, 8))

    def scalar(p):
        logits, _ = api.apply(cfg, p, tokens)
        return logits[0, -1, 5]

    grads = jax.grad(scalar)(params)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    gnorm = sum(float(jnp.sum(g ** 2)) for g in jax.tree_util.tree_leaves(grads))
    assert np.isfinite(gnorm) and gnorm > 0
    # finite-difference check on one weight of the head
    eps = 1e-2
    bumped = jax.tree_util.tree_map(lambda x: x, params)
    bumped["lm_head"] = {"kernel": params["lm_head"]["kernel"].at[3, 5].add(eps)}
    fd = (scalar(bumped) - scalar(params)) / eps
    np.testing.assert_allclose(float(fd), float(grads["lm_head"]["kernel"][3, 5]), rtol=1e-2, atol=1e-3)

    # vmap over a stack of 3 parameter sets: row k equals the unbatched forward of set k
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x * 0.5, x * 2.0]), params)
    batched = jax.vmap(lambda p: api.apply(cfg, p, tokens)[0])(stacked)
    for k, scale in enumerate([1.0, 0.5, 2.0]):
        single, _ = api.apply(cfg, jax.tree_util.tree_map(lambda x: x * scale, params), tokens)
        np.testing.assert_allclose(np.asarray(batched[k]), np.asarray(single), atol=1e-5)


@pytest.mark.parametrize("spec,sa,sb", [("...d,df->...f", (2, 5, 8), (8, 6)), ("btd,vd->btv", (2, 5, 8), (11, 8)),
                                        ("btkgd,bksd->bkgts", (2, 5, 3, 2, 4), (2, 3, 7, 4))])
def test_bf16_einsum_values_and_gradients(spec, sa, sb):
    """bf16 compute: the forward equals an fp32 matmul of the bf16-rounded operands; the backward (custom VJP,
    bf16 cotangent, fp32 accumulation) stays within bf16 rounding of the fp32 gradients."""
    from mogu_jax import numerics

    class Bf16:
        compute_dtype = jnp.bfloat16

    class F32:
        compute_dtype = jnp.float32

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a, b = jax.random.normal(ka, sa), jax.random.normal(kb, sb)
    rounded = [x.astype(jnp.bfloat16).astype(jnp.float32) for x in (a, b)]

    def f(c):
        return lambda x, y: jnp.sum(jnp.sin(numerics.einsum(c, spec, x, y)))

    ours = numerics.einsum(Bf16, spec, a, b)
    ref = numerics.einsum(F32, spec, *rounded)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5)
    g = jax.grad(f(Bf16), (0, 1))(a, b)
    gr = jax.grad(f(F32), (0, 1))(*rounded)
    for x, y in zip(g, gr):
        assert x.dtype == jnp.float32
        err = float(jnp.abs(x - y).max() / jnp.abs(y).max())
        assert 0 < err < 2e-2  # the cotangent really went through bf16, and stayed close
