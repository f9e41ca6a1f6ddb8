"""GPU tier of the PyTorch integration: the custom op, QuantizedLinear against the float64
reference, torch.compile(fullgraph=True) and CUDA-graph capture against eager, a bit-exact
checkpoint round trip, and a tiny Hugging Face Llama quantized, loaded and run for generation.

Fresh random inputs everywhere. The op allocates its output, so each module or op result is
checked against ``cuflute.qgemm`` writing into a NaN-poisoned ``out=``, and graph outputs are
poisoned with NaN before each replay.
"""
import numpy as np
import pytest

import cuflute
from cuflute import reference

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch") if cuflute.gpu_available() else None
if torch is not None:
    from torch import nn

    from cuflute import checkpoint
    from cuflute.torch import QuantizedLinear, quantize_model

REL_ERROR_BOUND = reference.REL_ERROR_BOUND
# A two-layer model in fp16 rounds every activation (norms, attention, MLP) on the way, so its
# logits carry a few such roundings (~5e-4 relative each) against a float64 reference.
MODEL_REL_ERROR_BOUND = 1e-2
CASES = [(4, 128, "float16"), (3, 64, "bfloat16"), (4, None, "bfloat16")]
MS = [1, 33]


def _dtype(name):
    return getattr(torch, name)


def _linear(k, n, dtype, seed, bias=True):
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(torch.rand(n, 1) + 0.5)
        if bias:
            linear.bias.normal_()
    return linear.to(device="cuda", dtype=dtype)


def _random_x(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=g, device="cuda").to(dtype)


def _poisoned_qgemm(x, layer):
    """cuflute.qgemm into a NaN-filled out=, plus the bias: what the module must return."""
    out = torch.full((*x.shape[:-1], layer.out_features), float("nan"), dtype=x.dtype, device="cuda")
    cuflute.qgemm(x, layer.packed(), out=out)
    return out if layer.bias is None else out.add_(layer.bias)


def _rel_error(y, ref):
    y, ref = y.double().cpu().numpy(), np.asarray(ref, dtype=np.float64)
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def _reference(layer, x):
    w64 = reference.dequantize(layer.packed().to_host())
    y = x.double().cpu().numpy() @ w64.T
    return y if layer.bias is None else y + layer.bias.double().cpu().numpy()


@pytest.mark.parametrize("bits, group_size, dtype", CASES)
def test_quantized_linear_matches_reference(bits, group_size, dtype):
    k, n = 768, 200
    layer = QuantizedLinear.from_linear(_linear(k, n, _dtype(dtype), seed=bits), bits, group_size)
    for m in MS:
        where = f"{bits=} {group_size=} {dtype} {m=} {n=} {k=}"
        x = _random_x((2, m, k), _dtype(dtype), seed=m)
        want = _poisoned_qgemm(x, layer)
        assert torch.isfinite(want).all(), f"unwritten or non-finite outputs: {where}"
        y = layer(x)
        assert tuple(y.shape) == (2, m, n) and y.dtype == _dtype(dtype), where
        assert torch.isfinite(y).all(), f"non-finite module outputs: {where}"
        ref = _reference(layer, x)
        for name, out in (("module", y), ("qgemm", want)):
            err = _rel_error(out, ref)
            assert err < REL_ERROR_BOUND[dtype], f"{name} rel error {err:.2e}: {where}"


@pytest.mark.parametrize("bits, group_size, dtype", CASES)
def test_op_matches_qgemm(bits, group_size, dtype):
    k, n = 768, 200
    layer = QuantizedLinear.from_linear(_linear(k, n, _dtype(dtype), seed=7, bias=False), bits, group_size)
    for m in MS:
        x = _random_x((m, k), _dtype(dtype), seed=100 + m)
        want = _poisoned_qgemm(x, layer)
        assert torch.isfinite(want).all(), f"{bits=} {group_size=} {dtype} {m=}"
        got = torch.ops.cuflute.qgemm(x, layer.qweight, layer.scales, layer.pair_lut,
                                      n, k, bits, layer.group_size, dtype)
        assert tuple(got.shape) == (m, n) and torch.isfinite(got).all(), f"{bits=} {group_size=} {dtype} {m=}"
        err = _rel_error(got, want.double().cpu().numpy())
        assert err < REL_ERROR_BOUND[dtype], f"op vs qgemm rel error {err:.2e}: {bits=} {group_size=} {dtype} {m=}"


def test_native_launcher_takes_the_ops_cuda_calls_and_matches_qgemm():
    """The C++ kernel (cuflute.torch.native_launcher) is the op's CUDA kernel, and its outputs
    equal cuflute.qgemm's bit for bit (the same kernel and config): for the calls it launches
    itself (contiguous x, leading dims, on a side stream) and those it hands to the Python
    kernel (a strided x, M on the dense path, M = 0, errors)."""
    from cuflute.torch import native_launcher

    native = native_launcher()
    if native is None:
        pytest.skip("the C++ launcher cannot be built here (see the warning)")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("cuflute::qgemm", "CUDA")
    side = torch.cuda.Stream()
    for bits, group_size, dtype in CASES:
        layer = QuantizedLinear.from_linear(_linear(768, 200, _dtype(dtype), seed=11), bits, group_size)
        plans = native.plan_count()
        xs = [_random_x((1, 768), _dtype(dtype), 1), _random_x((3, 5, 768), _dtype(dtype), 2),
              _random_x((33, 768), _dtype(dtype), 3), _random_x((300, 768), _dtype(dtype), 4),
              _random_x((4, 1536), _dtype(dtype), 5)[:, ::2], _random_x((0, 768), _dtype(dtype), 6)]
        for x in xs:
            where = f"{bits=} {group_size=} {dtype} x {tuple(x.shape)} strides {x.stride()}"
            want = _poisoned_qgemm(x, layer)
            assert torch.equal(layer(x), want), where
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                on_side = layer(x)
            side.synchronize()
            assert torch.equal(on_side, want), f"side stream: {where}"
        assert native.plan_count() > plans, "no call went through the C++ launcher"
        wrong = torch.float16 if dtype == "bfloat16" else torch.bfloat16
        with pytest.raises(TypeError, match="packed weight was packed for"):
            layer(xs[0].to(wrong))
        with pytest.raises(ValueError, match="K = 512"):
            torch.ops.cuflute.qgemm(xs[0][:, :512].contiguous(), layer.qweight, layer.scales,
                                    layer.pair_lut, 200, 768, bits, layer.group_size, dtype)


def test_native_launcher_runs_a_cluster_config(tuned_table_file):
    """Where the tuned table names a config that splits K over thread-block clusters (sm_90), the
    C++ launcher's launch (its grid's z the cluster) gives what cuflute.qgemm gives with that
    config forced, bit for bit, and the reference's result."""
    from cuflute import gemm
    from cuflute.kernels import CLUSTER_MIN_ARCH, TILE_CONFIGS, device_arch
    from cuflute.torch import native_launcher

    if device_arch(gemm.device_properties(0)) < CLUSTER_MIN_ARCH:
        pytest.skip("thread-block clusters need compute capability 9.0")
    native = native_launcher()
    if native is None:
        pytest.skip("the C++ launcher cannot be built here (see the warning)")
    config = next(c for c in TILE_CONFIGS if c.needs_clusters and c.mt == 2)
    tuned_table_file(gemm.device_name(0), [
        f"{{bits: 4, group: 128, dtype: float16, n: 208, k: 1024, m: 16, config: {config}, us: 1.0}}"])
    layer = QuantizedLinear.from_linear(_linear(1024, 208, torch.float16, seed=13), 4, 128)
    x = _random_x((16, 1024), torch.float16, 8)
    assert gemm.launch_plan(layer.packed(), 16, None).grid[2] == config.ks
    plans = native.plan_count()
    got = layer(x)
    assert native.plan_count() > plans, "the call did not go through the C++ launcher"
    want = torch.full((16, 208), float("nan"), dtype=torch.float16, device="cuda")
    cuflute.qgemm(x, layer.packed(), out=want, config=config)
    assert torch.equal(got, want.add_(layer.bias))
    assert _rel_error(got, _reference(layer, x)) < REL_ERROR_BOUND["float16"]


def _mlp(dtype="float16", seed=0):
    """Two quantized layers with an activation between, as in a transformer block."""
    model = nn.Sequential(_linear(1024, 512, _dtype(dtype), seed), nn.SiLU(),
                          _linear(512, 256, _dtype(dtype), seed + 1, bias=False))
    quantize_model(model, bits=4, group_size=128, progress=False)
    return model


def test_compile_fullgraph_matches_eager():
    model = _mlp()
    compiled = torch.compile(model, fullgraph=True)
    for m in MS:
        x = _random_x((m, 1024), torch.float16, seed=200 + m)
        eager = model(x)
        got = compiled(x)
        assert torch.isfinite(got).all(), f"{m=}"
        err = _rel_error(got, eager.double().cpu().numpy())
        assert err < REL_ERROR_BOUND["float16"], f"compiled vs eager rel error {err:.2e}, {m=}"
    layer = model[2]  # the op alone
    x = _random_x((MS[-1], 512), torch.float16, seed=300)
    err = _rel_error(torch.compile(layer, fullgraph=True)(x), layer(x).double().cpu().numpy())
    assert err < REL_ERROR_BOUND["float16"], f"compiled op vs eager rel error {err:.2e}"


def test_cuda_graph_capture_matches_eager():
    model = _mlp(seed=5)
    for m in MS:
        static_x = _random_x((m, 1024), torch.float16, seed=400 + m)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = model(static_x)
        for trial in range(3):
            x = _random_x((m, 1024), torch.float16, seed=500 + 10 * m + trial)
            static_x.copy_(x)
            static_y.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.isfinite(static_y).all(), f"unwritten graph outputs: {m=} {trial=}"
            assert torch.equal(static_y, model(x)), f"replay differs from eager: {m=} {trial=}"


def test_checkpoint_round_trip_is_bit_exact_on_gpu(tmp_path):
    model = _mlp(dtype="bfloat16", seed=11)
    x = _random_x((5, 1024), torch.bfloat16, seed=600)
    want = model(x)
    path = tmp_path / "mlp.safetensors"
    checkpoint.save(model, path)
    fresh = nn.Sequential(_linear(1024, 512, torch.bfloat16, 21), nn.SiLU(),
                          _linear(512, 256, torch.bfloat16, 22, bias=False))
    assert checkpoint.load(fresh, path) == ["0", "2"]
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert fresh[0].qweight.is_cuda
    err = _rel_error(fresh(x), want.double().cpu().numpy())
    assert err < REL_ERROR_BOUND["bfloat16"], f"loaded model vs original rel error {err:.2e}"


def _dequantized_float64_copy(model):
    """The same model in float64 on the CPU, each QuantizedLinear replaced by an nn.Linear
    holding its dequantized weight (cuflute.reference)."""
    import copy

    ref = copy.deepcopy(model).to("cpu")
    for name, m in list(ref.named_modules()):
        if isinstance(m, QuantizedLinear):
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            linear.weight.data = torch.from_numpy(reference.dequantize(m.packed()))
            if m.bias is not None:
                linear.bias.data = m.bias.double()
            ref.set_submodule(name, linear)
    return ref.double()


def test_hf_llama_quantize_load_and_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    from cuflute import hf
    from cuflute.cli import main

    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.float16).save_pretrained(tmp_path / "hf")
    assert main(["quantize", str(tmp_path / "hf"), "--bits", "4", "--group-size", "128",
                 "--out", str(tmp_path / "q")]) == 0

    model = hf.load_quantized(tmp_path / "q", device="cuda")
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)
    ids = torch.randint(0, config.vocab_size, (2, 5), device="cuda")
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        ref = _dequantized_float64_copy(model)(ids.cpu()).logits
    assert torch.isfinite(logits).all()
    err = _rel_error(logits, ref.numpy())
    assert err < MODEL_REL_ERROR_BOUND, f"logits rel error {err:.2e} against float64"

    out = model.generate(ids, attention_mask=mask, max_new_tokens=6,
                         do_sample=False)
    assert tuple(out.shape) == (2, 11) and torch.equal(out[:, :5], ids)
    last = logits[:, -1].float()
    chosen = last.gather(1, out[:, 5:6]).squeeze(1)
    slack = 1e-2 * last.abs().max()  # generate recomputes the prompt; near-ties may swap
    assert torch.all(chosen >= last.max(-1).values - slack), "first greedy token is not the argmax"


def test_module_goes_through_the_op_that_dispatch_modes_see():
    """QuantizedLinear calls torch.ops.cuflute.qgemm, so a dispatch mode (as export and fake
    tensors use) records it, and the output is qgemm's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    layer = QuantizedLinear.from_linear(_linear(256, 64, torch.float16, seed=3), 4, 128)
    x = _random_x((5, 256), torch.float16, seed=700)
    eager = layer(x)
    with Record() as record:
        recorded = layer(x)
    assert "cuflute.qgemm.default" in record.ops, record.ops
    want = _poisoned_qgemm(x, layer)
    assert torch.isfinite(want).all() and torch.equal(eager, want) and torch.equal(recorded, want)


@pytest.mark.parametrize("m", [1, 33])
def test_fused_gate_up_on_the_gpu_matches_the_reference(m):
    """A stacked pair of QuantizedLinear layers on the GPU (cuflute.fusion, CuPy arrays
    concatenated) against the float64 reference of the stacked weight, and its two halves
    against the separate layers' outputs."""
    from cuflute.fusion import stack_rows

    gate = QuantizedLinear.from_linear(_linear(512, 96, torch.float16, seed=11, bias=False), 4, 128)
    up = QuantizedLinear.from_linear(_linear(512, 200, torch.float16, seed=12, bias=False), 4, 128)
    fused = stack_rows([gate, up])
    assert fused.qweight.is_cuda and fused.out_features == 296
    x = _random_x((m, 512), torch.float16, seed=900 + m)
    y = fused(x)
    assert torch.isfinite(y).all()
    err = _rel_error(y, _reference(fused, x))
    assert err < REL_ERROR_BOUND["float16"], f"fused rel error {err:.2e}"
    for half, layer in zip(y.split([96, 200], dim=-1), (gate, up)):
        assert _rel_error(half, layer(x).double().cpu().numpy()) < REL_ERROR_BOUND["float16"]


@pytest.mark.parametrize("collecting", [True, False])
def test_host_timing_leaves_the_garbage_collector_as_it_found_it(collecting, monkeypatch):
    """e2e.host_time_us pauses the collector while it times (as timeit does); afterwards the
    collector is on or off as before, and every path has a positive time."""
    import gc

    from cuflute import e2e

    monkeypatch.setattr(e2e, "HOST_TIMING_ROUNDS", 2)
    monkeypatch.setattr(e2e, "HOST_TIMING_CALLS", 3)
    monkeypatch.setattr(e2e, "BUSY_GPU_CYCLES", 1000)
    layer = QuantizedLinear.from_linear(_linear(256, 64, torch.float16, seed=5), 4, 128)
    was = gc.isenabled()
    (gc.enable if collecting else gc.disable)()
    try:
        times = e2e.host_time_us(layer, _random_x((1, 256), torch.float16, seed=800))
        assert gc.isenabled() == collecting
    finally:
        (gc.enable if was else gc.disable)()
    assert set(times) == {"cuflute.qgemm(x, packed)", "torch.ops.cuflute.qgemm",
                          "QuantizedLinear(x)", "x + x (torch)"}
    assert all(t > 0 for t in times.values()), times


def test_the_op_does_not_hold_module_weights_dense():
    """With cuflute.dense_cache on, QuantizedLinear's calls past DENSE_CACHED_MIN_M rows still
    hold nothing: its buffers can be rewritten in place (load_state_dict), which a held W' would
    miss. A rewritten weight is read as rewritten."""
    from cuflute import dense_cache

    dense_cache.set_limit(64 << 20)
    try:
        layer = QuantizedLinear.from_linear(_linear(1280, 1000, torch.float16, seed=31), 4, 128)
        other = QuantizedLinear.from_linear(_linear(1280, 1000, torch.float16, seed=32), 4, 128)
        x = _random_x((128, 1280), torch.float16, 9)
        assert _rel_error(layer(x), _reference(layer, x)) < REL_ERROR_BOUND["float16"]
        layer.load_state_dict(other.state_dict())
        assert _rel_error(layer(x), _reference(other, x)) < REL_ERROR_BOUND["float16"]
        assert dense_cache.held_bytes() == 0
    finally:
        dense_cache.set_limit(0)
