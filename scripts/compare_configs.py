"""Time tile configs side by side (a development tool; the tuner picks winners, this shows all).

python scripts/compare_configs.py --shapes 8192x8192,4096x4096 --m 1,16 --bits 4,3 \
    --configs nt1_mt1_wk8_s2,nt2_mt1_wk4_s2_xs [--extra nt1_mt1_wk8_s4 ...]

--configs may name "dense" (dequantize, then cuBLAS); --extra names configs outside TILE_CONFIGS
(compiled on the fly) to try before adding them.
Each config's output is first checked against the default config's. Prints us per call
(CUDA-graph replays over rotated weights, as the benchmark) and the fraction of the copy
roofline, one line per shape, M and bits. --rounds R times every column R times, in turn, each
round starting one column further on, and prints each column's median: one config's time drifted
6 to 13% within one command on the H100 (docs/PERF_NOTES.md v39), so an A/B of a few percent
wants R >= 3.
"""
import argparse
import statistics
from functools import partial

import torch

from cuflute import bench, dispatch, kernels, qgemm
from cuflute.packing import packed_nbytes, random_packed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", type=bench.parse_shapes, default=list(bench.DEFAULT_SHAPES))
    parser.add_argument("--m", type=bench.parse_ints, default=[1, 4, 16])
    parser.add_argument("--bits", type=bench.parse_bits, default=[4, 3])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--configs", default=",".join(str(c) for c in kernels.TILE_CONFIGS))
    parser.add_argument("--extra", default="")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--graph-calls", type=int, default=bench.DEFAULT_GRAPH_CALLS)
    parser.add_argument("--rounds", type=bench.positive_int, default=1)
    args = parser.parse_args()

    extra = [kernels.tile_config_from_name(c) for c in args.extra.split(",") if c]
    kernels.TILE_CONFIGS = kernels.TILE_CONFIGS + tuple(extra)  # admitted here, not in the library
    configs = [dispatch.parse_config(c) for c in args.configs.split(",") if c] + extra
    kernels.precompile(0, [kernels.KernelSpec(b, args.group_size, "float16", c) for b in args.bits
                           for c in configs if c != dispatch.DENSE], workers=16)
    props = torch.cuda.get_device_properties(0)
    rotate = 2 * props.L2_cache_size
    copy_gbps = bench.measure_copy_gbps()
    print(f"{props.name}: copy {copy_gbps:.0f} GB/s")
    print("N K M bits | " + " | ".join(str(c) for c in configs) + " | default | fp16")
    for n, k in args.shapes:
        xs = {m: torch.randn(m, k, dtype=torch.float16, device="cuda") for m in args.m}
        dense = [torch.randn(n, k, dtype=torch.float16, device="cuda")
                 for _ in range(bench.rotation_copies(rotate, 2 * n * k))]
        for bits in args.bits:
            copies = bench.rotation_copies(rotate, packed_nbytes(n, k, bits, args.group_size))
            weights = [random_packed(n, k, bits, args.group_size, "float16", device=0, seed=s)
                       for s in range(copies)]
            for m, x in xs.items():
                expect = qgemm(x, weights[0]).float()
                columns = []  # the calls of each config, the default (None), then cuBLAS fp16
                for config in configs + [None]:
                    got = qgemm(x, weights[0], config=config).float()
                    err = ((got - expect).norm() / expect.norm()).item()
                    if not err < 2e-3:  # configs differ only in fp32 summation order
                        raise RuntimeError(f"{config} disagrees with the default: {err:.2e} at {n=} {k=} {m=} {bits=}")
                    columns.append([partial(qgemm, x, w, out=x.new_empty(m, n), config=config) for w in weights])
                columns.append([partial(torch.mm, x, w.t()) for w in dense])
                times = [[] for _ in columns]
                for r in range(args.rounds):
                    for i in [(r + j) % len(columns) for j in range(len(columns))]:
                        times[i].append(bench.time_graph_us(columns[i], args.replays, args.graph_calls))
                *us, fp16 = [statistics.median(t) for t in times]
                roofline = [bench.call_bytes(n, k, m, bits, args.group_size) / t / 1e3 / copy_gbps for t in us]
                cells = [f"{t:7.1f} ({f:.2f})" for t, f in zip(us, roofline)]
                print(f"{n} {k} {m} {bits} | " + " | ".join(cells) + f" | {fp16:7.1f}", flush=True)
            del weights
            bench.release_memory()
        del dense
        bench.release_memory()


if __name__ == "__main__":
    main()
