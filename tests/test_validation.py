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
