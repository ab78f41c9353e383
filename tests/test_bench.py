"""The benchmark's FLOP accounting against the performance issue's figures, and one short run."""

import importlib.util
import json
import types

import pytest

from tf_charrnn import bench, native
from tf_charrnn.errors import CharRNNError, UsageError


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
    best_64 = max(result["sample_chars_per_sec_64"],
                  result.get("sample_chars_per_sec_64_bfloat16", 0))
    best_1 = max(result["sample_chars_per_sec_1"], result.get("sample_chars_per_sec_1_bfloat16", 0))
    assert result["sample_64_over_1"] == pytest.approx(best_64 / best_1)
    if native.bfloat16_generation():
        assert result["sample_chars_per_sec_64_bfloat16"] > 0
    assert summary["preprocess_mb_per_sec"] > 0 and summary["peak_rss_mb"] > 0


@pytest.mark.parametrize("flag", [["--vs-torch"], ["--val-budget", "5"]])
def test_a_missing_corpus_is_named_before_anything_runs(tmp_path, flag):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(CharRNNError, match=f"{flag[0]} needs a corpus: .*nowhere.txt not found"):
        bench.main(["--recipe", "lecture", "--corpus", str(missing)] + flag)


def test_val_dropout_must_be_a_rate():
    with pytest.raises(UsageError, match=r"--val-dropout must be in \[0, 1\), got 1.0"):
        bench.main(["--recipe", "lecture", "--val-dropout", "1"])


def test_the_budget_run_trains_with_the_given_dropout(tmp_path, monkeypatch):
    """The quality run's config: the recipe's model with dropout, the time budget, a 90/10 split."""
    import tf_charrnn.train

    seen = []

    def fake_train(config, **kwargs):
        seen.append(config)
        return types.SimpleNamespace(val_loss=1.5, step=7, epoch=1)

    monkeypatch.setattr(tf_charrnn.train, "train", fake_train)
    corpus = tmp_path / "input.txt"
    corpus.write_text("some text\n" * 50)
    result = bench.measure_val_loss(bench.recipe_config("gru"), 3, corpus, dropout=0.1)
    cosine = bench.measure_val_loss(bench.recipe_config("gru"), 3, corpus, schedule="cosine")
    config, cosine_config = seen
    assert (config.model.cell, config.model.hidden_size, config.model.dropout) == ("gru", 128, 0.1)
    assert config.train.max_seconds == 3 and config.data.val_fraction == 0.1
    assert (config.train.schedule, cosine_config.train.schedule) == ("exponential", "cosine")
    assert result == {"val_loss_at_budget": 1.5, "steps_at_budget": 7, "epochs_at_budget": 1,
                      "val_dropout": 0.1, "val_schedule": "exponential"}
    assert cosine["val_schedule"] == "cosine" and cosine_config.model.dropout == 0.0


@pytest.mark.parametrize("flags, message", [
    (["--seconds", "inf"], "--seconds must be a positive number of seconds, got inf"),
    (["--seconds", "nan"], "--seconds must be a positive number of seconds, got nan"),
    (["--val-budget", "-1"], "--val-budget must be a positive number of seconds, got -1.0"),
    (["--preprocess-mb", "nan"], r"--preprocess-mb must be 0 \(skip\) or at least 1, got nan"),
    (["--preprocess-mb", "1e-7"], r"--preprocess-mb must be 0 \(skip\) or at least 1"),
    (["--steps-per-call", "0"], "--steps-per-call must be at least 1, got 0"),
])
def test_values_that_would_fail_later_are_refused_first(flags, message, monkeypatch):
    monkeypatch.setattr(bench, "bench_recipe", lambda *args: pytest.fail("measured"))
    with pytest.raises(UsageError, match=message):
        bench.main(["--recipe", "lecture"] + flags)


def test_an_unwritable_json_path_is_refused_before_measuring(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "bench_recipe", lambda *args: pytest.fail("measured"))
    with pytest.raises(UsageError, match="its directory does not exist"):
        bench.main(["--recipe", "lecture", "--json", str(tmp_path / "no" / "b.json")])
    with pytest.raises(UsageError, match="is a directory"):
        bench.main(["--recipe", "lecture", "--json", str(tmp_path)])


def test_vs_torch_without_torch_says_so_before_measuring(tmp_path, monkeypatch):
    corpus = tmp_path / "input.txt"
    corpus.write_text("some text\n" * 100)
    monkeypatch.setattr(bench, "bench_recipe", lambda *args: pytest.fail("measured"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: (
        None if name == "torch" else real_find_spec(name, *args)))
    with pytest.raises(CharRNNError, match="--vs-torch needs PyTorch: pip install torch"):
        bench.main(["--recipe", "lecture", "--vs-torch", "--corpus", str(tmp_path)])
