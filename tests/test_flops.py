"""The backward pass stops below the lowest trained layer (values and gradients unchanged, the lower layers'
backward absent from the differentiated program), and the analytic FLOP counts agree with the matmuls in the
traced programs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mogu_jax import flops as F
from mogu_jax import mogu as mogu_lib
from mogu_jax import train as T
from mogu_jax.config import ModelConfig
from mogu_jax.errors import MoguError
from mogu_jax.model import forward, init_params
from tiny_models import random_tokens


@pytest.fixture(scope="module")
def tiny4():
    """A random 4-layer GQA Llama, MoGU parts with routers in layers 2 and 3 (MoGU v2 style)."""
    cfg = ModelConfig(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                      router_layers=(2, 3))
    p = mogu_lib.init_mogu(cfg, 0, init_params(cfg, 1))
    key = jax.random.PRNGKey(3)
    p["router"] = jax.tree_util.tree_map(lambda x: x + 0.3 * jax.random.normal(key, x.shape), p["router"])
    for name in ("glad", "unwilling"):
        p[name]["B"] = 0.05 * jax.random.normal(key, p[name]["B"].shape)
    return cfg, p


def matmul_flops(jaxpr, mult=1) -> float:
    """2 x multiply-adds of every dot_general in a jaxpr, scan bodies times their length."""
    n = 0.0
    for e in jaxpr.eqns:
        if e.primitive.name == "dot_general":
            (ca, _), _ = e.params["dimension_numbers"]
            k = np.prod([e.invars[0].aval.shape[i] for i in ca])
            n += 2.0 * np.prod(e.outvars[0].aval.shape) * k * mult
        inner = mult * (e.params.get("length", 1) if e.primitive.name == "scan" else 1)
        for v in e.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else [v]):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    n += matmul_flops(sub, inner)
    return n


def router_grad(cfg, p, tokens, prefix=(), logits_from=0):
    def loss(trainable):
        out = forward(cfg, dict(p, **trainable), tokens, mode="routed", shared_prefix=prefix,
                      logits_from=logits_from)
        return jnp.mean(jnp.sin(out.logits)) + jnp.mean(out.alphas ** 2) - jnp.mean(out.betas), out
    return loss


@pytest.mark.parametrize("remat", [False, True])
def test_backward_stops_below_the_lowest_router(tiny4, remat):
    cfg, p = tiny4
    cfg = cfg.replace(remat=remat)
    tokens = jnp.asarray(random_tokens(3, 12, seed=7))
    tokens = tokens.at[:, :4].set(tokens[0, :4])
    trainable = {"router": p["router"]}
    assert T.lowest_trained_layer(cfg, "router") == 2 and T.lowest_trained_layer(cfg, "glad") == 2
    assert T.lowest_trained_layer(cfg.replace(router_layers=()), "glad") == 0
    for prefix in ((), tuple(int(t) for t in tokens[0, :4])):
        results = {}
        for k in (0, 2):
            c = cfg.replace(frozen_layers=k)
            f = router_grad(c, p, tokens, prefix, logits_from=4 if prefix else 0)
            (value, out), grad = jax.value_and_grad(f, has_aux=True)(trainable)
            program = jax.make_jaxpr(jax.grad(lambda t: f(t)[0]))(trainable).jaxpr
            results[k] = value, out, grad, matmul_flops(program)
        (v0, o0, g0, f0), (v2, o2, g2, f2) = results[0], results[2]
        np.testing.assert_allclose(float(v2), float(v0), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(o2.logits), np.asarray(o0.logits), atol=1e-5)
        np.testing.assert_allclose(np.asarray(o2.alphas), np.asarray(o0.alphas), atol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(g2), jax.tree_util.tree_leaves(g0)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6 * max(1.0, float(jnp.abs(b).max())))
        assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(g2)) > 0
        # the lower two layers run forward only: no backward, no remat recompute there
        assert f2 < 0.8 * f0, (f2, f0)


@pytest.mark.parametrize("remat", [False, True])
def test_joint_router_stage_backward_also_stops_below_the_lowest_router(tiny4, remat):
    """Routers + branches trained together (train.router_trains): below the lowest router a routed layer is the
    base layer, so the branches' slices there get exactly zero gradient and cutting the stack at that layer gives
    the same value and gradients with a smaller differentiated program."""
    cfg, p = tiny4
    cfg = cfg.replace(remat=remat)
    tokens = jnp.asarray(random_tokens(3, 12, seed=5))
    trainable = {k: p[k] for k in ("router", "glad", "unwilling")}
    assert T.lowest_trained_layer(cfg, "router", ("router", "glad", "unwilling")) == 2
    results = {}
    for k in (0, 2):
        f = router_grad(cfg.replace(frozen_layers=k), p, tokens)
        (value, _), grad = jax.value_and_grad(f, has_aux=True)(trainable)
        program = jax.make_jaxpr(jax.grad(lambda t: f(t)[0]))(trainable).jaxpr
        results[k] = value, grad, matmul_flops(program)
    (v0, g0, f0), (v2, g2, f2) = results[0], results[2]
    np.testing.assert_allclose(float(v2), float(v0), rtol=1e-6)
    for name in ("glad", "unwilling"):
        for leaf in jax.tree_util.tree_leaves(g0[name]):
            assert float(jnp.abs(leaf[:2]).max()) == 0.0  # the layers below the lowest router
            assert float(jnp.abs(leaf[2:]).max()) > 0
    for a, b in zip(jax.tree_util.tree_leaves(g2), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6 * max(1.0, float(jnp.abs(b).max())))
    assert f2 < 0.8 * f0, (f2, f0)


def test_frozen_layers_guard_rails(tiny4):
    cfg, p = tiny4
    tokens = jnp.asarray(random_tokens(2, 6))
    with pytest.raises(MoguError, match="cut through the MoGU layers"):
        forward(cfg.replace(frozen_layers=3), p, tokens, mode="routed")
    with pytest.raises(MoguError, match="cut through the MoGU layers"):
        forward(cfg.replace(frozen_layers=3), p, tokens, mode="glad")
    with pytest.raises(MoguError, match="cut through the MoGU layers"):  # v1: the branch in every layer
        forward(cfg.replace(frozen_layers=1, router_layers=()), p, tokens, mode="unwilling")


@pytest.mark.parametrize("mode", ["glad", "unwilling"])
def test_a_branch_lives_in_the_router_layers_and_its_stage_stops_there(tiny4, mode):
    """With routers in layers 2-3 (MoGU v2) a branch mode runs its branch there only: the lower slices change
    nothing (the base layers), so the branch stage cuts the stack at layer 2 (the same value and gradients, the
    lower slices' gradient exactly zero, a smaller differentiated program); scan and unrolled agree."""
    cfg, p = tiny4
    tokens = jnp.asarray(random_tokens(3, 12, seed=4))
    wild = dict(p, **{mode: jax.tree_util.tree_map(lambda x: x.at[:2].set(7.0), p[mode])})  # big lower slices
    base_out = forward(cfg, p, tokens, mode="base").logits
    for c in (cfg, cfg.replace(scan_layers=False)):
        np.testing.assert_allclose(np.asarray(forward(c, wild, tokens, mode=mode).logits),
                                   np.asarray(forward(cfg, p, tokens, mode=mode).logits), atol=1e-5)
    assert float(jnp.abs(forward(cfg, p, tokens, mode=mode).logits - base_out).max()) > 1e-3
    v1 = cfg.replace(router_layers=())  # the published v1 layout: the branch in every layer
    assert float(jnp.abs(forward(v1, wild, tokens, mode=mode).logits - forward(v1, p, tokens, mode=mode).logits
                         ).max()) > 1e-3
    assert T.lowest_trained_layer(cfg, mode) == 2
    results = {}
    for k in (0, 2):
        c = cfg.replace(frozen_layers=k)

        def f(branch):
            out = forward(c, dict(p, **{mode: branch}), tokens, mode=mode)
            return jnp.mean(jnp.sin(out.logits))
        value, grad = jax.value_and_grad(f)(p[mode])
        results[k] = value, grad, matmul_flops(jax.make_jaxpr(jax.grad(f))(p[mode]).jaxpr)
    (v0, g0, f0), (v2, g2, f2) = results[0], results[2]
    np.testing.assert_allclose(float(v2), float(v0), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g2), jax.tree_util.tree_leaves(g0)):
        assert float(jnp.abs(b[:2]).max()) == 0.0 and float(jnp.abs(b[2:]).max()) > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6 * max(1.0, float(jnp.abs(b).max())))
    assert f2 < 0.8 * f0, (f2, f0)


def test_lower_hidden_runs_the_shared_prefix_once(tiny4):
    """The cached lower layers' output (train.cache_frozen_layers) with the rows' shared first tokens run once per
    batch: the same values as every row run whole (padded rows too), fewer matmul FLOPs."""
    from mogu_jax.model import lower_hidden
    cfg, p = tiny4
    c = cfg.replace(frozen_layers=2)
    tokens = jnp.asarray(random_tokens(4, 16, seed=6))
    tokens = tokens.at[:, :6].set(tokens[0, :6])
    mask = jnp.asarray(np.arange(16)[None, :] < np.array([16, 12, 9, 14])[:, None])
    plain = lower_hidden(c, p, tokens, mask)
    shared = lower_hidden(c, p, tokens, mask, shared_prefix=6)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(shared)[real], np.asarray(plain)[real], atol=1e-5)

    def flops(n):
        return matmul_flops(jax.make_jaxpr(lambda t: lower_hidden(c, p, t, mask, shared_prefix=n))(tokens).jaxpr)
    assert flops(6) < 0.8 * flops(0)


@pytest.mark.parametrize("stage,remat,frozen,prefix", [
    ("glad", False, 0, 0), ("glad", True, 0, 4), ("router", False, 0, 0), ("router", True, 2, 0),
    ("router", False, 2, 4)])
def test_analytic_train_flops_match_the_traced_step(tiny4, stage, remat, frozen, prefix):
    cfg, p = tiny4
    cfg = cfg.replace(remat=remat, frozen_layers=frozen)
    b, t, lf = 4, 16, 8
    tokens = jnp.asarray(random_tokens(b, t, seed=1))
    tokens = tokens.at[:, :4].set(tokens[0, :4])
    pre = tuple(int(x) for x in tokens[0, :prefix])
    mode = T.MODE[stage]
    seqs = 2 if stage in F.PAIR_STAGES else 1

    def loss(trainable):
        total = 0.0
        for _ in range(seqs):  # the pair stages run the affirmative and the refusal sequence
            out = forward(cfg, dict(p, **trainable), tokens, mode=mode, shared_prefix=pre, logits_from=lf)
            total = total + jnp.mean(out.logits)
        return total

    traced = matmul_flops(jax.make_jaxpr(jax.grad(loss))({stage: p[stage]} if stage != "router"
                                                          else {"router": p["router"]}).jaxpr)
    analytic = F.train_step_flops(cfg, stage, b, t, prefix, lf)
    assert abs(analytic - traced) <= 0.08 * traced, (analytic, traced)


def test_generation_flops_scale():
    cfg = ModelConfig(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=4, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0)
    one = F.generation_flops(cfg, "base", 1, 16, 32, 8)
    assert F.generation_flops(cfg, "base", 2, 16, 32, 8) == 2 * one
    assert F.generation_flops(cfg, "routed", 1, 16, 32, 8) > one
    ledger = F.Ledger()
    ledger.add("data", 2e12)
    ledger.add("glad", 1e12)
    assert ledger.total == 3e12 and "compute 3.00 TFLOP (data 2.00, glad 1.00)" == ledger.format()


# ------------------------------------------------------------------ the router stage with cached lower layers
from test_train import _conf, _final, _losses, world  # noqa: E402,F401  (module fixture + helpers)


def test_router_stage_with_cached_lower_layers_trains_the_same(world, tmp_path):
    """Routers in layer 1 only (MoGU v2 subset) with the layer below cached once per example: the same losses
    and routers as running it every step (and as the single scan), fewer FLOPs counted; a sharded mesh too."""
    from mogu_jax.trainer import run_stage
    glad, unw = str(tmp_path / "glad"), str(tmp_path / "unwilling")
    run_stage(_conf(world, "glad", glad, "train.max_steps=1", "mesh.data=1"), progress=False)
    run_stage(_conf(world, "unwilling", unw, "train.max_steps=1", "mesh.data=1"), progress=False)
    results = {}
    for name, extra in (("cached", ["train.cache_frozen_layers=true"]),
                        ("plain", ["train.cache_frozen_layers=false"]),
                        ("cached_mesh", ["train.cache_frozen_layers=true", "mesh.data=2", "mesh.fsdp=2"]),
                        ("cached_unrolled", ["train.cache_frozen_layers=true", "model.scan_layers=false",
                                             "model.template=vicuna",
                                             "model.system=You are a careful assistant who answers briefly"]),
                        ("shared", ["train.cache_frozen_layers=true", "model.template=vicuna",
                                    "model.system=You are a careful assistant who answers briefly"]),
                        ("shared_plain", ["train.cache_frozen_layers=false", "model.template=vicuna",
                                          "model.system=You are a careful assistant who answers briefly"])):
        out = str(tmp_path / name)
        mesh = [] if any(e.startswith("mesh.") for e in extra) else ["mesh.data=1"]
        res = run_stage(_conf(world, "router", out, "train.max_steps=3", "optim.lr=1e-2", "model.router_layers=[1]",
                              f"inputs.glad={glad}", f"inputs.unwilling={unw}", *mesh, *extra), progress=False)
        assert res["done"]
        results[name] = (_losses(out), _final(out, "router", res["cfg"]), res["flops"])
    for a, b in (("cached", "plain"), ("cached_mesh", "plain"), ("shared", "shared_plain"),
                 ("cached_unrolled", "shared_plain")):
        np.testing.assert_allclose(results[a][0], results[b][0], rtol=1e-5, err_msg=a)
        for x, y in zip(jax.tree_util.tree_leaves(results[a][1]), jax.tree_util.tree_leaves(results[b][1])):
            np.testing.assert_allclose(x, y, atol=1e-5, err_msg=a)
    assert results["cached"][2] < results["plain"][2]


def test_branch_stage_in_the_router_layers_caches_the_layers_below(world, tmp_path):
    """A pair stage (unwilling) with model.router_layers=[1]: the branch trains in layer 1 only (layer 0's slice
    keeps B = 0), both halves of every example take layer 0's output from a cache computed once, and the losses
    and branch equal running layer 0 every step, for fewer FLOPs."""
    from mogu_jax.trainer import run_stage
    results = {}
    for name, cached in (("cached", "true"), ("plain", "false")):
        out = str(tmp_path / name)
        res = run_stage(_conf(world, "unwilling", out, "train.max_steps=4", "optim.lr=1e-2", "train.epochs=2",
                              "model.router_layers=[1]", f"train.cache_frozen_layers={cached}", "mesh.data=1"),
                        progress=False)
        assert res["done"]
        results[name] = (_losses(out), _final(out, "unwilling", res["cfg"]), res["flops"])
    np.testing.assert_allclose(results["cached"][0], results["plain"][0], rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(results["cached"][1]), jax.tree_util.tree_leaves(results["plain"][1])):
        np.testing.assert_allclose(x, y, atol=1e-5)
    branch = results["cached"][1]
    assert float(np.abs(branch["B"][0]).max()) == 0.0 and float(np.abs(branch["B"][1]).max()) > 0
    assert results["cached"][2] < results["plain"][2]
