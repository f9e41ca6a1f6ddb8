import pytest

from cuflute.dispatch import select_config
from cuflute.kernels import TILE_CONFIGS, KernelSpec, TileConfig, all_specs


@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 16, 17, 64, 300, 100000])
@pytest.mark.parametrize("n", [1, 16, 300, 4096, 57344])
def test_select_config_covers_m(m, n):
    tile = select_config(m, n, 4096, 4, 128, 90)
    assert tile in TILE_CONFIGS
    # the m tile never exceeds what the problem needs by more than one step
    assert tile.block_m < 2 * max(m, 8) or tile.mt == 1


def test_small_n_uses_more_ctas():
    assert select_config(1, 4096, 4096, 4, 128, 90).nt == 1
    assert select_config(1, 57344, 8192, 4, 128, 90).nt == 2


def test_kernel_spec_validation():
    with pytest.raises(ValueError, match="kernel bits must be one of"):
        KernelSpec(5, 128, "float16", TILE_CONFIGS[0])
    with pytest.raises(ValueError, match="kernel group must be one of"):
        KernelSpec(4, 96, "float16", TILE_CONFIGS[0])
    with pytest.raises(ValueError, match="kernel tile must be one of"):
        KernelSpec(4, 128, "float16", TileConfig(3, 3, 3))


def test_name_expression_and_count():
    spec = KernelSpec(3, 0, "bfloat16", TileConfig(2, 4, 4))
    assert spec.name_expression == "cuflute::lut_gemm<3, 0, __nv_bfloat16, 2, 4, 4>"
    assert len(all_specs()) == 3 * 5 * 2 * len(TILE_CONFIGS)
