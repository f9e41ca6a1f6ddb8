from dataclasses import replace

import pytest

from cuflute import dispatch
from cuflute.dispatch import DENSE, DENSE_MIN_M, gpu_slug, heuristic_config, parse_config, select_config
from cuflute.kernels import (MAX_K_SPLITS, MAX_SHARED_BYTES, TARGET_ARCHS, TILE_CONFIGS, WARPGROUP_CONFIGS,
                             X_ROW, X_SHARED, X_WARP, KernelSpec, TileConfig, WarpgroupConfig, XImageSpec, all_specs,
                             arch_option, builds_for, every_spec, instantiated, parse_tile_config,
                             tile_config_from_name)


@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 16, 17, 64, 300, 100000])
@pytest.mark.parametrize("n", [1, 16, 300, 4096, 57344])
def test_heuristic_covers_every_m(m, n):
    tile = select_config(m, n, 4096, 4, 128, "float16")
    if m >= DENSE_MIN_M:
        assert tile == DENSE
    else:
        assert tile in TILE_CONFIGS
        assert tile.block_m <= max(8, 2 * m), f"{m=} {n=} {tile}"
        assert tile.takes(m), f"{m=} {n=} {tile}"


def test_heuristic_m_tiles_follow_m():
    assert heuristic_config(1, 4, 128).block_m == heuristic_config(8, 4, 128).block_m == 8
    assert heuristic_config(9, 4, 128).block_m == heuristic_config(16, 4, 128).block_m == 16
    assert heuristic_config(17, 4, 128).block_m == heuristic_config(32, 4, 128).block_m == 16
    assert heuristic_config(33, 4, 128).block_m == heuristic_config(DENSE_MIN_M - 1, 4, 0).block_m == 32
    assert heuristic_config(33, 4, 64).block_m == 16  # four m tiles are not built for groups of 64
    assert heuristic_config(DENSE_MIN_M, 4, 128) == heuristic_config(10**6, 4, 0) == DENSE
    assert heuristic_config(1, 4, 128).xs == X_ROW and heuristic_config(2, 4, 128).xs == X_WARP


@pytest.mark.parametrize("group", [32, 64])
def test_small_groups_never_get_four_m_tiles(group):
    for m in (17, 64, DENSE_MIN_M - 1):
        tile = select_config(m, 4096, 4096, 3, group, "bfloat16")
        assert instantiated(3, group, tile) and tile.mt == 2, (m, group, tile)
    with pytest.raises(ValueError, match="is not compiled for 4-bit codes with scale groups of 32"):
        KernelSpec(4, 32, "float16", TileConfig(2, 4, 2, xs=X_WARP))
    # (a warp that scales the A operand holds no second set of sums: those are built)
    tiled = [s for s in all_specs() if isinstance(s.tile, TileConfig)]
    assert not any(s.tile.mt == 4 and s.group in (32, 64) and not s.tile.scales_a_operand for s in tiled)
    assert any(s.tile.mt >= 4 and s.group == 32 and s.tile.scales_a_operand for s in tiled)


def test_kernel_spec_validation():
    with pytest.raises(ValueError, match="kernel bits must be one of"):
        KernelSpec(5, 128, "float16", TILE_CONFIGS[0])
    with pytest.raises(ValueError, match="kernel group must be one of"):
        KernelSpec(4, 96, "float16", TILE_CONFIGS[0])
    with pytest.raises(ValueError, match="kernel tile must be one of"):
        KernelSpec(4, 128, "float16", TileConfig(3, 1, 3))
    with pytest.raises(ValueError, match="mt must be 1, 2, 4 or 8"):
        TileConfig(1, 16, 1)
    with pytest.raises(ValueError, match="needs wn >= 2"):
        TileConfig(2, 2, 4, xs=X_SHARED)
    with pytest.raises(ValueError, match="x of one row .* needs mt = 1"):
        TileConfig(1, 2, 4, xs=X_ROW)
    assert TileConfig(1, 1, 4, xs=X_ROW).takes(1) and not TileConfig(1, 1, 4, xs=X_ROW).takes(2)
    assert TileConfig(1, 1, 4, xs=X_WARP).takes(10**6)


def test_name_expression_and_count():
    spec = KernelSpec(3, 0, "bfloat16", TileConfig(1, 1, 8))
    assert spec.name_expression == "cuflute::lut_gemm<3, 0, __nv_bfloat16, 1, 1, 1, 8, 2, 0, 32, 0>"
    staged = KernelSpec(4, 128, "float16", TileConfig(2, 1, 4, xs=X_WARP))
    assert staged.name_expression == "cuflute::lut_gemm<4, 128, __half, 2, 1, 1, 4, 2, 1, 32, 0>"
    side_by_side = KernelSpec(2, 128, "float16", TileConfig(2, 4, 1, wn=4, xs=X_SHARED, lut_copies=16))
    assert side_by_side.name_expression == "cuflute::lut_gemm<2, 128, __half, 2, 4, 4, 1, 2, 2, 16, 0>"
    assert side_by_side.threads == 128
    wide = KernelSpec(4, 128, "float16", tile_config_from_name("nt4_mt4_wn2_wk2_ks2_s2_xsh_wl"))
    assert wide.name_expression == "cuflute::lut_gemm_split<4, 128, __half, 4, 4, 2, 2, 2, 2, 32, 1, 2>"
    assert wide.shared_bytes == KernelSpec(4, 128, "float16", replace(wide.tile, wide_lut=False)).shared_bytes + 32768
    # 3 bit widths x 5 groups x 2 dtypes a config, but eight to fifteen tiles a warp not with
    # groups of 32 or 64, ten to fifteen not with 3-bit codes, five n tiles of fewer than eight
    # not with 2-bit codes and groups of 64, and 32 (the A operand scaled) not with one group a
    # row; a wide LUT only with 4-bit codes; a warpgroup config with all
    narrow = [c for c in TILE_CONFIGS if not c.wide_lut]
    summed = [c for c in narrow if not c.scales_a_operand]
    eight_tiles = sum(c.mt * c.nt >= 8 for c in summed)
    ten_tiles = sum(c.mt * c.nt >= 10 for c in summed)
    five_n_tiles = sum(c.nt == 5 and c.mt * c.nt < 8 for c in summed)
    thirty_two = sum(c.mt * c.nt >= 32 for c in narrow)
    wide_groups = sum(5 - 2 * (not c.scales_a_operand and c.mt * c.nt >= 8) for c in TILE_CONFIGS if c.wide_lut)
    assert ten_tiles >= 1 and five_n_tiles >= 1 and thirty_two >= 1 and wide_groups >= 1
    assert len(all_specs()) == 2 * (15 * len(narrow) - 3 * 2 * eight_tiles - 3 * ten_tiles - 3 * thirty_two + wide_groups) \
        - 2 * five_n_tiles + 30 * len(WARPGROUP_CONFIGS)


def test_cluster_configs_split_k_on_sm90_only():
    split = TileConfig(2, 4, 1, wn=4, xs=X_SHARED, lut_copies=16, ks=2)
    assert split in TILE_CONFIGS and split.needs_clusters and not TileConfig(2, 4, 1, wn=4).needs_clusters
    assert str(split) == "nt2_mt4_wn4_wk1_ks2_s2_xsh_c16" and tile_config_from_name(str(split)) == split
    assert tile_config_from_name("nt1_mt2_wn8_wk1_ks4_s3_xsh").ks == 4
    assert tile_config_from_name("nt2_mt8_wn8_wk1_s2_xsh_wl").wide_lut
    with pytest.raises(ValueError, match="wide LUT"):
        tile_config_from_name("nt2_mt4_wn4_wk1_s2_xsh_c16_wl")
    spec = KernelSpec(4, 128, "float16", split)
    assert spec.name_expression == "cuflute::lut_gemm_split<4, 128, __half, 2, 4, 4, 1, 2, 2, 16, 0, 2>"
    assert builds_for(spec, 90) and not any(builds_for(spec, arch) for arch in (80, 86, 89))
    assert spec in every_spec(90) and spec not in every_spec(89) and spec in every_spec()


def test_configs_are_built_only_where_a_cta_can_have_their_shared_memory():
    five_by_two = TileConfig(5, 2, 4, xs=X_WARP)
    for bits, archs in ((4, {90}), (2, {80, 90})):
        spec = KernelSpec(bits, 128, "float16", five_by_two)
        assert {a for a in TARGET_ARCHS if builds_for(spec, a)} == archs
        assert all(spec.shared_bytes <= MAX_SHARED_BYTES[a] for a in archs)
    small = KernelSpec(4, 128, "float16", TileConfig(1, 1, 4, xs=X_ROW))
    assert all(builds_for(small, a) for a in TARGET_ARCHS)
    assert builds_for(KernelSpec(4, 128, "float16", five_by_two), 120)  # not a target: gemm checks
    assert all(s.shared_bytes <= MAX_SHARED_BYTES[a] for a in TARGET_ARCHS for s in every_spec(a)
               if isinstance(s, KernelSpec))


def test_ten_tiles_a_warp_are_not_built_for_three_bits():
    five_by_two = TileConfig(5, 2, 4, xs=X_WARP)
    assert instantiated(4, 128, five_by_two) and instantiated(2, 0, five_by_two)
    assert KernelSpec(4, 128, "bfloat16", five_by_two).tile == five_by_two  # built in bfloat16 too
    assert not instantiated(3, 128, five_by_two) and not instantiated(4, 64, five_by_two)
    with pytest.raises(ValueError, match="not compiled for 3-bit codes with scale groups of 128 in bfloat16"):
        KernelSpec(3, 128, "bfloat16", five_by_two)
    for ks in (0, MAX_K_SPLITS + 1):
        with pytest.raises(ValueError, match="ks .CTAs of a cluster splitting K. must be 1 to 8"):
            TileConfig(2, 4, 1, wn=4, xs=X_SHARED, ks=ks)
    # the fallback for a small shared memory (sm_86/sm_89) never lands on a cluster config
    for m in (16, 64, 200):
        tile = select_config(m, 4096, 4096, 4, 128, "float16", max_shared_bytes=60000)
        assert not tile.needs_clusters and tile.takes(m), (m, tile)


def test_cluster_config_is_refused_before_sm90(monkeypatch):
    """launch_plan says why, before it compiles anything."""
    from types import SimpleNamespace

    from cuflute import gemm

    buffer = SimpleNamespace(data=SimpleNamespace(ptr=0))
    packed = SimpleNamespace(device=0, qweight=buffer, scales=buffer, pair_lut=buffer, n=4096, k=4096,
                             k_chunks=16, n_groups=32, n_tiles=256, bits=4, kernel_group=128,
                             dtype="float16")
    a100 = {"major": 8, "minor": 0, "sharedMemPerBlockOptin": 166912, "name": "A100"}
    monkeypatch.setattr(gemm, "device_properties", lambda device: a100)
    monkeypatch.setattr(gemm, "get_kernel", lambda spec, device: pytest.fail("compiled"))
    with pytest.raises(ValueError, match="splits K over clusters of 2 CTAs, which need compute "
                                         "capability 9.0; cuda:0 has 8.0"):
        gemm._new_plan(packed, 64, "nt2_mt4_wn2_wk1_ks2_s2_xsh_c16", False)


def test_parse_tile_config():
    assert parse_tile_config("nt1_mt1_wk8_s2") == TileConfig(1, 1, 8)
    assert parse_tile_config("nt2_mt1_wk4_s2_xs") == TileConfig(2, 1, 4, xs=X_WARP)
    assert parse_tile_config("nt2_mt4_wn4_wk1_s2_xsh_c16") == \
        TileConfig(2, 4, 1, wn=4, xs=X_SHARED, lut_copies=16)
    assert tile_config_from_name("nt2_mt2_wn2_wk2_s3_xsh") == TileConfig(2, 2, 2, 3, wn=2, xs=X_SHARED)
    assert tile_config_from_name("nt1_mt2_wn8_wk1_s3_xs") == TileConfig(1, 2, 1, 3, wn=8, xs=X_WARP)
    assert parse_tile_config("nt2_mt1_wk8_s2_xr") == TileConfig(2, 1, 8, xs=X_ROW)
    assert str(TileConfig(1, 2, 1, 3, wn=8, xs=X_WARP)) == "nt1_mt2_wn8_wk1_s3_xs"
    assert parse_tile_config("nt2_mt4_wk2_s2_xs") == TileConfig(2, 4, 2, xs=X_WARP)
    assert all(parse_tile_config(str(c)) == c for c in TILE_CONFIGS)
    assert parse_config("dense") == DENSE and parse_config("nt1_mt1_wk4_s2_xs") == TileConfig(1, 1, 4, xs=X_WARP)
    with pytest.raises(ValueError, match="tile config must be one of"):
        parse_tile_config("nt3_mt3_wk3")
    with pytest.raises(ValueError, match="tile config must be one of"):
        parse_tile_config("fast")


def test_gpu_slug():
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_tuned_table_overrides_the_heuristic(tuned_table_file):
    tuned_table_file("Test GPU", [
        "{bits: 4, group: 128, dtype: float16, n: 4096, k: 4096, m: 4, config: nt2_mt1_wk4_s2_xs, us: 1.0}",
        "{bits: 4, group: 128, dtype: float16, n: 4096, k: 4096, m: 32, config: nt2_mt2_wn2_wk2_s2_xsh, us: 2.0}",
        "{bits: 4, group: 128, dtype: float16, n: 4096, k: 4096, m: 64, config: nt9_mt1_wk8_s2, us: 3.0}",
        "{bits: 4, group: 128, dtype: float16, n: 1024, k: 4096, m: 1, config: nt1_mt1_wk8_s2_xr, us: 1.0}"])
    pick = lambda m, n=4096: select_config(m, n, 4096, 4, 128, "float16", gpu_name="Test GPU")
    with pytest.warns(UserWarning, match="nt9_mt1_wk8_s2.*ignored"):  # a config no longer built
        dispatch.tuned_table("Test GPU")
    assert pick(1) == pick(4) == TileConfig(2, 1, 4, xs=X_WARP)  # smallest bucket at or above m
    assert pick(5) == pick(32) == pick(DENSE_MIN_M - 1) == TileConfig(2, 2, 2, wn=2, xs=X_SHARED)  # largest past the end
    assert pick(DENSE_MIN_M) == DENSE  # ... unless the heuristic goes dense there
    assert pick(1, n=8192) == heuristic_config(1, 4, 128)  # untuned shape: heuristic
    assert pick(1, n=1024) == TileConfig(1, 1, 8, xs=X_ROW)
    assert pick(2, n=1024) == heuristic_config(2, 4, 128)  # the M = 1 config takes one row
    assert select_config(1, 4096, 4096, 4, 128, "float16", gpu_name="Other GPU") == \
        heuristic_config(1, 4, 128)


def test_shared_memory_limit_picks_a_config_that_fits():
    big = select_config(4, 4096, 4096, 4, 128, "float16")
    need = KernelSpec(4, 128, "float16", big).shared_bytes
    small = select_config(4, 4096, 4096, 4, 128, "float16", max_shared_bytes=need - 1)
    assert KernelSpec(4, 128, "float16", small).shared_bytes < need
    # every bits/group fits sm_86/sm_89's 99 KiB opt-in limit with the fallback
    for bits in (2, 3, 4):
        for group in (32, 64, 128, 256, 0):
            for m in (1, 2):
                tile = select_config(m, 4096, 4096, bits, group, "float16", max_shared_bytes=101376)
                assert KernelSpec(bits, group, "float16", tile).shared_bytes <= 101376, (bits, group)
                assert tile.takes(m), (bits, group, m, tile)



@pytest.mark.parametrize("props", [
    {"sharedMemPerMultiprocessor": 233472, "reservedSharedMemPerBlock": 1024, "sharedMemPerBlockOptin": 232448},
    {"sharedMemPerMultiprocessor": 167936, "reservedSharedMemPerBlock": 1024, "sharedMemPerBlockOptin": 166912},
], ids=["sm_90", "sm_80"])
def test_spread_shared_memory_holds_an_sm_to_that_many_ctas(props):
    from cuflute.gemm import SHARED_GRANULE, spread_shared_bytes

    for ctas in range(1, 33):
        dynamic = spread_shared_bytes(ctas, props)
        assert 0 < dynamic <= props["sharedMemPerBlockOptin"]
        per_cta = -(-(dynamic + props["reservedSharedMemPerBlock"]) // SHARED_GRANULE) * SHARED_GRANULE
        assert props["sharedMemPerMultiprocessor"] // per_cta == ctas, (ctas, dynamic)


def test_warpgroup_configs_are_sm90a_kernels():
    config = WarpgroupConfig(bm=64, ks=4)
    assert config in WARPGROUP_CONFIGS and str(config) == "wg4_bm64_ks4_s2_b4"
    assert tile_config_from_name("wg4_bm64_ks4_s2_b4") == parse_tile_config(str(config)) == config
    assert parse_config("wg4_bm128_s2_b2") == WarpgroupConfig(bm=128, batch=2)
    with pytest.raises(ValueError, match="must be one of"):
        parse_tile_config("wg2_bm64_s2_b4")  # a valid name, not a built config
    assert (config.block_m, config.block_n_tiles, config.threads, config.needs_clusters) == (64, 16, 512, True)
    assert config.takes(10**6) and config.scales_a_operand
    spec = KernelSpec(3, 0, "bfloat16", config)
    assert spec.name_expression == "cuflute::lut_wgmma<3, 0, __nv_bfloat16, 64, 4, 2, 4, 4, false, false>"
    # Stream-K: no cluster, the same shared memory
    stream_k = WarpgroupConfig(bm=64, stream_k=True)
    assert stream_k in WARPGROUP_CONFIGS and str(stream_k) == "wg4_bm64_sk_s2_b4" and not stream_k.needs_clusters
    assert tile_config_from_name("wg4_bm64_sk_s2_b4") == stream_k
    assert KernelSpec(4, 128, "float16", stream_k).name_expression.endswith("64, 4, 2, 1, 4, true, false>")
    assert KernelSpec(4, 128, "float16", stream_k).shared_bytes == KernelSpec(4, 128, "float16",
                                                                              WarpgroupConfig(bm=64)).shared_bytes
    # codes and scales in registers: no warp's stages in shared memory (16 warps, two stages of a
    # tile's 2 KiB of 4-bit codes and 64 bytes of scales)
    reg_codes = WarpgroupConfig(bm=64, reg_codes=True)
    assert reg_codes in WARPGROUP_CONFIGS and str(reg_codes) == "wg4_bm64_s2_b4_rc"
    assert tile_config_from_name("wg4_bm64_s2_b4_rc") == reg_codes
    assert KernelSpec(4, 128, "float16", reg_codes).name_expression.endswith("64, 4, 2, 1, 4, false, true>")
    assert KernelSpec(4, 128, "float16", reg_codes).shared_bytes == \
        KernelSpec(4, 128, "float16", WarpgroupConfig(bm=64)).shared_bytes - 16 * 2 * (2048 + 64)
    assert builds_for(spec, 90) and not any(builds_for(spec, a) for a in (80, 86, 89, 100))
    assert spec in every_spec(90) and spec not in every_spec(80)
    # the LUT, two stages of x (256 k of 128 rows) and sixteen warps' codes and scales, two barriers
    big = KernelSpec(4, 128, "float16", WarpgroupConfig(bm=128, batch=2))
    assert big.shared_bytes == 32768 + 2 * (256 * 128 * 2 + 16 * (2048 + 64)) + 2 * 16 <= MAX_SHARED_BYTES[90]
    assert not builds_for(KernelSpec(4, 64, "float16", WarpgroupConfig(bm=128, batch=2)), 90)  # more scales
    # x's image for a BM: whole blocks of BM rows by whole chunks, one thread a 64-byte run, sm_90 alone
    image = XImageSpec(64)
    assert image.image_elements(65, 3) == 128 * 3 * 256 and image.grid(65, 3) == (128 * 3 * 256 // 32 // 256, 1, 1)
    assert image.name_expression == "cuflute::wgmma_x_image<64>" and image.shared_bytes == 0
    assert builds_for(image, 90) and not builds_for(image, 80)
    assert [s.bm for s in every_spec(90) if isinstance(s, XImageSpec)] == [32, 64, 128]
    assert not any(isinstance(s, XImageSpec) for a in (80, 86, 89) for s in every_spec(a))
    assert arch_option(90) == "-arch=sm_90a" and arch_option(80) == "-arch=sm_80"
    for bad, message in (({"bm": 16}, "bm must be"), ({"bm": 32, "wg": 8}, "wg must be"),
                         ({"bm": 64, "batch": 3}, "batch 1, 2, 4 or 8"), ({"bm": 64, "ks": 9}, "ks"),
                         ({"bm": 64, "ks": 2, "stream_k": True}, "without a cluster")):
        with pytest.raises(ValueError, match=message):
            WarpgroupConfig(**bad)
