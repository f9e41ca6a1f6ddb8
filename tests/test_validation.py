"""Errors a user meets before any GPU work: these run without a GPU."""
import numpy as np
import pytest

import cuflute


def _packed():
    return cuflute.pack(cuflute.quantize(np.ones((16, 256)), group_size=128))


def test_numpy_input_is_a_type_error():
    with pytest.raises(TypeError, match="NumPy array on the host"):
        cuflute.qgemm(np.ones((1, 256), dtype=np.float16), _packed())


def test_other_input_is_a_type_error():
    with pytest.raises(TypeError, match="CuPy array or a CUDA torch tensor, got list"):
        cuflute.qgemm([[1.0] * 256], _packed())


def test_torch_cpu_tensor_is_a_type_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="cuflute needs a CUDA tensor"):
        cuflute.qgemm(torch.ones(1, 256, dtype=torch.float16), _packed())


def test_import_touches_no_gpu():
    import subprocess
    import sys

    code = ("import sys, cuflute; "
            "assert 'cupy' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gpu_available_is_false_not_an_error_without_a_gpu():
    assert cuflute.gpu_available() in (True, False)


@pytest.mark.parametrize("shape, strides, expected", [
    ((5, 16), (16, 1), 16),  # contiguous
    ((5, 16), (32, 1), 32),  # a column slice of a wider matrix
    ((2, 3, 16), (48, 16, 1), 16),  # leading dims that flatten
    ((3, 1, 16), (64, 16, 1), 64),  # a size-1 dim's stride does not matter
    ((1, 1, 16), (7, 3, 1), 16),  # one row: its stride is never used
    ((2, 3, 16), (64, 16, 1), None),  # rows 3 apart in one dim, 4 in the next: no one stride
    ((5, 16), (1, 5), None),  # transposed: K is not contiguous
])
def test_row_stride_of_flattened_leading_dims(shape, strides, expected):
    from cuflute.interop import _row_stride

    assert _row_stride(shape, strides) == expected, f"{shape=} {strides=}"


def test_param_block_points_the_driver_at_each_argument():
    """cuLaunchKernelEx reads parameter i from pointers[i]: 8 bytes for an address, the low 4
    bytes for an int."""
    import ctypes

    from cuflute.gemm import _ParamBlock

    block = _ParamBlock()
    args = (0x7F00_1234_5670, 4096, 0x7F00_0000_0010, 7, 300, 2**31 - 1)
    block.slots[:len(args)] = args
    pointers = (ctypes.c_void_p * len(args)).from_address(block.address)
    for i, value in enumerate(args):
        assert ctypes.c_uint64.from_address(pointers[i]).value == value, f"slot {i}"
        if value < 2**31:
            assert ctypes.c_int32.from_address(pointers[i]).value == value, f"slot {i} as int"


def test_launch_config_has_cuda_h_layout():
    """CUlaunchConfig and CUlaunchAttribute as cuda.h lays them out on 64-bit hosts (and
    cuda_src/torch_op.cpp static_asserts): the driver reads the bytes, not the names."""
    import ctypes

    from cuflute.gemm import _PROGRAMMATIC_STREAM_SERIALIZATION, _LaunchConfig, _ParamBlock

    offsets = {name: getattr(_LaunchConfig, name).offset for name, _ in _LaunchConfig._fields_}
    assert offsets == {"grid": 0, "block": 12, "shared_bytes": 24, "stream": 32, "attrs": 40,
                       "num_attrs": 48}
    assert ctypes.sizeof(_LaunchConfig) == 56
    block = _ParamBlock()
    attribute = bytes(block.config.attrs.contents)
    assert len(attribute) == 72
    assert attribute[:4] == _PROGRAMMATIC_STREAM_SERIALIZATION.to_bytes(4, "little")
    assert attribute[8:12] == (1).to_bytes(4, "little")  # programmaticStreamSerializationAllowed
    assert tuple(block.config.block) == (0, 1, 1)
