"""``python -m cuflute {bench,tune,compile,compile-check,eval-quality,quantize,e2e}``."""
from __future__ import annotations

import argparse


def _compile(args: argparse.Namespace) -> int:
    from .gemm import gpu_available
    from .kernels import precompile

    if not gpu_available():
        print("no CUDA GPU here: nothing to compile for; `cuflute compile-check` compiles with "
              "NVRTC for the target architectures without one")
        return 1
    compiled, too_big = precompile(args.device, workers=args.workers)
    print(f"compiled {compiled} specializations for cuda:{args.device}; {too_big} need more "
          f"shared memory than it has and never run there")
    try:
        from .torch import native_launcher
    except ImportError:
        return 0  # no torch: nothing more to build
    built = native_launcher() is not None
    print(f"torch.ops.cuflute.qgemm's C++ launcher: {'built' if built else 'not built (see the warning)'}")
    return 0


def _compile_check(args: argparse.Namespace) -> int:
    from .kernels import TARGET_ARCHS, arch_option, every_spec, nvrtc_compile

    failures = 0
    for arch in args.arch or TARGET_ARCHS:
        usages = nvrtc_compile(every_spec(arch), arch)
        spilled = [u for u in usages if u.spill_stores or u.spill_loads or u.stack_frame]
        failures += len(spilled)
        print(f"{arch_option(arch).removeprefix('-arch=')}: {len(usages)} specializations, registers "
              f"{min(u.registers for u in usages)}..{max(u.registers for u in usages)}, "
              f"{len(spilled)} with local memory")
        for u in spilled:
            print(f"  {u.name}: stack {u.stack_frame} B, spill stores {u.spill_stores} B, "
                  f"spill loads {u.spill_loads} B")
    return 1 if failures else 0


def main(argv=None) -> int:
    from . import bench, e2e, hf, quality, tune

    parser = argparse.ArgumentParser(prog="cuflute", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    bench_parser = commands.add_parser("bench", help="time qgemm against cuBLAS fp16 and the peers")
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(run=bench.run)

    tune_parser = commands.add_parser(
        "tune", help="time the tile configs of a sweep file, write tuning/configs/<gpu>.yaml")
    tune.add_arguments(tune_parser)
    tune_parser.set_defaults(run=tune.run)

    compile_parser = commands.add_parser("compile", help="JIT-compile every kernel for a GPU")
    compile_parser.add_argument("--device", type=int, default=0)
    compile_parser.add_argument("--workers", type=int, default=8)
    compile_parser.set_defaults(run=_compile)

    check_parser = commands.add_parser(
        "compile-check", help="compile every kernel with NVRTC (no GPU needed), report spills")
    check_parser.add_argument("--arch", type=int, action="append",
                              help="e.g. 90; repeatable (default: 80 86 89 90)")
    check_parser.set_defaults(run=_compile_check)

    quality_parser = commands.add_parser(
        "eval-quality", help="quantize all-MiniLM-L6-v2 with each method, report the errors")
    quality.add_arguments(quality_parser)
    quality_parser.set_defaults(run=quality.run)

    quantize_parser = commands.add_parser(
        "quantize", help="quantize a Hugging Face Llama checkpoint directory for cuflute")
    hf.add_arguments(quantize_parser)
    quantize_parser.set_defaults(run=hf.run)

    e2e_parser = commands.add_parser(
        "e2e", help="decoding tokens/s of a Llama-3-8B-shaped model, fp16 against cuflute")
    e2e.add_arguments(e2e_parser)
    e2e_parser.set_defaults(run=e2e.run)

    args = parser.parse_args(argv)
    return args.run(args)
