"""The benchmark's pure parts (arguments, byte counts, formatting, the no-GPU path) on the CPU,
and one small end-to-end run where a GPU and PyTorch are present."""
import argparse
import csv
import io
import json

import numpy as np
import pytest

from cuflute import bench, pack, quantize
from cuflute.packing import packed_nbytes


def parse(*argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_are_the_llama3_layers_and_issue_settings():
    args = parse()
    assert args.shapes == [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
                           (10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)]
    assert args.m == [1, 4, 16, 32, 64, 128]
    assert args.bits == [4, 3]
    assert (args.group_size, args.dtype, args.peers) == (128, "float16", True)
    assert args.rotate_bytes is None  # resolved to 2 x L2 on the GPU
    assert args.bcq is True and parse("--no-bcq").bcq is False
    assert args.json is args.csv is args.markdown is None


def test_flags_parse():
    args = parse("--shapes", "4096x4096, 8192x28672", "--m", "1,7", "--bits", "3",
                 "--group-size", "64", "--dtype", "bfloat16", "--rotate-bytes", "512MiB",
                 "--replays", "5", "--graph-calls", "4", "--no-peers", "--json", "a.json",
                 "--csv", "a.csv", "--markdown", "a.md")
    assert args.shapes == [(4096, 4096), (8192, 28672)]
    assert args.m == [1, 7] and args.bits == [3]
    assert (args.group_size, args.dtype, args.rotate_bytes) == (64, "bfloat16", 512 * 2**20)
    assert (args.replays, args.graph_calls, args.peers) == (5, 4, False)
    assert (args.json, args.csv, args.markdown) == ("a.json", "a.csv", "a.md")


@pytest.mark.parametrize("argv", [
    ["--shapes", "4096"], ["--shapes", "4096x"], ["--shapes", "0x4096"], ["--shapes", "axb"],
    ["--m", "0"], ["--m", "1,x"], ["--bits", "5"], ["--bits", "4,1"], ["--group-size", "100"],
    ["--dtype", "float32"], ["--rotate-bytes", "12 parsecs"], ["--rotate-bytes", "0"],
    ["--replays", "0"], ["--graph-calls", "0"],
])
def test_bad_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("copies, graph_calls, repeats", [
    (2, 16, 8), (3, 16, 6), (48, 16, 1), (16, 16, 1), (5, 1, 1),
])
def test_a_timed_graph_repeats_the_copies_to_hold_enough_calls(copies, graph_calls, repeats):
    assert bench.graph_repeats(copies, graph_calls) == repeats
    assert (repeats - 1) * copies < graph_calls <= repeats * copies


@pytest.mark.parametrize("text, expected", [
    ("123", 123), ("100MB", 10**8), ("2GiB", 2 << 30), ("64 KiB", 65536), ("512mib", 2**29),
])
def test_parse_bytes(text, expected):
    assert bench.parse_bytes(text) == expected


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n, k, group_size", [(16, 256, 128), (40, 384, 128), (7, 96, 32),
                                              (33, 512, 256), (130, 1280, 64)])
def test_packed_nbytes_matches_the_packer(n, k, group_size, bits):
    w = np.random.default_rng(n * k + bits).standard_normal((n, k))
    packed = pack(quantize(w, bits=bits, group_size=group_size))
    assert packed_nbytes(n, k, bits, group_size) == packed.nbytes, f"{n=} {k=} {bits=}"


def test_byte_counts_of_a_llama_layer():
    # 4-bit 4096x4096, group 128: codes N*K/2, scales N*(K/128)*2 bytes, pair LUT 256 * 4.
    packed = 4096 * 4096 // 2 + 4096 * 32 * 2 + 256 * 4
    assert packed_nbytes(4096, 4096, 4, 128) == packed
    assert bench.call_bytes(4096, 4096, 16, 4, 128) == packed + 2 * 16 * 4096 * 2
    assert bench.dense_call_bytes(4096, 4096, 1) == 2 * 4096 * 4096 + 2 * 4096 + 2 * 4096
    # 3 bits: 3/8 of a byte per code, on a K that is no multiple of 256 (padded to 14336).
    assert packed_nbytes(4096, 14336, 3, 128) == (4096 * 14336 * 3 // 8
                                                        + 4096 * 112 * 2 + 64 * 4)


def test_rotation_copies_overflow_the_budget_and_are_at_least_two():
    assert bench.rotation_copies(100 << 20, 8 << 20) == 13  # ceil(100 / 8)
    assert bench.rotation_copies(100 << 20, 10 << 20) == 10
    assert bench.rotation_copies(100 << 20, 940 << 20) == 2


def row(n=4096, k=4096, m=1, bits=4, us=10.0, baseline_us=30.0, peers=None, copy_gbps=3000.0):
    return bench.make_row(n, k, m, bits, 128, "float16", us, baseline_us, peers or {}, copy_gbps)


def test_make_row_arithmetic():
    r = row(us=10.0, baseline_us=30.0, peers={"torch-int4": 15.0}, copy_gbps=2000.0)
    assert r.bytes == bench.call_bytes(4096, 4096, 1, 4, 128)
    assert r.gbps == pytest.approx(r.bytes / 10e-6 / 1e9)
    assert r.roofline == pytest.approx(r.gbps / 2000.0)
    assert r.speedup == pytest.approx(3.0)
    assert (r.torch_int4_us, r.torch_int4_x) == (15.0, pytest.approx(2.0))
    assert r.bnb_nf4_us is None and r.bnb_nf4_x is None


def test_held_dense_rows_count_the_dense_weight_and_show_their_path():
    held = bench.make_row(4096, 4096, 128, 4, 128, "float16", 20.0, 20.0, {}, 3000.0, path="held W'")
    assert held.bytes == bench.dense_call_bytes(4096, 4096, 128)
    header, cells = bench.result_table([held, row(m=128)], "float16", [], path=True)
    assert header[:6] == ["N", "K", "M", "bits", "path", "us"]
    assert [c[4] for c in cells] == ["held W'", "kernel"]
    assert "path" not in bench.result_table([held], "float16", [])[0]


def test_cuflute_path_is_the_dispatchers_pick():
    from cuflute.dispatch import DENSE_CACHED_MIN_M, DENSE_MIN_M

    path = lambda m, held: bench.cuflute_path(4096, 4096, m, 4, 128, "float16", "No GPU", held)
    assert path(1, True) == path(DENSE_CACHED_MIN_M, False) == "kernel"
    assert path(DENSE_CACHED_MIN_M, True) == "held W'" and path(DENSE_MIN_M, False) == "dense"


def test_summary_is_the_median_over_shapes_per_m_and_bits():
    rows = [row(n=n, m=m, bits=bits, us=us, baseline_us=30.0,
                peers={"torch-int4": 60.0} if n == 4096 else {})
            for m in (1, 16) for bits in (4, 3)
            for n, us in ((4096, 30.0), (6144, 15.0), (8192, 3.0))]
    summary = bench.summarize(rows)
    assert [(s["m"], s["bits"]) for s in summary] == [(1, 4), (1, 3), (16, 4), (16, 3)]
    for s in summary:
        assert s["shapes"] == 3
        assert s["speedup"] == pytest.approx(2.0)  # of 1, 2, 10
        assert s["torch_int4_x"] == pytest.approx(0.5)  # only one shape has it
        assert s["bnb_nf4_x"] is None


def test_text_and_markdown_tables():
    rows = [row(us=12.34, baseline_us=37.02, peers={"torch-int4": 20.0}), row(m=16, us=20.0)]
    header, cells = bench.result_table(rows, "float16", ["torch-int4"])
    assert header == ["N", "K", "M", "bits", "us", "GB/s", "roofline", "fp16 us", "x fp16",
                      "torch-int4 us", "torch-int4 x"]
    assert cells[0][:5] == ["4096", "4096", "1", "4", "12.3"]
    assert cells[0][8:] == ["3.00", "20.0", "1.85"]
    assert cells[1][-2:] == ["-", "-"]
    text = bench.render_text(header, cells).splitlines()
    assert len(text) == 3 and len({len(line) for line in text}) == 1  # aligned columns
    markdown = bench.render_markdown(header, cells).splitlines()
    assert markdown[1] == "|" + " ---: |" * len(header)
    assert all(line.count("|") == len(header) + 1 for line in markdown)
    assert bench.result_table(rows, "bfloat16", [])[0][-2:] == ["bf16 us", "x bf16"]


def info(**overrides):
    fields = dict(gpu="NVIDIA H100 80GB HBM3", sm_count=132, l2_bytes=50 << 20,
                  copy_gbps=3012.0, date="2026-11-25 10:00 UTC",
                  versions={"cuflute": "0.1.0", "torch": "2.11.0", "cuda": "13.0",
                            "cupy": "14.2.0", "bitsandbytes": None},
                  dtype="float16", group_size=128, rotate_bytes=100 << 20, replays=20,
                  graph_calls=16, peers=["torch-int4"], unavailable={"bnb-nf4": "ModuleNotFoundError: x"})
    fields.update(overrides)
    return bench.RunInfo(**fields)


def test_csv_json_and_markdown_outputs():
    rows = [row(peers={"torch-int4": 20.0}), row(m=16, bits=3)]
    parsed = list(csv.DictReader(io.StringIO(bench.rows_csv(rows))))
    assert [(p["m"], p["bits"]) for p in parsed] == [("1", "4"), ("16", "3")]
    assert float(parsed[0]["speedup"]) == pytest.approx(3.0)
    assert parsed[1]["torch_int4_us"] == ""

    data = json.loads(bench.results_json(info(), rows))
    assert data["info"]["copy_gbps"] == 3012.0
    assert [r["m"] for r in data["rows"]] == [1, 16]
    assert [(s["m"], s["bits"]) for s in data["summary"]] == [(1, 4), (16, 3)]

    report = bench.markdown_report(info(), rows)
    for expected in ("NVIDIA H100 80GB HBM3", "2026-11-25", "torch 2.11.0", "cupy 14.2.0",
                     "bitsandbytes not installed", "3012 GB/s", "| torch-int4 us |",
                     "bnb-nf4: unavailable (ModuleNotFoundError: x)", "## Median over the shapes"):
        assert expected in report, expected


def test_bcq_columns_beside_the_lut_kernel_with_a_dash_past_its_range():
    rows = [bench.make_row(4096, 4096, 1, 4, 128, "float16", 10.0, 30.0, {"torch-int4": 15.0},
                           3000.0, bcq_us=12.0),
            row(m=16, us=20.0, baseline_us=30.0)]
    assert rows[0].bcq_us == 12.0 and rows[0].bcq_x == pytest.approx(2.5)
    assert rows[1].bcq_us is None and rows[1].bcq_x is None
    header, cells = bench.result_table(rows, "float16", ["torch-int4"], bcq=True)
    assert header[7:] == ["fp16 us", "x fp16", "bcq us", "bcq x", "torch-int4 us", "torch-int4 x"]
    assert cells[0][9:11] == ["12.0", "2.50"] and cells[1][9:11] == ["-", "-"]
    assert bench.result_table(rows, "float16", [])[0][-1] == "x fp16"  # no BCQ columns
    summary = bench.summarize(rows)
    assert summary[0]["bcq_x"] == pytest.approx(2.5) and summary[1]["bcq_x"] is None
    s_header, s_cells = bench.summary_table(summary, "float16", [], bcq=True)
    assert s_header == ["M", "bits", "x fp16", "roofline", "bcq x"] and s_cells[1][-1] == "-"
    report = bench.markdown_report(info(bcq=True), rows)
    assert "| bcq us | bcq x |" in report and "| bcq x |" in report.split("## Median")[1]
    assert float(list(csv.DictReader(io.StringIO(bench.rows_csv(rows))))[0]["bcq_x"]) == 2.5


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("n, k", [(4096, 4096), (40, 1000)])
def test_bcq_bytes_match_its_packer(n, k, bits):
    from cuflute import bcq
    from cuflute.bcq.packing import packed_nbytes as bcq_nbytes

    assert bcq.random_packed(n, k, bits, 128).nbytes == bcq_nbytes(n, k, bits, 128), f"{n=} {k=}"


def test_write_atomically_replaces_the_file(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    bench.write_atomically(str(path), "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_first_line_of_an_exception():
    assert bench.first_line(RuntimeError("bad shape\n  at line 3")) == "RuntimeError: bad shape"


def test_without_a_gpu_it_explains_prints_the_nominal_floor_and_exits_0(
        monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench, "gpu_skip_reason", lambda: "no CUDA GPU here")
    out_json = tmp_path / "r.json"
    args = parse("--shapes", "4096x4096", "--m", "1,16", "--json", str(out_json))
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    assert "No GPU available: no CUDA GPU here." in out
    assert "cuflute, cuBLAS, torch-int4, bnb-nf4, cuflute.bcq" in out
    assert f"Not written, since nothing was measured: {out_json}" in out
    assert "NOMINAL 3.0 TB/s" in out and "not measured" in out
    assert not out_json.exists()
    floor = [line.split() for line in out.splitlines() if line.startswith("4096")]
    assert [(f[2], f[3]) for f in floor] == [("1", "4"), ("1", "3"), ("16", "4"), ("16", "3")]
    nbytes = bench.call_bytes(4096, 4096, 1, 4, 128)
    assert floor[0][5] == f"{nbytes / 3000.0 / 1e3:.2f}"  # floor us at 3000 GB/s
    assert float(floor[0][7]) == pytest.approx(
        bench.dense_call_bytes(4096, 4096, 1) / nbytes, abs=0.01)  # ideal x fp16, about 3.9


def test_plain_progress_counts_steps(capsys):
    bar = bench.PlainProgress(3)
    bar.set_description("4096x4096 cuBLAS fp16 M=1")
    bar.update()
    bar.set_description("4096x4096 cuflute 4-bit M=1")
    assert capsys.readouterr().err.splitlines() == ["[1/3] 4096x4096 cuBLAS fp16 M=1",
                                                    "[2/3] 4096x4096 cuflute 4-bit M=1"]


@pytest.mark.gpu
def test_small_run_on_a_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if bench.gpu_skip_reason() is not None:
        pytest.skip(bench.gpu_skip_reason())
    del torch
    path = tmp_path / "r.json"
    args = parse("--shapes", "1024x2048", "--m", "1,16", "--bits", "4", "--replays", "3",
                 "--rotate-bytes", "16MiB", "--json", str(path))
    assert bench.run(args) == 0
    data = json.loads(path.read_text())
    assert len(data["rows"]) == 2
    for r in data["rows"]:
        assert r["us"] > 0 and r["baseline_us"] > 0 and 0 < r["roofline"] < 1.5, r
    assert data["info"]["copy_gbps"] > 100
