"""The three training stages: losses against a per-example PyTorch loop, meshes, frozen weights,
optimizer state, exact resume after SIGKILL, two processes, learning, and bad input."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mogu_jax import data as D
from mogu_jax import train as T
from mogu_jax.cli import main
from mogu_jax.config import ModelConfig
from mogu_jax.errors import MoguError
from mogu_jax.convert import mogu_artifacts as art
from mogu_jax.convert.hf import params_from_source
from mogu_jax.convert.sources import HFDirSource
from mogu_jax.train_config import load_config
from mogu_jax.trainer import restore_part, run_stage
from test_mogu import random_mogu, torch_reference
from tiny_models import make_hf_model, save_hf, cli_fails

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _words(r, n):
    return " ".join(f"w{r.randrange(4, 120)}" for _ in range(n))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import random
    root = tmp_path_factory.mktemp("train")
    hf = str(root / "hf")
    save_hf("llama_gqa", hf)
    r = random.Random(0)
    with open(root / "pairs.jsonl", "w") as f:
        for _ in range(24):
            f.write(json.dumps({"instruction": _words(r, r.randrange(3, 9)),
                                "affirmative": "w10 w11 " + _words(r, r.randrange(2, 8)),
                                "refusal": "w20 w21 " + _words(r, 3)}) + "\n")
    with open(root / "router.jsonl", "w") as f:
        for i in range(32):
            lab = i % 2
            f.write(json.dumps({"instruction": ("w50 " if lab else "w60 ") + _words(r, r.randrange(3, 9)),
                                "output": ("w20 w21 " if lab else "w10 w11 ") + _words(r, 3), "label": lab}) + "\n")
    src = HFDirSource(hf)
    cfg = ModelConfig.from_hf(src.hf_config())
    base = params_from_source(src, cfg, finish=lambda _, a: jnp.asarray(a))
    return {"root": root, "hf": hf, "pairs": str(root / "pairs.jsonl"), "router": str(root / "router.jsonl"),
            "cfg": cfg, "base": base, "tok": src.tokenizer()}


def _conf(world, stage, out, *extra):
    over = [f"model.base={world['hf']}", f"data.glad.jsonl={world['pairs']}",
            f"data.unwilling.jsonl={world['pairs']}", f"data.router.jsonl={world['router']}",
            f"output.dir={out}", "train.batch_size=8", "output.tensorboard=false", *extra]
    return load_config(stage, None, over)


# ------------------------------------------------------------------ losses vs a per-example reference
def _ce(logits, tokens, loss_mask):
    lp = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1).numpy()
    idx = np.nonzero(loss_mask)[0]
    return float(np.mean([-lp[t - 1, tokens[t]] for t in idx]))


SYSTEM = " ".join(f"w{i}" for i in range(30, 45))


@pytest.mark.parametrize("stage,shared", [("glad", False), ("unwilling", False), ("router", False), ("glad", True),
                                          ("router", True), ("router", "after_prefix")])
def test_stage_loss_equals_per_example_reference(world, stage, shared, tmp_path):
    """Our batched stage loss = the per-example loss of the real HF model (PEFT for the responders, the spec's
    formula for the router). ``shared``: a template with a system prompt, whose tokens the loss runs once per
    batch (StageData.shared_prefix), and the LM head from the first loss position, as run_stage does;
    ``after_prefix``: also the router's targets only after that prompt (``train.router_targets``)."""
    cfg, tok = world["cfg"], world["tok"]
    rows = D.load_stage_data(stage, world["router"] if stage == "router" else world["pairs"])
    if shared:
        data = D.tokenize_stage(stage, rows, tok, max_len=1024, template="vicuna", system=SYSTEM)
        prefix, start = data.shared_prefix(), data.logits_from()
        assert len(prefix) == start >= D.MIN_SHARED_PREFIX  # the system prompt, cut at the first loss position
    else:
        data = D.tokenize_stage(stage, rows, tok, max_len=1024)
        prefix, start = (), 0
    batch = next(D.StageLoader(data, 8, seed=3))
    params = random_mogu(cfg, world["base"], seed=1, router_std=0.5)
    frozen = {k: v for k, v in params.items() if k != stage}
    router_from = T.router_targets_from({"router_targets": shared}, data) if shared == "after_prefix" else 0
    assert router_from == (len(prefix) if shared == "after_prefix" else 0)
    total, stats = T.stage_loss_fn(cfg, stage, 2.0, start, prefix, router_from=router_from)(params[stage], frozen,
                                                                                           batch)
    ours = float(total) / float(stats["weight"])

    per = []
    if stage == "router":
        hf = make_hf_model("llama_gqa")
        for i in range(8):
            m = batch["attn_mask"][i]
            toks = batch["tokens"][i][m]
            logits, a, b = torch_reference(hf, cfg, params, toks[None], cfg.router_layer_ids)
            lab = int(batch["label"][i])
            a, b = a[..., router_from:], b[..., router_from:]
            mse = np.mean((a - lab) ** 2) + np.mean((b - (1 - lab)) ** 2)
            per.append(_ce(logits[0], toks, batch["loss_mask"][i][m]) + 2.0 * mse)
    else:
        from peft import PeftModel
        art.write_peft_adapter(str(tmp_path / stage), jax.tree_util.tree_map(np.asarray, params[stage]), cfg)
        pm = PeftModel.from_pretrained(make_hf_model("llama_gqa"), str(tmp_path / stage))
        for i in range(8):
            ce = {}
            for half in ("affirm", "refusal"):
                h = batch[half]
                m = h["attn_mask"][i]
                toks = h["tokens"][i][m]
                with torch.no_grad():
                    logits = pm(torch.tensor(toks[None], dtype=torch.long)).logits[0].numpy()
                ce[half] = _ce(logits, toks, h["loss_mask"][i][m])
            per.append(ce["affirm"] / ce["refusal"] if stage == "glad" else ce["refusal"] / ce["affirm"])
    w = batch["weight"]
    ref = float(np.sum(np.asarray(per) * w) / np.sum(w))
    assert abs(ours - ref) <= 1e-5, (ours, ref)


@pytest.mark.parametrize("stage", ["glad", "router"])
def test_logits_only_from_the_first_loss_position(world, stage):
    """The LM head applied from ``logits_from`` on gives the same loss and gradients; one position later
    drops a loss token (the check is not vacuous)."""
    cfg, tok = world["cfg"], world["tok"]
    rows = D.load_stage_data(stage, world["router"] if stage == "router" else world["pairs"])
    data = D.tokenize_stage(stage, rows, tok, max_len=1024)
    start = min(ex.prompt_len for seqs in data.sequences().values() for ex in seqs) - 1
    assert start > 0 and data.logits_from() <= start and data.logits_from() % 8 == 0
    batch = next(D.StageLoader(data, 8, seed=3))
    params = random_mogu(cfg, world["base"], seed=1, router_std=0.5)
    frozen = {k: v for k, v in params.items() if k != stage}

    def run(logits_from):
        fn = T.stage_loss_fn(cfg, stage, 2.0, logits_from)
        (total, _), g = jax.value_and_grad(fn, has_aux=True)(params[stage], frozen, batch)
        return float(total), g

    masks = [batch[h]["loss_mask"] for h in ("affirm", "refusal")] if stage == "glad" else [batch["loss_mask"]]
    batch_start = min(int(np.argmax(row)) for m in masks for row in np.asarray(m) if row.any()) - 1
    assert batch_start >= start
    full, g_full = run(0)
    part, g_part = run(batch_start)  # the furthest this batch allows (the data's own start is <= it)
    assert abs(full - part) <= 1e-6 * max(1.0, abs(full))
    for a, b in zip(jax.tree_util.tree_leaves(g_full), jax.tree_util.tree_leaves(g_part)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert abs(run(batch_start + 1)[0] - full) > 1e-4


@pytest.mark.parametrize("stage,shared", [("glad", False), ("router", False), ("router", True)])
def test_loss_windows_give_the_same_loss_and_gradients(world, stage, shared):
    """``loss_windows``: the LM head on each row's response window only (``loss_pos``, narrower than the positions
    from the data's first loss position on) gives the same loss and gradients as the head over every position;
    a window one position short drops loss tokens (the check is not vacuous)."""
    cfg, tok = world["cfg"], world["tok"]
    rows = D.load_stage_data(stage, world["router"] if stage == "router" else world["pairs"])
    extra = dict(template="vicuna", system=SYSTEM) if shared else {}
    data = D.tokenize_stage(stage, rows, tok, max_len=1024, **extra)
    prefix, start = (data.shared_prefix(), data.logits_from()) if shared else ((), 0)
    plain = next(D.StageLoader(data, 8, seed=3))
    windowed = next(D.StageLoader(data, 8, seed=3, loss_windows=True))
    halves = [windowed["affirm"], windowed["refusal"]] if stage == "glad" else [windowed]
    for h in halves:
        t = h["tokens"].shape[1]
        assert "loss_pos" in h and h["loss_pos"].shape[1] < t - data.logits_from()
        assert h["loss_pos"].shape[1] % D.LOSS_WINDOW_MULTIPLE == 0
    params = random_mogu(cfg, world["base"], seed=1, router_std=0.5)
    frozen = {k: v for k, v in params.items() if k != stage}
    fn = T.stage_loss_fn(cfg, stage, 2.0, start, prefix)

    def run(batch):
        (total, _), g = jax.value_and_grad(fn, has_aux=True)(params[stage], frozen, batch)
        return float(total), g

    full, g_full = run(plain)
    part, g_part = run(windowed)
    assert abs(full - part) <= 1e-5 * max(1.0, abs(full)), (full, part)
    for a, b in zip(jax.tree_util.tree_leaves(g_full), jax.tree_util.tree_leaves(g_part)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    for h in halves:  # a window one short of the batch's longest response: that row loses its last token
        longest = int(np.asarray(h["loss_mask"]).sum(axis=1).max())
        h["loss_pos"], h["loss_valid"] = D.loss_window(np.asarray([int(np.argmax(m)) for m in h["loss_mask"]]),
                                                       longest - 1, h["tokens"].shape[1])
    assert abs(run(windowed)[0] - full) > 1e-4


def test_loss_window_positions():
    """loss_window: from the position before the first response token; clipped at length - 2 and marked so."""
    pos, valid = D.loss_window(np.asarray([3, 6]), 4, 8)
    np.testing.assert_array_equal(pos, [[2, 3, 4, 5], [5, 6, 6, 6]])
    np.testing.assert_array_equal(valid, [[True] * 4, [True, True, False, False]])
    ex = [D.Example(np.zeros(n, np.int32), np.arange(n) >= p, p, n) for n, p in ((10, 7), (20, 5), (30, 20))]
    assert D.loss_window_width(ex, 16, 0) == 8  # the 3-token response, rounded up; the longer rows do not fit 16
    assert D.loss_window_width(ex, 32, 0) == 16  # the 15-token response
    assert D.loss_window_width(ex, 32, 16) == 0  # not narrower than the 16 positions from logits_from on


def test_shared_prefix_of_the_data(world):
    """StageData.shared_prefix: the tokens all sequences (both halves of pairs) start with, never past the first
    loss position; nothing when they share less than MIN_SHARED_PREFIX tokens."""
    tok = world["tok"]
    pairs = D.load_stage_data("glad", world["pairs"])
    data = D.tokenize_stage("glad", pairs, tok, max_len=1024, template="vicuna", system=SYSTEM)
    prefix = data.shared_prefix(min_len=1)
    seqs = [ex.tokens for s in data.sequences().values() for ex in s]
    assert all(tuple(t[:len(prefix)]) == prefix for t in seqs) and len(prefix) == data.logits_from()
    common = next(n for n in range(min(map(len, seqs)) + 1)
                  if n == min(map(len, seqs)) or len({int(t[n]) for t in seqs}) > 1)
    assert common > len(prefix)  # the system prompt goes on: the cut is the first loss position's
    plain = D.tokenize_stage("glad", pairs, tok, max_len=1024)  # the tiny tokenizer's bare template
    assert plain.shared_prefix() == () and len(plain.shared_prefix(min_len=1)) < D.MIN_SHARED_PREFIX


def test_short_batch_weights_and_accumulation_average(world):
    """Gradient accumulation over micro-batches = one big batch: the mean of the per-example losses."""
    cfg, tok = world["cfg"], world["tok"]
    data = D.tokenize_stage("glad", D.load_stage_data("glad", world["pairs"]), tok)
    big = next(D.StageLoader(data, 8, seed=5, shuffle=False))
    halves = [next(it) for it in [iter(D.StageLoader(data, 4, seed=5, shuffle=False))] for _ in range(2)]
    params = random_mogu(cfg, world["base"], seed=2)
    fn = T.stage_loss_fn(cfg, "glad")
    g = jax.grad(lambda p, b: fn(p, {"base": world["base"]}, b)[0])
    g_big = g(params["glad"], big)
    g_acc = jax.tree_util.tree_map(jnp.add, g(params["glad"], halves[0]), g(params["glad"], halves[1]))
    for x, y in zip(jax.tree_util.tree_leaves(g_big), jax.tree_util.tree_leaves(g_acc)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_grad_accum_through_step_fns_equals_one_large_batch(world):
    """train.grad_accum > 1 through the real StepFns (grad step, accumulate, update): one update from two
    micro-batches of 4 equals one update from the batch of 8 (params, optimizer state and stats)."""
    from mogu_jax.sharding import make_mesh
    from mogu_jax.trainer import place_state

    cfg, tok = world["cfg"], world["tok"]
    data = D.tokenize_stage("glad", D.load_stage_data("glad", world["pairs"]), tok)
    mesh = make_mesh((2, 2, 1))
    big = T.local_batch_to_global(next(D.StageLoader(data, 8, seed=5, shuffle=False)), mesh)
    it = iter(D.StageLoader(data, 4, seed=5, shuffle=False))
    halves = [T.local_batch_to_global(next(it), mesh) for _ in range(2)]
    tx = T.make_optimizer({"lr": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-6}, 10)
    out = {}
    for name, mbs in (("one", [big]), ("accumulated", halves)):
        trainable = jax.tree_util.tree_map(np.asarray, T.init_trainable(cfg, "glad", 0))
        trainable["B"] = trainable["B"] + 0.01  # away from zero, so A gets a gradient too
        state, frozen, state_sh, frozen_sh = place_state(cfg, "glad", {"base": world["base"]}, trainable, mesh, tx)
        fns = T.StepFns(cfg, "glad", tx, mesh, state_sh, frozen_sh)
        out[name] = fns.step(state, frozen, mbs)
    (s1, st1), (s2, st2) = out["one"], out["accumulated"]
    assert int(s1["step"]) == int(s2["step"]) == 1
    for k in ("loss", "weight", "grad_norm"):
        np.testing.assert_allclose(float(st1[k]), float(st2[k]), rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    assert float(np.abs(np.asarray(s1["params"]["A"]) - np.asarray(T.init_trainable(cfg, "glad", 0)["A"])).max()) > 0


# ------------------------------------------------------------------ meshes, frozen weights, optimizer state
def _final(out, stage, cfg):
    return jax.tree_util.tree_map(np.asarray, restore_part(os.path.join(out, "final", stage), cfg, stage))


def _losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]


def test_meshes_give_the_same_training(world, tmp_path):
    results = {}
    for mesh in [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 2, 4)]:
        out = str(tmp_path / ("glad_%d%d%d" % mesh))
        conf = _conf(world, "glad", out, "train.max_steps=3", "optim.lr=1e-2", f"mesh.data={mesh[0]}",
                     f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}")
        res = run_stage(conf, progress=False)
        assert res["done"] and res["updates"] == 3
        results[mesh] = (_losses(out), _final(out, "glad", res["cfg"]))
    ref_losses, ref_params = results[(1, 1, 1)]
    assert float(np.abs(ref_params["B"]).max()) > 0  # training moved B away from zero
    for mesh, (losses, params) in results.items():
        np.testing.assert_allclose(losses, ref_losses, atol=1e-5, err_msg=str(mesh))
        for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
            np.testing.assert_allclose(x, y, atol=1e-5, err_msg=str(mesh))


def test_shared_prefix_training_on_meshes(world, tmp_path):
    """run_stage with a system prompt (its tokens run once per batch): a sharded mesh trains as one device does,
    and as training with train.share_prefix off."""
    results = {}
    for mesh, share in [((1, 1, 1), True), ((2, 2, 2), True), ((1, 1, 1), False)]:
        out = str(tmp_path / ("glad_%d%d%d_%s" % (*mesh, share)))
        conf = _conf(world, "glad", out, "train.max_steps=3", "optim.lr=1e-2", f"mesh.data={mesh[0]}",
                     f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}", "model.template=vicuna",
                     f"model.system={SYSTEM}", f"train.share_prefix={str(share).lower()}")
        res = run_stage(conf, progress=False)
        assert res["done"] and res["updates"] == 3
        results[(mesh, share)] = (_losses(out), _final(out, "glad", res["cfg"]))
    ref_losses, ref_params = results[((1, 1, 1), False)]
    assert float(np.abs(ref_params["B"]).max()) > 0
    for key, (losses, params) in results.items():
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(key))
        for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
            np.testing.assert_allclose(x, y, atol=1e-5, err_msg=str(key))


def test_only_the_trainable_subtree_changes(world):
    from mogu_jax.sharding import make_mesh, param_logical_axes, replicated, tree_shardings
    from mogu_jax.trainer import optax_shardings
    cfg = world["cfg"]
    params = random_mogu(cfg, world["base"], seed=4)
    mesh = make_mesh((2, 2, 2))
    tx = T.make_optimizer({"lr": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-6}, 10)
    frozen = {k: params[k] for k in ("base", "glad", "unwilling")}
    before = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), frozen)
    f_sh = tree_shardings(param_logical_axes(cfg, ("glad", "unwilling")), frozen, mesh)
    t_sh = tree_shardings(param_logical_axes(cfg, ("router",))["router"], params["router"], mesh)
    opt_shape = jax.eval_shape(tx.init, params["router"])
    state_sh = {"params": t_sh, "opt_state": optax_shardings(tx, opt_shape, t_sh, replicated(mesh)),
                "step": replicated(mesh)}
    frozen_g = T.to_global(frozen, f_sh)
    trainable = T.to_global(jax.tree_util.tree_map(np.asarray, params["router"]), t_sh)
    state = {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.asarray(0, jnp.int32)}
    # the optimizer state holds moments for the router leaves only (plus step counters)
    opt_leaves = [x for x in jax.tree_util.tree_leaves(state["opt_state"]) if np.ndim(x) > 0]
    router_shapes = sorted(x.shape for x in jax.tree_util.tree_leaves(params["router"]))
    assert sorted(x.shape for x in opt_leaves) == sorted(router_shapes * 2)
    fns = T.StepFns(cfg, "router", tx, mesh, state_sh, f_sh)
    data = D.tokenize_stage("router", D.load_stage_data("router", world["router"]), world["tok"])
    batch = T.local_batch_to_global(next(D.StageLoader(data, 8)), mesh)
    old_router = jax.tree_util.tree_map(np.asarray, params["router"])
    state, stats = fns.step(state, frozen_g, [batch])
    state, stats = fns.step(state, frozen_g, [batch])
    assert int(state["step"]) == 2
    changed = [not np.array_equal(np.asarray(a), b) for a, b in
               zip(jax.tree_util.tree_leaves(state["params"]), jax.tree_util.tree_leaves(old_router))]
    assert all(changed)
    for a, b in zip(jax.tree_util.tree_leaves(frozen_g), jax.tree_util.tree_leaves(before)):
        assert np.asarray(a).tobytes() == b.tobytes()


def _hash_dir(d):
    import hashlib
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(d)):
        for n in sorted(files):
            h.update(n.encode())
            h.update(open(os.path.join(root, n), "rb").read())
    return h.hexdigest()


def test_router_targets_option_is_checked(world):
    data = D.tokenize_stage("router", D.load_stage_data("router", world["router"]), world["tok"], max_len=1024,
                            template="vicuna", system=SYSTEM)
    assert T.router_targets_from({"router_targets": "all"}, data) == 0
    assert T.router_targets_from({"router_targets": "after_prefix"}, data) == len(data.shared_prefix()) > 0
    assert T.router_targets_from({"router_targets": "prompt"}, data) == len(data.shared_prefix())
    assert T.router_targets_prompt({"router_targets": "prompt"}) and not T.router_targets_prompt({})
    assert T.router_targets_prompt({"router_targets": "prompt_end"})
    assert T.router_targets_last({"router_targets": "prompt_end"}) == T.ROUTER_END_TOKENS
    assert T.router_targets_last({"router_targets": "prompt"}) == 0
    with pytest.raises(MoguError, match="train.router_targets must be one of all, after_prefix, prompt, prompt_end"):
        T.router_targets_from({"router_targets": "instruction"}, data)
    # prompt: the prompt after the shared prefix and the first response token; padding never
    attn = np.array([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]], bool)
    resp = np.array([[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 1, 1]], bool)
    got = np.asarray(T.router_target_mask(attn, resp, 2, prompt=True)).astype(int)
    np.testing.assert_array_equal(got, [[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(np.asarray(T.router_target_mask(attn, resp, 2)).astype(int),
                                  [[0, 0, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1, 1]])
    # prompt_end: of the prompt only its last `last` positions, and the first response token
    got = np.asarray(T.router_target_mask(attn, resp, 2, prompt=True, last=2)).astype(int)
    np.testing.assert_array_equal(got, [[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 0]])


def test_router_stage_learns_and_exports(world, tmp_path):
    base_hash = _hash_dir(world["hf"])
    glad = str(tmp_path / "glad")
    run_stage(_conf(world, "glad", glad, "train.max_steps=2", "mesh.data=1"), progress=False)
    unw = str(tmp_path / "unwilling")
    run_stage(_conf(world, "unwilling", unw, "train.max_steps=2", "mesh.data=1"), progress=False)
    inputs_hash = (_hash_dir(os.path.join(glad, "final")), _hash_dir(os.path.join(unw, "published")))
    out = str(tmp_path / "router")
    res = run_stage(_conf(world, "router", out, "train.epochs=8", "optim.lr=5e-3", "mesh.data=2", "mesh.fsdp=2",
                          "mesh.tensor=2", f"inputs.glad={glad}",
                          f"inputs.unwilling={os.path.join(unw, 'published', 'unwilling')}"), progress=False)
    last = res["last"]
    first = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert last["a_malicious"] > last["a_benign"] + 0.5 and last["b_benign"] > last["b_malicious"] + 0.5
    assert last["loss"] < first["loss"]
    # the published router file has the published keys; inputs and base were read, never written
    sd = torch.load(os.path.join(out, "published", "router.pth"), weights_only=True)
    assert "model.routers.1.beta_.linear_2.bias" in sd
    assert _hash_dir(world["hf"]) == base_hash
    assert (_hash_dir(os.path.join(glad, "final")), _hash_dir(os.path.join(unw, "published"))) == inputs_hash
    assert os.path.isfile(os.path.join(out, "DONE"))


# ------------------------------------------------------------------ exact resume after SIGKILL
def _cli(world, stage, out, *extra):
    return [sys.executable, "-m", "mogu_jax.cli", "train", stage, f"model.base={world['hf']}",
            f"data.{stage}.jsonl={world['pairs']}", f"output.dir={out}", "train.batch_size=8",
            "output.tensorboard=false", *extra]


def test_resume_after_sigkill_is_bit_identical(world, tmp_path):
    extra = ["train.max_steps=40", "train.epochs=20", "checkpoint.every=3", "mesh.data=1", "optim.lr=1e-2"]
    full = str(tmp_path / "full")
    subprocess.run(_cli(world, "glad", full, *extra), check=True, capture_output=True, cwd=REPO)
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(_cli(world, "glad", killed, *extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO)
    metrics = os.path.join(killed, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(metrics) and sum(1 for _ in open(metrics)) >= 10:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "DONE"))
    ckpts = os.path.join(killed, "checkpoints")
    saved = max(int(n) for n in os.listdir(ckpts) if n.isdigit())  # the last checkpoint the kill left
    logged = open(metrics).read().count("\n")  # complete metric lines written before the kill
    r = subprocess.run(_cli(world, "glad", killed, *extra, "--resume"), capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    # the resumed process continued from that checkpoint: its first update is saved + 1, and it ran only the rest
    # (a restart from update 0 would log update 1 again and 40 more lines)
    with open(metrics) as f:
        tail = f.read().split("\n")[logged:]
    resumed = [json.loads(line)["update"] for line in tail if line.strip().startswith("{")]
    assert saved >= 3 and resumed == list(range(saved + 1, 41)), (saved, resumed[:3])
    cfg = ModelConfig.from_dict(json.load(open(os.path.join(full, "final", "glad", "stage.json")))["model_config"])
    a, b = _final(full, "glad", cfg), _final(killed, "glad", cfg)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.tobytes() == y.tobytes()


# ------------------------------------------------------------------ two processes
def test_two_processes_equal_one(world, tmp_path):
    extra = ["train.max_steps=3", "optim.lr=1e-2"]
    one = str(tmp_path / "one")
    res = run_stage(_conf(world, "glad", one, *extra), progress=False)  # 8 devices in this process
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = str(tmp_path / "two")
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   MOGU_COORDINATOR=f"127.0.0.1:{port}", MOGU_NUM_PROCESSES="2", MOGU_PROCESS_ID=str(pid))
        log = open(tmp_path / f"proc{pid}.log", "w")  # files, not pipes: a full pipe would stall a collective
        procs.append(subprocess.Popen(_cli(world, "glad", two, *extra), env=env, cwd=REPO, stdout=log,
                                      stderr=subprocess.STDOUT))
    for p in procs:
        p.wait(timeout=300)
    logs = [open(tmp_path / f"proc{pid}.log").read()[-2000:] for pid in range(2)]
    assert all(p.returncode == 0 for p in procs), logs
    np.testing.assert_allclose(_losses(two), _losses(one), atol=1e-5)
    a, b = _final(one, "glad", res["cfg"]), _final(two, "glad", res["cfg"])
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-5)


# ------------------------------------------------------------------ bad input and faults


def _train_argv(world, stage, out, *extra):
    return ["train", stage, f"model.base={world['hf']}", f"data.{stage}.jsonl={world['pairs']}",
            f"output.dir={out}", "train.batch_size=8", "output.tensorboard=false", *extra]


def test_bad_config_and_data(world, tmp_path, capsys):
    out = str(tmp_path / "out")
    cli_fails(capsys, _train_argv(world, "glad", out, "optim.learnig_rate=1"), "optim.learnig_rate", "did you mean")
    cli_fails(capsys, _train_argv(world, "glad", out, "trian.epochs=1"), "'train.epochs'")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "w5", "affirmative": "", "refusal": "w6"}) + "\n")
    cli_fails(capsys, ["train", "glad", f"model.base={world['hf']}", f"data.glad.jsonl={bad}", f"output.dir={out}"],
           "bad.jsonl", "affirmative")
    a, r = tmp_path / "a.json", tmp_path / "r.json"
    a.write_text(json.dumps([{"instruction": "w5 w6", "output": "w7"}, {"instruction": "w8", "output": "w9"}]))
    r.write_text(json.dumps([{"instruction": "w5 w6", "output": "w10"}]))
    cli_fails(capsys, ["train", "glad", f"model.base={world['hf']}", f"data.glad.affirm={a}", f"data.glad.reject={r}",
                    f"output.dir={out}"], "r.json")
    assert not os.path.exists(out)


def test_mismatched_inputs_for_the_router_stage(world, tmp_path, capsys):
    from test_mogu import peft_adapter
    peft_adapter(make_hf_model("llama_gqa"), str(tmp_path / "r4"), seed=1, r=4)
    out = str(tmp_path / "out")
    cli_fails(capsys, ["train", "router", f"model.base={world['hf']}", f"data.router.jsonl={world['router']}",
                    f"inputs.glad={tmp_path / 'r4'}", f"inputs.unwilling={tmp_path / 'r4'}", f"output.dir={out}",
                    "train.batch_size=8"], "r=4", "r=8")
    peft_adapter(make_hf_model("smollm2_like"), str(tmp_path / "wide"), seed=1)
    cli_fails(capsys, ["train", "router", f"model.base={world['hf']}", f"data.router.jsonl={world['router']}",
                    f"inputs.glad={tmp_path / 'wide'}", f"inputs.unwilling={tmp_path / 'wide'}",
                    f"output.dir={out}", "train.batch_size=8"], "lora_A.weight", "shape")
    assert not os.path.exists(os.path.join(out, "checkpoints"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(world, tmp_path, capsys):
    out = str(tmp_path / "nan")
    bad = ["optim.lr=3e38", "checkpoint.every=1", "train.max_steps=6", "train.epochs=3", "mesh.data=1"]
    cli_fails(capsys, _train_argv(world, "glad", out, *bad), "non-finite", "last good checkpoint is update")
    steps = sorted(int(n) for n in os.listdir(os.path.join(out, "checkpoints")) if n.isdigit())
    assert steps and max(steps) < 6
    assert not os.path.exists(os.path.join(out, "DONE")) and not os.path.exists(os.path.join(out, "final"))
    # the kept checkpoint is complete and restorable: resuming reaches the same NaN, not a broken file
    cli_fails(capsys, _train_argv(world, "glad", out, *bad, "--resume"), "non-finite")


def test_resume_on_a_different_mesh(world, tmp_path):
    """A run checkpointed on a (2,2,2) mesh continues on one device and ends where a one-device run ends."""
    extra = ["train.max_steps=4", "train.epochs=2", "checkpoint.every=1", "optim.lr=1e-2"]
    ref = str(tmp_path / "ref")
    res = run_stage(_conf(world, "glad", ref, *extra, "mesh.data=1"), progress=False)
    moved = str(tmp_path / "moved")
    part = run_stage(_conf(world, "glad", moved, *extra, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
                     progress=False, stop_after=2)
    assert part["updates"] == 2 and not part["done"]
    done = run_stage(_conf(world, "glad", moved, *extra, "mesh.data=1"), resume=True, progress=False)
    assert done["done"] and done["updates"] == 4
    np.testing.assert_allclose(_losses(moved), _losses(ref), atol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(_final(moved, "glad", res["cfg"])),
                    jax.tree_util.tree_leaves(_final(ref, "glad", res["cfg"]))):
        np.testing.assert_allclose(x, y, atol=1e-5)


# ------------------------------------------------------------------ joint router + branch training (MoGU v2)
JOINT = "train.router_trains=[router,glad,unwilling]"


def test_joint_step_changes_router_and_branches_only(world):
    """With train.router_trains listing the branches, one step differentiates router + both branches: all of
    their leaves move, each has optimizer moments, and the frozen base stays bit-identical."""
    from mogu_jax.sharding import make_mesh, replicated, tree_shardings
    from mogu_jax.sharding import param_logical_axes
    from mogu_jax.trainer import place_state
    cfg = world["cfg"]
    params = jax.tree_util.tree_map(np.asarray, random_mogu(cfg, world["base"], seed=4))
    parts = T.trained_parts("router", ["glad", "router", "unwilling"])
    assert parts == ("router", "glad", "unwilling") and T.trained_parts("router", None) == ("router",)
    mesh = make_mesh((2, 2, 2))
    tx = T.make_optimizer({"lr": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-6}, 10)
    trainable, frozen = T.initial_trainable(cfg, "router", parts, {k: params[k] for k in ("base", "glad", "unwilling")},
                                            seed=0)
    assert sorted(frozen) == ["base"] and sorted(trainable) == ["glad", "router", "unwilling"]
    before = {k: jax.tree_util.tree_map(lambda x: np.array(x, copy=True), v) for k, v in trainable.items()}
    base_before = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), frozen)
    state, frozen_g, state_sh, frozen_sh = place_state(cfg, "router", frozen, trainable, mesh, tx, parts)
    opt_leaves = [x for x in jax.tree_util.tree_leaves(state["opt_state"]) if np.ndim(x) > 0]
    assert sorted(x.shape for x in opt_leaves) == sorted([x.shape for x in jax.tree_util.tree_leaves(before)] * 2)
    fns = T.StepFns(cfg, "router", tx, mesh, state_sh, frozen_sh, parts=parts)
    data = D.tokenize_stage("router", D.load_stage_data("router", world["router"]), world["tok"])
    batch = T.local_batch_to_global(next(D.StageLoader(data, 8)), mesh)
    state, _ = fns.step(state, frozen_g, [batch])
    state, _ = fns.step(state, frozen_g, [batch])
    for part in parts:
        for a, b in zip(jax.tree_util.tree_leaves(state["params"][part]), jax.tree_util.tree_leaves(before[part])):
            assert not np.array_equal(np.asarray(a), b), part
    for a, b in zip(jax.tree_util.tree_leaves(frozen_g), jax.tree_util.tree_leaves(base_before)):
        assert np.asarray(a).tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def branches(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("branches")
    dirs = {}
    for stage in ("glad", "unwilling"):
        dirs[stage] = str(root / stage)
        run_stage(_conf(world, stage, dirs[stage], "train.max_steps=2", "optim.lr=1e-2", "mesh.data=1"),
                  progress=False)
    return dirs


def _router_conf(world, branches, out, *extra):
    return _conf(world, "router", out, "mesh.data=1", "optim.lr=1e-2", f"inputs.glad={branches['glad']}",
                 f"inputs.unwilling={branches['unwilling']}", *extra)


def test_joint_router_stage_exports_branches_and_demo_assembles_them(world, branches, tmp_path):
    """The router stage trained jointly writes final/ and published/ for router and both branches (changed from
    their inputs, which stay untouched); by default it writes only the router and the branches the demo assembles
    are the responder stages', bit for bit. The demo's _assemble picks the jointly trained branches up."""
    from mogu_jax import api
    from mogu_jax.checkpoint import load_checkpoint
    from mogu_jax.pipeline import _assemble
    from peft import PeftModel
    inputs = {p: _final(branches[p], p, world["cfg"]) for p in ("glad", "unwilling")}
    inputs_hash = {p: _hash_dir(branches[p]) for p in ("glad", "unwilling")}
    base_ckpt = str(tmp_path / "base")
    api.convert_hf_to_jax(world["hf"], base_ckpt)
    runs = {}
    for name, extra in (("default", ()), ("joint", (JOINT,))):
        out = str(tmp_path / name)
        res = run_stage(_router_conf(world, branches, out, "train.max_steps=3", *extra), progress=False)
        assert res["done"]
        _assemble(base_ckpt, {"router": out, **branches}, str(tmp_path / f"mogu_{name}"), {"routed_tokens": -1})
        runs[name] = (out, res, load_checkpoint(str(tmp_path / f"mogu_{name}"))[1])
    out, res, mogu = runs["default"]
    assert sorted(os.listdir(os.path.join(out, "final"))) == ["router"]
    assert sorted(os.listdir(os.path.join(out, "published"))) == ["router.pth"]
    for p in ("glad", "unwilling"):
        for a, b in zip(jax.tree_util.tree_leaves(mogu[p]), jax.tree_util.tree_leaves(inputs[p])):
            assert np.asarray(a).tobytes() == b.tobytes()
    out, res, mogu = runs["joint"]
    assert sorted(os.listdir(os.path.join(out, "final"))) == ["glad", "router", "unwilling"]
    assert sorted(os.listdir(os.path.join(out, "published"))) == ["glad", "router.pth", "unwilling"]
    for p in ("glad", "unwilling"):
        trained = _final(out, p, res["cfg"])
        for a, b, c in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(inputs[p]),
                           jax.tree_util.tree_leaves(mogu[p])):
            assert not np.array_equal(a, b), p
            assert np.asarray(c).tobytes() == a.tobytes()
        assert _hash_dir(branches[p]) == inputs_hash[p]
    # the published branch is a PEFT adapter of the trained weights
    pm = PeftModel.from_pretrained(make_hf_model("llama_gqa"), os.path.join(out, "published", "glad"))
    lora_b = [v for k, v in pm.state_dict().items() if "lora_B" in k][0]
    np.testing.assert_allclose(lora_b.numpy(), _final(out, "glad", res["cfg"])["B"][0].T, atol=1e-6)


def test_joint_router_stage_resumes_exactly(world, branches, tmp_path):
    extra = ("train.max_steps=4", "train.epochs=2", "checkpoint.every=1", JOINT)
    full = str(tmp_path / "full")
    ref = run_stage(_router_conf(world, branches, full, *extra), progress=False)
    cut = str(tmp_path / "cut")
    part = run_stage(_router_conf(world, branches, cut, *extra), progress=False, stop_after=2)
    assert part["updates"] == 2 and not part["done"] and not os.path.exists(os.path.join(cut, "final"))
    with pytest.raises(Exception, match="resume it with the same setting"):
        run_stage(_router_conf(world, branches, cut, *extra[:-1]), resume=True, progress=False)
    done = run_stage(_router_conf(world, branches, cut, *extra), resume=True, progress=False)
    assert done["done"] and done["updates"] == 4
    assert _losses(cut) == _losses(full)
    for p in ("router", "glad", "unwilling"):
        for a, b in zip(jax.tree_util.tree_leaves(_final(cut, p, ref["cfg"])),
                        jax.tree_util.tree_leaves(_final(full, p, ref["cfg"]))):
            assert a.tobytes() == b.tobytes(), p


def test_fresh_glad_branch_starts_at_zero_and_trains_in_the_router_stage(world, branches, tmp_path, capsys):
    """inputs.glad: fresh with joint training: no glad stage; the router stage starts the glad branch as a new
    adapter whose product is zero (the routed layer then adds only the unwilling branch and the routers' scaling),
    trains it and exports it; without glad in train.router_trains it is refused before anything is loaded."""
    from mogu_jax.trainer import _load_model
    conf = _conf(world, "router", str(tmp_path / "fresh"), "mesh.data=1", "optim.lr=1e-2", "inputs.glad=fresh",
                 f"inputs.unwilling={branches['unwilling']}", "train.max_steps=2", JOINT)
    cfg, frozen, _ = _load_model(conf)
    assert not np.any(frozen["glad"]["B"]) and np.any(frozen["glad"]["A"])  # PEFT init: the product B A is zero
    res = run_stage(conf, progress=False)
    assert res["done"] and np.any(_final(res["out_dir"], "glad", res["cfg"])["B"])
    out = str(tmp_path / "refused")
    cli_fails(capsys, ["train", "router", f"model.base={world['hf']}", f"data.router.jsonl={world['router']}",
                       "inputs.glad=fresh", f"inputs.unwilling={branches['unwilling']}", f"output.dir={out}"],
              "inputs.glad: fresh", "needs train.router_trains to include glad")
    assert not os.path.exists(out)


def test_bad_router_trains(world, branches, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["train", "router", f"model.base={world['hf']}", f"data.router.jsonl={world['router']}",
            f"inputs.glad={branches['glad']}", f"inputs.unwilling={branches['unwilling']}", f"output.dir={out}"]
    cli_fails(capsys, argv + ["train.router_trains=[glad]"], "must include router")
    cli_fails(capsys, argv + ["train.router_trains=[router,base]"], "unknown part 'base'")
    cli_fails(capsys, argv + ["train.router_trains=7"], "train.router_trains")
    cli_fails(capsys, argv + ["model.router_layers=[0,5]"], "layer 5 does not exist")
    assert not os.path.exists(out)


# ------------------------------------------------------------------ every preset loads and plans
MESH_PRESET_TOPOLOGY = {"single.yaml": "v5e:1x1", "fsdp8.yaml": "v5p:2x2x2", "tpu-v4-32.yaml": "v4-32"}


def test_every_config_preset_loads_and_plans():
    """Every configs/*.yaml loads for every stage; every model preset's own architecture lowers the real train step
    for a TPU slice (with 1 layer: tracing only), and every mesh preset compiles a small model for its topology (the
    [tpu] extra; without it, loading only)."""
    import glob

    from mogu_jax import plan as PL
    from test_plan import HAS_TPU_COMPILER, SMALL

    models = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
    meshes = sorted(glob.glob(os.path.join(REPO, "configs", "mesh", "*.yaml")))
    assert {os.path.basename(m) for m in meshes} == set(MESH_PRESET_TOPOLOGY)  # a new preset needs its topology
    fsdp8 = os.path.join(REPO, "configs", "mesh", "fsdp8.yaml")
    for path in models:
        for stage in ("glad", "unwilling", "router"):
            conf = load_config(stage, [path, fsdp8])
            PL.model_config(conf)
            if HAS_TPU_COMPILER and stage == "glad":
                conf["model"]["architecture"] = dict(conf["model"]["architecture"], num_hidden_layers=1)
                with pytest.raises(MoguError, match="does not exist") if conf["model"]["router_layers"] else \
                        contextlib.nullcontext():
                    PL.model_config(conf)  # routers (and branches) in layers a 1-layer model lacks: one clear error
                conf["model"]["router_layers"] = None
                low = PL.lower_stage(conf, PL.parse_topology("v5p:2x2x2"))
                assert low.mesh.shape["fsdp"] == 8 and low.lowered is not None, path
    for path in meshes:
        topo = PL.parse_topology(MESH_PRESET_TOPOLOGY[os.path.basename(path)])
        conf = load_config("glad", path, [o for o in SMALL if not o.startswith("mesh.")])
        PL.check_mesh(conf["mesh"], topo)
        if HAS_TPU_COMPILER:
            plan = PL.plan_stage(conf, topo)
            assert plan.bytes["total"] < topo.chip.hbm, path
