"""MoGU core: the routed projection against an independent PyTorch statement of the formula, glad mode
against peft.PeftModel, published artifacts in and out, layer-subset routers, bad artifacts."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mogu_jax import api
from mogu_jax import mogu as mogu_lib
from mogu_jax.checkpoint import read_meta
from mogu_jax.cli import main
from mogu_jax.convert import mogu_artifacts as art
from mogu_jax.convert.hf import params_from_source
from mogu_jax.convert.sources import HFDirSource
from mogu_jax.config import ModelConfig
from mogu_jax.errors import MoguError
from mogu_jax.model import forward, forward_unrolled, init_cache, unstack_layers
from tiny_models import make_hf_model, random_tokens, save_hf, cli_fails

TOL = 1e-4


def random_mogu(cfg, base, seed=0, router_std=0.3):
    """MoGU params whose branches and routers all matter (B non-zero, routers away from 0.5)."""
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    p = mogu_lib.init_mogu(cfg, k[0], base)
    for name, key in (("glad", k[1]), ("unwilling", k[2])):
        p[name]["B"] = 0.05 * jax.random.normal(key, p[name]["B"].shape)
    p["router"] = jax.tree_util.tree_map(lambda x, kk=k[3]: x + router_std * jax.random.normal(kk, x.shape),
                                         p["router"])
    p["router"] = jax.tree_util.tree_map(lambda x: x * 1.0, p["router"])
    return p


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("mogu") / "hf")
    save_hf("llama_gqa", d)
    src = HFDirSource(d)
    cfg = ModelConfig.from_hf(src.hf_config())
    base = params_from_source(src, cfg, finish=lambda _, a: jnp.asarray(a))
    return d, cfg, base


# ------------------------------------------------------------------ independent PyTorch reference
class RefProjection(torch.nn.Module):
    """(a + b) * W_o x + s * (a * dU(x) + b * dG(x)), written from MOGU_SPEC.md section 1."""

    def __init__(self, o_proj, glad, unwilling, router_u, router_g, s):
        super().__init__()
        self.o_proj, self.glad, self.unwilling = o_proj, glad, unwilling
        self.router_u, self.router_g, self.s = router_u, router_g, s

    @staticmethod
    def head(p, x):
        h = x @ p["w0"]
        h = h @ p["w1"] + p["b1"]
        return torch.sigmoid(h @ p["w2"] + p["b2"])

    def forward(self, x):
        self.a, self.b = self.head(self.router_u, x), self.head(self.router_g, x)
        d_u = (x @ self.unwilling["A"]) @ self.unwilling["B"]
        d_g = (x @ self.glad["A"]) @ self.glad["B"]
        return (self.a + self.b) * self.o_proj(x) + self.s * (self.a * d_u + self.b * d_g)


def torch_reference(hf, cfg, params, tokens, layers):
    t = lambda x: torch.tensor(np.asarray(x))  # noqa: E731
    refs = []
    for n, i in enumerate(layers):
        attn = hf.model.layers[i].self_attn
        glad = {k: t(v[i]) for k, v in params["glad"].items()}
        unw = {k: t(v[i]) for k, v in params["unwilling"].items()}
        ru = {k: t(v[n]) for k, v in params["router"]["unwilling"].items()}
        rg = {k: t(v[n]) for k, v in params["router"]["glad"].items()}
        ref = RefProjection(attn.o_proj, glad, unw, ru, rg, cfg.lora_alpha / cfg.lora_rank)
        attn.o_proj = ref
        refs.append(ref)
    try:
        with torch.no_grad():
            logits = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        a = np.stack([r.a[..., 0].numpy() for r in refs])
        b = np.stack([r.b[..., 0].numpy() for r in refs])
    finally:
        for i, r in zip(layers, refs):
            hf.model.layers[i].self_attn.o_proj = r.o_proj
    return logits, a, b


@pytest.mark.parametrize("subset", [None, (1,)])
def test_routed_forward_matches_torch_formula(tiny, subset):
    d, cfg, base = tiny
    if subset:
        cfg = cfg.replace(router_layers=subset)
    params = random_mogu(cfg, base)
    tokens = random_tokens(2, 12, seed=3)
    out = forward(cfg, params, jnp.asarray(tokens), mode="routed")
    layers = cfg.router_layer_ids
    assert out.alphas.shape == (len(layers), 2, 12) == out.betas.shape
    hf = make_hf_model("llama_gqa")
    ref_logits, ref_a, ref_b = torch_reference(hf, cfg, params, tokens, layers)
    assert np.abs(np.asarray(out.logits) - ref_logits).max() <= TOL
    assert np.abs(np.asarray(out.alphas) - ref_a).max() <= TOL
    assert np.abs(np.asarray(out.betas) - ref_b).max() <= TOL
    # the routers really vary per token (not a constant 0.5)
    assert float(jnp.std(out.alphas)) > 1e-3
    # unrolled driver (decoding) computes the same
    un = forward_unrolled(cfg, unstack_layers(params, cfg.num_layers), jnp.asarray(tokens), mode="routed")
    np.testing.assert_allclose(np.asarray(un.logits), np.asarray(out.logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(un.alphas), np.asarray(out.alphas), atol=1e-6)


def test_new_params_follow_conventions(tiny):
    _, cfg, base = tiny
    p = mogu_lib.init_mogu(cfg, 0, base)
    assert p["glad"]["A"].shape == (cfg.num_layers, 64, 8) and p["glad"]["B"].shape == (cfg.num_layers, 8, 64)
    assert float(jnp.abs(p["glad"]["B"]).max()) == 0.0 and float(jnp.abs(p["glad"]["A"]).max()) > 0
    tokens = jnp.asarray(random_tokens(1, 6))
    out = forward(cfg, p, tokens, mode="routed")
    # fresh routers: a = b ~ 0.5, so (a+b) ~ 1 and the routed model starts near the base model
    assert abs(float(out.alphas.mean()) - 0.5) < 0.05 and abs(float(out.betas.mean()) - 0.5) < 0.05
    axes = mogu_lib.mogu_logical_axes(cfg)
    assert axes["glad"]["A"] == jax.sharding.PartitionSpec("layers", "heads", "lora_rank")
    assert axes["router"]["unwilling"]["w0"] == jax.sharding.PartitionSpec("layers", "heads", "router_hidden")


# ------------------------------------------------------------------ PEFT parity and artifacts
def peft_adapter(hf_model, out_dir, seed, r=8, target=("o_proj",)):
    """A real PEFT LoRA on o_proj with random (non-zero) B, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    pm = get_peft_model(hf_model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target),
                                             lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(out_dir)
    return pm


def test_glad_mode_equals_peft_and_forced_router_equals_glad(tiny, tmp_path):
    d, cfg, base = tiny
    hf = make_hf_model("llama_gqa")
    pm = peft_adapter(hf, str(tmp_path / "glad"), seed=1)
    tokens = random_tokens(2, 10, seed=4)
    with torch.no_grad():
        ref = pm(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    cfg2, parts = api.load_mogu_parts(cfg, glad=str(tmp_path / "glad"))
    assert (cfg2.lora_rank, cfg2.lora_alpha) == (8, 16.0)
    params = {"base": base, **jax.tree_util.tree_map(jnp.asarray, parts)}
    glad = forward(cfg2, params, jnp.asarray(tokens), mode="glad")
    assert np.abs(np.asarray(glad.logits) - ref).max() <= TOL

    # routed with the router forced to a = 0, b = 1 is exactly glad mode
    full = random_mogu(cfg2, base)
    full["glad"] = params["glad"]
    forced = jax.tree_util.tree_map(jnp.zeros_like, full["router"])
    forced["unwilling"]["b2"] = jnp.full_like(forced["unwilling"]["b2"], -1e4)
    forced["glad"]["b2"] = jnp.full_like(forced["glad"]["b2"], 1e4)
    full["router"] = forced
    routed = forward(cfg2, full, jnp.asarray(tokens), mode="routed")
    assert float(routed.alphas.max()) == 0.0 and float(routed.betas.min()) == 1.0
    np.testing.assert_allclose(np.asarray(routed.logits), np.asarray(glad.logits), atol=1e-6)


def _export_router(cfg, router, path, dtype=torch.float32):
    torch.save({k: torch.tensor(v).to(dtype) for k, v in art.router_tensors(router, cfg)}, path)


def test_published_artifacts_round_trip(tiny, tmp_path):
    d, cfg, base = tiny
    peft_adapter(make_hf_model("llama_gqa"), str(tmp_path / "resp_glad" / "800_lora"), seed=1)
    peft_adapter(make_hf_model("llama_gqa"), str(tmp_path / "resp_unwill" / "960_lora"), seed=2)
    peft_adapter(make_hf_model("llama_gqa"), str(tmp_path / "resp_unwill" / "1200_lora"), seed=3)
    os.makedirs(tmp_path / "router_layer")
    router = jax.tree_util.tree_map(np.asarray, random_mogu(cfg, base)["router"])
    _export_router(cfg, router, str(tmp_path / "router_layer" / "5920_router.pth"))
    ck = str(tmp_path / "ck")
    assert main(["convert", "mogu-to-jax", ck, "--base", d, "--mogu-dir", str(tmp_path), "--release",
                 "llama2"]) == 0
    assert sorted(read_meta(ck)["parts"]) == ["glad", "router", "unwilling"]
    cfg1, params, tok = api.load(ck)
    assert tok is not None and set(params) == {"base", "glad", "unwilling", "router"}

    out = str(tmp_path / "export")
    assert main(["convert", "jax-to-mogu", ck, out]) == 0
    assert sorted(os.listdir(out)) == ["glad", "router.pth", "unwilling"]
    # adapters: the same tensors, bit for bit, as the released ones (the authors' 960 checkpoint)
    for ours, theirs in (("glad", "resp_glad/800_lora"), ("unwilling", "resp_unwill/960_lora")):
        a = load_file(os.path.join(out, ours, "adapter_model.safetensors"))
        b = load_file(str(tmp_path / theirs / "adapter_model.safetensors"))
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
        acfg = json.load(open(os.path.join(out, ours, "adapter_config.json")))
        assert acfg["r"] == 8 and acfg["lora_alpha"] == 16 and acfg["target_modules"] == ["o_proj"]
    # router: torch.load gives the published keys, shapes and dtypes
    sd = torch.load(os.path.join(out, "router.pth"), weights_only=True)
    orig = torch.load(str(tmp_path / "router_layer" / "5920_router.pth"), weights_only=True)
    assert sorted(sd) == sorted(orig)
    assert "model.routers.0.alpha_.linear_0.weight" in sd and "model.routers.1.beta_.linear_2.bias" in sd
    assert sd["model.routers.0.alpha_.linear_0.weight"].shape == (512, 64)
    assert all(torch.equal(sd[k], orig[k]) and sd[k].dtype == orig[k].dtype for k in sd)

    # exported adapters load in PeftModel and reproduce our glad / unwilling outputs
    from peft import PeftModel
    tokens = random_tokens(2, 9, seed=5)
    for mode in ("glad", "unwilling"):
        pm = PeftModel.from_pretrained(make_hf_model("llama_gqa"), os.path.join(out, mode))
        with torch.no_grad():
            ref = pm(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        ours = forward(cfg1, params, jnp.asarray(tokens), mode=mode).logits
        assert np.abs(np.asarray(ours) - ref).max() <= TOL, mode

    # import -> export -> import is bit-exact
    ck2 = str(tmp_path / "ck2")
    assert main(["convert", "mogu-to-jax", ck2, "--base", d, "--glad", os.path.join(out, "glad"),
                 "--unwilling", os.path.join(out, "unwilling"), "--router", os.path.join(out, "router.pth")]) == 0
    _, params2, _ = api.load(ck2)
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_subset_router_file(tiny, tmp_path, capsys):
    d, cfg, base = tiny
    sub = cfg.replace(router_layers=(1,))
    p = random_mogu(sub, base)
    path = str(tmp_path / "r.pth")
    _export_router(sub, jax.tree_util.tree_map(np.asarray, p["router"]), path)
    assert sorted({k.split(".")[2] for k in torch.load(path, weights_only=True)}) == ["1"]
    # without --router-layers the file is missing layer 0: a clear error
    code = main(["convert", "mogu-to-jax", str(tmp_path / "ck"), "--base", d, "--router", path])
    assert code == 2 and "missing: [0]" in capsys.readouterr().err
    assert main(["convert", "mogu-to-jax", str(tmp_path / "ck"), "--base", d, "--router", path,
                 "--router-layers", "1"]) == 0
    cfg1, params, _ = api.load(str(tmp_path / "ck"))
    assert cfg1.router_layer_ids == (1,)
    np.testing.assert_array_equal(np.asarray(params["router"]["glad"]["w0"]), np.asarray(p["router"]["glad"]["w0"]))


# ------------------------------------------------------------------ bad artifacts


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    peft_adapter(make_hf_model("llama_gqa"), str(root / "good"), seed=1)
    peft_adapter(make_hf_model("llama_gqa"), str(root / "r4"), seed=1, r=4)
    peft_adapter(make_hf_model("llama_gqa"), str(root / "qproj"), seed=1, target=("q_proj",))
    peft_adapter(make_hf_model("llama_mha"), str(root / "mha"), seed=1, target=("k_proj", "o_proj"))
    return root


def _write_adapter_variant(src, dst, edit):
    os.makedirs(dst)
    sd = load_file(os.path.join(src, "adapter_model.safetensors"))
    edit(sd)
    save_file(sd, os.path.join(dst, "adapter_model.safetensors"))
    with open(os.path.join(src, "adapter_config.json")) as f, open(os.path.join(dst, "adapter_config.json"), "w") as g:
        g.write(f.read())


def test_bad_artifacts(tiny, adapters, tmp_path, capsys):
    d, cfg, base = tiny
    out = str(tmp_path / "out")
    good = str(adapters / "good")
    # an adapter for another model: the tensor and both shapes are named
    wrong = str(tmp_path / "wrong")
    _write_adapter_variant(good, wrong, lambda sd: sd.update(
        {"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": torch.zeros(8, 96)}))
    cli_fails(capsys, ["convert", "mogu-to-jax", out, "--base", d, "--glad", wrong],
           "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight", "[8, 96]", "[8, 64]")
    # an adapter targeting other modules
    cli_fails(capsys, ["convert", "mogu-to-jax", out, "--base", d, "--glad", str(adapters / "qproj")],
           "q_proj", "o_proj")
    cli_fails(capsys, ["convert", "mogu-to-jax", out, "--base", d, "--glad", str(adapters / "mha")],
           "other modules", "k_proj")
    # rank mismatch between the two adapters
    cli_fails(capsys, ["convert", "mogu-to-jax", out, "--base", d, "--glad", good, "--unwilling",
                    str(adapters / "r4")], "rank mismatch", "r=8", "r=4")
    # missing and extra layers
    missing = str(tmp_path / "missing")
    _write_adapter_variant(good, missing, lambda sd: [sd.pop(k) for k in list(sd) if ".layers.1." in k])
    cli_fails(capsys, ["convert", "mogu-to-jax", out, "--base", d, "--glad", missing], "missing layers [1]")
    extra = str(tmp_path / "extra")
    _write_adapter_variant(good, extra, lambda sd: sd.update(
        {k.replace(".layers.1.", ".layers.5."): v.clone() for k, v in list(sd.items()) if ".layers.1." in k}))
    cli_fails(capsys, ["convert", "mogu-to-jax", out, "--base", d, "--glad", extra], "layers [5]", "2 layers")
    # a router file with unknown keys, and one whose width does not fit the base model
    router = jax.tree_util.tree_map(np.asarray, random_mogu(cfg, base)["router"])
    rpath = str(tmp_path / "router.pth")
    sd = {k: torch.tensor(v) for k, v in art.router_tensors(router, cfg)}
    sd["model.routers.0.gamma_.linear_0.weight"] = torch.zeros(512, 64)
    torch.save(sd, rpath)
    cli_fails(capsys, ["convert", "mogu-to-jax", out, "--base", d, "--router", rpath], "unknown keys", "gamma_")
    sd.pop("model.routers.0.gamma_.linear_0.weight")
    sd["model.routers.1.beta_.linear_1.bias"] = torch.zeros(96)
    torch.save(sd, rpath)
    cli_fails(capsys, ["convert", "mogu-to-jax", out, "--base", d, "--router", rpath],
           "model.routers.1.beta_.linear_1.bias", "[96]", "[64]")
    # nothing was written by any of these
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out")]


def test_routed_generation_needs_routers(tiny, tmp_path, capsys):
    d, cfg, base = tiny
    cli_fails(capsys, ["generate", d, "--prompt", "w5 w6", "--mode", "routed", "--max-new-tokens", "4"],
           "routed", "router")


def test_folded_router_is_exact(tiny):
    _, cfg, base = tiny
    p = random_mogu(cfg, base, router_std=1.0)
    tokens = jnp.asarray(random_tokens(2, 9))
    ref = forward(cfg, p, tokens, mode="routed")
    folded = dict(p, router=mogu_lib.fold_router(p["router"]))
    out = forward(cfg, folded, tokens, mode="routed")
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=TOL)
    np.testing.assert_allclose(np.asarray(out.alphas), np.asarray(ref.alphas), atol=TOL)
    assert folded["router"]["v"].shape == (cfg.num_layers, 64, 2)


@pytest.mark.parametrize("mode", ["glad", "routed"])
def test_cached_generation_in_mode_equals_full_recompute(tiny, mode):
    """--mode: every new token decoded in that mode with the KV cache = greedy over full re-forwards."""
    from mogu_jax.generate import generate
    _, cfg, base = tiny
    sub = cfg.replace(router_layers=(0,)) if mode == "routed" else cfg
    p = random_mogu(sub, base, router_std=1.0)
    prompts = [[5, 9, 33, 4], [7, 100, 12, 18, 19, 20, 3]]
    out = generate(sub, p, prompts, max_new_tokens=6, eos_ids=(), mode=mode)
    for prompt, got in zip(prompts, out.tokens):
        seq = list(prompt)
        for _ in range(6):
            logits = forward(sub, p, jnp.asarray([seq]), mode=mode).logits
            seq.append(int(jnp.argmax(logits[0, -1])))
        assert got == seq[len(prompt):]
    base_out = generate(sub, p, prompts, max_new_tokens=6, eos_ids=(), mode="base")
    assert base_out.tokens != out.tokens  # the mode really changed the decoding


@pytest.mark.parametrize("m", [0, 2, 5])
def test_routed_handoff_equals_base_from_scratch(tiny, m):
    """The first m tokens routed, then the base model: the continuation equals the base model's own
    greedy continuation of prompt + routed tokens, computed from scratch."""
    from mogu_jax.generate import compile_count, generate
    _, cfg, base = tiny
    p = random_mogu(cfg, base, router_std=1.0, seed=7)
    prompts = [[5, 9, 33, 4], [7, 100, 12, 18, 19, 20, 3], [44, 45]]
    out = generate(cfg, p, prompts, max_new_tokens=10, eos_ids=(), mode="routed", routed_tokens=m)
    allr = generate(cfg, p, prompts, max_new_tokens=10, eos_ids=(), mode="routed")
    for prompt, got, every in zip(prompts, out.tokens, allr.tokens):
        assert got[:m] == every[:m]  # the routed phase is the routed model's
        cont = generate(cfg, p, [prompt + got[:m]], max_new_tokens=10 - m, eos_ids=(), mode="base").tokens[0]
        assert got[m:] == cont
    # router telemetry: one [R] row of a and b per routed token
    assert out.router[0]["a"].shape == (m, cfg.num_layers)
    if m:
        np.testing.assert_allclose(out.router[0]["a"], allr.router[0]["a"][:m], atol=1e-6)
    # a different m reuses the compiled code (m is traced)
    before = compile_count()
    generate(cfg, p, prompts, max_new_tokens=10, eos_ids=(), mode="routed", routed_tokens=m + 1)
    assert compile_count() == before


def test_routed_all_equals_stepwise_forward_and_telemetry(tiny):
    _, cfg, base = tiny
    from mogu_jax.generate import generate
    p = random_mogu(cfg, base, router_std=1.0, seed=8)
    prompt = [5, 9, 33, 4, 8]
    out = generate(cfg, p, [prompt], max_new_tokens=5, eos_ids=(), mode="routed")
    seq = list(prompt)
    a_rows = []
    for _ in range(5):
        o = forward(cfg, p, jnp.asarray([seq]), mode="routed")
        a_rows.append(np.asarray(o.alphas[:, 0, -1]))
        seq.append(int(jnp.argmax(o.logits[0, -1])))
    assert out.tokens[0] == seq[len(prompt):]
    np.testing.assert_allclose(out.router[0]["a"], np.stack(a_rows), atol=1e-5)


def test_generate_cli_routed_options(tiny, tmp_path, capsys):
    d, cfg, base = tiny
    cli_fails(capsys, ["generate", d, "--prompt", "w5 w6", "--routed-tokens", "3", "--max-new-tokens", "4"],
           "routed decoding needs a MoGU checkpoint")
    cli_fails(capsys, ["generate", d, "--prompt", "w5 w6", "--base-only", "--mode", "glad"], "--base-only")
    # a MoGU checkpoint: routed decoding with handoff by default, telemetry in the JSONL and the trace
    p = random_mogu(cfg, base, router_std=1.0)
    from mogu_jax.checkpoint import save_checkpoint
    from mogu_jax.convert.sources import HFDirSource
    src = HFDirSource(d)
    ck = str(tmp_path / "ck")
    save_checkpoint(ck, cfg.replace(routed_tokens=2), jax.tree_util.tree_map(np.asarray, p), src.hf_config(),
                    tokenizer=src.tokenizer())
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "w5 w6 w7"}\n{"id": "b", "prompt": "w9"}\n')
    assert main(["generate", ck, "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
                 "--max-new-tokens", "6", "--router-trace", str(tmp_path / "t.npz")]) == 0
    lines = [json.loads(x) for x in open(tmp_path / "o.jsonl")]
    assert [x["id"] for x in lines] == ["a", "b"] and all("router_a_mean" in x for x in lines)
    tr = np.load(tmp_path / "t.npz")
    assert tr["a_0"].shape[1] == cfg.num_layers and tr["a_0"].shape[0] <= 2  # 2 routed tokens (config default)
    assert main(["generate", ck, "--prompt", "w5 w6", "--routed-tokens", "all", "--max-new-tokens", "3"]) == 0
    cli_fails(capsys, ["generate", ck, "--prompt", "w5", "--routed-tokens", "x"], "--routed-tokens")


@pytest.mark.parametrize("subset", [(), (1,)])
def test_unrolled_layers_equal_scan_in_values_and_gradients(tiny, subset):
    """cfg.scan_layers=False (unrolled training forward, layers without a router statically plain) gives the
    scan's logits, router weights and router gradients; so does remat, with either policy."""
    _, cfg, base = tiny
    cfg = cfg.replace(router_layers=subset)
    p = random_mogu(cfg, base, router_std=1.0)
    tokens = jnp.asarray(random_tokens(2, 9))

    def run(c):
        def loss(router):
            out = forward(c, dict(p, router=router), tokens, mode="routed")
            return jnp.mean(jnp.sin(out.logits)) + jnp.mean(out.alphas ** 2) - jnp.mean(out.betas), out
        (value, out), grad = jax.value_and_grad(loss, has_aux=True)(p["router"])
        return value, out, grad

    ref = run(cfg)
    for c in (cfg.replace(scan_layers=False), cfg.replace(scan_layers=False, remat=True),
              cfg.replace(remat=True, remat_policy="dots")):
        value, out, grad = run(c)
        np.testing.assert_allclose(float(value), float(ref[0]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref[1].logits), atol=TOL)
        np.testing.assert_allclose(np.asarray(out.alphas), np.asarray(ref[1].alphas), atol=TOL)
        assert out.alphas.shape == ref[1].alphas.shape == (len(cfg.router_layer_ids), 2, 9)
        for g, r in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref[2])):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)
        assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grad)) > 0


def test_shared_prefix_forward_equals_plain_forward(tiny):
    """forward(shared_prefix=...) (the prefix once, the rows over its broadcast cache) gives the plain forward's
    logits, router weights (prefix positions included) and gradients: scan, unrolled, remat and a MoGU v2
    router subset; routed and glad; with a padded row (kv_mask)."""
    _, cfg, base = tiny
    p = random_mogu(cfg, base, router_std=1.0)
    tokens = np.asarray(random_tokens(3, 12, seed=5))
    tokens[:, :5] = tokens[0, :5]  # every row starts with the same 5 tokens
    kv_mask = np.ones((3, 12), bool)
    kv_mask[2, 9:] = False  # row 2 is shorter (right padding)
    tokens, kv_mask = jnp.asarray(tokens), jnp.asarray(kv_mask)
    prefix = tuple(int(x) for x in tokens[0, :4])

    def run(c, mode, shared, start=6):
        def loss(trainable):
            params = dict(p, **trainable)
            out = forward(c, params, tokens, kv_mask=kv_mask, mode=mode, logits_from=start, shared_prefix=shared)
            return jnp.mean(jnp.sin(out.logits)) + jnp.mean(out.alphas ** 2 * kv_mask) - jnp.mean(out.betas), out
        trainable = {"router": p["router"]} if mode == "routed" else {"glad": p["glad"]}
        (value, out), grad = jax.value_and_grad(loss, has_aux=True)(trainable)
        return value, out, grad

    cases = [(cfg, "routed"), (cfg.replace(scan_layers=False), "routed"), (cfg.replace(remat=True), "routed"),
             (cfg.replace(router_layers=(1,)), "routed"), (cfg, "glad")]
    for c, mode in cases:
        ref = run(c, mode, ())
        value, out, grad = run(c, mode, prefix)
        assert out.logits.shape == ref[1].logits.shape == (3, 6, cfg.vocab_size)
        assert out.alphas.shape == ref[1].alphas.shape
        np.testing.assert_allclose(float(value), float(ref[0]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref[1].logits), atol=TOL)
        np.testing.assert_allclose(np.asarray(out.alphas), np.asarray(ref[1].alphas), atol=TOL)
        np.testing.assert_allclose(np.asarray(out.betas), np.asarray(ref[1].betas), atol=TOL)
        for g, r in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref[2])):
            # fp32 sums in another order (the prefix's gradient adds up the rows first); in the float64
            # accumulation mode the two agree to 1e-16 (measured)
            assert np.abs(np.asarray(g) - np.asarray(r)).max() <= 1e-3 * np.abs(np.asarray(r)).max()
        assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grad)) > 0
    # a prefix the rows do not have gives other numbers (the check above is not vacuous)
    wrong = ((prefix[0] + 1) % cfg.vocab_size,) + prefix[1:]
    right = np.asarray(run(cfg, "routed", ())[1].logits)
    assert np.abs(np.asarray(run(cfg, "routed", wrong)[1].logits) - right).max() > 1e-3
    with pytest.raises(MoguError, match="inside the shared prefix"):
        forward(cfg, p, tokens, mode="routed", logits_from=2, shared_prefix=prefix)
    with pytest.raises(MoguError, match="cache-free"):
        forward(cfg, p, tokens, cache=init_cache(cfg, 3, 16), mode="routed", logits_from=6, shared_prefix=prefix)


def test_unknown_remat_policy(tiny):
    _, cfg, base = tiny
    with pytest.raises(MoguError, match="unknown remat_policy 'some'"):
        forward(cfg.replace(remat=True, remat_policy="some"), base, jnp.asarray(random_tokens(1, 4)))
