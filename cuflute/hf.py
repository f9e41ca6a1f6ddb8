"""Hugging Face Llama-architecture checkpoints on disk: quantize into a cuflute directory, and
load such a directory back into transformers for generation. Nothing is fetched from the hub.

    python -m cuflute quantize <hf-model-dir> --bits 4 --group-size 128 --out <dir>

The output directory holds ``config.json`` (the model's, as transformers writes it), the
tokenizer and generation files copied unchanged, and ``cuflute.safetensors``
(cuflute.checkpoint's format: the quantized linear layers and every other tensor as it was).
``load_quantized(<dir>, device="cuda")`` gives back a ``LlamaForCausalLM`` whose linear layers
are ``QuantizedLinear``, ready for ``model.generate``.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama",)
CHECKPOINT_NAME = "cuflute.safetensors"
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "chat_template.jinja")
DEFAULT_SKIP = ("lm_head",)


def _config(model_dir: Path):
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{model_dir} holds a {config.model_type!r} model; cuflute.hf takes "
                         f"{SUPPORTED_MODEL_TYPES}")
    return config


def _half_dtype(dtype, config):
    """The activations' dtype: the one asked for, else the checkpoint's if it is a half type,
    else float16."""
    import torch

    halves = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype is not None:
        if isinstance(dtype, str) and dtype not in halves:
            raise ValueError(f"dtype must be one of {sorted(halves)}, got {dtype!r}")
        return halves.get(dtype, dtype)
    return config.dtype if config.dtype in halves.values() else torch.float16


def quantize_checkpoint(model_dir, out_dir, bits: int = 4, group_size: int | None = 128,
                        table="nf", skip=DEFAULT_SKIP, dtype=None, progress: bool = True):
    """Quantize the linear layers (except ``skip``) of the checkpoint in ``model_dir`` into
    ``out_dir``; returns the QuantizationReport."""
    from transformers import AutoModelForCausalLM

    from . import checkpoint
    from .torch import quantize_model

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = _config(model_dir)
    dtype = _half_dtype(dtype, config)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    report = quantize_model(model, bits, group_size, table, skip, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out_dir)
    for name in COPIED_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    checkpoint.save(model, out_dir / CHECKPOINT_NAME)
    return report


def load_quantized(model_dir, device="cuda"):
    """The model of a directory written by ``quantize_checkpoint``, on ``device``, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from . import checkpoint

    model_dir = Path(model_dir)
    config = _config(model_dir)
    path = model_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {CHECKPOINT_NAME}: write it with "
                                "`python -m cuflute quantize`")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=_half_dtype(None, config))
    checkpoint.load(model, path)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model.eval()


def _group_size(text: str) -> int | None:
    if text in ("channel", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer or 'channel', got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="a Hugging Face Llama checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    parser.add_argument("--bits", type=int, choices=(2, 3, 4), default=4)
    parser.add_argument("--group-size", type=_group_size, default=128, metavar="G",
                        help="32, 64, 128, 256 or 'channel' (default: %(default)s)")
    parser.add_argument("--table", choices=("nf", "int"), default="nf")
    parser.add_argument("--skip", action="append", metavar="PATTERN",
                        help="module name or fnmatch pattern to keep unquantized; repeatable "
                             f"(default: {' '.join(DEFAULT_SKIP)})")
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default=None,
                        help="activation dtype (default: the checkpoint's if half, else float16)")


def run(args: argparse.Namespace) -> int:
    report = quantize_checkpoint(args.model_dir, args.out, args.bits, args.group_size, args.table,
                                 DEFAULT_SKIP if args.skip is None else args.skip, args.dtype)
    print(report)
    print(f"wrote {args.out / CHECKPOINT_NAME}; load it with "
          f"cuflute.hf.load_quantized({str(args.out)!r}, device='cuda')")
    return 0
