"""CPU tier of the PyTorch integration: QuantizedLinear construction, the op's fake
implementation, quantize_model, checkpoint save/load and its error paths, the HF command."""
import json
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from torch import nn  # noqa: E402

import cuflute  # noqa: E402
from cuflute import checkpoint  # noqa: E402
from cuflute.torch import QuantizationReport, QuantizedLinear, quantize_model  # noqa: E402


def _linear(k, n, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


@pytest.mark.parametrize("bits, group_size, dtype", [(4, 128, torch.float16), (3, 64, torch.bfloat16),
                                                      (2, None, torch.float16)])
def test_from_linear_holds_what_pack_makes(bits, group_size, dtype):
    linear = _linear(384, 200, dtype)
    layer = QuantizedLinear.from_linear(linear, bits, group_size)
    name = str(dtype).removeprefix("torch.")
    want = cuflute.pack(cuflute.quantize(linear.weight.detach().float().numpy(), bits, group_size), name)
    got = layer.packed()
    where = f"{bits=} {group_size=} {dtype}"
    for array in ("qweight", "scales", "pair_lut"):
        np.testing.assert_array_equal(getattr(got, array), getattr(want, array), err_msg=where)
    assert (got.n, got.k, got.bits, got.group_size, got.dtype) == \
        (want.n, want.k, want.bits, want.group_size, want.dtype), where
    assert torch.equal(layer.bias, linear.bias.detach()), where
    text = repr(layer)
    group = "per-channel" if group_size is None else str(group_size)
    for part in (f"bits={bits}", f"group_size={group}", "table=nf", f"dtype={name}", "bias=True"):
        assert part in text, f"{part!r} not in {text!r}: {where}"


def test_buffers_survive_a_dtype_conversion_unchanged():
    layer = QuantizedLinear.from_linear(_linear(256, 64, torch.float16), 4, 128)
    before = {k: v.clone() for k, v in layer.state_dict().items() if k != "bias"}
    layer.to(torch.bfloat16)
    for key, value in before.items():
        assert torch.equal(getattr(layer, key), value), key


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=5), "bits must be one of"),
    (dict(group_size=48), "group_size must be one of"),
    (dict(in_features=200, group_size=128), "multiple of 8 and of group_size"),
    (dict(dtype=torch.float32), "torch.float16 or torch.bfloat16"),
    (dict(table=[0.0, 1.0]), "needs 16 values"),
])
def test_constructor_rejects_what_the_kernel_cannot_run(kwargs, message):
    args = dict(in_features=256, out_features=64)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        QuantizedLinear(**args)


def _op_args(layer, device="meta"):
    return (layer.qweight.to(device), layer.scales.to(device), layer.pair_lut.to(device),
            layer.out_features, layer.in_features, layer.bits, layer.group_size,
            str(layer.dtype).removeprefix("torch."))


def test_fake_implementation_gives_shape_and_dtype():
    layer = QuantizedLinear(512, 300, 3, 128, "nf", torch.bfloat16)
    x = torch.empty(2, 7, 512, dtype=torch.bfloat16, device="meta")
    y = torch.ops.cuflute.qgemm(x, *_op_args(layer))
    assert (tuple(y.shape), y.dtype) == ((2, 7, 300), torch.bfloat16)
    with pytest.raises(TypeError, match="packed for bfloat16"):
        torch.ops.cuflute.qgemm(x.to(torch.float16), *_op_args(layer))
    with pytest.raises(ValueError, match=r"dtype must be one of \('float16', 'bfloat16'\), got 'half'"):
        torch.ops.cuflute.qgemm(x, *_op_args(layer)[:-1], "half")
    with pytest.raises(ValueError, match="K = 256"):
        torch.ops.cuflute.qgemm(x[..., :256], *_op_args(layer))


def test_module_exports_to_one_op_through_the_fake_implementation():
    layer = QuantizedLinear.from_linear(_linear(256, 64, torch.float16), 4, 128)
    program = torch.export.export(layer, (torch.randn(3, 256, dtype=torch.float16),))
    ops = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert ops.count("cuflute.qgemm.default") == 1, ops
    out = next(node for node in program.graph.nodes if node.op == "output").args[0][0]
    assert tuple(out.meta["val"].shape) == (3, 64), out.meta["val"]


def test_forward_needs_a_cuda_tensor():
    layer = QuantizedLinear.from_linear(_linear(256, 64, torch.float16), 4, 128)
    with pytest.raises(TypeError, match="needs a CUDA tensor"):
        layer(torch.randn(1, 256, dtype=torch.float16))


class _Net(nn.Module):
    def __init__(self, dtype=torch.float16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(50, 256)
        self.inner = nn.ModuleDict({"up": nn.Linear(256, 512), "down": nn.Linear(512, 256, bias=False),
                                    "odd": nn.Linear(100, 64)})
        self.head = nn.Linear(256, 50, bias=False)
        self.head.weight = self.embed.weight  # tied, as small language models do
        self.to(dtype)


def test_quantize_model_replaces_and_reports_skips():
    net = _Net()
    report = quantize_model(net, bits=4, group_size=128, skip=["head"], progress=False)
    assert isinstance(report, QuantizationReport)
    assert report.replaced == ["inner.up", "inner.down"]
    skipped = dict(report.skipped)
    assert set(skipped) == {"inner.odd", "head"}
    assert "skip pattern 'head'" in skipped["head"] and "in_features = 100" in skipped["inner.odd"]
    assert isinstance(net.inner.up, QuantizedLinear) and isinstance(net.inner.odd, nn.Linear)
    assert "replaced 2" in str(report) and "inner.odd" in str(report)


def test_quantize_model_skips_by_pattern():
    net = _Net()
    report = quantize_model(net, bits=3, group_size=64, skip=("*.down", "head"), progress=False)
    assert report.replaced == ["inner.up"]


def test_quantize_model_checks_before_replacing():
    net = _Net(dtype=torch.float32)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        quantize_model(net, bits=4, group_size=128, progress=False)
    assert not any(isinstance(m, QuantizedLinear) for m in net.modules())
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(_Net(), bits=4, group_size=100, progress=False)


def _quantized_net(seed=0):
    net = _Net(seed=seed)
    quantize_model(net, bits=4, group_size=128, skip=["head"], progress=False)
    return net


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {name: type(m) for name, m in model.named_modules()})


def _assert_untouched(model, snapshot):
    state, types = snapshot
    assert {name: type(m) for name, m in model.named_modules()} == types
    now = model.state_dict()
    assert set(now) == set(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key


def test_checkpoint_round_trips_bit_exactly(tmp_path):
    net = _quantized_net()
    path = tmp_path / "net.safetensors"
    checkpoint.save(net, path)
    fresh = _Net(seed=1)
    assert checkpoint.load(fresh, path) == ["inner.up", "inner.down"]
    _assert_untouched(fresh, _snapshot(net))
    assert fresh.head.weight.data_ptr() == fresh.embed.weight.data_ptr(), "the tie was lost"
    again = _quantized_net(seed=2)  # loading into an already quantized model works too
    checkpoint.load(again, path)
    _assert_untouched(again, _snapshot(net))


def test_save_needs_quantized_layers(tmp_path):
    with pytest.raises(ValueError, match="no QuantizedLinear"):
        checkpoint.save(_Net(), tmp_path / "x.safetensors")


def _data_start(path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _rewrite_record(path, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        record = json.loads(f.metadata()["cuflute"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(record)
    save_file(tensors, str(path), metadata={"cuflute": json.dumps(record)})


def _corrupt_byte(path):
    data = bytearray(path.read_bytes())
    data[(_data_start(path) + len(data)) // 2] ^= 0x5A
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _truncate_header(path):
    path.write_bytes(path.read_bytes()[:50])


def _future_version(path):
    _rewrite_record(path, lambda r: r.update(format_version=99))


def _garbled_record(path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={"cuflute": "{not json"})


def _no_record(path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3)}, str(path))


@pytest.mark.parametrize("damage, message", [
    (_corrupt_byte, "does not match its sha256 digest"),
    (_truncate, "truncated or corrupted"),
    (_truncate_header, "truncated or corrupted"),
    (_future_version, "format version 99"),
    (_garbled_record, "corrupted cuflute record"),
    (_no_record, "without a cuflute record"),
])
def test_bad_file_gives_clear_error_and_leaves_model_untouched(tmp_path, damage, message):
    path = tmp_path / "net.safetensors"
    checkpoint.save(_quantized_net(), path)
    damage(path)
    model = _Net(seed=3)
    before = _snapshot(model)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load(model, path)
    _assert_untouched(model, before)


def test_version_1_files_load_unless_they_hold_3_bit_layers(tmp_path):
    """Version 1 packed 3-bit codes in another order: read as version 2 they would be wrong."""
    path = tmp_path / "net.safetensors"
    net = _quantized_net()  # 4-bit: the same bytes in both versions
    checkpoint.save(net, path)
    _rewrite_record(path, lambda r: r.update(format_version=1))
    fresh = _Net(seed=1)
    assert checkpoint.load(fresh, path) == ["inner.up", "inner.down"]
    _assert_untouched(fresh, _snapshot(net))

    three_bit = _Net()
    quantize_model(three_bit, bits=3, group_size=128, skip=["head", "*.down"], progress=False)
    checkpoint.save(three_bit, path)
    _rewrite_record(path, lambda r: r.update(format_version=1))
    model = _Net(seed=3)
    before = _snapshot(model)
    with pytest.raises(checkpoint.CheckpointError, match=r"format version 1 .*\['inner.up'\]"):
        checkpoint.load(model, path)
    _assert_untouched(model, before)


class _OtherNet(_Net):
    def __init__(self):
        super().__init__()
        self.inner["down"] = nn.Linear(512, 128, bias=False).half()


def test_checkpoint_for_another_model_is_refused_before_any_change(tmp_path):
    path = tmp_path / "net.safetensors"
    checkpoint.save(_quantized_net(), path)
    model = _OtherNet()
    before = _snapshot(model)
    with pytest.raises(checkpoint.CheckpointError, match="inner.down"):
        checkpoint.load(model, path)
    _assert_untouched(model, before)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float16)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


def test_quantize_command_writes_a_directory_that_loads_back(tiny_llama_dir, tmp_path):
    from cuflute import hf
    from cuflute.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_dir), "--bits", "3", "--group-size", "64",
                 "--out", str(out)]) == 0
    model = hf.load_quantized(out, device="cpu")
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 14 and isinstance(model.lm_head, nn.Linear)
    assert model.model.layers[1].mlp.down_proj.bits == 3
    _, stored = checkpoint.read(out / hf.CHECKPOINT_NAME)
    _assert_untouched(model, ({k: v for k, v in stored.items()}, {n: type(m) for n, m in model.named_modules()}))


def test_quantize_command_refuses_other_architectures(tmp_path):
    from cuflute import hf

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' model"):
        hf.quantize_checkpoint(tmp_path, tmp_path / "out")


def test_native_launcher_can_be_turned_off_and_a_failed_build_leaves_the_python_kernel(monkeypatch):
    import cuflute.torch as cuflute_torch
    from torch.utils import cpp_extension

    monkeypatch.setattr(cuflute_torch, "_native", None)
    monkeypatch.setenv("CUFLUTE_NATIVE_OP", "0")
    assert cuflute_torch.native_launcher() is None

    def no_compiler(**kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(cuflute_torch, "_native", None)
    monkeypatch.setenv("CUFLUTE_NATIVE_OP", "1")
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with pytest.warns(UserWarning, match="could not be built .*no C\\+\\+ compiler here"):
        assert cuflute_torch.native_launcher() is None
    assert cuflute_torch.native_launcher() is None  # tried once, not again
