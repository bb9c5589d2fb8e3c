"""The three MoGU training stages as sharded, jitted train steps (MOGU_SPEC.md section 2).

Each stage differentiates exactly one subtree of the MoGU parameters (``glad``, ``unwilling`` or
``router``): the loss is ``loss(trainable, frozen, batch)`` and ``jax.grad`` is taken with respect to
``trainable`` only, so the frozen base (and, for the router stage, both branches) get neither gradients
nor optimizer state and are never written. The step is ``jax.jit`` with explicit in/out shardings over
a ``(data, fsdp, tensor)`` mesh (``mogu_jax.sharding``), the train state is donated.

The router stage can also train the branches with the routers (MoGU v2's "backbone modules active";
``train.router_trains: [router, glad, unwilling]``; the published v1 setting, routers only, is the default):
the trainable tree is then ``{"router", "glad", "unwilling"}`` (the parts trained, the branches starting from
the glad / unwilling stages' results) and only the base stays frozen (:func:`trained_parts`).

Gradient accumulation sums the gradients of ``sum_i w_i * loss_i`` over the micro-batches and divides
by the total weight once, so an update sees exactly the mean of the per-example losses of all its
examples, whatever the micro-batch size (the published runs use micro-batch 1).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mogu_jax import losses as L
from mogu_jax import mogu as mogu_lib
from mogu_jax.config import ModelConfig, as_dtype
from mogu_jax.errors import MoguError
from mogu_jax.model import forward

Array = Any
PAIR_STAGES = ("glad", "unwilling")
MODE = {"glad": "glad", "unwilling": "unwilling", "router": "routed"}


# ------------------------------------------------------------------------------ trainable parts
def trained_parts(stage: str, router_trains=None) -> tuple:
    """The MoGU parts a stage trains: its own part; the router stage also the branches listed in
    ``train.router_trains`` (validated by :func:`mogu_jax.train_config.resolve_router_trains`)."""
    from mogu_jax.train_config import resolve_router_trains
    if stage != "router" or router_trains is None:
        return (stage,)
    return tuple(resolve_router_trains(router_trains))


def trainable_by_part(stage: str, parts: tuple, trainable) -> dict:
    """``{part: subtree}`` of a trainable tree: the stage's subtree itself when it trains only its own part
    (the published setting: checkpoints keep that layout), else the dict of the parts it trains."""
    return {stage: trainable} if tuple(parts) == (stage,) else dict(trainable)


def initial_trainable(cfg: ModelConfig, stage: str, parts: tuple, frozen: dict, seed: int) -> tuple[Any, dict]:
    """(trainable, frozen): a fresh subtree for the stage's own part; parts trained jointly (the router stage's
    branches) start from their value in ``frozen`` and move out of it."""
    fresh = init_trainable(cfg, stage, seed)
    if tuple(parts) == (stage,):
        return fresh, frozen
    trainable = {p: (fresh if p == stage else frozen[p]) for p in parts}
    return trainable, {k: v for k, v in frozen.items() if k not in parts}


def trainable_logical_axes(cfg: ModelConfig, stage: str, parts: tuple):
    """Logical axis names of the trainable tree (see :func:`trainable_by_part` for its layout)."""
    from mogu_jax.sharding import param_logical_axes
    axes = param_logical_axes(cfg, parts)
    return axes[stage] if tuple(parts) == (stage,) else {p: axes[p] for p in parts}


def check_router_layers(cfg: ModelConfig) -> None:
    bad = [i for i in cfg.router_layer_ids if not 0 <= i < cfg.num_layers]
    if bad:
        raise MoguError(f"model.router_layers: layer {bad[0]} does not exist; the model has layers "
                        f"0..{cfg.num_layers - 1}")


# ----------------------------------------------------------------------------------------- losses
def stage_loss_fn(cfg: ModelConfig, stage: str, router_lambda: float = 2.0, logits_from: int = 0,
                  shared_prefix: tuple = (), parts: Optional[tuple] = None, router_from: int = 0,
                  router_prompt: bool = False, router_last: int = 0) -> Callable:
    """``f(trainable, frozen, batch) -> (sum_i w_i * loss_i, stats)``: stats are weighted sums (divide by
    ``stats["weight"]``) so they add up over micro-batches and processes. ``logits_from``: the LM head runs
    from this position on only (:meth:`mogu_jax.data.StageData.logits_from`: no example of the stage takes a
    loss before it; the same loss, less work), or on a batch's ``loss_pos`` (each row's own response window,
    :class:`mogu_jax.data.StageLoader`'s ``loss_windows``) when it has them. ``shared_prefix``: tokens every row of every batch starts with
    (:meth:`mogu_jax.data.StageData.shared_prefix`), run once per batch instead of once per row (the same
    loss, less work). ``parts``: the parts ``trainable`` holds (:func:`trained_parts`; default the stage's own).
    ``router_from``: the router stage's targets cover positions from this one on (``train.router_targets``);
    ``router_prompt``: only the prompt's positions and the first response token's (``router_targets: prompt``);
    ``router_last``: of the prompt only its last ``router_last`` positions (``prompt_end``)."""
    mode = MODE[stage]
    parts = tuple(parts or (stage,))
    cfg = cfg.replace(frozen_layers=lowest_trained_layer(cfg, stage, parts))

    def params_of(trainable, frozen):
        return {**frozen, **trainable_by_part(stage, parts, trainable)}

    if stage in PAIR_STAGES:
        def loss(trainable, frozen, batch):
            params = params_of(trainable, frozen)
            w = batch["weight"].astype(jnp.float32)
            real = w > 0
            ces = {}
            for half in ("affirm", "refusal"):
                b = batch[half]
                logits = forward(cfg, params, b["tokens"], kv_mask=b["attn_mask"], mode=mode,
                                 logits_from=b.get("loss_pos", logits_from), shared_prefix=shared_prefix,
                                 hidden=b.get("hidden")).logits
                ces[half] = jnp.where(real, L.sequence_ce(logits, b, logits_from), 1.0)
            per = jnp.where(real, L.pair_loss(stage, ces["affirm"], ces["refusal"]), 0.0)
            stats = {"loss": jnp.sum(per * w), "ce_affirm": jnp.sum(ces["affirm"] * w),
                     "ce_refusal": jnp.sum(ces["refusal"] * w), "weight": jnp.sum(w),
                     "tokens": sum(jnp.sum(batch[h]["attn_mask"] * w[:, None]) for h in ("affirm", "refusal"))}
            return jnp.sum(per * w), stats
        return loss

    def loss(trainable, frozen, batch):
        params = params_of(trainable, frozen)
        w = batch["weight"].astype(jnp.float32)
        out = forward(cfg, params, batch["tokens"], kv_mask=batch["attn_mask"], mode=mode,
                      logits_from=batch.get("loss_pos", logits_from),
                      shared_prefix=shared_prefix, hidden=batch.get("hidden"))
        ce = L.sequence_ce(out.logits, batch, logits_from)
        targets = router_target_mask(batch["attn_mask"], batch["loss_mask"], router_from, router_prompt, router_last)
        mse_a, mse_b = L.router_mse(out.alphas, out.betas, targets, batch["label"])
        per = ce + router_lambda * (mse_a + mse_b)
        mal = (batch["label"] == 1) & (w > 0)
        ben = (batch["label"] == 0) & (w > 0)
        m = batch["attn_mask"].astype(jnp.float32)[None]

        def tok_sum(v, rows):
            mm = jnp.broadcast_to(m * rows.astype(jnp.float32)[None, :, None], v.shape)
            return jnp.sum(v * mm), jnp.sum(mm)

        stats = {"loss": jnp.sum(per * w), "ce": jnp.sum(ce * w), "mse_a": jnp.sum(mse_a * w),
                 "mse_b": jnp.sum(mse_b * w), "weight": jnp.sum(w),
                 "tokens": jnp.sum(batch["attn_mask"] * w[:, None])}
        for name, rows in (("malicious", mal), ("benign", ben)):
            sa, n = tok_sum(out.alphas, rows)
            sb, _ = tok_sum(out.betas, rows)
            stats[f"a_sum_{name}"], stats[f"b_sum_{name}"], stats[f"n_{name}"] = sa, sb, n
        return jnp.sum(per * w), stats
    return loss


ROUTER_TARGETS = ("all", "after_prefix", "prompt", "prompt_end")
#: ``router_targets: prompt_end``: the targets cover this many prompt positions before the first response token
#: (the chat template's assistant header and the instruction's last words: the positions that have read the whole
#: instruction) and that token.
ROUTER_END_TOKENS = 8


def router_target_mask(attn_mask: Array, loss_mask: Array, router_from: int = 0, prompt: bool = False,
                       last: int = 0) -> Array:
    """[B, T] bool: the positions whose router weights the router loss pulls to the row's label: the real tokens
    from ``router_from`` on; with ``prompt``, of the response (``loss_mask``) only its first token; with ``last``
    > 0, of the prompt only its last ``last`` positions."""
    targets = attn_mask
    pos = jnp.arange(targets.shape[1])[None, :]
    if router_from:
        targets = targets & (pos >= router_from)
    if prompt:
        first = loss_mask & ~jnp.pad(loss_mask[:, :-1], ((0, 0), (1, 0)))
        targets = targets & (~loss_mask | first)
    if last:
        start = jnp.argmax(loss_mask, axis=1)[:, None]  # the first response token
        targets = targets & (pos >= start - last)
    return targets


def router_targets_from(tconf: dict, examples) -> int:
    """The first position the router stage's targets cover (``train.router_targets``): 0 for ``all``, the
    length of the tokens every example starts with for ``after_prefix`` and ``prompt`` (which also leaves out
    the response after its first token: :func:`router_targets_prompt`)."""
    how = tconf.get("router_targets", "all")
    if how not in ROUTER_TARGETS:
        raise MoguError(f"train.router_targets must be one of {', '.join(ROUTER_TARGETS)}, got {how!r}")
    return len(examples.shared_prefix()) if how in ("after_prefix", "prompt") else 0


def router_targets_prompt(tconf: dict) -> bool:
    """``router_targets: prompt``: the targets cover the prompt after the shared prefix and the first response
    token only (the positions whose router weights routed decoding and the gated handoff read); ``prompt_end``:
    of the prompt only its last :data:`ROUTER_END_TOKENS` positions (:func:`router_targets_last`)."""
    return tconf.get("router_targets", "all") in ("prompt", "prompt_end")


def router_targets_last(tconf: dict) -> int:
    """How many prompt positions before the first response token the targets cover (0: all of them)."""
    return ROUTER_END_TOKENS if tconf.get("router_targets", "all") == "prompt_end" else 0


def lowest_trained_layer(cfg: ModelConfig, stage: str, parts: Optional[tuple] = None) -> int:
    """The lowest layer holding a parameter the stage's loss depends on: the lowest MoGU layer. With MoGU v2's
    routers in a subset of layers (``model.router_layers``) a layer without a router is the base layer in every
    mode (:func:`mogu_jax.model.forward`): the branches live in the router layers too, so every stage (a
    branch stage, or the router stage with its branches frozen, as published, or trained with the routers,
    ``train.router_trains``) runs the layers below the lowest one forward only (``cfg.frozen_layers``); their
    slices of the branch trees keep their initial value (B = 0: no delta). 0 with routers in every layer."""
    del stage, parts  # the same for every stage and set of trained parts (see above)
    return min(cfg.router_layer_ids)


class FrozenLayersCache:
    """The residual stream entering the lowest trained layer, per example, computed once
    (:func:`mogu_jax.model.lower_hidden`): with MoGU v2 routers in the upper layers and the branches frozen,
    the layers below run the same forward on the same tokens every epoch. Batches then carry ``hidden`` and
    the train step skips those layers (the same loss and gradients). Host memory: examples x tokens x hidden
    size x 4 bytes. ``shared_prefix``: every sequence starts with the same first ``shared_prefix`` tokens (the
    stage's :meth:`mogu_jax.data.StageData.shared_prefix`), which run once per batch."""

    def __init__(self, cfg: ModelConfig, frozen: dict, sequences: list, pad_id: int, batch_size: int = 32,
                 shared_prefix: int = 0):
        from mogu_jax.model import lower_hidden

        fn = jax.jit(lambda base, tokens, mask: lower_hidden(cfg, base, tokens, mask, shared_prefix=shared_prefix))
        base = jax.device_put(frozen["base"])
        self.rows: list[np.ndarray] = [None] * len(sequences)  # type: ignore[list-item]
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        for lo in range(0, len(order), batch_size):
            idx = order[lo:lo + batch_size]
            t = max(len(sequences[i]) for i in idx)
            t = -(-t // 16) * 16  # a few shapes, few compiles
            tokens = np.full((batch_size, t), pad_id, np.int32)
            mask = np.zeros((batch_size, t), bool)
            for r, i in enumerate(idx):
                tokens[r, :len(sequences[i])] = sequences[i]
                mask[r, :len(sequences[i])] = True
            h = np.asarray(fn(base, tokens, mask))
            for r, i in enumerate(idx):
                self.rows[i] = h[r, :len(sequences[i])]
        self.examples = len(sequences)
        self.tokens = sum(len(x) for x in sequences)
        # the tokens the layers ran: the shared ones once per batch, not once per example
        batches = math.ceil(self.examples / batch_size)
        self.tokens_run = self.tokens - (self.examples - batches) * shared_prefix

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows)

    def batch(self, rows: np.ndarray, length: int) -> np.ndarray:
        """[len(rows), length, D] fp32 for these example indices (zeros past each example's end)."""
        d = self.rows[0].shape[-1]
        out = np.zeros((len(rows), length, d), np.float32)
        for r, i in enumerate(rows):
            out[r, :len(self.rows[i])] = self.rows[i][:length]
        return out


def summarize(stats: dict, stage: str) -> dict:
    """Weighted sums -> means (loss, CE terms, ratio, router MSE, mean a/b per label)."""
    w = max(float(stats["weight"]), 1e-9)
    out = {"loss": float(stats["loss"]) / w, "examples": float(stats["weight"]), "tokens": float(stats["tokens"])}
    if stage in PAIR_STAGES:
        out["ce_affirm"] = float(stats["ce_affirm"]) / w
        out["ce_refusal"] = float(stats["ce_refusal"]) / w
        out["ratio"] = out["loss"]
    else:
        out["ce"] = float(stats["ce"]) / w
        out["mse_a"] = float(stats["mse_a"]) / w
        out["mse_b"] = float(stats["mse_b"]) / w
        for name in ("malicious", "benign"):
            n = float(stats[f"n_{name}"])
            if n > 0:
                out[f"a_{name}"] = float(stats[f"a_sum_{name}"]) / n
                out[f"b_{name}"] = float(stats[f"b_sum_{name}"]) / n
    return out


# -------------------------------------------------------------------------------------- optimizer
def make_optimizer(optim: dict, total_steps: int) -> optax.GradientTransformation:
    """AdamW (no weight decay by default), optional warmup + schedule and global-norm clipping."""
    lr = float(optim["lr"])
    warm = int(optim.get("warmup_steps") or 0)
    kind = optim.get("schedule", "constant")
    decay_steps = max(total_steps - warm, 1)
    if kind == "constant":
        sched = optax.constant_schedule(lr)
    elif kind == "linear":
        sched = optax.linear_schedule(lr, 0.0, decay_steps)
    elif kind == "cosine":
        sched = optax.cosine_decay_schedule(lr, decay_steps)
    else:
        raise MoguError(f"unknown schedule {kind!r}; constant, linear or cosine")
    if warm:
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warm), sched], [warm])
    tx = optax.adamw(sched, b1=float(optim["b1"]), b2=float(optim["b2"]), eps=float(optim["eps"]),
                     weight_decay=float(optim.get("weight_decay") or 0.0))
    if optim.get("clip_norm"):
        tx = optax.chain(optax.clip_by_global_norm(float(optim["clip_norm"])), tx)
    return tx


# ------------------------------------------------------------------------------------- train step
class StepFns:
    """The jitted pieces of one stage on one mesh: a fused grad+update step (no accumulation), and for
    accumulation a grad step, an accumulate, and an update. All with explicit shardings; state donated."""

    def __init__(self, cfg: ModelConfig, stage: str, tx: optax.GradientTransformation, mesh, state_sh, frozen_sh,
                 router_lambda: float = 2.0, logits_from: int = 0, shared_prefix: tuple = (),
                 parts: Optional[tuple] = None, router_from: int = 0, router_prompt: bool = False,
                 router_last: int = 0):
        from jax.sharding import NamedSharding, PartitionSpec as P

        from mogu_jax.sharding import activation_sharding, batch_sharding

        self.loss = stage_loss_fn(cfg, stage, router_lambda, logits_from, tuple(shared_prefix), parts, router_from,
                                  router_prompt, router_last)
        self.tx = tx
        rep = NamedSharding(mesh, P())
        grad_sh = state_sh["params"]

        def batch_sh(batch):
            return jax.tree_util.tree_map(lambda x: batch_sharding(mesh, len(np.shape(x))), batch)

        self.batch_sh = batch_sh

        def grads(trainable, frozen, batch):
            # traced with the rules table reaching activations (batch over data x fsdp, heads over tensor)
            with activation_sharding(mesh):
                (_, stats), g = jax.value_and_grad(self.loss, has_aux=True)(trainable, frozen, batch)
            return g, stats

        def update(state, g, weight):
            g = jax.tree_util.tree_map(lambda x: x / jnp.maximum(weight, 1e-9), g)
            updates, opt_state = tx.update(g, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            gnorm = optax.tree.norm(g)
            return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, gnorm

        def fused(state, frozen, batch):
            g, stats = grads(state["params"], frozen, batch)
            state, gnorm = update(state, g, stats["weight"])
            return state, dict(stats, grad_norm=gnorm)

        self._grads, self._update, self._fused = grads, update, fused
        self.state_sh, self.frozen_sh, self.grad_sh, self.rep = state_sh, frozen_sh, grad_sh, rep
        self._cache: dict = {}

    def _jit(self, name, batch):
        key = (name, jax.tree_util.tree_structure(batch))
        if key not in self._cache:
            bsh = self.batch_sh(batch)
            if name == "fused":
                fn = jax.jit(self._fused, in_shardings=(self.state_sh, self.frozen_sh, bsh),
                             out_shardings=(self.state_sh, self.rep), donate_argnums=(0,))
            else:
                fn = jax.jit(self._grads, in_shardings=(self.grad_sh, self.frozen_sh, bsh),
                             out_shardings=(self.grad_sh, self.rep))
            self._cache[key] = fn
        return self._cache[key]

    def lower(self, state, frozen, batch, accumulate: bool = False):
        """The step ``step`` runs, lowered for (abstract) arguments: the fused grad+update step, or with
        ``accumulate`` the per-micro-batch gradient step (``mogu-jax plan`` compiles these)."""
        if accumulate:
            return self._jit("grads", batch).lower(state["params"], frozen, batch)
        return self._jit("fused", batch).lower(state, frozen, batch)

    def step(self, state, frozen, micro_batches: list):
        """One optimizer update from ``micro_batches`` (global arrays). Returns (state, stats)."""
        if len(micro_batches) == 1:
            return self._jit("fused", micro_batches[0])(state, frozen, micro_batches[0])
        if "accumulate" not in self._cache:
            self._cache["accumulate"] = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b),
                                                donate_argnums=(0,))
            self._cache["update"] = jax.jit(self._update, in_shardings=(self.state_sh, self.grad_sh, self.rep),
                                            out_shardings=(self.state_sh, self.rep), donate_argnums=(0, 1))
        total_g = total_s = None
        for mb in micro_batches:
            g, s = self._jit("grads", mb)(state["params"], frozen, mb)
            if total_g is None:
                total_g, total_s = g, s
            else:
                total_g = self._cache["accumulate"](total_g, g)
                total_s = jax.tree_util.tree_map(jnp.add, total_s, s)
        state, gnorm = self._cache["update"](state, total_g, total_s["weight"])
        return state, dict(total_s, grad_norm=gnorm)


def state_shardings(cfg: ModelConfig, stage: str, frozen, trainable, mesh, tx,
                    parts: Optional[tuple] = None) -> tuple[dict, Any]:
    """(train-state shardings {params, opt_state, step}, frozen-tree shardings) by the logical axis rules, for
    concrete or abstract (``jax.ShapeDtypeStruct``) ``frozen`` / ``trainable`` trees (``parts``: what
    ``trainable`` holds, :func:`trained_parts`)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mogu_jax.sharding import param_logical_axes, tree_shardings

    frozen_parts = tuple(k for k in frozen if k != "base")
    frozen_logical = param_logical_axes(cfg, frozen_parts) if frozen_parts else {"base": param_logical_axes(cfg)}
    frozen_sh = tree_shardings(frozen_logical, frozen, mesh)
    train_sh = tree_shardings(trainable_logical_axes(cfg, stage, tuple(parts or (stage,))), trainable, mesh)
    rep = NamedSharding(mesh, P())
    opt_shape = jax.eval_shape(tx.init, trainable)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt_shape, train_sh, transform_non_params=lambda _: rep,
                                   is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return {"params": train_sh, "opt_state": opt_sh, "step": rep}, frozen_sh


# ------------------------------------------------------------------------------------ host helpers
def host_value(x) -> np.ndarray:
    """A (replicated or fully addressable) array's value on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)


@jax.jit
def _finite_leaves(tree) -> Array:
    """[n_float_leaves] bools: every value of the leaf is finite (replicated over the mesh)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]) if leaves else jnp.ones((0,), bool)


def non_finite_parts(state: dict) -> list[str]:
    """The parts of a train state (``params``, ``opt_state``) holding a NaN or inf; [] when all are finite."""
    return [k for k in ("params", "opt_state") if k in state and not host_value(_finite_leaves(state[k])).all()]


def stop_if_not_finite(state: dict, update: int, stage: str, last_good: Optional[int], ckpt_dir: str) -> None:
    """Raise (as a NaN loss does) when the trainable parameters or optimizer state hold a NaN or inf after
    ``update``: nothing of such a run may be saved or exported as final."""
    bad = non_finite_parts(state)
    if bad:
        raise MoguError(f"non-finite values in the {' and '.join(bad)} after update {update} of the {stage} "
                        f"stage (a NaN/inf learning rate or a diverging run); stopped. The last good checkpoint "
                        f"is {'update ' + str(last_good) if last_good is not None else 'none'} in {ckpt_dir}")


def to_global(tree, shardings):
    """Put host numpy arrays (the same on every process) onto ``shardings`` (works multi-process)."""
    def put(x, sh):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])
    return jax.tree_util.tree_map(put, tree, shardings)


def local_batch_to_global(batch, mesh):
    """This process's rows of a global batch -> global arrays sharded over (data, fsdp)."""
    from mogu_jax.sharding import batch_sharding

    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), np.asarray(x)), batch)


def gather_to_host(tree):
    """Full numpy copies of (possibly sharded, multi-process) arrays on every process."""
    from jax.experimental import multihost_utils
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def trainable_dtype_cast(tree, dtype):
    return jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), tree)


def init_trainable(cfg: ModelConfig, stage: str, seed: int) -> dict:
    key = jax.random.fold_in(jax.random.PRNGKey(seed), {"glad": 1, "unwilling": 2, "router": 3}[stage])
    if stage == "router":
        return mogu_lib.init_router(cfg, key)
    return mogu_lib.init_branch(cfg, key)


def total_updates(steps_per_epoch: int, epochs: float, grad_accum: int, max_steps: Optional[int]) -> int:
    n = max(int(math.floor(steps_per_epoch * float(epochs) / grad_accum)), 1)
    return min(n, int(max_steps)) if max_steps else n


def write_jsonl(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def now() -> float:
    return time.perf_counter()
