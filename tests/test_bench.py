"""The benchmark's FLOP accounting against the performance issue's figures, and one short run."""

import json

import pytest

from tf_charrnn import bench
from tf_charrnn.errors import CharRNNError


@pytest.mark.parametrize("recipe, mflop_per_trained_char", [
    ("lecture", 1.62), ("medium", 5.2), ("large", 33.2)])
def test_flops_per_char_match_the_hand_counts(recipe, mflop_per_trained_char):
    """Forward + backward = 3x the forward matmuls (the issue's accounting, vocabulary 65)."""
    config = bench.recipe_config(recipe)
    trained = 3 * bench.flops_per_char(config, bench.VOCAB_SIZE) / 1e6
    assert trained == pytest.approx(mflop_per_trained_char, abs=0.05)


def test_gemm_dtypes_follow_the_precision_and_the_kernel():
    """mixed_bfloat16: the fused kernel's input projections run in bfloat16, its per-step product
    and the output layer in float32; Keras's own loop runs its per-step product in bfloat16."""
    fused = bench.gemm_shapes(bench.recipe_config("lecture", "fused", None, "mixed_bfloat16"), 65)
    assert [dtype for _, _, dtype in fused] == ["bfloat16", "float32"] * 2 + ["float32"]
    stock = bench.gemm_shapes(bench.recipe_config("lecture", "keras", None, "mixed_bfloat16"), 65)
    assert [dtype for _, _, dtype in stock] == ["bfloat16"] * 4 + ["float32"]
    plain = bench.gemm_shapes(bench.recipe_config("lecture"), 65)
    assert {dtype for _, _, dtype in plain} == {"float32"}
    assert [count for _, count, _ in plain] == [1, 50, 1, 50, 1]


def test_a_short_run_prints_the_table_and_writes_every_key(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench.main(["--recipe", "min_char_rnn", "--seconds", "0.3", "--sample-seconds", "0.3",
                       "--matmul-seconds", "0.05", "--preprocess-mb", "1", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| min_char_rnn |" in printed
    summary = json.loads(out.read_text())
    (result,) = summary["recipes"]
    for key in ("train_chars_per_sec", "flops_per_char", "matmul_gflops",
                "sample_chars_per_sec_1", "sample_chars_per_sec_64",
                "naive_sample_chars_per_sec"):
        assert result[key] > 0, key
    assert summary["preprocess_mb_per_sec"] > 0 and summary["peak_rss_mb"] > 0


@pytest.mark.parametrize("flag", [["--vs-torch"], ["--val-budget", "5"]])
def test_a_missing_corpus_is_named_before_anything_runs(tmp_path, flag):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(CharRNNError, match=f"{flag[0]} needs a corpus: .*nowhere.txt not found"):
        bench.main(["--recipe", "lecture", "--corpus", str(missing)] + flag)
