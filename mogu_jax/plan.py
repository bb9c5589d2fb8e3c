"""``mogu-jax plan``: will a MoGU stage fit, and how fast would it run, on a TPU slice -- checked on any machine.

The model is built abstractly from the config's ``model.architecture`` (the base's public ``config.json``
fields; no weights), then *the same* jitted train step that ``mogu-jax train`` runs (:class:`mogu_jax.train.
StepFns` with :func:`mogu_jax.train.state_shardings`) is lowered for ``jax.ShapeDtypeStruct`` arguments and
compiled by XLA's TPU compiler (libtpu, the ``[tpu]`` extra) for abstract devices of the named topology
(``jax.experimental.topologies``). ``compiled.memory_analysis()`` gives the per-chip bytes; a step that does not
fit fails to compile (``RESOURCE_EXHAUSTED``). FLOPs are counted analytically (``cost_analysis`` counts a scanned
layer stack once).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mogu_jax.config import ModelConfig
from mogu_jax.errors import MoguError

GiB = 1024 ** 3
STAGES = ("glad", "unwilling", "router", "generate")


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm: int  # bytes per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    dims: int  # 2 (v5e, v6e) or 3 (v4, v5p) torus dimensions
    cores_per_chip: int  # how Cloud names count (v4-8 = 4 chips: TensorCores)
    chip_config: str  # libtpu chip config ("megacore": one device per chip)


CHIPS = {
    "v4": Chip(32 * GiB, 275e12, 3, 2, "megacore"),
    "v5e": Chip(16 * GiB, 197e12, 2, 1, "default"),
    "v5p": Chip(95 * GiB, 459e12, 3, 2, "megacore"),
    "v6e": Chip(32 * GiB, 918e12, 2, 1, "default"),
}
ALIASES = {"v5litepod": "v5e", "v5": "v5p", "v6": "v6e"}
KNOWN_FORMS = ("GEN:AxB (2-D: v5e, v6e) or GEN:AxBxC (3-D: v4, v5p), e.g. v5e:4x4, v5p:2x2x2; or a Cloud name "
               "GEN-N (v4 / v5p count TensorCores, v5e / v6e chips), e.g. v4-8, v5e-16, v5p-32, v6e-16")


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given
    generation: str
    shape: tuple  # chips per torus dimension

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_name(self) -> str:
        return f"{'v5' if self.generation == 'v5p' else self.generation}:{'x'.join(map(str, self.shape))}"


def _default_shape(chips: int, dims: int) -> tuple:
    """Chips -> the slice shape Cloud uses: 2-D 1x1, 2x2, 2x4, 4x4, 4x8 ...; 3-D 2x2x1, 2x2x2, 2x2x4, 2x4x4 ..."""
    shape = [1] * dims if (dims == 2 or chips < 4) else [2, 2, 1]
    rest, rem = divmod(chips, math.prod(shape))
    if rem or rest & (rest - 1):
        raise MoguError(f"no {dims}-D slice of {chips} chips; known form: {KNOWN_FORMS}")
    while rest > 1:
        k = min(range(dims), key=lambda k: (shape[k], -k))
        shape[k] *= 2
        rest //= 2
    return tuple(shape)


def parse_topology(name: str) -> Topology:
    """``v5e:4x4``, ``v5p:2x2x2``, ``v4-8``, ``v6e-16`` ... -> :class:`Topology`; anything else: one clear error."""
    m = re.fullmatch(r"(v\d[a-z]*)(?::(\d+(?:x\d+)+)|-(\d+))", name.strip().lower())
    gen = ALIASES.get(m.group(1), m.group(1)) if m else None
    if not m or gen not in CHIPS:
        raise MoguError(f"unknown topology {name!r}; known form: {KNOWN_FORMS}")
    chip = CHIPS[gen]
    if m.group(2):
        shape = tuple(int(x) for x in m.group(2).split("x"))
        if len(shape) != chip.dims or min(shape) < 1:
            raise MoguError(f"topology {name!r}: {gen} slices have {chip.dims} dimensions; known form: {KNOWN_FORMS}")
    else:
        n = int(m.group(3))
        if n % chip.cores_per_chip or n < chip.cores_per_chip:
            raise MoguError(f"topology {name!r}: {gen} Cloud names count {chip.cores_per_chip} cores per chip")
        shape = _default_shape(n // chip.cores_per_chip, chip.dims)
    return Topology(name, gen, shape)


def topology_devices(topo: Topology) -> list:
    """Abstract (compile-only) devices of ``topo`` from libtpu; a clear error when the extra is missing."""
    try:
        from jax.experimental import topologies
        from jax._src.cloud_tpu_init import get_tpu_library_path
    except ImportError as e:  # pragma: no cover - jax always has these
        raise MoguError(f"this jax has no TPU topology support ({e})") from None
    if get_tpu_library_path() is None:
        raise MoguError("mogu-jax plan needs XLA's TPU compiler (libtpu), which is not installed: "
                        "pip install 'mogu_jax[tpu]'  (i.e. jax[tpu] of the installed jax version)")
    import os

    # no TPU runtime here: tell libtpu what it would otherwise look up (and warn about on stderr)
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{topo.generation}-{topo.chips * topo.chip.cores_per_chip}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: no chip to lock
    dims = topo.shape + (1,) * (3 - len(topo.shape))
    host = tuple(min(2, d) for d in dims[:2]) + (1,)
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.libtpu_name,
                                            chip_config_name=topo.chip.chip_config, chips_per_host_bounds=host,
                                            num_slices=1, wrap=(False, False, False))
    except Exception as e:  # noqa: BLE001 - libtpu's errors are plain runtime errors
        raise MoguError(f"libtpu cannot build topology {topo.libtpu_name} ({str(e).splitlines()[0]}); "
                        f"known form: {KNOWN_FORMS}") from None
    return list(desc.devices)


# ------------------------------------------------------------------------------------ the model
def model_config(conf: dict) -> ModelConfig:
    """The training config's model, from ``model.architecture`` (or a local HF folder's config.json), with the
    same execution settings ``mogu-jax train`` applies."""
    import os

    from mogu_jax.config import read_hf_config

    m = conf["model"]
    arch = m.get("architecture")
    if not arch:
        base = m.get("base")
        if base and os.path.isfile(os.path.join(str(base), "config.json")):
            arch = read_hf_config(base)
        else:
            raise MoguError("the config cannot describe the model: give model.architecture (the fields of the "
                            "base's config.json, as configs/*.yaml do) or model.base=<a local HF folder>")
    if not isinstance(arch, dict):
        raise MoguError("model.architecture must be a mapping of config.json fields")
    from mogu_jax.attention import IMPLEMENTATIONS

    if m["attention"] not in IMPLEMENTATIONS:
        raise MoguError(f"unknown model.attention {m['attention']!r}; one of {', '.join(IMPLEMENTATIONS)}")
    cfg = ModelConfig.from_hf(arch)
    from mogu_jax.precision import is_auto

    # the plan targets a TPU, whose MXU multiplies bf16 natively: what `dtype: auto` picks there
    dtype = "bfloat16" if is_auto(m["dtype"]) else str(m["dtype"])
    pdtype = m.get("param_dtype")
    if pdtype is not None and is_auto(pdtype):
        pdtype = "bfloat16" if dtype == "bfloat16" else None
    pdtype = pdtype or arch.get("torch_dtype") or arch.get("dtype") or "float32"
    cfg = cfg.replace(dtype=dtype, param_dtype=str(pdtype), remat=bool(m["remat"]),
                      remat_policy=str(m["remat_policy"]), lora_rank=int(m["lora_rank"]),
                      lora_alpha=float(m["lora_alpha"]), router_hidden=int(m["router_hidden"]),
                      router_layers=tuple(m["router_layers"] or ()), scan_layers=bool(m["scan_layers"]),
                      attention=str(m["attention"]))
    from mogu_jax.train import check_router_layers
    check_router_layers(cfg)  # one clear line for a layer the architecture does not have
    return cfg


def _sds(tree, dtype=None):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype), tree)


def abstract_trees(cfg: ModelConfig, stage: str, trainable_dtype) -> tuple[dict, dict]:
    """(frozen, trainable) as ``jax.ShapeDtypeStruct`` trees, exactly the trees ``run_stage`` builds."""
    import flax.linen as nn

    from mogu_jax import mogu as mogu_lib
    from mogu_jax import train as T
    from mogu_jax.model import abstract_params

    frozen = {"base": _sds(nn.meta.unbox(abstract_params(cfg)))}
    if stage == "router":
        branch = jax.eval_shape(lambda: mogu_lib.init_branch(cfg, jax.random.PRNGKey(0)))
        frozen.update(glad=_sds(branch), unwilling=_sds(branch))
    trainable = _sds(jax.eval_shape(lambda: T.init_trainable(cfg, stage, 0)), trainable_dtype)
    return frozen, trainable


def abstract_batch(stage: str, batch: int, seq: int) -> dict:
    """A global micro-batch of ``stage`` (the layout of :mod:`mogu_jax.data`)."""
    def seqs():
        return {"tokens": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
                "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.bool_),
                "attn_mask": jax.ShapeDtypeStruct((batch, seq), jnp.bool_)}
    w = jax.ShapeDtypeStruct((batch,), jnp.float32)
    if stage == "router":
        return {**seqs(), "label": jax.ShapeDtypeStruct((batch,), jnp.int32), "weight": w}
    return {"affirm": seqs(), "refusal": seqs(), "weight": w}


def sharded_bytes(tree, shardings) -> int:
    """Bytes of ``tree`` held by one device under ``shardings``."""
    total = 0
    for x, sh in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
        total += math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    return total


def tree_count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


# ------------------------------------------------------------------------------- compiling a stage
class DoesNotFit(MoguError):
    """The step needs more memory per chip than the chip has (a compile-time out-of-memory)."""

    def __init__(self, what: str, detail: str, over: Optional[float], at_least: bool = False):
        self.over = over
        by = f" by {'at least ' if at_least else ''}{over / GiB:.2f} GiB" if over else ""
        super().__init__(f"{what} does not fit{by} ({detail})")


def _oom(e: Exception, what: str) -> Optional[DoesNotFit]:
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "HbmOom" not in text:
        return None
    over = None
    unit = {"K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 * GiB}
    m = re.search(r"[Ee]xceeded hbm capacity by ([\d.]+)([KMGT])", text)
    if m:
        over = float(m.group(1)) * unit[m.group(2)]
    m = re.search(r"required for [^(]*\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)", text)
    at_least = bool(m) and over is None  # the temporaries alone: the arguments come on top
    if at_least:
        over = float(m.group(1)) * unit[m.group(2)] - float(m.group(3)) * unit[m.group(4)]
    line = next((ln.strip() for ln in text.splitlines() if "hbm" in ln.lower()), text.splitlines()[0])
    return DoesNotFit(what, line[:200], over, at_least)


def compile_lowered(lowered, what: str):
    """(compiled, seconds); a compile-time out-of-memory -> :class:`DoesNotFit`."""
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA raises its runtime error type
        oom = _oom(e, what)
        if oom is not None:
            raise oom from None
        raise
    return compiled, time.perf_counter() - t0


@dataclasses.dataclass
class StagePlan:
    stage: str
    topology: Topology
    mesh: dict
    per_chip_batch: int
    global_batch: int
    seq_len: int
    grad_accum: int
    bytes: dict  # per chip: frozen, trainable, optimizer, grad_accumulator, batch, temporaries, total
    compiled: dict  # memory_analysis fields
    compile_s: float
    counts: dict  # parameters: frozen, trainable


def _train_settings(conf: dict, per_chip_batch: int, batch_shards: int) -> tuple[int, int]:
    """(global micro-batch, grad_accum) for ``per_chip_batch`` rows per batch shard, keeping the config's
    examples per update (``train.examples_per_update``, else batch_size x grad_accum)."""
    t = conf["train"]
    per_update = int(t.get("examples_per_update") or int(t["batch_size"]) * int(t["grad_accum"]))
    global_batch = per_chip_batch * batch_shards
    return global_batch, max(1, math.ceil(per_update / global_batch))


@dataclasses.dataclass
class LoweredStage:
    lowered: Any  # the train step StepFns runs, lowered for abstract arguments
    what: str  # names the stage, slice, mesh and batch (for messages)
    mesh: Any
    global_batch: int
    grad_accum: int
    seq_len: int
    trees: dict  # abstract frozen, trainable, opt_state, batch
    shardings: dict  # their shardings


def lower_stage(conf: dict, topo: Topology, per_chip_batch: int = 1, devices: Optional[list] = None) -> LoweredStage:
    """Lower the train step of ``conf["stage"]`` (:class:`mogu_jax.train.StepFns`, the shardings of
    :func:`mogu_jax.train.state_shardings`) for ``topo`` at ``per_chip_batch`` rows per batch shard."""
    from mogu_jax import train as T
    from mogu_jax.config import as_dtype
    from mogu_jax.sharding import make_mesh

    stage = conf["stage"]
    cfg = model_config(conf)
    devices = devices if devices is not None else topology_devices(topo)
    mesh = make_mesh(conf["mesh"], devices=devices)
    global_batch, accum = _train_settings(conf, per_chip_batch, mesh.shape["data"] * mesh.shape["fsdp"])
    seq = int(conf["data"]["max_len"])
    tx = T.make_optimizer(conf["optim"], int(conf["train"].get("max_steps") or 1))
    frozen, trainable = abstract_trees(cfg, stage, as_dtype(conf["model"]["trainable_dtype"]))
    state_sh, frozen_sh = T.state_shardings(cfg, stage, frozen, trainable, mesh, tx)
    state = {"params": trainable, "opt_state": jax.eval_shape(tx.init, trainable),
             "step": jax.ShapeDtypeStruct((), jnp.int32)}
    batch = abstract_batch(stage, global_batch, seq)
    fns = T.StepFns(cfg, stage, tx, mesh, state_sh, frozen_sh, float(conf["train"]["router_lambda"]))
    what = (f"the {stage} stage on {topo.name} (mesh {dict(mesh.shape)}, {per_chip_batch} row(s) per batch shard, "
            f"length {seq})")
    lowered = fns.lower(state, frozen, batch, accumulate=accum > 1)
    trees = {"frozen": frozen, "trainable": trainable, "opt_state": state["opt_state"], "batch": batch}
    shardings = {"frozen": frozen_sh, "trainable": state_sh["params"], "opt_state": state_sh["opt_state"],
                 "batch": fns.batch_sh(batch)}
    return LoweredStage(lowered, what, mesh, global_batch, accum, seq, trees, shardings)


def plan_stage(conf: dict, topo: Topology, per_chip_batch: int = 1, devices: Optional[list] = None) -> StagePlan:
    """Compile the train step of ``conf["stage"]`` for ``topo`` at ``per_chip_batch`` rows per batch shard."""
    from mogu_jax.sharding import MESH_AXES

    low = lower_stage(conf, topo, per_chip_batch, devices)
    compiled, secs = compile_lowered(low.lowered, low.what)
    mem = compiled.memory_analysis()
    t, sh = low.trees, low.shardings
    b = {"frozen": sharded_bytes(t["frozen"], sh["frozen"]), "trainable": sharded_bytes(t["trainable"], sh["trainable"]),
         "optimizer": sharded_bytes(t["opt_state"], sh["opt_state"]),
         "grad_accumulator": sharded_bytes(t["trainable"], sh["trainable"]) if low.grad_accum > 1 else 0,
         "batch": sharded_bytes(t["batch"], sh["batch"]), "temporaries": int(mem.temp_size_in_bytes)}
    b["total"] = sum(b.values()) + int(mem.generated_code_size_in_bytes)
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    return StagePlan(conf["stage"], topo, {a: int(low.mesh.shape[a]) for a in MESH_AXES}, per_chip_batch,
                     low.global_batch, low.seq_len, low.grad_accum, b, {f: int(getattr(mem, f)) for f in fields}, secs,
                     {"frozen": tree_count(t["frozen"]), "trainable": tree_count(t["trainable"])})


def max_batch(conf: dict, topo: Topology, devices: list, limit: int = 1024) -> tuple[int, Optional[StagePlan]]:
    """The largest per-chip batch that compiles within HBM, and its plan (0, None when one row does not fit).

    A step's memory grows about linearly with its batch, so the compiles at 1 and 2 rows predict the answer;
    the prediction is compiled, then batches above the largest that fits (doubling steps) until one does not,
    then a bisection: usually 4-5 compiles where doubling from 1 and bisecting takes ~2 log2(n). Exact either
    way: every answer is a compile that fits next to one that does not (or ``limit``)."""
    def fits(n):
        try:
            p = plan_stage(conf, topo, n, devices)
        except DoesNotFit:
            return None
        return p if p.bytes["total"] <= topo.chip.hbm else None

    one = fits(1)
    if one is None:
        return 0, None
    two = fits(2) if limit >= 2 else None
    if two is None:
        return 1, one
    lo, best, hi = 2, two, None
    per_row = two.bytes["total"] - one.bytes["total"]
    guess = min(limit, 1 + int((topo.chip.hbm - one.bytes["total"]) // per_row)) if per_row > 0 else limit
    if guess > lo:
        p = fits(guess)
        if p is None:
            hi = guess
        else:
            lo, best = guess, p
    step = 1
    while hi is None and lo < limit:  # the prediction fits: find a batch that does not
        n = min(limit, lo + step)
        p = fits(n)
        if p is None:
            hi = n
        else:
            lo, best, step = n, p, step * 2
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        p = fits(mid)
        lo, hi, best = (mid, hi, p) if p is not None else (lo, mid, best)
    return lo, best


# ----------------------------------------------------------------------------------- FLOPs, schedule
def forward_flops_per_token(cfg: ModelConfig, seq: int, mode: str) -> float:
    """Matmul FLOPs of one token's forward at context ``seq`` (attention over all ``seq`` keys, as the reference
    computes it; a causal kernel skips about half of that part). ``mode``: base, glad, unwilling, routed."""
    d, hd, layers = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    attn_w = cfg.num_heads * hd
    proj = d * attn_w * 2 + d * cfg.num_kv_heads * hd * 2
    mlp = d * cfg.intermediate_size * (3 if cfg.gated_mlp else 2)
    flops = 2 * layers * (proj + mlp) + 2 * d * cfg.vocab_size + 4 * layers * seq * attn_w
    branch = cfg.lora_rank * (attn_w + d)
    router = attn_w * cfg.router_hidden + cfg.router_hidden * 2
    extra = {"base": 0, "glad": layers * branch, "unwilling": layers * branch,
             "routed": 2 * layers * branch + len(cfg.router_layer_ids) * router}[mode]
    return flops + 2 * extra


def stage_flops_per_token(cfg: ModelConfig, stage: str, seq: int, trainable_params: int) -> float:
    """Forward + backward of a stage per token: the frozen base gets activation gradients only (one more forward's
    worth), the trained part also weight gradients (2 FLOPs per parameter per token); remat adds one forward."""
    from mogu_jax.train import MODE

    fwd = forward_flops_per_token(cfg, seq, MODE[stage])
    return fwd * (3 if cfg.remat else 2) + 2 * trainable_params


def schedule(conf: dict, stage: str) -> dict:
    """Tokens of the configured schedule: updates x examples per update x sequences per example x max_len (every
    row padded to max_len: an upper bound; real data is shorter)."""
    t = conf["train"]
    updates = int(t.get("max_steps") or 0)
    per_update = int(t.get("examples_per_update") or int(t["batch_size"]) * int(t["grad_accum"]))
    seqs = 1 if stage == "router" else 2
    return {"updates": updates, "examples_per_update": per_update,
            "tokens": updates * per_update * seqs * int(conf["data"]["max_len"])}


def throughput(conf: dict, plan: StagePlan, mfu: float) -> dict:
    cfg = model_config(conf)
    fpt = stage_flops_per_token(cfg, plan.stage, plan.seq_len, plan.counts["trainable"])
    tok_s = mfu * plan.topology.chip.peak_flops * plan.topology.chips / fpt
    sch = schedule(conf, plan.stage)
    return {"flops_per_token": fpt, "tokens_per_s": tok_s, "mfu": mfu, **sch,
            "seconds": sch["tokens"] / tok_s if sch["tokens"] else None}


# ----------------------------------------------------------------------------------------- generation
@dataclasses.dataclass
class GeneratePlan:
    topology: Topology
    mesh: dict
    batch: int
    context: int
    prompt: int
    bytes: dict  # per chip: params, kv_caches, prefill_temporaries, decode_temporaries, total
    compile_s: float


def _handoff(cfg: ModelConfig):
    """MoGU's routed decoding with the published handoff (:class:`mogu_jax.generate.RoutedHandoff`: a routed and
    a base model, two KV caches), over the stacked layers and caches (``nn.scan``, as a sharded model runs)."""
    from mogu_jax.generate import RoutedHandoff, ScanBase

    h = RoutedHandoff(cfg)
    h.routed, h.base = ScanBase(cfg, "routed"), ScanBase(cfg, "base")
    h.trunk = 0  # both models whole over their stacked caches (the layers below the routers not shared)
    return h


def plan_generate(conf: dict, topo: Topology, batch: int, context: int, new_tokens: int = 256,
                  devices: Optional[list] = None) -> GeneratePlan:
    """Compile routed generation's prefill (``context - new_tokens`` prompt tokens) and one decode step for
    ``topo``, with both KV caches of ``context`` slots; the batch over data x fsdp, the caches' heads over tensor."""
    import flax.linen as nn
    from jax.sharding import PartitionSpec as P

    from mogu_jax import mogu as mogu_lib
    from mogu_jax.model import CACHE_AXES, abstract_params
    from jax.sharding import NamedSharding

    from mogu_jax.sharding import MESH_AXES, make_mesh, param_shardings, spec_for, tree_shardings

    cfg = model_config(conf)
    if not 0 < new_tokens < context:
        raise MoguError(f"generation needs a context ({context}) longer than the new tokens ({new_tokens})")
    devices = devices if devices is not None else topology_devices(topo)
    mesh = make_mesh(conf["mesh"], devices=devices)
    base = _sds(nn.meta.unbox(abstract_params(cfg)))
    parts = jax.eval_shape(lambda: mogu_lib.init_mogu(cfg, jax.random.PRNGKey(0), {}))
    params = {"base": base, **{k: _sds(v, jnp.float32) for k, v in parts.items() if k != "base"}}
    params_sh = param_shardings(cfg, params, mesh)
    layer_cache = jax.ShapeDtypeStruct((cfg.num_layers, batch, cfg.num_kv_heads, context, cfg.head_dim),
                                       cfg.compute_dtype)
    cache = {m: {"k": layer_cache, "v": layer_cache} for m in ("routed", "base")}
    cache_sh = tree_shardings(jax.tree_util.tree_map(lambda _: P(*CACHE_AXES), cache), cache, mesh)
    h = _handoff(cfg)
    prompt = context - new_tokens

    def step(params, tokens, positions, kv_mask, cache, index, step_no):
        logits, cache, _ = h(params, tokens, positions, kv_mask, cache, index, step_no, cfg.routed_tokens)
        return logits, cache

    bytes_, secs = {}, 0.0
    for name, t in (("prefill", prompt), ("decode", 1)):
        args = (params, jax.ShapeDtypeStruct((batch, t), jnp.int32), jax.ShapeDtypeStruct((batch, t), jnp.int32),
                jax.ShapeDtypeStruct((batch, context), jnp.bool_), cache, jax.ShapeDtypeStruct((), jnp.int32),
                jax.ShapeDtypeStruct((), jnp.int32))
        rows = NamedSharding(mesh, spec_for(("batch", "length"), (batch, t), mesh))  # batch 1: not split
        fn = jax.jit(step, in_shardings=(params_sh, rows, rows, rows, cache_sh, None, None),
                     out_shardings=(None, cache_sh), donate_argnums=(4,))
        what = f"routed generation ({name}) on {topo.name} at batch {batch}, context {context}"
        compiled, s = compile_lowered(fn.lower(*args), what)
        secs += s
        bytes_[f"{name}_temporaries"] = int(compiled.memory_analysis().temp_size_in_bytes)
    bytes_["params"] = sharded_bytes(params, params_sh)
    bytes_["kv_caches"] = sharded_bytes(cache, cache_sh)
    bytes_["total"] = bytes_["params"] + bytes_["kv_caches"] + max(bytes_["prefill_temporaries"],
                                                                   bytes_["decode_temporaries"])
    return GeneratePlan(topo, {a: int(mesh.shape[a]) for a in MESH_AXES}, batch, context, prompt, bytes_, secs)


def check_mesh(mesh: dict, topo: Topology) -> None:
    """The config's mesh must multiply to the slice's chips (one axis may be -1)."""
    from mogu_jax.sharding import mesh_shape

    try:
        mesh_shape(mesh, topo.chips)
    except MoguError as e:
        raise MoguError(f"{e} (topology {topo.name} has {topo.chips} chips)") from None


def tpu_compiler_available() -> bool:
    """Whether libtpu (the ``[tpu]`` extra) is installed."""
    from jax._src.cloud_tpu_init import get_tpu_library_path

    return get_tpu_library_path() is not None
