"""``python -m cuflute e2e``: greedy-decoding tokens/s of a Llama-3-8B-shaped transformers model,
fp16 against cuflute 4-bit and 3-bit.

The model is a transformers ``LlamaForCausalLM`` with Llama-3-8B's shapes and random weights
drawn on the GPU (normal, std 0.02). For cuflute every linear layer of the decoder becomes a
``QuantizedLinear`` over ``random_packed`` codes and scales (random, not zero): decoding speed
does not depend on the values, and quantizing 8B weights with the NumPy quantizer would take
minutes. The embeddings and ``lm_head`` stay fp16 in every variant. Unless ``--no-fuse``, each
MLP's gate and up projections are one layer (cuflute.fusion) in every variant, fp16 included.

Method: per variant and batch size, a fresh ``StaticCache``; one decode step (embedding, the
32 layers, ``lm_head``, argmax, the token fed back and the position advanced, all on the GPU)
is captured in one CUDA graph after eager warm-up steps; tokens/s = batch * steps / the time of
``steps`` replays (CUDA events), after warm-up replays. Attention runs over the whole static
cache with a mask, the same for every variant. ``--compile`` puts the step through
``torch.compile`` before the capture, so that Inductor fuses the small kernels around the
linear layers (norms, rotary embedding, activation), for every variant alike.

Beside the step, one more graph calls each decoder linear layer once on a static input of the
batch's size: the share of the step that the weights' format decides.
"""
from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

from .bench import capture_graph

# Llama-3-8B.
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
GROUP_SIZE = 128
EAGER_WARMUP_STEPS = 3
GRAPH_WARMUP_REPLAYS = 5
HOST_TIMING_CALLS = 200
HOST_TIMING_ROUNDS = 15
# GPU cycles of a sleep kernel that keeps the GPU busy while host calls are timed (~0.1 s).
BUSY_GPU_CYCLES = 200_000_000
LINEAR_REPLAYS = 20


@dataclass(frozen=True)
class Result:
    variant: str
    batch: int
    ms_per_step: float
    linears_ms: float  # one call of every decoder linear layer

    @property
    def tokens_per_s(self) -> float:
        return self.batch * 1e3 / self.ms_per_step


def build_model(layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers})
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.float16, attn_implementation="sdpa")
    generator = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def decoder_linears(model):
    """(name, module) of the linear layers of the decoder blocks (not lm_head)."""
    from torch import nn

    from .torch import QuantizedLinear

    return [(name, m) for name, m in model.named_modules()
            if name.startswith("model.layers.") and isinstance(m, (nn.Linear, QuantizedLinear))]


def quantize_randomly(model, bits: int, seed: int) -> None:
    """Every decoder linear layer -> a QuantizedLinear over random codes and scales."""
    from .packing import random_packed
    from .torch import QuantizedLinear

    for i, (name, m) in enumerate(decoder_linears(model)):
        packed = random_packed(m.out_features, m.in_features, bits, GROUP_SIZE, "float16",
                               device=0, seed=seed + i)
        model.set_submodule(name, QuantizedLinear.from_packed(packed))


def compile_kernels(model, batches, workers: int = 8) -> None:
    """Compile the kernels the decode steps will launch, in parallel, before any timing."""
    import torch

    layers = {(m.out_features, m.in_features): m for _, m in decoder_linears(model)}

    def first_call(job):
        layer, batch = job
        layer(torch.randn(batch, layer.in_features, dtype=torch.float16, device="cuda"))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(first_call, [(layer, b) for layer in layers.values() for b in batches]))
    torch.cuda.synchronize()



def _replay_ms(graph, warmups: int, replays: int) -> float:
    import torch

    for _ in range(warmups):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def time_linears(model, batch: int) -> float:
    """Milliseconds of one call of every decoder linear layer on a [batch, K] input."""
    import torch

    layers = [m for _, m in decoder_linears(model)]
    xs = {m.in_features: torch.randn(batch, m.in_features, dtype=torch.float16, device="cuda")
          for m in layers}

    @torch.no_grad()
    def calls():
        for m in layers:
            m(xs[m.in_features])

    graph = capture_graph(calls, [calls])
    ms = _replay_ms(graph, GRAPH_WARMUP_REPLAYS, LINEAR_REPLAYS)
    del graph
    return ms


def time_decoding(model, batch: int, steps: int, seed: int, compile_step: bool = False) -> float:
    """Milliseconds per decode step, from CUDA-graph replays of one step."""
    import torch
    from transformers import StaticCache

    cache_len = EAGER_WARMUP_STEPS + GRAPH_WARMUP_REPLAYS + steps
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda", generator=generator)
    position = torch.zeros(1, dtype=torch.long, device="cuda")
    cache_slots = torch.arange(cache_len, device="cuda")

    @torch.no_grad()
    def step():
        # The mask lets each query see the slots written so far, itself included.
        mask = (cache_slots <= position).view(1, 1, 1, cache_len).expand(batch, 1, 1, cache_len)
        logits = model(input_ids=tokens, position_ids=position.view(1, 1).expand(batch, 1),
                       attention_mask=mask, past_key_values=cache, use_cache=True).logits
        tokens.copy_(logits[:, -1].argmax(-1, keepdim=True))
        position.add_(1)

    # The first step runs eagerly: it allocates the cache outside any compiled region.
    run = torch.compile(step, dynamic=False) if compile_step else step
    graph = capture_graph(run, [step] + [run] * (EAGER_WARMUP_STEPS - 1))
    ms = _replay_ms(graph, GRAPH_WARMUP_REPLAYS, steps)
    if position.item() != cache_len:
        raise RuntimeError(f"decoded {position.item()} positions, expected {cache_len}")
    del graph
    return ms


def host_time_us(layer, x) -> dict[str, float]:
    """Host microseconds of one eager call, each path (and torch's own x + x for scale): the
    median over rounds of back-to-back calls issued while a sleep kernel keeps the GPU busy, so
    that only the host is timed. The garbage collector is paused while a round runs (it collects
    before each), as timeit does: a collection's cost grows with every Python object the process
    holds, which is not the op's (docs/PERF_NOTES.md: the e2e model alive cost the op 4 to 6 us
    a call, the collector about 2 of them)."""
    import torch

    from .gemm import qgemm

    packed = layer.packed()
    args = (layer.qweight, layer.scales, layer.pair_lut, layer.out_features,
            layer.in_features, layer.bits, layer.group_size, packed.dtype)
    paths = {
        "cuflute.qgemm(x, packed)": lambda: qgemm(x, packed),
        "torch.ops.cuflute.qgemm": lambda: torch.ops.cuflute.qgemm(x, *args),
        "QuantizedLinear(x)": lambda: layer(x),
        # for scale: an eager torch op that allocates its output and launches one kernel
        "x + x (torch)": lambda: x + x,
    }
    # Round-robin over the paths, so that the host's drift (clocks, other tenants) reaches all.
    rounds = {name: [] for name in paths}
    collecting = gc.isenabled()
    gc.disable()
    try:
        for _ in range(HOST_TIMING_ROUNDS):
            for name, call in paths.items():
                torch.cuda.synchronize()
                gc.collect()
                torch.cuda._sleep(BUSY_GPU_CYCLES)
                t0 = time.perf_counter()
                for _ in range(HOST_TIMING_CALLS):
                    call()
                rounds[name].append((time.perf_counter() - t0) / HOST_TIMING_CALLS * 1e6)
    finally:
        if collecting:
            gc.enable()
    torch.cuda.synchronize()
    return {name: statistics.median(r) for name, r in rounds.items()}


def markdown(results: list[Result], header: str, bits: list[int]) -> str:
    """The tokens/s table, then where the step's time goes."""
    by = {(r.variant, r.batch): r for r in results}
    head = "| batch | fp16 tokens/s |" + "".join(f" {b}-bit tokens/s | {b}-bit vs fp16 |" for b in bits)
    lines = [header, "", head, "| ---: | ---: |" + " ---: | ---: |" * len(bits)]
    for batch in sorted({r.batch for r in results}):
        base = by[("fp16", batch)]
        row = f"| {batch} | {base.tokens_per_s:.1f} |"
        for b in bits:
            r = by[(f"{b}-bit", batch)]
            row += f" {r.tokens_per_s:.1f} | {r.tokens_per_s / base.tokens_per_s:.2f}x |"
        lines.append(row)
    lines += ["", "| batch | variant | ms per step | decoder linears, ms | rest of the step, ms |",
              "| ---: | --- | ---: | ---: | ---: |"]
    for r in sorted(results, key=lambda r: r.batch):
        lines.append(f"| {r.batch} | {r.variant} | {r.ms_per_step:.3f} | {r.linears_ms:.3f} | "
                     f"{r.ms_per_step - r.linears_ms:.3f} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, action="append",
                        help="batch size; repeatable (default: 1 and 16)")
    parser.add_argument("--bits", type=int, action="append", choices=(2, 3, 4),
                        help="cuflute code width; repeatable (default: 4 and 3)")
    parser.add_argument("--steps", type=int, default=128, help="timed decode steps (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=LLAMA3_8B["num_hidden_layers"],
                        help="decoder layers (default: Llama-3-8B's %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                        help="fuse each MLP's gate and up projections, in every variant (default: on)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step before capturing it")
    parser.add_argument("--markdown", type=str, default=None, metavar="PATH",
                        help="also write the table as Markdown (GPU and date in its header)")


def run(args: argparse.Namespace) -> int:
    from .gemm import gpu_available

    if not gpu_available():
        print("no CUDA GPU here: the end-to-end decoding benchmark needs one")
        return 1
    import torch
    import transformers

    from .fusion import fuse_gated_mlps
    from .packing import random_packed
    from .torch import QuantizedLinear

    batches, bits = args.batch or [1, 16], args.bits or [4, 3]
    model = build_model(args.layers, args.seed)
    if args.fuse:
        fuse_gated_mlps(model)
        torch.cuda.empty_cache()
    results = []
    for variant in ["fp16", *(f"{b}-bit" for b in bits)]:
        if variant != "fp16":
            quantize_randomly(model, int(variant.split("-")[0]), args.seed)
            torch.cuda.empty_cache()
            compile_kernels(model, batches)
        for batch in batches:
            ms = time_decoding(model, batch, args.steps, args.seed, args.compile)
            results.append(Result(variant, batch, ms, time_linears(model, batch)))
            print(f"{variant:>6} batch {batch:>3}: {ms:7.3f} ms/step, "
                  f"{results[-1].tokens_per_s:9.1f} tokens/s, decoder linears "
                  f"{results[-1].linears_ms:6.3f} ms", flush=True)
    # The decoding model is freed first: the host time is the op's, not that of a process
    # holding 8B parameters and compiled graphs.
    del model
    gc.collect()
    torch.cuda.empty_cache()
    small = QuantizedLinear.from_packed(random_packed(512, 512, 4, GROUP_SIZE, "float16", device=0))
    host = host_time_us(small, torch.randn(1, 512, dtype=torch.float16, device="cuda"))

    gpu = torch.cuda.get_device_name()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    header = (f"{gpu}, {date}; torch {torch.__version__}, transformers {transformers.__version__}, "
              f"Python {platform.python_version()}. Llama-3-8B shapes ({args.layers} layers), "
              f"random weights (cuflute: random packed codes and scales, g={GROUP_SIZE}, NF table; "
              "embeddings and lm_head fp16 in all variants; "
              f"{'gate and up projections fused' if args.fuse else 'projections unfused'}); "
              "greedy decoding from a "
              f"StaticCache of {EAGER_WARMUP_STEPS + GRAPH_WARMUP_REPLAYS + args.steps} slots, one "
              f"CUDA graph per decode step{' (torch.compile inside)' if args.compile else ''}, "
              f"{args.steps} timed steps.")
    table = markdown(results, header, bits)
    print()
    print(table)
    print("host time of one eager call (1x512 @ 512x512 4-bit, GPU kept busy, median of "
          f"{HOST_TIMING_ROUNDS} rounds of {HOST_TIMING_CALLS} calls):")
    for name, us in host.items():
        print(f"  {name:<28} {us:6.1f} us")
    if args.markdown:
        host_lines = "".join(f"- {name}: {us:.1f} us\n" for name, us in host.items())
        with open(args.markdown, "w") as f:
            f.write(table + "\nHost time of one eager call:\n\n" + host_lines)
    return 0
