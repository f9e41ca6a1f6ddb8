"""GPU tier of the quality evaluation: on all-MiniLM-L6-v2's real weights, the kernel path of
`eval-quality` against the NumPy reference path. Skipped without a GPU or without the model."""
import numpy as np
import pytest

from cuflute import pack, quality, quantize, reference

pytestmark = pytest.mark.gpu

LAYER_BOUND = reference.REL_ERROR_BOUND[quality.PACK_DTYPE]
CASES = [(method, g) for method in ("nf4", "nf3", "nf2", "nfl3") for g in (32, 64, 128)]


@pytest.fixture(scope="module")
def evaluation():
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    from cuflute.minilm import MiniLM

    try:
        model = MiniLM.load()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return quality.Evaluation.prepare(model)


@pytest.mark.parametrize("method, group_size", CASES)
def test_kernel_path_agrees_with_reference_path(evaluation, method, group_size):
    gpu = evaluation.run(method, group_size, "gpu")
    cpu = evaluation.run(method, group_size, "cpu")
    a = gpu.kernel_vs_reference
    where = f"{method=} {group_size=} {a}"
    assert gpu.path == "kernel" and cpu.path == "reference", where
    # every layer's kernel output on its calibration activations (outputs poisoned with NaN)
    assert a["worst_layer_error"] <= LAYER_BOUND, where
    assert a["embedding_one_minus_cos"] <= quality.EMBEDDING_AGREEMENT_BOUND, where
    assert gpu.weight_error == cpu.weight_error, where  # the same packed weights
    assert abs(gpu.one_minus_cos - cpu.one_minus_cos) <= 1e-5 + 1e-2 * cpu.one_minus_cos, (
        f"{where}: kernel 1-cos {gpu.one_minus_cos}, reference {cpu.one_minus_cos}")


@pytest.mark.parametrize("bits, group_size", [(4, 128), (2, 32)])
def test_kernel_on_fresh_random_activations(evaluation, bits, group_size):
    rng = np.random.default_rng()
    packed = {n: pack(quantize(evaluation.model.weight(n), bits, group_size, "nf"),
                      quality.PACK_DTYPE) for n in evaluation.names}
    kernel = quality.KernelLinears(packed)
    for name, p in packed.items():
        m = int(rng.integers(1, 70))
        x = rng.standard_normal((m, p.k)).astype(np.float16)
        y = kernel(name, x).astype(np.float64)
        expected = reference.qgemm(x, p)
        where = f"{bits=} {group_size=} {name} {m=}"
        assert np.all(np.isfinite(y)), f"unwritten or non-finite outputs: {where}"
        rel = np.linalg.norm(y - expected) / np.linalg.norm(expected)
        assert rel <= LAYER_BOUND, f"relative error {rel:.2e} > {LAYER_BOUND}: {where}"
