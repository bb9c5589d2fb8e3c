"""``mogu-jax plan``: a small-width model compiled by XLA's TPU compiler for abstract TPU topologies (the
``[tpu]`` extra: skipped cleanly without libtpu), activation sharding proved by compiled numbers, the attention
kernels against the reference, and bad input."""

import contextlib
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mogu_jax import attention as A
from mogu_jax import plan as PL
from mogu_jax.config import ModelConfig
from mogu_jax.train_config import load_config
from tiny_models import cli_fails

HAS_TPU_COMPILER = PL.tpu_compiler_available()
needs_tpu = pytest.mark.skipif(not HAS_TPU_COMPILER, reason="the [tpu] extra (libtpu) is not installed")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a small Llama (GQA): compiles for TPU in seconds
ARCH = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False)
ARCH_ARG = "model.architecture={" + ", ".join(f"{k}: {v}" for k, v in ARCH.items()).replace("False", "false") + "}"
SMALL = [ARCH_ARG, "model.dtype=bfloat16", "model.param_dtype=bfloat16", "model.attention=xla", "data.max_len=128",
         "train.batch_size=1", "train.examples_per_update=4", "mesh.data=1", "mesh.fsdp=-1"]


def _conf(*extra, stage="glad"):
    return load_config(stage, None, SMALL + list(extra))


def _analytic_base_params(a: dict) -> tuple[int, int]:
    """(all base parameters, norm parameters) of a Llama from its config.json fields."""
    d, i, layers, v = a["hidden_size"], a["intermediate_size"], a["num_hidden_layers"], a["vocab_size"]
    hd = d // a["num_attention_heads"]
    attn = d * a["num_attention_heads"] * hd * 2 + d * a["num_key_value_heads"] * hd * 2
    norms = (2 * layers + 1) * d
    return v * d * 2 + layers * (attn + 3 * d * i) + norms, norms


@needs_tpu
def test_small_model_fits_and_bytes_are_the_analytic_count():
    topo = PL.parse_topology("v5e:2x2")
    plan = PL.plan_stage(_conf(), topo, per_chip_batch=1)
    total, norms = _analytic_base_params(ARCH)
    d, layers, r = ARCH["hidden_size"], ARCH["num_hidden_layers"], 8
    assert plan.counts["frozen"] == total
    assert plan.counts["trainable"] == layers * r * (d + d)  # LoRA A [attn_width, r] + B [r, hidden] per layer
    # bf16 base: every matrix sharded over the 4 fsdp chips, the norm scales replicated
    assert plan.bytes["frozen"] == (total - norms) * 2 // 4 + norms * 2
    # fp32 trainables and Adam's two moments (plus its step counter)
    # (LoRA A [L, attn_width, r]: heads over tensor (1 here), whole on every chip; B [L, r, hidden]: hidden over fsdp)
    assert plan.bytes["trainable"] == layers * d * r * 4 + layers * r * d * 4 // 4
    assert 2 * plan.bytes["trainable"] <= plan.bytes["optimizer"] <= 2 * plan.bytes["trainable"] + 16
    assert plan.grad_accum == 1 and plan.global_batch == 4
    # the compiled step's arguments are exactly these trees (TPU pads small arrays to its tiles)
    ours = sum(plan.bytes[k] for k in ("frozen", "trainable", "optimizer", "batch"))
    assert ours <= plan.compiled["argument_size_in_bytes"] <= ours * 1.1 + 64 * 1024
    assert 0 < plan.bytes["total"] < topo.chip.hbm


@needs_tpu
def test_a_batch_that_cannot_fit_is_one_clear_line(capsys):
    line = cli_fails(capsys, ["plan", "glad", "--topology", "v5e:2x2", "--batch", "4096", *SMALL[:-1],
                              "data.max_len=1024", "mesh.fsdp=-1"], "does not fit by", "GiB", "try", "remat")
    assert "Traceback" not in line


@needs_tpu
def test_activation_sharding_lowers_per_chip_temporaries(monkeypatch):
    """The rules table reaches activations: with it, the batch is spread over the 4 chips and each chip's
    temporaries fall; without it (the constraints made no-ops, as before), they are those of a larger batch."""
    from mogu_jax import sharding

    topo = PL.parse_topology("v5e:2x2")
    arch = dict(ARCH, hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4,
                vocab_size=1024)  # big enough that the activations are most of the temporaries
    conf = _conf("data.max_len=256")
    conf["model"]["architecture"] = arch
    on = PL.plan_stage(conf, topo, per_chip_batch=4)

    @contextlib.contextmanager
    def off(mesh, rules=None):
        yield

    monkeypatch.setattr(sharding, "activation_sharding", off)
    without = PL.plan_stage(conf, topo, per_chip_batch=4)
    # measured: 89 MiB with the rules table, 322 MiB without (global batch 16 x 256 tokens, libtpu 0.0.42.1)
    assert on.bytes["temporaries"] < 0.5 * without.bytes["temporaries"], (on.bytes, without.bytes)


@needs_tpu
def test_generate_plan_holds_both_kv_caches():
    topo = PL.parse_topology("v5e:2x2")
    g = PL.plan_generate(_conf(stage="router"), topo, batch=4, context=256, new_tokens=128)
    a = ARCH
    hd = a["hidden_size"] // a["num_attention_heads"]
    # two caches (routed, base), k and v, bf16, [L, B, KVH, S, Dh]; the batch spread over the 4 chips
    per_chip = 2 * 2 * 2 * a["num_hidden_layers"] * 4 * a["num_key_value_heads"] * 256 * hd // 4
    assert g.bytes["kv_caches"] == per_chip
    assert g.bytes["prefill_temporaries"] > 0 and g.bytes["total"] < topo.chip.hbm


# ------------------------------------------------------------------------------------------ attention
def _qkv(b=2, t=128, h=4, kvh=2, d=16, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32)
    k = jax.random.normal(ks[1], (b, kvh, t, d), jnp.float32)
    v = jax.random.normal(ks[2], (b, kvh, t, d), jnp.float32)
    lengths = np.array([t, t - 37])
    kv_mask = jnp.asarray(np.arange(t)[None] < lengths[:, None])
    causal = np.tril(np.ones((t, t), bool))
    mask = jnp.asarray(causal[None, None]) & kv_mask[:, None, None, :]
    return q, k, v, kv_mask, mask, lengths


def _cfg(**kw):
    return ModelConfig.from_hf(ARCH).replace(**kw)


def _valid_rows(x, lengths):
    return [np.asarray(x[i, :n]) for i, n in enumerate(lengths)]


def test_splash_kernel_equals_the_reference_on_cpu():
    """The Pallas splash kernel (interpret mode on CPU) against the einsum reference: causal, right padding, GQA."""
    q, k, v, kv_mask, mask, lengths = _qkv()
    cfg = _cfg()
    ref = A.reference_attention(cfg, q, k, v, mask)
    out = A.splash_attention(cfg, q, k, v, kv_mask, interpret=True)
    for a, b in zip(_valid_rows(out, lengths), _valid_rows(ref, lengths)):
        np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_dot_product_attention_call_equals_the_reference(padding):
    """The call the cuDNN path makes, run by XLA on CPU: same mask, scale and GQA layout as the reference. Right
    padding takes the kernel's key lengths, left padding (which lengths cannot describe) the masked call; the
    branch taken is checked through the kernel's arguments."""
    q, k, v, kv_mask, mask, lengths = _qkv(seed=1)
    if padding == "left":
        kv_mask = kv_mask[:, ::-1]
        mask = jnp.asarray(np.tril(np.ones((128, 128), bool))[None, None]) & kv_mask[:, None, None, :]
    cfg = _cfg()
    ref = A.reference_attention(cfg, q, k, v, mask)
    seen = []
    real = jax.nn.dot_product_attention

    def spy(*a, **kw):
        seen.append("lengths" if kw.get("key_value_seq_lengths") is not None else "mask")
        return real(*a, **kw)

    jax.nn.dot_product_attention = spy
    try:
        out = jax.jit(lambda q, k, v, m: A.dot_product_attention(cfg, q, k, v, m, "xla"))(q, k, v, mask)
    finally:
        jax.nn.dot_product_attention = real
    assert sorted(seen) == ["lengths", "mask"]  # both branches traced; the device picks one
    rows = range(2) if padding == "right" else [0]  # left padding: the valid rows are the last ones
    for i in rows:
        n = lengths[i]
        sl = slice(0, n) if padding == "right" else slice(None)
        np.testing.assert_allclose(np.asarray(out[i, sl]), np.asarray(ref[i, sl]), atol=2e-5)
    if padding == "left":
        n = lengths[1]
        np.testing.assert_allclose(np.asarray(out[1, -n:]), np.asarray(ref[1, -n:]), atol=2e-5)
    # the branch the device took: with the mask, left padding's valid rows differ from the key-length answer
    by_len = A.jax.nn.dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), is_causal=True,
                                            key_value_seq_lengths=jnp.asarray(lengths, jnp.int32),
                                            scale=1 / 4.0, implementation="xla").reshape(out.shape)
    same = np.allclose(np.asarray(by_len[1, :lengths[1]]), np.asarray(out[1, :lengths[1]]), atol=2e-5)
    assert same == (padding == "right")


def test_kernels_fall_back_for_alibi_and_sliding_window_and_say_so_once(capsys):
    A._SAID.clear()
    alibi = _cfg(alibi="falcon", attention="splash")
    assert A.implementation(alibi) == "xla"
    assert A.implementation(alibi) == "xla"
    err = capsys.readouterr().err
    assert err.count("ALiBi") == 1 and "reference" in err
    window = _cfg(sliding_window=64, attention="cudnn")
    assert A.implementation(window) == "xla"
    assert "sliding window" in capsys.readouterr().err
    assert A.implementation(_cfg(attention="splash")) == "splash"
    assert A.implementation(_cfg(attention="splash"), cached=True) == "xla"  # decoding with a KV cache
    assert A.implementation(_cfg(attention="auto")) == "xla"  # CPU


def test_unknown_attention_is_an_error(capsys):
    cli_fails(capsys, ["plan", "glad", "--topology", "v5e:2x2", *SMALL, "model.attention=flash"], "model.attention",
              "splash")


# ----------------------------------------------------------------------------------------- bad input
def test_unknown_topology_lists_the_known_form(capsys):
    cli_fails(capsys, ["plan", "glad", "--topology", "v9z-8", *SMALL], "unknown topology", "v5e:4x4", "v5p-32")
    cli_fails(capsys, ["plan", "glad", "--topology", "v5e:2x2x2", *SMALL], "2 dimensions")


def test_a_mesh_that_does_not_multiply_to_the_chips(capsys):
    cli_fails(capsys, ["plan", "glad", "--topology", "v5e:2x2", *SMALL, "mesh.fsdp=3"], "needs 3 devices", "4 chips")


def test_a_config_that_cannot_describe_the_model(capsys, tmp_path):
    cli_fails(capsys, ["plan", "router", "--topology", "v5e:2x2", "model.base=smollm2-nowhere", "mesh.data=-1"],
              "cannot describe the model", "model.architecture")


def test_without_the_extra_plan_says_how_to_install_it(capsys, monkeypatch):
    import jax._src.cloud_tpu_init as cti
    monkeypatch.setattr(cti, "get_tpu_library_path", lambda: None)
    cli_fails(capsys, ["plan", "glad", "--topology", "v5e:2x2", *SMALL], "pip install", "[tpu]")


def test_cloud_names_map_to_slices():
    shapes = {n: PL.parse_topology(n).shape for n in ("v4-8", "v5e-16", "v5p-32", "v6e-16", "v4-32", "v5p:2x4x4")}
    assert shapes == {"v4-8": (2, 2, 1), "v5e-16": (4, 4), "v5p-32": (2, 2, 4), "v6e-16": (4, 4), "v4-32": (2, 2, 4),
                      "v5p:2x4x4": (2, 4, 4)}


def test_every_model_preset_describes_its_model():
    """Every configs/*.yaml model preset loads for every stage and carries its architecture (planning needs no
    download); the sizes are those of the public models."""
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))):
        for stage in ("glad", "unwilling", "router"):
            cfg = PL.model_config(load_config(stage, path))
            assert cfg.num_layers in (30, 32), path


@pytest.mark.parametrize("base,per_row,hbm", [(3.0, 2.5, 16.0), (1.0, 0.9, 32.0), (10.0, 7.0, 16.0), (20.0, 1.0, 16.0),
                                              (1.0, 0.0, 16.0), (0.5, 0.9, 16.0)])
def test_max_batch_search_is_exact_in_few_compiles(monkeypatch, base, per_row, hbm):
    """``max_batch`` against a step whose memory is ``base + per_row * (batch - 1)`` GiB plus a little curvature
    (activations are not exactly linear), with the compiles replaced by that formula: the exact answer, and
    far fewer compiles than one per batch size."""
    gib = PL.GiB
    calls = []

    class Fake:
        def __init__(self, n):
            self.bytes = {"total": int((base + per_row * (n - 1) + 0.01 * n * n) * gib)}

    def fake_plan(conf, topo, n, devices):
        calls.append(n)
        total = Fake(n).bytes["total"]
        if total > hbm * gib:
            raise PL.DoesNotFit("step", "over", total - hbm * gib)
        return Fake(n)

    monkeypatch.setattr(PL, "plan_stage", fake_plan)
    topo = PL.Topology("fake", {16.0: "v5e", 32.0: "v6e"}[hbm], (2, 2))  # 16 / 32 GiB chips
    assert topo.chip.hbm == hbm * gib
    n, plan = PL.max_batch({}, topo, [], limit=64)
    want = max([k for k in range(1, 65) if Fake(k).bytes["total"] <= hbm * gib], default=0)
    assert n == want
    assert (plan is None) == (want == 0) and (plan is None or plan.bytes["total"] == Fake(want).bytes["total"])
    assert len(calls) <= 2 * max(1, want).bit_length() + 2
    if (base, per_row) == (3.0, 2.5):  # nearly linear: the prediction (6) and the batch above it, 4 compiles in all
        assert calls == [1, 2, 6, 7]
