"""Save and load quantized models: safetensors tensors plus a versioned record in its metadata.

One safetensors file holds every tensor of ``model.state_dict()`` (tensors that share memory,
such as tied embeddings, stored once) and, under the metadata key ``"cuflute"``, a JSON record::

    {"format": "cuflute-quantized-model", "format_version": 2, "cuflute_version": "0.3.0",
     "layers": {"<module name>": {"in_features", "out_features", "bits", "group_size",
                                  "table", "dtype", "bias"}},      # QuantizedLinear.config()
     "tied":   {"<state-dict key>": "<stored key it shares memory with>"},
     "sha256": {"<stored key>": "<hex digest of the tensor's bytes>"}}

``load`` reads the whole file and checks everything (header, record, format version, digests,
and every tensor's name, shape and dtype against the model it will go into) before it changes
the model, so a truncated or corrupted file or an unknown version leaves the model as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .torch import QuantizedLinear

FORMAT = "cuflute-quantized-model"
FORMAT_VERSION = 2
# Version 1 (cuflute 0.1.0) packed the two bit planes of 3-bit codes in another order; its 2- and
# 4-bit layers are stored as version 2 stores them, so its files load when they have no 3-bit layer.
READABLE_VERSIONS = (1, FORMAT_VERSION)
METADATA_KEY = "cuflute"


class CheckpointError(ValueError):
    """The file is not a cuflute checkpoint this version reads, or does not fit the model."""


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _storage_key(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
            tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def save(model: nn.Module, path) -> None:
    """Write ``model`` (with its QuantizedLinear layers) to the safetensors file ``path``."""
    from safetensors.torch import save_file

    layers = {name: m.config() for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        raise ValueError("the model has no QuantizedLinear layers: run cuflute.torch.quantize_model first")
    tensors, tied, first_key = {}, {}, {}
    for key, tensor in model.state_dict().items():
        storage = _storage_key(tensor)
        if storage in first_key:
            tied[key] = first_key[storage]
            continue
        first_key[storage] = key
        tensors[key] = tensor.detach().to("cpu").contiguous()
    record = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "cuflute_version": __version__,
        "layers": layers, "tied": tied,
        "sha256": {key: _digest(tensor) for key, tensor in tensors.items()},
    }
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={METADATA_KEY: json.dumps(record)})
    os.replace(partial, path)


def read(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The record and all tensors (on the CPU, tied keys filled in) of a checked checkpoint."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as error:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or "
                              f"corrupted?): {error}") from error
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} is a safetensors file without a cuflute record: it was "
                              "not written by cuflute.checkpoint.save")
    try:
        record = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} has a corrupted cuflute record: {error}") from error
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: the record's format is not {FORMAT!r}")
    version = record.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} has format version {version!r}, written by cuflute "
            f"{record.get('cuflute_version')}; this cuflute ({__version__}) reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}")
    for field in ("layers", "tied", "sha256"):
        if not isinstance(record.get(field), dict):
            raise CheckpointError(f"{path}: the record has no {field!r} table")
    if version == 1:
        three_bit = [name for name, config in record["layers"].items()
                     if isinstance(config, dict) and config.get("bits") == 3]
        if three_bit:
            raise CheckpointError(
                f"{path} has format version 1 (cuflute {record.get('cuflute_version')}), whose "
                f"3-bit codes are packed in an order this cuflute does not read: layers "
                f"{three_bit[:5]} ({len(three_bit)} in all); quantize the model again with this cuflute")
    if set(record["sha256"]) != set(tensors):
        missing = sorted(set(record["sha256"]) ^ set(tensors))
        raise CheckpointError(f"{path}: the stored tensors and the record disagree on {missing[:5]}")
    for key, tensor in tensors.items():
        if _digest(tensor) != record["sha256"][key]:
            raise CheckpointError(f"{path}: tensor {key!r} does not match its sha256 digest; the "
                                  "file is corrupted")
    for alias, source in record["tied"].items():
        if source not in tensors:
            raise CheckpointError(f"{path}: {alias!r} is tied to {source!r}, which is not stored")
        tensors[alias] = tensors[source]
    return record, tensors


def _replacements(model: nn.Module, layers: dict, path) -> dict[str, QuantizedLinear]:
    """An empty QuantizedLinear per recorded layer, on the device of the module it replaces."""
    new = {}
    for name, config in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path} has quantized layer {name!r}, the model has no such "
                                  "module") from None
        if not isinstance(old, (nn.Linear, QuantizedLinear)):
            raise CheckpointError(f"{path} has quantized layer {name!r}, the model's {name} is a "
                                  f"{type(old).__name__}, not a linear layer")
        shape = (old.out_features, old.in_features, old.bias is not None)
        want = (config.get("out_features"), config.get("in_features"), config.get("bias"))
        if shape != want:
            raise CheckpointError(f"{path}: layer {name!r} is (out, in, bias) = {want}, the "
                                  f"model's is {shape}")
        device = next(iter(old.buffers() if isinstance(old, QuantizedLinear) else old.parameters())).device
        try:
            new[name] = QuantizedLinear.from_config(config, device=device)
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: layer {name!r} has an invalid record {config}: "
                                  f"{error!r}") from error
    return new


def _check_fits(model: nn.Module, new: dict[str, QuantizedLinear], tensors: dict, path) -> None:
    """The model's state dict after the replacements must match the file key for key."""
    expected = {}
    for key, tensor in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner not in new:
            expected[key] = tensor
    for name, module in new.items():
        expected.update(module.state_dict(prefix=f"{name}."))
    if set(expected) != set(tensors):
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:5]} "
                              f"({len(missing)} in all), unexpected {extra[:5]} ({len(extra)} in all)")
    for key, tensor in tensors.items():
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape) or tensor.dtype != want.dtype:
            raise CheckpointError(f"{path}: {key} is {tensor.dtype} {tuple(tensor.shape)}, the "
                                  f"model wants {want.dtype} {tuple(want.shape)}")


def load(model: nn.Module, path) -> list[str]:
    """Load the checkpoint ``path`` into ``model`` (its plain or already quantized form):
    the recorded linear layers become QuantizedLinear, every tensor is copied in bit for bit.
    Returns the names of the quantized layers. Nothing changes unless all checks pass."""
    record, tensors = read(path)
    new = _replacements(model, record["layers"], path)
    _check_fits(model, new, tensors, path)
    for name, module in new.items():
        model.set_submodule(name, module)
    model.load_state_dict(tensors, strict=True)
    return list(new)
