"""Our checkpoint folder: model config + parameters in orbax format (+ tokenizer).

Layout::

    CKPT_DIR/
      mogu.json      format tag, ModelConfig, the source's Hugging Face config.json (verbatim),
                     generation config, source fingerprint, parameter dtypes
      params/        orbax (OCDBT) PyTree checkpoint of the parameter pytree
      tokenizer/     tokenizer files (tokenizer.json, tokenizer_config.json, chat template), if any

Written atomically (temp folder + rename): a folder with ``mogu.json`` is always complete.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import numpy as np

from mogu_jax.config import ModelConfig
from mogu_jax.errors import MoguError
from mogu_jax.io_utils import atomic_dir

FORMAT = "mogu_jax.checkpoint"
VERSION = 1
META = "mogu.json"


def is_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), META))


def looks_like_checkpoint(path: str | os.PathLike) -> bool:
    """A folder with our ``params/`` orbax folder (whether or not ``mogu.json`` is there)."""
    return os.path.isfile(os.path.join(os.fspath(path), "params", "_CHECKPOINT_METADATA"))


def read_meta(path: str | os.PathLike) -> dict:
    p = os.path.join(os.fspath(path), META)
    if not os.path.isfile(p) and looks_like_checkpoint(path):
        raise MoguError(f"checkpoint {os.fspath(path)} has params/ but no {META} (an incomplete or damaged "
                        f"mogu_jax checkpoint; convert it again)")
    try:
        with open(p, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise MoguError(f"{os.fspath(path)} is not a mogu_jax checkpoint (no {META})") from None
    except json.JSONDecodeError as e:
        raise MoguError(f"{p} is not valid JSON: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MoguError(f"{p} is not a mogu_jax checkpoint file ({type(e).__name__})") from None
    except OSError as e:
        raise MoguError(f"cannot read {p}: {e.strerror or e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise MoguError(f"{p} is not a mogu_jax checkpoint file (no model_config)")
    if meta.get("format") != FORMAT:
        raise MoguError(f"{p} is not a mogu_jax checkpoint (format {meta.get('format')!r})")
    if meta.get("version", 0) > VERSION:
        raise MoguError(f"{p} has format version {meta['version']}; this mogu_jax reads up to {VERSION}")
    return meta


def _checkpointer():
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer()


def save_checkpoint(out_dir: str, cfg: ModelConfig, params: dict, hf_config: dict, tokenizer=None,
                    generation_config: Optional[dict] = None, fingerprint: Optional[str] = None,
                    overwrite: bool = False, extra_meta: Optional[dict] = None) -> str:
    from mogu_jax.model import split_params
    base, parts = split_params(params)
    dtypes = sorted({str(np.dtype(x.dtype)) for x in jax.tree_util.tree_leaves(base)})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": cfg.to_dict(),
        "hf_config": hf_config,
        "generation_config": generation_config,
        "source_fingerprint": fingerprint,
        "param_dtypes": dtypes,
        "parts": sorted(parts),
    }
    if extra_meta:
        meta.update(extra_meta)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        ckptr = _checkpointer()
        ckptr.save(os.path.join(tmp, "params"), base)
        for name, tree in parts.items():
            ckptr.save(os.path.join(tmp, name), tree)
        ckptr.wait_until_finished()
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        # mogu.json last: its presence marks a complete checkpoint even inside the temp folder
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=2)
    return out_dir


def load_checkpoint(path: str, shardings=None, cast=None, **cfg_overrides):
    """-> (cfg, params, meta). ``shardings``: optional pytree of jax.sharding.Sharding (restores sharded);
    ``cast``: a dtype to cast parameters to after restore. Shapes are validated against the config first."""
    import flax.linen as nn

    from mogu_jax.model import abstract_params

    path = os.path.abspath(os.fspath(path))  # orbax resolves relative paths elsewhere: always hand it absolute ones
    meta = read_meta(path)
    cfg = ModelConfig.from_dict(meta["model_config"])
    if cfg_overrides:
        cfg = cfg.replace(**cfg_overrides)
    pdir = os.path.join(path, "params")
    if not os.path.isdir(pdir):
        raise MoguError(f"checkpoint {path} has no params/ folder")
    ckptr = _checkpointer()
    try:
        stored = ckptr.metadata(pdir)
        stored = getattr(stored, "item_metadata", stored)
    except Exception as e:  # noqa: BLE001 - orbax raises several types for damaged folders
        raise MoguError(f"checkpoint {path}: cannot read the parameter index in params/ "
                        f"({' '.join(str(e).split())[:300]})") from None
    if not stored:
        raise MoguError(f"checkpoint {path}: cannot read the parameter index in params/ (damaged or incomplete)")
    expected = nn.meta.unbox(abstract_params(cfg))
    _validate_tree(stored, expected, path)

    def target(meta_leaf, sharding=None):
        return jax.ShapeDtypeStruct(tuple(meta_leaf.shape), meta_leaf.dtype, sharding=sharding)

    if shardings is not None:
        abstract = jax.tree_util.tree_map(target, _as_dict(stored), shardings)
    else:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree_util.tree_map(lambda m: target(m, dev), _as_dict(stored))
    try:
        params = ckptr.restore(pdir, abstract)
    except Exception as e:  # noqa: BLE001
        raise restore_error(path, "params", e) from None
    parts = {}
    for name in meta.get("parts", []):
        parts[name] = _restore_part(ckptr, os.path.join(path, name), cfg, name)
    if cast is not None:
        params = jax.tree_util.tree_map(lambda x: x.astype(cast), params)
    if parts:
        params = {"base": params, **parts}
    return cfg, params, meta


def _restore_part(ckptr, pdir: str, cfg: ModelConfig, name: str):
    from mogu_jax import mogu as mogu_lib
    pdir = os.path.abspath(pdir)
    if not os.path.isdir(pdir):
        raise MoguError(f"checkpoint lists MoGU part {name!r} but has no {os.path.basename(pdir)}/ folder")
    try:
        stored = ckptr.metadata(pdir)
        stored = getattr(stored, "item_metadata", stored)
    except Exception as e:  # noqa: BLE001
        raise MoguError(f"cannot read {pdir}: {e}") from None
    init = mogu_lib.init_router if name == "router" else mogu_lib.init_branch
    expected = jax.eval_shape(lambda: init(cfg, jax.random.PRNGKey(0)))
    _validate_tree(stored, expected, pdir)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev),
                                    _as_dict(stored))
    try:
        return ckptr.restore(pdir, target)
    except Exception as e:  # noqa: BLE001
        raise restore_error(os.path.dirname(pdir), name, e) from None


def restore_error(ckpt: str, folder: str, err: Exception) -> MoguError:
    """One line for a failed orbax restore, naming the checkpoint and the parameter (TensorStore's own
    message spans dozens of lines of spec)."""
    import re
    text = str(err)
    names = [p for p in re.findall(r"'path': '([^']+)'", text) if not p.startswith("/")]
    what = f"parameter {names[-1].rstrip('/').replace('.', '/')}" if names else "its parameters"
    first = " ".join(text.splitlines()[0].split("See full TensorStore details")[0].split())[:300] if text else ""
    return MoguError(f"checkpoint {ckpt}: cannot read {what} from {folder}/ (the file is damaged or truncated"
                     f"{': ' + first.rstrip('. ') if first else ''})")


def _as_dict(tree):
    if isinstance(tree, dict):
        return {k: _as_dict(v) for k, v in tree.items()}
    if hasattr(tree, "items") and not hasattr(tree, "shape"):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


def _validate_tree(stored, expected, where: str) -> None:
    s_flat = {jax.tree_util.keystr(p): leaf for p, leaf in
              jax.tree_util.tree_flatten_with_path(_as_dict(stored))[0]}
    e_flat = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]}
    missing = sorted(set(e_flat) - set(s_flat))
    extra = sorted(set(s_flat) - set(e_flat))
    if missing:
        raise MoguError(f"checkpoint {where} is missing parameters {missing[:5]}")
    if extra:
        raise MoguError(f"checkpoint {where} has parameters the config does not define: {extra[:5]}")
    for k, e in e_flat.items():
        got = tuple(s_flat[k].shape)
        if got != tuple(e.shape):
            raise MoguError(f"checkpoint {where}: parameter {k} has shape {list(got)}, expected {list(e.shape)}")


def load_tokenizer(path: str):
    tdir = os.path.join(os.fspath(path), "tokenizer")
    if not os.path.isdir(tdir):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tdir)
