"""Where base weights come from: a Hugging Face folder (safetensors, single or sharded, or PyTorch .bin)
or a GGUF file. Every source exposes tensors under their Hugging Face names, one at a time, plus the
Hugging Face config dict, so one conversion table serves them all."""

from __future__ import annotations

import abc
import glob
import hashlib
import json
import os
from typing import Optional

import numpy as np

from mogu_jax.config import read_hf_config
from mogu_jax.convert.safetensors_io import SafetensorsFile
from mogu_jax.errors import MoguError


class TensorSource(abc.ABC):
    """Tensors by Hugging Face name. Subclasses implement keys/shape/dtype/get and hf_config."""

    description = "checkpoint"

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Every tensor name."""

    @abc.abstractmethod
    def shape(self, key: str) -> tuple:
        """A tensor's shape (Hugging Face layout), without reading its data."""

    @abc.abstractmethod
    def dtype(self, key: str) -> np.dtype:
        """A tensor's dtype, without reading its data."""

    @abc.abstractmethod
    def get(self, key: str) -> np.ndarray:
        """One tensor's data."""

    @abc.abstractmethod
    def hf_config(self) -> dict:
        """The Hugging Face config dict (config.json)."""

    def tokenizer(self):
        """A ``transformers`` tokenizer for this checkpoint, or None when it ships none."""
        return None

    def generation_config(self) -> Optional[dict]:
        return None

    def fingerprint(self) -> str:
        """A cheap identity of the source (config + tensor names/shapes/dtypes), for overwrite checks."""
        h = hashlib.sha256(json.dumps(self.hf_config(), sort_keys=True, default=str).encode())
        for k in sorted(self.keys()):
            h.update(f"{k}:{self.shape(k)}:{self.dtype(k)}".encode())
        return h.hexdigest()[:16]

    def close(self):
        pass


class HFDirSource(TensorSource):
    """A Hugging Face model folder: config.json + model.safetensors / sharded index / pytorch_model*.bin."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = os.fspath(hf_dir)
        if not os.path.isdir(self.dir):
            raise MoguError(f"{self.dir} is not a directory, a .gguf file or a known alias (smollm2)")
        self.description = self.dir
        self._config = read_hf_config(self.dir)
        self._where: dict[str, object] = {}  # key -> SafetensorsFile or torch state dict
        st_index = os.path.join(self.dir, "model.safetensors.index.json")
        st_single = os.path.join(self.dir, "model.safetensors")
        bin_index = os.path.join(self.dir, "pytorch_model.bin.index.json")
        bins = sorted(glob.glob(os.path.join(self.dir, "pytorch_model*.bin")))
        if os.path.isfile(st_index):
            self._load_index(st_index, self._open_st)
        elif os.path.isfile(st_single):
            f = SafetensorsFile(st_single)
            self._where.update({k: f for k in f.keys()})
        elif os.path.isfile(bin_index):
            self._load_index(bin_index, self._open_bin)
        elif bins:
            for b in bins:
                sd = self._open_bin(b)
                self._where.update({k: sd for k in sd})
        else:
            others = sorted(glob.glob(os.path.join(self.dir, "*.safetensors")))
            if not others:
                raise MoguError(f"no weights in {self.dir}: expected model.safetensors, "
                                "model.safetensors.index.json or pytorch_model*.bin")
            for p in others:
                f = SafetensorsFile(p)
                self._where.update({k: f for k in f.keys()})

    def _load_index(self, index_path, opener):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise MoguError(f"bad shard index {index_path}: {e}") from None
        opened: dict[str, object] = {}
        for key, shard in weight_map.items():
            if shard not in opened:
                p = os.path.join(self.dir, shard)
                if not os.path.isfile(p):
                    raise MoguError(f"shard {shard} named in {os.path.basename(index_path)} is missing")
                opened[shard] = opener(p)
            self._where[key] = opened[shard]

    @staticmethod
    def _open_st(path):
        return SafetensorsFile(path)

    @staticmethod
    def _open_bin(path):
        try:
            import torch
        except ImportError:
            raise MoguError(f"{path} is a PyTorch .bin checkpoint: install torch (pip install 'mogu_jax[torch]') "
                            "or convert it to safetensors") from None
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            raise MoguError(f"cannot read PyTorch checkpoint {path}: {e}") from None
        return _TorchStateDict(sd)

    def keys(self):
        return list(self._where)

    def shape(self, key):
        return tuple(self._where[key].shape(key))

    def dtype(self, key):
        return self._where[key].dtype(key)

    def get(self, key):
        return self._where[key].get(key)

    def hf_config(self):
        return self._config

    def tokenizer(self):
        if not any(os.path.isfile(os.path.join(self.dir, n)) for n in
                   ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return None
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(self.dir)

    def generation_config(self):
        p = os.path.join(self.dir, "generation_config.json")
        if os.path.isfile(p):
            with open(p) as f:
                return json.load(f)
        return None


class _TorchStateDict:
    """A torch state dict (memory-mapped) with the SafetensorsFile accessors."""

    def __init__(self, sd):
        self.sd = sd

    def __iter__(self):
        return iter(self.sd)

    def shape(self, key):
        return tuple(self.sd[key].shape)

    def dtype(self, key):
        return _torch_to_np_dtype(self.sd[key].dtype)

    def get(self, key):
        import torch
        t = self.sd[key].detach().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(self.dtype(key)).copy()
        return t.numpy().copy()


def _torch_to_np_dtype(tdt):
    import ml_dtypes
    import torch
    table = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16,
             torch.float64: np.float64, torch.int64: np.int64, torch.int32: np.int32, torch.uint8: np.uint8,
             torch.int8: np.int8, torch.bool: np.bool_}
    if tdt not in table:
        raise MoguError(f"unsupported tensor dtype {tdt}")
    return np.dtype(table[tdt])


def open_source(path: str | os.PathLike) -> TensorSource:
    """A Hugging Face folder, a .gguf file, or the alias ``smollm2`` (the embedded default model)."""
    p = os.fspath(path)
    if p == "smollm2" or p.endswith(".gguf"):
        from mogu_jax.convert.gguf import GGUFSource, resolve_gguf_path
        return GGUFSource(resolve_gguf_path(p))
    if not os.path.exists(p):
        raise MoguError(f"{p} does not exist (expected a Hugging Face model folder, a .gguf file or 'smollm2')")
    return HFDirSource(p)


def to_torch(arr: np.ndarray):
    """numpy (bf16 included) -> torch tensor, bit for bit."""
    import ml_dtypes
    import torch
    arr = np.ascontiguousarray(arr)
    if arr.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(arr.copy())


class StateDictSource(TensorSource):
    """An in-memory transformers model (or its state dict + config dict) as a source."""

    description = "in-memory model"

    def __init__(self, model_or_state_dict, hf_config: Optional[dict] = None):
        if hasattr(model_or_state_dict, "state_dict"):
            hf_config = hf_config or model_or_state_dict.config.to_dict()
            model_or_state_dict = model_or_state_dict.state_dict()
        if hf_config is None:
            raise MoguError("StateDictSource needs the model's config dict")
        self._sd = _TorchStateDict(model_or_state_dict) if _is_torch_dict(model_or_state_dict) else None
        self._np = None if self._sd is not None else dict(model_or_state_dict)
        self._config = dict(hf_config)

    def keys(self):
        return list(self._sd.sd if self._sd is not None else self._np)

    def shape(self, key):
        return self._sd.shape(key) if self._sd is not None else tuple(self._np[key].shape)

    def dtype(self, key):
        return self._sd.dtype(key) if self._sd is not None else np.dtype(self._np[key].dtype)

    def get(self, key):
        return self._sd.get(key) if self._sd is not None else np.asarray(self._np[key])

    def hf_config(self):
        return self._config


def _is_torch_dict(d) -> bool:
    v = next(iter(d.values()), None)
    return v is not None and type(v).__module__.startswith("torch")
