"""``python -m cuflute bench``: cuflute against cuBLAS and the peers that import here.

Method (DESIGN.md section 5). Each method's weights rotate over enough distinct copies to
overflow L2; one CUDA graph captures one call per copy in sequence, that sequence repeated until
the graph holds at least ``--graph-calls`` calls, and the median replay time (after warm-up)
divided by the calls in the graph is the time per call. A replay is timed from an idle stream,
so its time includes the host's launch of the graph, about 8 us on the H100 machine before the
first kernel starts: over one call a copy (``--graph-calls 1``, as up to cuflute 0.3.0) that was
about 4 us of each call of the largest shapes, which rotate over two copies (docs/PERF_NOTES.md
v23). The bytes of a call are the packed weight (qweight + scales + pair LUT) plus activations
``M*K*2`` and output ``M*N*2``; the roofline fraction divides the achieved bandwidth by the
device-to-device copy bandwidth measured at the start of the same run (bytes read + written).

BCQ (cuflute.bcq, LUT-GEMM's binary-coding kernel) at the same bits is timed the same way on
the same shapes and M, up to its M <= 8; its columns show "-" past that.

``--dense-cache`` times cuflute with cuflute.dense_cache on and no practical limit: the cells
that the dispatcher sends to cuBLAS over a held W' (column "path": "held W'") read that W', 2 N K
bytes, and their bytes and roofline count it.

Without a GPU it says what it skipped and prints the byte floor at a nominal bandwidth.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import statistics
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import partial

from . import __version__, dense_cache, gpu_available, qgemm
from .dispatch import DENSE, DENSE_CACHED, select_config
from .dtypes import DTYPES
from .formats import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from .bcq import MAX_M as BCQ_MAX_M
from .bcq import gemm as bcq_gemm
from .bcq import random_packed as bcq_random_packed
from .bcq.packing import packed_nbytes as bcq_packed_nbytes
from .packing import kernel_group, packed_nbytes, random_packed

# (N, K) of the linear layers of Llama-3-8B, then Llama-3-70B:
# fused q/k/v projection, attention output, fused gate/up, down.
DEFAULT_SHAPES = (
    (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
    (10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672),
)
DEFAULT_M = (1, 4, 16, 32, 64, 128)
DEFAULT_BITS = (4, 3)
DEFAULT_GROUP_SIZE = 128
DEFAULT_REPLAYS = 20
DEFAULT_GRAPH_CALLS = 16
WARMUP_RUNS = 3
COPY_BYTES = 2 << 30  # large enough that the copy runs at DRAM speed, far past any L2
COPY_REPEATS = 10
NOMINAL_GBPS = 3000.0  # H100 80GB HBM3 copy bandwidth seen on the device machine (DESIGN.md 6)
TORCH_INT4_INNER_K_TILES = 8  # gpt-fast's choice; K must be a multiple of 8 * 16
PEERS = ("torch-int4", "bnb-nf4")
SHORT_DTYPE = {"float16": "fp16", "bfloat16": "bf16"}
BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


# ----------------------------------------------------------------------------- arguments

def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4096x4096,8192x28672' -> [(4096, 4096), (8192, 28672)]: (N out, K in) per weight."""
    shapes = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", item)
        if not match or 0 in (int(match[1]), int(match[2])):
            raise argparse.ArgumentTypeError(f"shape {item!r} is not NxK with positive N and K")
        shapes.append((int(match[1]), int(match[2])))
    return shapes


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not positive")
    return value


def parse_ints(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16], each positive."""
    return [positive_int(item) for item in text.split(",")]


def parse_bits(text: str) -> list[int]:
    """'4,3' -> [4, 3], each a supported bit width."""
    bits = parse_ints(text)
    bad = [b for b in bits if b not in SUPPORTED_BITS]
    if bad:
        raise argparse.ArgumentTypeError(f"bits {bad} not supported; choose from {SUPPORTED_BITS}")
    return bits


def parse_bytes(text: str) -> int:
    """'512MiB' -> 536870912; KiB/MiB/GiB are powers of two, KB/MB/GB powers of ten."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    unit = match[2].upper() if match else None
    if unit not in BYTE_UNITS or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive byte count such as 100000000, 100MB or 512MiB")
    return int(match[1]) * BYTE_UNITS[unit]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", type=parse_shapes, default=list(DEFAULT_SHAPES),
                        metavar="NxK[,NxK...]",
                        help="weight shapes, N out by K in (default: the Llama-3-8B and -70B "
                             "linear layers)")
    parser.add_argument("--m", type=parse_ints, default=list(DEFAULT_M), metavar="M[,M...]",
                        help="rows of activations (default: %(default)s)")
    parser.add_argument("--bits", type=parse_bits, default=list(DEFAULT_BITS),
                        metavar="B[,B...]", help="code widths (default: %(default)s)")
    parser.add_argument("--group-size", type=int, choices=SUPPORTED_GROUP_SIZES,
                        default=DEFAULT_GROUP_SIZE, help="k per scale (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default="float16",
                        help="activations and output, also the cuBLAS baseline's weights "
                             "(default: %(default)s)")
    parser.add_argument("--rotate-bytes", type=parse_bytes, default=None, metavar="BYTES",
                        help="bytes of distinct weight copies each timed graph cycles through, "
                             "e.g. 512MiB (default: twice the GPU's L2)")
    parser.add_argument("--replays", type=positive_int, default=DEFAULT_REPLAYS,
                        help="timed graph replays per measurement (default: %(default)s)")
    parser.add_argument("--graph-calls", type=positive_int, default=DEFAULT_GRAPH_CALLS,
                        help="calls each timed graph holds at least, the weight copies in turn "
                             "(default: %(default)s; 1: one call a copy, as up to cuflute 0.3.0)")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                        help="also time " + " and ".join(PEERS) + " where they import")
    parser.add_argument("--bcq", action=argparse.BooleanOptionalAction, default=True,
                        help=f"also time cuflute.bcq (binary-coding LUT-GEMM) at the same bits, "
                             f"for M <= {BCQ_MAX_M}")
    parser.add_argument("--dense-cache", action=argparse.BooleanOptionalAction, default=False,
                        help="time cuflute with cuflute.dense_cache on, without a practical limit: "
                             "where the tuned table measured cuBLAS over the dequantized weight "
                             "faster, that weight is held in 16 bits (2 N K bytes) and multiplied "
                             "by cuBLAS (default: off, as cuflute's own default)")
    parser.add_argument("--json", metavar="PATH", help="write metadata, rows and summary as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write one CSV line per shape, M and bits")
    parser.add_argument("--markdown", metavar="PATH",
                        help="write a BENCHMARKS.md-style report with GPU, date and versions")


# ----------------------------------------------------------------------------- arithmetic

def call_bytes(n: int, k: int, m: int, bits: int, group_size: int) -> int:
    """The fewest bytes one call moves: the packed weight, 16-bit activations in and output out."""
    return packed_nbytes(n, k, bits, group_size) + 2 * m * k + 2 * m * n


def dense_call_bytes(n: int, k: int, m: int) -> int:
    """The same for a 16-bit weight, as cuBLAS reads it."""
    return 2 * n * k + 2 * m * k + 2 * m * n


def rotation_copies(rotate_bytes: int, bytes_per_copy: int) -> int:
    """Distinct weight copies a graph cycles through, so none is still in L2 when it comes back."""
    return max(2, -(-rotate_bytes // bytes_per_copy))


@dataclass(frozen=True)
class Row:
    """One shape, M and bits. Times are microseconds per call; None: that peer did not run."""

    n: int
    k: int
    m: int
    bits: int
    group_size: int
    dtype: str
    bytes: int  # call_bytes
    us: float
    gbps: float  # bytes / us
    roofline: float  # gbps / measured copy bandwidth
    baseline_us: float  # cuBLAS on a 16-bit weight of the same shape, in `dtype`
    speedup: float  # baseline_us / us
    torch_int4_us: float | None
    torch_int4_x: float | None  # baseline_us / torch_int4_us
    bnb_nf4_us: float | None
    bnb_nf4_x: float | None
    bcq_us: float | None  # cuflute.bcq at the same bits; None: not run or M past its range
    bcq_x: float | None  # baseline_us / bcq_us
    path: str = "kernel"  # what cuflute ran: PATHS' values


# The dispatcher's pick -> Row.path
PATHS = {DENSE: "dense", DENSE_CACHED: "held W'"}


def peer_field(peer: str) -> str:
    """'torch-int4' -> 'torch_int4', the prefix of its fields in Row."""
    return peer.replace("-", "_")


def make_row(n: int, k: int, m: int, bits: int, group_size: int, dtype: str, us: float,
             baseline_us: float, peer_us: dict[str, float], copy_gbps: float,
             bcq_us: float | None = None, path: str = "kernel") -> Row:
    """A Row with the derived numbers; peer_us holds the peers that ran at this shape and M."""
    nbytes = dense_call_bytes(n, k, m) if path == PATHS[DENSE_CACHED] else \
        call_bytes(n, k, m, bits, group_size)
    gbps = nbytes / us / 1e3
    peers = {}
    for peer in PEERS:
        t = peer_us.get(peer)
        peers[f"{peer_field(peer)}_us"] = t
        peers[f"{peer_field(peer)}_x"] = None if t is None else baseline_us / t
    return Row(n=n, k=k, m=m, bits=bits, group_size=group_size, dtype=dtype, bytes=nbytes,
               us=us, gbps=gbps, roofline=gbps / copy_gbps, baseline_us=baseline_us,
               speedup=baseline_us / us, **peers, bcq_us=bcq_us,
               bcq_x=None if bcq_us is None else baseline_us / bcq_us, path=path)


def median_or_none(values) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(rows: list[Row]) -> list[dict]:
    """Per M and bits, in the order they were run: medians over the shapes."""
    summary = []
    for m, bits in dict.fromkeys((r.m, r.bits) for r in rows):
        group = [r for r in rows if (r.m, r.bits) == (m, bits)]
        entry = {"m": m, "bits": bits, "shapes": len(group),
                 "speedup": median_or_none(r.speedup for r in group),
                 "roofline": median_or_none(r.roofline for r in group)}
        for peer in PEERS:
            key = f"{peer_field(peer)}_x"
            entry[key] = median_or_none(getattr(r, key) for r in group)
        entry["bcq_x"] = median_or_none(r.bcq_x for r in group)
        summary.append(entry)
    return summary


# ----------------------------------------------------------------------------- formatting

def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def result_table(rows: list[Row], dtype: str, peers: list[str], bcq: bool = False,
                 path: bool = False):
    """(header, cells) of the main table; peers: the peer columns to show; bcq: show BCQ's;
    path: show what cuflute ran."""
    base = SHORT_DTYPE[dtype]
    header = ["N", "K", "M", "bits"] + (["path"] if path else []) + \
        ["us", "GB/s", "roofline", f"{base} us", f"x {base}"]
    if bcq:
        header += ["bcq us", "bcq x"]
    for peer in peers:
        header += [f"{peer} us", f"{peer} x"]
    cells = []
    for r in rows:
        line = [str(r.n), str(r.k), str(r.m), str(r.bits)] + ([r.path] if path else []) + \
            [fmt(r.us, ".1f"), fmt(r.gbps, ".0f"), fmt(r.roofline, ".2f"), fmt(r.baseline_us, ".1f"),
             fmt(r.speedup, ".2f")]
        if bcq:
            line += [fmt(r.bcq_us, ".1f"), fmt(r.bcq_x, ".2f")]
        for peer in peers:
            line += [fmt(getattr(r, f"{peer_field(peer)}_us"), ".1f"),
                     fmt(getattr(r, f"{peer_field(peer)}_x"), ".2f")]
        cells.append(line)
    return header, cells


def summary_table(summary: list[dict], dtype: str, peers: list[str], bcq: bool = False):
    """(header, cells) of the medians over shapes per M and bits."""
    base = SHORT_DTYPE[dtype]
    header = (["M", "bits", f"x {base}", "roofline"] + (["bcq x"] if bcq else [])
              + [f"{peer} x" for peer in peers])
    cells = [[str(s["m"]), str(s["bits"]), fmt(s["speedup"], ".2f"), fmt(s["roofline"], ".2f")]
             + ([fmt(s["bcq_x"], ".2f")] if bcq else [])
             + [fmt(s[f"{peer_field(peer)}_x"], ".2f") for peer in peers] for s in summary]
    return header, cells


def floor_table(shapes, ms, bits_list, group_size: int, gbps: float):
    """(header, cells): the time floor of each call at bandwidth `gbps`, and of cuBLAS fp16."""
    header = ["N", "K", "M", "bits", "MB/call", "floor us", "fp16 floor us", "ideal x fp16"]
    cells = []
    for n, k in shapes:
        for m in ms:
            for bits in bits_list:
                nbytes, dense = call_bytes(n, k, m, bits, group_size), dense_call_bytes(n, k, m)
                cells.append([str(n), str(k), str(m), str(bits), f"{nbytes / 1e6:.2f}",
                              f"{nbytes / gbps / 1e3:.2f}", f"{dense / gbps / 1e3:.2f}",
                              f"{dense / nbytes:.2f}"])
    return header, cells


def render_text(header: list[str], cells: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(line[i]) for line in cells]) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths))
                     for line in [header] + cells)


def render_markdown(header: list[str], cells: list[list[str]]) -> str:
    lines = [header, ["---:"] * len(header)] + cells
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


@dataclass(frozen=True)
class RunInfo:
    """Where and how a run measured: goes into the JSON and the Markdown report."""

    gpu: str
    sm_count: int
    l2_bytes: int
    copy_gbps: float  # device-to-device copy, bytes read + written
    date: str
    versions: dict  # package -> version, None where it does not import
    dtype: str
    group_size: int
    rotate_bytes: int
    replays: int
    graph_calls: int  # the fewest calls a timed graph holds (the copies in turn, repeated)
    peers: list  # the peers tried
    unavailable: dict  # peer -> why it has no numbers
    bcq: bool = False  # whether cuflute.bcq was timed beside
    dense_cache: bool = False  # whether cuflute ran with cuflute.dense_cache on (--dense-cache)


def rows_csv(rows: list[Row]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(asdict(rows[0])), lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    return out.getvalue()


def results_json(info: RunInfo, rows: list[Row]) -> str:
    return json.dumps({"info": asdict(info), "rows": [asdict(r) for r in rows],
                       "summary": summarize(rows)}, indent=2) + "\n"


def markdown_report(info: RunInfo, rows: list[Row]) -> str:
    versions = ", ".join(f"{name} {version or 'not installed'}"
                         for name, version in info.versions.items())
    lines = [
        "# cuflute benchmark",
        "",
        f"- GPU: {info.gpu}, {info.sm_count} SMs, {info.l2_bytes / 2**20:.0f} MiB L2",
        f"- Date: {info.date}",
        f"- Versions: {versions}",
        f"- Copy bandwidth measured in this run: {info.copy_gbps:.0f} GB/s "
        "(device-to-device, bytes read + written)",
        f"- {info.dtype} activations, group size {info.group_size}; weights rotated over "
        f"{info.rotate_bytes / 2**20:.0f} MiB of copies per method; median of {info.replays} "
        f"CUDA-graph replays of at least {info.graph_calls} calls (the copies in turn)",
        "- roofline = (packed weight + activations + output bytes) / time / copy bandwidth",
    ]
    if info.dense_cache:
        lines.append("- cuflute.dense_cache on (`--dense-cache`), without a practical limit: path "
                     "\"held W'\" is cuBLAS over the weight dequantized once and held in 16 bits "
                     "(2 N K bytes, counted in its bytes and roofline), where the tuned table "
                     "measured that faster than the LUT GEMM")
    lines += [
        "",
        render_markdown(*result_table(rows, info.dtype, info.peers, info.bcq, info.dense_cache)),
        "",
        "## Median over the shapes",
        "",
        render_markdown(*summary_table(summarize(rows), info.dtype, info.peers, info.bcq)),
    ]
    if info.unavailable:
        lines.append("")
    lines += [f"- {peer}: unavailable ({why})" for peer, why in info.unavailable.items()]
    return "\n".join(lines) + "\n"


def write_atomically(path: str, text: str) -> None:
    """A reader never sees half a file, and a failed run leaves the old one (STYLE.md 3)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


# ----------------------------------------------------------------------------- progress

class PlainProgress:
    """tqdm's face where tqdm is not installed: one stderr line per step."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def set_description(self, desc: str) -> None:
        print(f"[{self.done + 1}/{self.total}] {desc}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n

    def close(self) -> None:
        pass


def progress_bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return PlainProgress(total)
    return tqdm(total=total, file=sys.stderr, unit="method")


# ----------------------------------------------------------------------------- timing (GPU)

def gpu_skip_reason() -> str | None:
    """Why nothing can be timed here, or None when it can."""
    if not gpu_available():
        return "no CUDA GPU (or no CUDA libraries for CuPy) on this machine"
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed (it runs the CUDA graphs, events and cuBLAS baseline)"
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA GPU"
    return None


def median_event_ms(work, repeats: int) -> float:
    """Median milliseconds of work() on the current stream by CUDA events, after warm-up runs."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times_ms = []
    for _ in range(WARMUP_RUNS + repeats):
        start.record()
        work()
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    return statistics.median(times_ms[WARMUP_RUNS:])


def measure_copy_gbps(nbytes: int = COPY_BYTES) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the bytes read plus those written."""
    import torch

    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / median_event_ms(partial(dst.copy_, src), COPY_REPEATS) / 1e6


def capture_graph(fn, warmups):
    """A CUDA graph of ``fn()``, after each of ``warmups`` has run once on a side stream, as
    torch.cuda.graph asks: JIT compilation, module loads, cuBLAS handles and lazy allocations
    happen before the capture."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for warmup in warmups:
            warmup()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_repeats(copies: int, graph_calls: int) -> int:
    """How many times a timed graph runs the sequence of one call a copy: at least graph_calls calls."""
    return -(-graph_calls // copies)


def time_graph_us(calls: list, replays: int, graph_calls: int = DEFAULT_GRAPH_CALLS) -> float:
    """Median microseconds per call, the calls captured in sequence into one CUDA graph, the
    sequence repeated until the graph holds at least ``graph_calls`` of them."""
    repeats = graph_repeats(len(calls), graph_calls)

    def run_all():
        for _ in range(repeats):
            for call in calls:
                call()

    graph = capture_graph(run_all, calls)
    return median_event_ms(graph.replay, replays) * 1e3 / (repeats * len(calls))


def cuflute_calls(n, k, bits, group_size, dtype, copies):
    """make_calls(x) for cuflute over `copies` distinct random packed weights."""
    import torch

    device = torch.cuda.current_device()
    weights = [random_packed(n, k, bits, group_size, dtype, device=device, seed=seed)
               for seed in range(copies)]
    if weights[0].nbytes != packed_nbytes(n, k, bits, group_size):
        raise RuntimeError(f"random_packed made {weights[0].nbytes} bytes, the roofline counts "
                           f"{packed_nbytes(n, k, bits, group_size)}: {n=} {k=} {bits=}")

    def make_calls(x):
        # Outputs exist before capture, so the graph allocates nothing.
        return [partial(qgemm, x, w, out=x.new_empty((x.shape[0], n))) for w in weights]
    return make_calls


def cublas_calls(n, k, dtype, copies):
    """make_calls(x) for torch.mm(x, w.T) over distinct random [N, K] weights: nn.Linear's layout."""
    import torch

    weights = [torch.randn(n, k, dtype=getattr(torch, dtype), device="cuda") for _ in range(copies)]

    def make_calls(x):
        return [partial(torch.mm, x, w.t(), out=x.new_empty((x.shape[0], n))) for w in weights]
    return make_calls


def torch_int4_calls(n, k, group_size, copies):
    """make_calls(x) for aten._weight_int4pack_mm (tinygemm): bf16 activations, asymmetric int4."""
    import torch

    packs = []
    for _ in range(copies):
        # Since torch 2.5 the packer takes [N, K/2] uint8, two 4-bit codes a byte: random
        # bytes are random codes.
        codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        weight = torch.ops.aten._convert_weight_to_int4pack(codes, TORCH_INT4_INNER_K_TILES)
        scales_and_zeros = torch.rand(k // group_size, n, 2, dtype=torch.bfloat16, device="cuda")
        packs.append((weight, scales_and_zeros))

    def make_calls(x):
        x = x.to(torch.bfloat16)
        return [partial(torch.ops.aten._weight_int4pack_mm, x, w, group_size, sz)
                for w, sz in packs]
    return make_calls


def bnb_nf4_calls(n, k, group_size, dtype, copies):
    """make_calls(x) for bitsandbytes' matmul_4bit over NF4 weights with blocks of group_size."""
    import bitsandbytes as bnb
    import torch

    weights = [bnb.functional.quantize_4bit(
                   torch.randn(n, k, dtype=getattr(torch, dtype), device="cuda"),
                   blocksize=group_size, quant_type="nf4")
               for _ in range(copies)]

    def make_calls(x):
        return [partial(bnb.matmul_4bit, x, w.t(), quant_state=state) for w, state in weights]
    return make_calls


def bcq_calls(n, k, bits, group_size, dtype, copies):
    """make_calls(x) for cuflute.bcq over `copies` distinct random packed BCQ weights."""
    import torch

    device = torch.cuda.current_device()
    weights = [bcq_random_packed(n, k, bits, group_size, dtype, device=device, seed=seed)
               for seed in range(copies)]

    def make_calls(x):
        return [partial(bcq_gemm, x, w, out=x.new_empty((x.shape[0], n))) for w in weights]
    return make_calls


def time_method(make_calls, xs: dict, replays: int, graph_calls: int, bar,
                label: str) -> dict[int, float]:
    """{M: median us per call}; make_calls(x) gives one call per weight copy."""
    times = {}
    for m, x in xs.items():
        bar.set_description(f"{label} M={m}")
        times[m] = time_graph_us(make_calls(x), replays, graph_calls)
    bar.update()
    return times


def time_peer(peer: str, build, xs: dict, replays: int, graph_calls: int, bar, label: str,
              unavailable: dict) -> dict[int, float]:
    """time_method(build(), ...), except that a peer that raises is noted, never fatal."""
    try:
        return time_method(build(), xs, replays, graph_calls, bar, label)
    except Exception as exc:  # a peer's API drift or shape limits are not this run's failure
        unavailable.setdefault(peer, f"{label}: {first_line(exc)}")
        bar.update()
        return {}


def importable_peers() -> tuple[list[str], dict[str, str]]:
    """The peers that import here, and why each other one is skipped."""
    import torch

    peers, skipped = [], {}
    if hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        peers.append("torch-int4")
    else:
        skipped["torch-int4"] = f"torch {torch.__version__} has no aten._weight_int4pack_mm"
    try:
        import bitsandbytes  # noqa: F401
        peers.append("bnb-nf4")
    except Exception as exc:  # a broken CUDA setup raises more than ImportError
        skipped["bnb-nf4"] = first_line(exc)
    return peers, skipped


def release_memory() -> None:
    """Hand cached blocks back, so the next shape's copies fit: torch and CuPy pool separately."""
    import cupy
    import torch

    torch.cuda.empty_cache()
    cupy.get_default_memory_pool().free_all_blocks()


def package_versions() -> dict:
    import cupy
    import torch

    try:
        import bitsandbytes
        bnb_version = bitsandbytes.__version__
    except Exception:  # as in importable_peers
        bnb_version = None
    # str(): torch's version is a str subclass that YAML and JSON writers may not know
    return {"cuflute": __version__, "torch": str(torch.__version__), "cuda": torch.version.cuda,
            "cupy": cupy.__version__, "bitsandbytes": bnb_version}


def cuflute_path(n: int, k: int, m: int, bits: int, group_size: int, dtype: str, gpu: str,
                 held: bool) -> str:
    """What qgemm runs for this problem on GPU ``gpu`` (Row.path); held: dense_cache is on."""
    pick = select_config(m, n, k, bits, kernel_group(group_size, k), dtype, gpu, dense_cache=held)
    return PATHS.get(pick, "kernel")


def benchmark(args: argparse.Namespace) -> tuple[RunInfo, list[Row]]:
    """Time every shape, M and bits; the peers' failures land in RunInfo.unavailable."""
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    limit = dense_cache.limit()
    dense_cache.set_limit(props.total_memory if args.dense_cache else 0)
    try:
        return _benchmark(args, props)
    finally:
        dense_cache.set_limit(limit)


def _benchmark(args: argparse.Namespace, props) -> tuple[RunInfo, list[Row]]:
    import torch

    rotate = args.rotate_bytes or 2 * props.L2_cache_size
    copy_gbps = measure_copy_gbps()
    release_memory()
    peers, unavailable = importable_peers() if args.peers else ([], {})
    base = SHORT_DTYPE[args.dtype]
    bcq_ms = [m for m in args.m if m <= BCQ_MAX_M] if args.bcq else []
    bar = progress_bar(len(args.shapes) * (1 + len(args.bits) * (1 + bool(bcq_ms)) + len(peers)))
    rows = []
    for n, k in args.shapes:
        four_bit = rotation_copies(rotate, n * k // 2)
        xs = {m: torch.randn(m, k, dtype=getattr(torch, args.dtype), device="cuda")
              for m in args.m}
        label = f"{n}x{k}"
        baseline = time_method(
            cublas_calls(n, k, args.dtype, rotation_copies(rotate, 2 * n * k)),
            xs, args.replays, args.graph_calls, bar, f"{label} cuBLAS {base}")
        builds = {
            "torch-int4": lambda: torch_int4_calls(n, k, args.group_size, four_bit),
            "bnb-nf4": lambda: bnb_nf4_calls(n, k, args.group_size, args.dtype, four_bit),
        }
        peer_us = {peer: time_peer(peer, builds[peer], xs, args.replays, args.graph_calls, bar,
                                   f"{label} {peer}", unavailable) for peer in peers}
        release_memory()
        ours = {}
        for bits in args.bits:
            copies = rotation_copies(rotate, packed_nbytes(n, k, bits, args.group_size))
            ours[bits] = time_method(
                cuflute_calls(n, k, bits, args.group_size, args.dtype, copies),
                xs, args.replays, args.graph_calls, bar, f"{label} cuflute {bits}-bit")
            release_memory()
        bcq = {}
        for bits in args.bits if bcq_ms else []:
            copies = rotation_copies(rotate, bcq_packed_nbytes(n, k, bits, args.group_size))
            bcq[bits] = time_method(
                bcq_calls(n, k, bits, args.group_size, args.dtype, copies),
                {m: xs[m] for m in bcq_ms}, args.replays, args.graph_calls, bar,
                f"{label} cuflute.bcq {bits}-bit")
            release_memory()
        for m in args.m:
            at_m = {peer: times[m] for peer, times in peer_us.items() if m in times}
            rows += [make_row(n, k, m, bits, args.group_size, args.dtype, ours[bits][m],
                              baseline[m], at_m, copy_gbps, bcq.get(bits, {}).get(m),
                              cuflute_path(n, k, m, bits, args.group_size, args.dtype, props.name,
                                           args.dense_cache))
                     for bits in args.bits]
        del xs
        release_memory()
    bar.close()
    info = RunInfo(gpu=props.name, sm_count=props.multi_processor_count,
                   l2_bytes=props.L2_cache_size, copy_gbps=copy_gbps,
                   date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   versions=package_versions(), dtype=args.dtype, group_size=args.group_size,
                   rotate_bytes=rotate, replays=args.replays,
                   graph_calls=args.graph_calls, peers=peers,
                   unavailable=unavailable, bcq=args.bcq, dense_cache=args.dense_cache)
    return info, rows


# ----------------------------------------------------------------------------- entry points

def print_without_gpu(args: argparse.Namespace, reason: str) -> None:
    methods = (["cuflute", "cuBLAS"] + (list(PEERS) if args.peers else [])
               + (["cuflute.bcq"] if args.bcq else []))
    files = [path for path in (args.json, args.csv, args.markdown) if path]
    print(f"No GPU available: {reason}.")
    print(f"Skipped the copy-bandwidth measurement and all timings ({', '.join(methods)}).")
    if files:
        print(f"Not written, since nothing was measured: {', '.join(files)}.")
    print()
    print(f"Byte floor per call at a NOMINAL {NOMINAL_GBPS / 1e3:.1f} TB/s (an H100's copy "
          "bandwidth; not measured here), group size "
          f"{args.group_size}, 16-bit activations and output:")
    print(render_text(*floor_table(args.shapes, args.m, args.bits, args.group_size,
                                   NOMINAL_GBPS)))


def run(args: argparse.Namespace) -> int:
    reason = gpu_skip_reason()
    if reason is not None:
        print_without_gpu(args, reason)
        return 0
    info, rows = benchmark(args)
    print(render_text(*result_table(rows, info.dtype, info.peers, info.bcq, info.dense_cache)))
    print()
    print("Median over the shapes:")
    print(render_text(*summary_table(summarize(rows), info.dtype, info.peers, info.bcq)))
    for peer, why in info.unavailable.items():
        print(f"{peer}: unavailable ({why})")
    print(f"{info.gpu}; copy bandwidth measured {info.copy_gbps:.0f} GB/s; roofline = bytes / "
          "time / that; weights rotated over "
          f"{info.rotate_bytes / 2**20:.0f} MiB; median of {info.replays} graph replays of at least "
          f"{info.graph_calls} calls.")
    for path, text in ((args.json, lambda: results_json(info, rows)),
                       (args.csv, lambda: rows_csv(rows)),
                       (args.markdown, lambda: markdown_report(info, rows))):
        if path:
            write_atomically(path, text())
            print(f"wrote {path}")
    return 0
