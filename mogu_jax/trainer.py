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
def load_part(path: str, part: str, cfg, seed: int = 0):
    """A glad / unwilling branch from a stage output folder, one of our MoGU checkpoints, or a PEFT folder; or,
    for ``inputs.<part>: fresh``, a new adapter (PEFT init, B = 0: it adds nothing until trained; ``seed`` draws A)."""
    from mogu_jax.checkpoint import is_checkpoint, load_checkpoint
    from mogu_jax.convert.mogu_artifacts import read_peft_adapter
    from mogu_jax.mogu import BRANCHES, init_branch
    from mogu_jax.train_config import FRESH

    if path == FRESH:
        rng = jax.random.PRNGKey(seed + 1 + BRANCHES.index(part))
        return jax.tree_util.tree_map(np.asarray, init_branch(cfg, rng))
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

    path = os.path.abspath(path)  # orbax reads no metadata through a relative path (configs name relative runs/)
    init = mogu_lib.init_router if part == "router" else mogu_lib.init_branch
    expected = jax.eval_shape(lambda: init(cfg, jax.random.PRNGKey(0)))
    path = os.path.abspath(path)  # orbax wants absolute paths
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
    stage, out_dir = conf["stage"], conf["output"]["dir"]
    ckpt_dir = _check_run_folder(conf, resume)
    maybe_init_distributed(conf["distributed"])
    lead = jax.process_index() == 0
    parts = T.trained_parts(stage, conf["train"].get("router_trains"))
    if resume:
        check_resumed_parts(out_dir, stage, parts)
    cfg, frozen, tok = _load_model(conf)
    examples, loader = _load_data(conf, tok, say=lead and progress)
    tconf = conf["train"]
    accum = int(tconf["grad_accum"])
    total = T.total_updates(loader.steps_per_epoch, tconf["epochs"], accum, tconf["max_steps"])
    run = _Run(conf, cfg, examples, loader, frozen, total, ckpt_dir, parts, say=lead and progress)
    if lead:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(conf, f, sort_keys=False)
    start = run.restore() if resume else 0
    last = run.train(start, accum, progress=progress and lead, stop_after=stop_after)
    done = int(T.host_value(run.state["step"])) >= total
    paths = export_stage(out_dir, cfg, stage, run.state["params"], base_name=conf["model"]["base"],
                         parts=parts) if done else {}
    return {"stage": stage, "updates": int(T.host_value(run.state["step"])), "total_updates": total, "last": last,
            "done": done, "out_dir": out_dir, **paths, "cfg": cfg, "flops": run.flops}


def _check_run_folder(conf: dict, resume: bool) -> str:
    """The run's checkpoint folder, after the checks that need nothing loaded."""
    out_dir = conf["output"]["dir"]
    if not out_dir:
        raise MoguError("output.dir is not set")
    if not conf["model"]["base"]:
        raise MoguError("model.base is not set (an HF folder, .gguf, smollm2 or one of our checkpoints)")
    ckpt_dir = os.path.abspath(os.path.join(out_dir, "checkpoints"))
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir) and not resume:
        raise MoguError(f"{out_dir} already holds checkpoints of a run; pass --resume to continue it, "
                        "or choose another output.dir")
    if os.path.isfile(os.path.join(out_dir, DONE)) and resume:
        raise MoguError(f"{out_dir} holds a finished stage ({DONE}); nothing to resume")
    return ckpt_dir


def _load_model(conf: dict):
    """(cfg with the stage's MoGU shape, the frozen trees {base[, glad, unwilling]}, tokenizer)."""
    from mogu_jax import api
    from mogu_jax.model import split_params

    m, stage = conf["model"], conf["stage"]
    cfg, params, tok = api.load(m["base"], dtype=m["dtype"], param_dtype=m["param_dtype"], remat=bool(m["remat"]),
                              remat_policy=str(m["remat_policy"]))
    if tok is None:
        raise MoguError(f"{m['base']} has no tokenizer; training needs one")
    base, _ = split_params(params)
    cfg = cfg.replace(lora_rank=int(m["lora_rank"]), lora_alpha=float(m["lora_alpha"]),
                      router_hidden=int(m["router_hidden"]), router_layers=tuple(m["router_layers"] or ()),
                      scan_layers=bool(m["scan_layers"]), attention=str(m["attention"]))
    T.check_router_layers(cfg)
    frozen = {"base": base}
    if stage == "router":
        from mogu_jax.mogu import BRANCHES
        for part in BRANCHES:
            src = conf["inputs"][part]
            if not src:
                raise MoguError(f"the router stage needs inputs.{part} (the {part} stage's output folder, a "
                                "MoGU checkpoint, a PEFT adapter folder, or 'fresh' with train.router_trains)")
            frozen[part] = load_part(src, part, cfg, seed=int(conf["train"]["seed"]))
    return cfg, frozen, tok


def _load_data(conf: dict, tok, say: bool):
    """The stage's tokenised examples and this process's loader."""
    from mogu_jax import data as D

    stage, dconf, tconf, m = conf["stage"], conf["data"], conf["train"], conf["model"]
    rows = D.load_stage_data(stage, *stage_paths(stage, dconf[stage]))
    examples = D.tokenize_stage(stage, rows, tok, template=m["template"], system=m["system"],
                                max_len=int(dconf["max_len"]), refusal_eos=dconf["refusal_eos"])
    loader = D.StageLoader(examples, int(tconf["batch_size"]), seed=int(tconf["seed"]),
                           shuffle=bool(dconf["shuffle"]), buckets=tuple(dconf["buckets"]),
                           group_batches=int(dconf["group_batches"]), balance_labels=bool(dconf["balance_labels"]),
                           label_weights=dconf["label_weights"], loss_windows=bool(dconf["loss_windows"]),
                           process_index=jax.process_index(), process_count=jax.process_count())
    if say:
        print(f"[{stage}] data: {D.format_summary(loader.summary())}")
    return examples, loader


class _Run:
    """A stage's sharded train state, step functions, checkpoints and loop."""

    def __init__(self, conf: dict, cfg, examples, loader, frozen: dict, total: int, ckpt_dir: str, parts: tuple,
                 say: bool):
        import orbax.checkpoint as ocp

        from mogu_jax.sharding import make_mesh

        self.conf, self.cfg, self.loader, self.total, self.ckpt_dir = conf, cfg, loader, total, ckpt_dir
        self.stage = stage = conf["stage"]
        self.parts = parts
        tconf, m = conf["train"], conf["model"]
        self.mesh = make_mesh(conf["mesh"])
        tx = T.make_optimizer(conf["optim"], total)
        tdtype = np.dtype(str(np.dtype(_np_dtype(m["trainable_dtype"]))))
        trainable, frozen = T.initial_trainable(cfg, stage, parts, frozen, int(tconf["seed"]))
        trainable = T.trainable_dtype_cast(trainable, tdtype)
        self.state, self.frozen, self.state_sh, frozen_sh = place_state(cfg, stage, frozen, trainable, self.mesh, tx,
                                                                        parts)
        self.prefix = examples.shared_prefix() if tconf["share_prefix"] else ()
        self.logits_from = examples.logits_from()
        router_from = T.router_targets_from(tconf, examples) if stage == "router" else 0
        self.fns = T.StepFns(cfg, stage, tx, self.mesh, self.state_sh, frozen_sh, float(tconf["router_lambda"]),
                             logits_from=self.logits_from, shared_prefix=self.prefix, parts=parts,
                             router_from=router_from,
                             router_prompt=stage == "router" and T.router_targets_prompt(tconf),
                             router_last=T.router_targets_last(tconf) if stage == "router" else 0)
        if say and self.prefix:
            print(f"[{stage}] the {len(self.prefix)} tokens every example starts with run once per batch "
                  "(train.share_prefix)")
        self.mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=int(conf["checkpoint"]["keep"]), create=True))
        self.flops = 0  # analytic FLOPs of the updates run (mogu_jax.flops)
        self.hidden = self._cache_frozen_layers(examples, frozen, say)

    def _cache_frozen_layers(self, examples, frozen: dict, say: bool):
        """With nothing trained below layer k (MoGU v2: routers, and so branches, from layer k up): their output
        per sequence, once (``train.cache_frozen_layers``; one process; the lower layers then never run again).
        Pair stages cache both halves of every example."""
        from mogu_jax import flops as F

        k = T.lowest_trained_layer(self.cfg, self.stage, self.parts)
        if not (k and self.conf["train"]["cache_frozen_layers"]
                and jax.process_count() == 1):
            return None
        cfg = self.cfg.replace(frozen_layers=k)
        caches = {}
        p = len(self.prefix)  # the shared tokens run once per batch of the cache
        for name, seqs in examples.sequences().items():
            tokens = [ex.tokens for ex in seqs]
            caches[name] = T.FrozenLayersCache(cfg, frozen, tokens, examples.pad_id, shared_prefix=p)
            self.flops += caches[name].tokens_run * F.layer_flops(cfg, "base", max(len(s) for s in tokens), k)
        self.loader.extra_inputs = lambda name, rows, length: {"hidden": caches[name].batch(rows, length)}
        if say:
            mib = sum(c.nbytes for c in caches.values()) / 2**20
            print(f"[{self.stage}] layers 0-{k - 1} hold nothing trained: their output is computed once per "
                  f"sequence ({mib:.0f} MiB) and every update runs layers {k}-{self.cfg.num_layers - 1} only "
                  "(train.cache_frozen_layers)")
        return caches

    def restore(self) -> int:
        """Continue from the last checkpoint (state and data position); the update to start at."""
        import orbax.checkpoint as ocp

        step = self.mngr.latest_step()
        if step is None:
            return 0
        abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                          self.state, self.state_sh)
        restored = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                   data=ocp.args.JsonRestore()))
        self.state = restored["state"]
        self.loader.skip_to(restored["data"]["loader"])
        return int(restored["data"]["update"])

    def save(self, update: int) -> None:
        import orbax.checkpoint as ocp

        self.mngr.save(update, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.state),
            data=ocp.args.JsonSave({"update": update, "loader": self.loader.state(), "stage": self.stage})))

    def step(self, update: int, accum: int) -> dict:
        """One optimizer update: its metrics, after the non-finite check."""
        t0 = T.now()
        mbs = [T.local_batch_to_global(next(self.loader), self.mesh) for _ in range(accum)]
        self.state, stats = self.fns.step(self.state, self.frozen, mbs)
        stats = {k: float(T.host_value(v)) for k, v in stats.items()}
        if not all(np.isfinite(v) for v in (stats["loss"], stats["grad_norm"])):
            good = self.mngr.latest_step()
            raise MoguError(f"non-finite loss or gradient at update {update + 1} of the {self.stage} stage "
                            f"(loss={stats['loss']}, grad_norm={stats['grad_norm']}); stopped. The last good "
                            f"checkpoint is {'update ' + str(good) if good is not None else 'none'} in "
                            f"{self.ckpt_dir}")
        T.stop_if_not_finite(self.state, update + 1, self.stage, self.mngr.latest_step(), self.ckpt_dir)
        dt = T.now() - t0
        self.flops += sum(self.step_flops(mb) for mb in mbs)
        last = T.summarize(stats, self.stage)
        last.update(update=update + 1, grad_norm=stats["grad_norm"], step_time=dt, tokens_per_s=last["tokens"] / dt,
                    epoch=self.loader.global_step / max(self.loader.steps_per_epoch, 1))
        return last

    def step_flops(self, mb: dict) -> int:
        from mogu_jax import flops as F

        cfg = self.cfg.replace(frozen_layers=T.lowest_trained_layer(self.cfg, self.stage, self.parts))
        halves = [mb["affirm"], mb["refusal"]] if "affirm" in mb else [mb]
        per_half = 2 if "affirm" in mb else 1  # train_step_flops counts both halves of a pair stage
        return sum(F.train_step_flops(cfg, self.stage, h["tokens"].shape[0], h["tokens"].shape[1], len(self.prefix),
                                      self.logits_from, lower_cached=self.hidden is not None,
                                      head_positions=h["loss_pos"].shape[1] if "loss_pos" in h else None)
                   for h in halves) // per_half

    def train(self, start: int, accum: int, progress: bool, stop_after: Optional[int]) -> dict:
        """Updates ``start`` .. total (or ``stop_after``), with progress, JSONL metrics and checkpoints."""
        from tqdm.auto import tqdm

        lead = jax.process_index() == 0
        out_dir = self.conf["output"]["dir"]
        metrics_path = os.path.join(out_dir, "metrics.jsonl")
        writer = _tensorboard(out_dir) if (lead and self.conf["output"].get("tensorboard")) else None
        bar = tqdm(total=self.total, initial=start, desc=f"train {self.stage}", unit="update", disable=not progress)
        every = int(self.conf["checkpoint"]["every"])
        log_every = max(int(self.conf["train"]["log_every"]), 1)
        last: dict = {}
        try:
            for update in range(start, self.total):
                last = self.step(update, accum)
                if lead and ((update + 1) % log_every == 0 or update + 1 == self.total):
                    T.write_jsonl(metrics_path, last)
                    if writer is not None:
                        for k, v in last.items():
                            writer.add_scalar(f"{self.stage}/{k}", v, update + 1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
                bar.update(1)
                if (update + 1) % every == 0 or update + 1 == self.total:
                    self.save(update + 1)
                if stop_after is not None and update + 1 >= stop_after:
                    break
            self.mngr.wait_until_finished()
        finally:
            bar.close()
            self.mngr.wait_until_finished()
            if writer is not None:
                writer.close()
        return last


def check_resumed_parts(out_dir: str, stage: str, parts: tuple) -> None:
    """A resumed run trains the parts its checkpoints hold (train.router_trains as in the run's config.yaml)."""
    path = os.path.join(out_dir, "config.yaml")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        before = (yaml.safe_load(f) or {}).get("train", {}).get("router_trains")
    if T.trained_parts(stage, before) != tuple(parts):
        raise MoguError(f"{out_dir} was trained with train.router_trains={list(T.trained_parts(stage, before))}; "
                        f"resume it with the same setting, not {list(parts)}")


def place_state(cfg, stage: str, frozen: dict, trainable: dict, mesh, tx, parts: Optional[tuple] = None):
    """Shard the frozen tree and a fresh train state {params, opt_state, step} onto ``mesh`` by the logical
    axis rules (``parts``: what ``trainable`` holds, see ``train.trained_parts``). Returns (state, frozen,
    state_shardings, frozen_shardings)."""
    state_sh, frozen_sh = T.state_shardings(cfg, stage, frozen, trainable, mesh, tx, parts)
    train_sh, opt_sh, rep = state_sh["params"], state_sh["opt_state"], state_sh["step"]
    params_g = T.to_global(trainable, train_sh)
    state = {"params": params_g, "opt_state": jax.jit(tx.init, out_shardings=opt_sh)(params_g),
             "step": jax.device_put(np.asarray(0, np.int32), rep)}
    return state, T.to_global(frozen, frozen_sh), state_sh, frozen_sh


def optax_shardings(tx, opt_shape, param_sh, rep):
    import optax
    return optax.tree_map_params(tx, lambda _, sh: sh, opt_shape, param_sh, transform_non_params=lambda _: rep,
                                 is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def export_stage(out_dir: str, cfg, stage: str, trained, base_name: str = "", parts: Optional[tuple] = None) -> dict:
    """final/<part>/ for every part the stage trained (orbax, every process takes part; stage.json written last
    marks it complete) and published/ (router.pth and/or PEFT folders, written atomically by process 0), then
    DONE. The router stage trained jointly with the branches publishes them too."""
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils

    from mogu_jax.io_utils import atomic_dir, write_file_atomic, write_json_atomic

    parts = tuple(parts or (stage,))
    if T.non_finite_parts({"params": trained}):
        raise MoguError(f"the trained {stage} stage holds NaN or inf values; not exported")
    lead = jax.process_index() == 0
    by_part = T.trainable_by_part(stage, parts, trained)
    finals = {p: os.path.abspath(os.path.join(out_dir, "final", p)) for p in parts}
    pub = os.path.join(out_dir, "published")
    host = T.gather_to_host(by_part)  # a collective: every process calls it
    if lead:
        for final in finals.values():
            if os.path.exists(final):
                shutil.rmtree(final)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("mogu-export-clean")
    ck = ocp.StandardCheckpointer()
    for p in parts:
        ck.save(os.path.join(finals[p], "params"), by_part[p])
    ck.wait_until_finished()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("mogu-export-saved")
    if lead:
        for p in parts:
            write_json_atomic(os.path.join(finals[p], "stage.json"), {"stage": stage, "part": p,
                                                                       "model_config": cfg.to_dict()})
        with atomic_dir(pub, overwrite=True) as tmp:
            for p in parts:
                _publish_part(tmp, p, host[p], cfg, base_name)
        write_file_atomic(os.path.join(out_dir, DONE), stage + "\n")
    return {"final": finals[stage], "finals": finals, "published": pub}


def _publish_part(folder: str, part: str, tree, cfg, base_name: str) -> None:
    """One trained part in the published format: router.pth (router.safetensors without torch), or a PEFT folder."""
    from mogu_jax.convert import mogu_artifacts as art

    if part != "router":
        art.write_peft_adapter(os.path.join(folder, part), tree, cfg, base_name)
        return
    try:
        art.write_router(os.path.join(folder, "router.pth"), tree, cfg)
    except MoguError:  # no torch: the same keys in safetensors
        art.write_router(os.path.join(folder, "router.safetensors"), tree, cfg)


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
