"""CPU tier of gate/up fusion: stacked layers hold exactly their parts' rows, a fused tiny
Llama computes what the unfused one does, and layers that cannot stack are refused."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from cuflute import reference  # noqa: E402
from cuflute.fusion import GatedMLP, fuse_gated_mlps, stack_rows  # noqa: E402
from cuflute.torch import QuantizedLinear  # noqa: E402


def _quantized(n, k, bits=4, group_size=128, seed=0, bias=False):
    torch.manual_seed(seed)
    return QuantizedLinear.from_linear(nn.Linear(k, n, bias=bias).half(), bits, group_size)


@pytest.mark.parametrize("bits, group_size", [(4, 128), (3, None), (2, 64)])
def test_stacked_quantized_layer_is_its_parts_rows(bits, group_size):
    parts = [_quantized(48, 256, bits, group_size, seed=1, bias=True),
             _quantized(40, 256, bits, group_size, seed=2)]  # the last may be ragged
    stacked = stack_rows(parts)
    assert isinstance(stacked, QuantizedLinear) and (stacked.in_features, stacked.out_features) == (256, 88)
    want = np.vstack([reference.dequantize(p.packed()) for p in parts])
    np.testing.assert_array_equal(reference.dequantize(stacked.packed()), want)
    assert torch.equal(stacked.bias, torch.cat([parts[0].bias, torch.zeros(40, dtype=torch.float16)]))


def test_stacked_linear_is_its_parts_rows():
    torch.manual_seed(0)
    parts = [nn.Linear(32, 24), nn.Linear(32, 8, bias=False)]
    stacked = stack_rows(parts)
    x = torch.randn(5, 32)
    torch.testing.assert_close(stacked(x), torch.cat([p(x) for p in parts], dim=-1), rtol=0, atol=0)


def test_layers_that_cannot_stack_are_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        stack_rows([_quantized(40, 256), _quantized(48, 256)])
    with pytest.raises(ValueError, match="share bits"):
        stack_rows([_quantized(48, 256, bits=4), _quantized(48, 256, bits=3)])
    with pytest.raises(ValueError, match="one kind with one in_features"):
        stack_rows([_quantized(48, 256), nn.Linear(256, 48)])
    with pytest.raises(ValueError, match="one kind with one in_features"):
        stack_rows([nn.Linear(256, 48), nn.Linear(128, 48)])


def test_fused_llama_computes_what_the_unfused_one_does():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
        names = fuse_gated_mlps(model)
        got = model(ids).logits
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(isinstance(model.get_submodule(n), GatedMLP) for n in names)
    assert model.model.layers[0].mlp.gate_up_proj.out_features == 192
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
