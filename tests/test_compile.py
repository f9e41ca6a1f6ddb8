"""NVRTC compiles every kernel specialization of both families for each target architecture:
no GPU needed."""
import os
from concurrent.futures import ProcessPoolExecutor

import pytest

from cuflute.kernels import TARGET_ARCHS, every_spec, nvrtc_compile, parse_ptxas_log

pytest.importorskip("cupy_backends.cuda.libs.nvrtc")


def _slices(specs: list, parts: int) -> list[list]:
    size = -(-len(specs) // parts)
    return [specs[i:i + size] for i in range(0, len(specs), size)]


@pytest.fixture(scope="module")
def compiled():
    """{arch: (specs, their ResourceUsage)}: minutes of NVRTC per arch, so the (arch, slice of
    the specs) programs compile in parallel processes, one per core."""
    workers = os.cpu_count() or 1
    parts = max(1, workers // len(TARGET_ARCHS))
    specs = {arch: every_spec(arch) for arch in TARGET_ARCHS}  # the cluster configs on sm_90 only
    slices = {arch: _slices(arch_specs, parts) for arch, arch_specs in specs.items()}
    with ProcessPoolExecutor(min(workers, sum(map(len, slices.values())))) as pool:
        jobs = {arch: [pool.submit(nvrtc_compile, part, arch) for part in arch_slices]
                for arch, arch_slices in slices.items()}
        return {arch: (specs[arch], [u for job in arch_jobs for u in job.result()])
                for arch, arch_jobs in jobs.items()}


@pytest.mark.parametrize("arch", TARGET_ARCHS)
def test_every_specialization_compiles_without_local_memory(arch, compiled):
    specs, usages = compiled[arch]
    assert len(usages) == len(specs)
    for spec, usage in zip(specs, usages):
        detail = f"sm_{arch} {spec.name_expression}: {usage}"
        assert usage.spill_stores == 0 and usage.spill_loads == 0, detail
        assert usage.stack_frame == 0, detail
        assert usage.registers <= 65536 // spec.threads, detail  # one CTA must fit an SM
        assert usage.shared_bytes == 0, detail  # all of it dynamic: spec.shared_bytes


def test_the_written_cubin_is_a_whole_elf_file(tmp_path):
    """Every header table the ELF header points at lies inside the file (cuobjdump reads them)."""
    import struct

    from cuflute.kernels import DequantSpec

    path = tmp_path / "k.cubin"
    nvrtc_compile([DequantSpec(4, 128, "float16")], 90, str(path))
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF"
    ph_offset, sh_offset = struct.unpack_from("<QQ", data, 0x20)
    ph_size, ph_count, sh_size, sh_count = struct.unpack_from("<HHHH", data, 0x36)
    assert ph_offset + ph_size * ph_count <= len(data)
    assert sh_offset + sh_size * sh_count <= len(data)


def test_parse_ptxas_log_reads_spills():
    log = (
        "ptxas info    : Compiling entry function '_Z1fv' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1fv\n"
        "ptxas         .     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem\n"
    )
    (usage,) = parse_ptxas_log(log)
    assert (usage.name, usage.registers, usage.stack_frame, usage.spill_stores,
            usage.spill_loads, usage.shared_bytes) == ("_Z1fv", 255, 16, 8, 4, 2048)
