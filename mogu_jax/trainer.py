"""Run one MoGU training stage end to end: model, data, mesh, sharded state, the loop with progress and
JSONL metrics, orbax checkpoints with exact resume, and the export of the trained part.

Output folder (``output.dir``)::

    config.yaml          the resolved configuration
    metrics.jsonl        one line per logged update (loss, CE terms, ratio / router MSE, mean a and b
                         per label, tokens/s, step time, grad norm)
    checkpoints/<step>/  orbax: the trainable subtree + optimizer state + step, and the data position
    final/<part>/        the trained subtree (orbax), with stage.json (model config incl. rank / router)
    published/           the trained part in the published format: glad/ or unwilling/ (PEFT LoRA
                         folder) or router.pth
    DONE                 written last: the stage finished
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import jax
import numpy as np
import yaml

from mogu_jax import train as T
from mogu_jax.errors import MoguError

DONE = "DONE"


# ------------------------------------------------------------------------------------ distributed
def maybe_init_distributed(dist: dict) -> None:
    """``jax.distributed.initialize`` from the config or MOGU_COORDINATOR / MOGU_NUM_PROCESSES /
    MOGU_PROCESS_ID. On CPU the collectives go through gloo."""
    coord = dist.get("coordinator") or os.environ.get("MOGU_COORDINATOR")
    n = dist.get("num_processes") or os.environ.get("MOGU_NUM_PROCESSES")
    pid = dist.get("process_id")
    if pid is None:
        pid = os.environ.get("MOGU_PROCESS_ID")
    if not coord or not n or int(n) <= 1:
        return
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {}
    if dist.get("local_devices"):
        kw["local_device_ids"] = list(range(int(dist["local_devices"])))
    jax.distributed.initialize(coordinator_address=coord, num_processes=int(n), process_id=int(pid), **kw)


# ---------------------------------------------------------------------------------------- inputs
def load_part(path: str, part: str, cfg):
    """A glad / unwilling branch from a stage output folder, one of our MoGU checkpoints, or a PEFT folder."""
    from mogu_jax.checkpoint import is_checkpoint, load_checkpoint
    from mogu_jax.convert.mogu_artifacts import read_peft_adapter

    if os.path.isdir(os.path.join(path, "final", part)):
        path = os.path.join(path, "final", part)
    if os.path.isfile(os.path.join(path, "stage.json")):
        return restore_part(path, cfg, part)
    if is_checkpoint(path):
        _, params, _ = load_checkpoint(path)
        if part not in params:
            raise MoguError(f"checkpoint {path} has no {part} part")
        return jax.tree_util.tree_map(np.asarray, params[part])
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        tree, r, alpha = read_peft_adapter(path, cfg, part)
        if (r, alpha) != (cfg.lora_rank, cfg.lora_alpha):
            raise MoguError(f"{part} adapter {path} has r={r}, lora_alpha={alpha}; the config says "
                            f"r={cfg.lora_rank}, lora_alpha={cfg.lora_alpha}")
        return tree
    raise MoguError(f"{path} is not a stage output folder, a MoGU checkpoint or a PEFT adapter folder for {part}")


def restore_part(path: str, cfg, part: str):
    import orbax.checkpoint as ocp

    from mogu_jax.checkpoint import _as_dict, _validate_tree
    from mogu_jax import mogu as mogu_lib

    init = mogu_lib.init_router if part == "router" else mogu_lib.init_branch
    expected = jax.eval_shape(lambda: init(cfg, jax.random.PRNGKey(0)))
    ck = ocp.StandardCheckpointer()
    meta = ck.metadata(os.path.join(path, "params"))
    meta = getattr(meta, "item_metadata", meta)
    _validate_tree(meta, expected, path)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev),
                                    _as_dict(meta))
    return ck.restore(os.path.join(path, "params"), target)


# ------------------------------------------------------------------------------------------- run
def run_stage(conf: dict, resume: bool = False, progress: bool = True, stop_after: Optional[int] = None) -> dict:
    """Train one stage as configured. Returns a summary (last metrics, output paths)."""
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    from mogu_jax import api, data as D
    from mogu_jax.model import split_params
    from mogu_jax.sharding import make_mesh

    stage = conf["stage"]
    out_dir = conf["output"]["dir"]
    if not out_dir:
        raise MoguError("output.dir is not set")
    if not conf["model"]["base"]:
        raise MoguError("model.base is not set (an HF folder, .gguf, smollm2 or one of our checkpoints)")
    maybe_init_distributed(conf["distributed"])
    lead = jax.process_index() == 0
    ckpt_dir = os.path.abspath(os.path.join(out_dir, "checkpoints"))
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir) and not resume:
        raise MoguError(f"{out_dir} already holds checkpoints of a run; pass --resume to continue it, "
                        "or choose another output.dir")
    if os.path.isfile(os.path.join(out_dir, DONE)) and resume:
        raise MoguError(f"{out_dir} holds a finished stage ({DONE}); nothing to resume")

    # ---- model
    m = conf["model"]
    cfg, params, tok = api.load(m["base"], dtype=m["dtype"], param_dtype=m["param_dtype"], remat=bool(m["remat"]),
                              remat_policy=str(m["remat_policy"]))
    if tok is None:
        raise MoguError(f"{m['base']} has no tokenizer; training needs one")
    base, _ = split_params(params)
    cfg = cfg.replace(lora_rank=int(m["lora_rank"]), lora_alpha=float(m["lora_alpha"]),
                      router_hidden=int(m["router_hidden"]), router_layers=tuple(m["router_layers"] or ()),
                      scan_layers=bool(m["scan_layers"]), attention=str(m["attention"]))
    frozen = {"base": base}
    if stage == "router":
        for part in ("glad", "unwilling"):
            src = conf["inputs"][part]
            if not src:
                raise MoguError(f"the router stage needs inputs.{part} (the {part} stage's output folder, a "
                                "MoGU checkpoint or a PEFT adapter folder)")
            frozen[part] = load_part(src, part, cfg)

    # ---- data
    dconf = conf["data"]
    rows = D.load_stage_data(stage, *stage_paths(stage, dconf[stage]))
    examples = D.tokenize_stage(stage, rows, tok, template=m["template"], system=m["system"],
                                max_len=int(dconf["max_len"]))
    tconf = conf["train"]
    loader = D.StageLoader(examples, int(tconf["batch_size"]), seed=int(tconf["seed"]),
                           shuffle=bool(dconf["shuffle"]), buckets=tuple(dconf["buckets"]),
                           group_batches=int(dconf["group_batches"]), balance_labels=bool(dconf["balance_labels"]),
                           process_index=jax.process_index(), process_count=jax.process_count())
    if lead and progress:
        print(f"[{stage}] data: {D.format_summary(loader.summary())}")
    accum = int(tconf["grad_accum"])
    total = T.total_updates(loader.steps_per_epoch, tconf["epochs"], accum, tconf["max_steps"])

    # ---- mesh, shardings, state
    mesh = make_mesh(conf["mesh"])
    tx = T.make_optimizer(conf["optim"], total)
    tdtype = np.dtype(str(np.dtype(_np_dtype(m["trainable_dtype"]))))
    trainable = T.trainable_dtype_cast(T.init_trainable(cfg, stage, int(tconf["seed"])), tdtype)
    state, frozen, state_sh, frozen_sh = place_state(cfg, stage, frozen, trainable, mesh, tx)
    prefix = examples.shared_prefix() if tconf["share_prefix"] else ()
    fns = T.StepFns(cfg, stage, tx, mesh, state_sh, frozen_sh, float(tconf["router_lambda"]),
                    logits_from=examples.logits_from(), shared_prefix=prefix)
    if lead and progress and prefix:
        print(f"[{stage}] the {len(prefix)} tokens every example starts with run once per batch (train.share_prefix)")

    # ---- output folder, checkpoints, resume
    if lead:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(conf, f, sort_keys=False)
    mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=int(conf["checkpoint"]["keep"]), create=True))
    start = 0
    if resume and mngr.latest_step() is not None:
        step = mngr.latest_step()
        abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                          state, state_sh)
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                              data=ocp.args.JsonRestore()))
        state = restored["state"]
        loader.skip_to(restored["data"]["loader"])
        start = int(restored["data"]["update"])
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    writer = _tensorboard(out_dir) if (lead and conf["output"].get("tensorboard")) else None

    def save(update: int):
        mngr.save(update, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"update": update, "loader": loader.state(), "stage": stage})))

    bar = tqdm(total=total, initial=start, desc=f"train {stage}", unit="update", disable=not (progress and lead))
    last = {}
    every = int(conf["checkpoint"]["every"])
    log_every = max(int(tconf["log_every"]), 1)
    try:
        for update in range(start, total):
            t0 = T.now()
            mbs = [T.local_batch_to_global(next(loader), mesh) for _ in range(accum)]
            state, stats = fns.step(state, frozen, mbs)
            stats = {k: float(T.host_value(v)) for k, v in stats.items()}
            if not all(np.isfinite(v) for v in (stats["loss"], stats["grad_norm"])):
                good = mngr.latest_step()
                raise MoguError(f"non-finite loss or gradient at update {update + 1} of the {stage} stage "
                                f"(loss={stats['loss']}, grad_norm={stats['grad_norm']}); stopped. The last good "
                                f"checkpoint is {'update ' + str(good) if good is not None else 'none'} in {ckpt_dir}")
            dt = T.now() - t0
            last = T.summarize(stats, stage)
            last.update(update=update + 1, grad_norm=stats["grad_norm"], step_time=dt, tokens_per_s=last["tokens"] / dt,
                        epoch=loader.global_step / max(loader.steps_per_epoch, 1))
            if lead and ((update + 1) % log_every == 0 or update + 1 == total):
                T.write_jsonl(metrics_path, last)
                if writer is not None:
                    for k, v in last.items():
                        writer.add_scalar(f"{stage}/{k}", v, update + 1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
            bar.update(1)
            if (update + 1) % every == 0 or update + 1 == total:
                save(update + 1)
            if stop_after is not None and update + 1 >= stop_after:
                break
        mngr.wait_until_finished()
    finally:
        bar.close()
        mngr.wait_until_finished()
        if writer is not None:
            writer.close()
    done = int(T.host_value(state["step"])) >= total
    paths = {}
    if done:
        paths = export_stage(out_dir, cfg, stage, state["params"], base_name=m["base"])
    return {"stage": stage, "updates": int(T.host_value(state["step"])), "total_updates": total, "last": last,
            "done": done, "out_dir": out_dir, **paths, "cfg": cfg}


def place_state(cfg, stage: str, frozen: dict, trainable: dict, mesh, tx):
    """Shard the frozen tree and a fresh train state {params, opt_state, step} onto ``mesh`` by the logical
    axis rules. Returns (state, frozen, state_shardings, frozen_shardings)."""
    state_sh, frozen_sh = T.state_shardings(cfg, stage, frozen, trainable, mesh, tx)
    train_sh, opt_sh, rep = state_sh["params"], state_sh["opt_state"], state_sh["step"]
    params_g = T.to_global(trainable, train_sh)
    state = {"params": params_g, "opt_state": jax.jit(tx.init, out_shardings=opt_sh)(params_g),
             "step": jax.device_put(np.asarray(0, np.int32), rep)}
    return state, T.to_global(frozen, frozen_sh), state_sh, frozen_sh


def optax_shardings(tx, opt_shape, param_sh, rep):
    import optax
    return optax.tree_map_params(tx, lambda _, sh: sh, opt_shape, param_sh, transform_non_params=lambda _: rep,
                                 is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def export_stage(out_dir: str, cfg, stage: str, trained, base_name: str = "") -> dict:
    """final/<part>/ (orbax, every process takes part; stage.json written last marks it complete) and
    published/ (PEFT folder or router.pth, written atomically by process 0), then DONE."""
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils

    from mogu_jax.convert import mogu_artifacts as art
    from mogu_jax.io_utils import atomic_dir

    lead = jax.process_index() == 0
    final = os.path.abspath(os.path.join(out_dir, "final", stage))
    pub = os.path.join(out_dir, "published")
    host = T.gather_to_host(trained)  # a collective: every process calls it
    if lead and os.path.exists(final):
        shutil.rmtree(final)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("mogu-export-clean")
    ck = ocp.StandardCheckpointer()
    ck.save(os.path.join(final, "params"), trained)
    ck.wait_until_finished()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("mogu-export-saved")
    if lead:
        with open(os.path.join(final, "stage.json"), "w") as f:
            json.dump({"stage": stage, "model_config": cfg.to_dict()}, f, indent=2)
        with atomic_dir(pub, overwrite=True) as tmp:
            if stage == "router":
                try:
                    art.write_router(os.path.join(tmp, "router.pth"), host, cfg)
                except MoguError:  # no torch: the same keys in safetensors
                    art.write_router(os.path.join(tmp, "router.safetensors"), host, cfg)
            else:
                art.write_peft_adapter(os.path.join(tmp, stage), host, cfg, base_name)
        with open(os.path.join(out_dir, DONE), "w") as f:
            f.write(stage + "\n")
    return {"final": final, "published": pub}


def stage_paths(stage: str, d: dict) -> tuple:
    """The data files of a stage from its config section (our JSONL, or the published pair of files)."""
    if d.get("jsonl"):
        return (d["jsonl"],)
    keys = ("normal", "label") if stage == "router" else ("affirm", "reject")
    if all(d.get(k) for k in keys):
        return tuple(d[k] for k in keys)
    raise MoguError(f"no data for the {stage} stage: set data.{stage}.jsonl, or data.{stage}.{keys[0]} and "
                    f"data.{stage}.{keys[1]}")


def _np_dtype(name):
    from mogu_jax.config import as_dtype
    return as_dtype(name)


def _tensorboard(out_dir: str):
    try:
        from tensorboardX import SummaryWriter  # type: ignore
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter  # type: ignore
        except Exception:  # noqa: BLE001 - tensorboard is optional
            return None
    try:
        return SummaryWriter(os.path.join(out_dir, "tensorboard"))
    except Exception:  # noqa: BLE001
        return None
