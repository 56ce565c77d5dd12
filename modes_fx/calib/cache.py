"""A resumable on-disk calibration cache: every finished pass is written at once, so a killed
calibration continues where it stopped. One JSON file per (model weights, data, settings)."""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

_CHUNK_BYTES = 1 << 28  # tensors are hashed in 256 MiB pieces (one piece at a time leaves the device)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # a repr naming an object's address is not deterministic


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 hex of every parameter and buffer of ``model``: by name (``named_parameters``, then
    ``named_buffers``), each one's name, tensor type, dtype, shape and bytes.

    A tensor subclass (``is_traceable_wrapper_subclass``, e.g. torchao's quantized weights and
    ``modes_fx``'s ``Int4ExpertsTensor``) is hashed as its type, its flatten context
    (``repr`` of the ``ctx`` that ``__tensor_flatten__`` returns: group size, logical shape, ...)
    and each inner tensor, recursively. A context whose ``repr`` names an object address
    (``... at 0x...``) is not deterministic across processes: it is left out (only the marker
    ``<context skipped>`` is hashed) and the inner tensors alone tell such weights apart.

    Device and requires_grad are not hashed. Bytes are read from contiguous CPU copies, a piece at
    a time, so hashing costs one sha256 pass over the weights (about 1 s per GB). Raises
    ValueError naming the parameter when a tensor is on the meta device (weights not loaded)."""
    digest = hashlib.sha256()
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            _hash_tensor(digest, f"{kind} {name}", tensor)
    return digest.hexdigest()


def _hash_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    kind = type(tensor)
    header = [name, f"{kind.__module__}.{kind.__qualname__}", str(tensor.dtype), list(tensor.shape)]
    if is_traceable_wrapper_subclass(tensor):
        inner_names, ctx = tensor.__tensor_flatten__()
        context = repr(ctx)
        header += [list(inner_names), "<context skipped>" if _ADDRESS.search(context) else context]
        digest.update(json.dumps(header).encode() + b"\n")
        for inner in inner_names:
            _hash_tensor(digest, f"{name}.{inner}", getattr(tensor, inner))
        return
    if tensor.is_meta:
        raise ValueError(f"{name} is on the meta device: load the model's weights before calibrating")
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    header.append(flat.numel())
    digest.update(json.dumps(header).encode() + b"\n")
    for piece in flat.split(_CHUNK_BYTES):
        digest.update(piece.cpu().numpy())


def config_fingerprint(model: torch.nn.Module) -> str | None:
    """sha256 hex of the model's transformers config (``config.to_dict()`` without
    ``_name_or_path`` and ``transformers_version``), or None for a model without one: settings
    such as ``rms_norm_eps`` or ``rope_parameters`` change the outputs without changing a weight."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    text = _ADDRESS.sub("", json.dumps(_without_volatile(config.to_dict()), sort_keys=True, default=repr))
    return hashlib.sha256(text.encode()).hexdigest()


def _without_volatile(value):
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in ("_name_or_path", "transformers_version")}
    if isinstance(value, (list, tuple)):
        return [_without_volatile(v) for v in value]
    return value


class DiskCache:
    """Sections of key → JSON value, saved atomically (write + rename) on every new entry."""

    def __init__(self, directory: str | os.PathLike, key: dict):
        text = json.dumps(key, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.path = Path(directory) / f"modes-calibration-{digest}.json"
        self.data = self._load(text) if self.path.exists() else {"key": json.loads(text)}

    def _load(self, key_text: str) -> dict:
        """The file's contents; ValueError naming the file when it is not JSON, not a JSON object,
        or holds another key (a 16-hex digest collision, or a file edited or copied by hand)."""
        try:
            data = json.loads(self.path.read_text())
        except (ValueError, UnicodeDecodeError) as error:  # json.JSONDecodeError is a ValueError
            problem = f"is not valid JSON ({error})"
        else:
            if not isinstance(data, dict):
                problem = f"holds a JSON {type(data).__name__}, not an object"
            elif any(not isinstance(value, dict) for name, value in data.items() if name != "key"):
                problem = "has a section that is not a JSON object"
            elif "key" not in data or json.dumps(data["key"], sort_keys=True) != key_text:
                problem = "was written for another calibration (its \"key\" differs from this one's)"
            else:
                return data
        raise ValueError(f"corrupt calibration cache {self.path}: it {problem}; delete it to recompute")

    def section(self, name: str) -> "CacheSection":
        return CacheSection(self, self.data.setdefault(name, {}))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)


class CacheSection(MutableMapping):
    """A dict view of one section; keys may be strings or tuples of floats (stored as repr text)."""

    def __init__(self, cache: DiskCache, store: dict):
        self.cache, self.store = cache, store

    @staticmethod
    def _text(key) -> str:
        return ",".join(repr(float(k)) for k in key) if isinstance(key, tuple) else key

    def __getitem__(self, key):
        value = self.store[self._text(key)]
        return tuple(value) if isinstance(value, list) else value

    def __setitem__(self, key, value) -> None:
        self.store[self._text(key)] = list(value) if isinstance(value, tuple) else value
        self.cache.save()

    def __delitem__(self, key) -> None:
        del self.store[self._text(key)]
        self.cache.save()

    def __contains__(self, key) -> bool:
        return self._text(key) in self.store

    def __iter__(self) -> Iterator:
        return iter(self.store)

    def __len__(self) -> int:
        return len(self.store)
