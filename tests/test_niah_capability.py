"""Long context end to end (long-context.md §5): the notebook ``08_long_context`` trains the tiny MLA model at
L = 64 without YaRN on synthetic pass keys, evaluates the needle grid up to 4L three ways (no YaRN, YaRN without
training, YaRN after a short fine-tune at 2L), compares argmax with greedy-through-the-cache scoring, trains
the GQA model of equal parameters, an NSA model and a DSA model (indexer warm-up + sparse stage from the dense
run); its ``results.json`` is checked here against floors fixed from the calibration runs reported in the README
(sections "Long context" and "Sparse attention"), with margin."""

import json
from pathlib import Path

import pytest
from notebook_run import run_notebook

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "08_long_context.py"
L = 64
# the floors; the calibration run (README, "Long context") clears them with the margins stated there
AT_L_MEAN, AT_L_CELL = 0.95, 0.90
EXTENDED_4L, EXTENDED_GAIN = 0.80, 0.20
FINE_TUNED_AT_L = 0.90  # the extension keeps the short lengths (not a floor of the issue's)
NSA_AT_L, NSA_AT_HALF_L = 0.95, 0.90  # "within 5 points of dense" (1.00 / 1.00); calibration: 0.98 / 0.98
DSA_AT_L, DSA_AT_HALF_L = 0.90, 0.90  # calibration: 1.00 / 1.00 (top 16 of 64 keys)


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    out = tmp_path_factory.mktemp("niah")
    run_notebook(NOTEBOOK, {"NIAH_OUT": str(out)})
    return json.loads((out / "results.json").read_text())


def test_the_trained_length_is_solved(res):
    r = res["results"]["no_yarn"]
    assert min(v for k, v in r["by_length"].items() if int(k) <= L) >= AT_L_MEAN, r
    assert r["min_cell_at_most_L"] >= AT_L_CELL, r


def test_yarn_with_a_short_fine_tune_at_2l_extends_to_4l(res):
    r = res["results"]
    ext, base = r["yarn_ft"]["by_length"][str(4 * L)], r["no_yarn"]["by_length"][str(4 * L)]
    assert ext >= EXTENDED_4L and ext - base >= EXTENDED_GAIN, (ext, base, r["yarn"]["by_length"])
    assert min(v for k, v in r["yarn_ft"]["by_length"].items() if int(k) <= L) >= FINE_TUNED_AT_L, r["yarn_ft"]


def test_argmax_and_generate_scoring_agree_on_the_trained_model(res):
    assert res["agree"]
    assert res["results"]["yarn_ft_generate"]["by_length"] == res["results"]["yarn_ft_argmax_check"]["by_length"]


def test_mla_caches_fewer_bytes_than_gqa_of_equal_parameters_as_the_formula_says(res):
    """fp32, 2 layers: MLA (64 latent + 16 RoPE key) x 4 B x 2 = 640 B per token; GQA 2 x 2 heads x 32 x 4 B x 2
    = 1024 B per token; measured from the allocated caches at every evaluated length."""
    mla, gqa = res["cache"]["mla"], res["cache"]["gqa"]
    assert mla["formula_bytes_per_token"] == (64 + 16) * 4 * 2 and gqa["formula_bytes_per_token"] == 2 * 2 * 32 * 4 * 2
    for c in (mla, gqa):
        assert set(c["measured_bytes_per_token"].values()) == {c["formula_bytes_per_token"]}
    assert res["results"]["gqa"]["by_length"][str(L)] >= AT_L_MEAN  # the same task, learnt as well


@pytest.mark.parametrize("model, at_l, at_half_l", [("nsa", NSA_AT_L, NSA_AT_HALF_L), ("dsa", DSA_AT_L, DSA_AT_HALF_L)])
def test_sparse_attention_retrieves_like_dense_attention_at_the_trained_length(res, model, at_l, at_half_l):
    by = res["results"][model]["by_length"]
    assert by[str(L)] >= at_l and by[str(L // 2)] >= at_half_l, (model, by, res["results"]["no_yarn"]["by_length"])


def test_the_dsa_indexer_learns_the_attention_in_its_warm_up(res):
    kl = res["indexer_kl"]["dsa_warmup"]
    assert kl[-1] < 0.5 * kl[0], kl
