"""Every command, fed missing, malformed and out-of-range arguments, fails in one line.

Exit code 2 for a usage error (a bad flag or value), 1 for a runtime error (a missing corpus, run
or checkpoint), with one `error: ...` line on stderr and no traceback; `--debug` shows the
traceback instead. Most rows run in-process through run_cli; a few run as real processes to
check the real exit code and stderr.
"""

import os
import re
import subprocess
import sys

import pytest

from tf_charrnn.cli import run_cli
from tf_charrnn.config import Config, apply_overrides
from tf_charrnn.errors import CharRNNError
from tf_charrnn.train import train

MODULES = ("tf_charrnn.train", "tf_charrnn.sample", "tf_charrnn.export")

# TensorFlow 2.21's start-up notices, written to stderr while it loads. The in-process rows skip
# them; test_a_failing_command_prints_nothing_but_its_error_line checks a real process has none.
TF_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|"
                      r"[IWE]\d{4} [\d:.]+\s+\d+ \S+:\d+\]|To enable the following instructions)")

SMALL = ["--batch-size", "4", "--seq-length", "8", "--num-layers", "1", "--hidden-size", "8",
         "--embedding-size", "4", "--kernel", "keras", "--max-steps", "2"]


def main_of(module):
    """The module's main, or a skip when another engineer has not written it yet."""
    try:
        imported = __import__(module, fromlist=["main"])
    except ImportError as error:
        pytest.skip(f"{module} is not importable yet ({error})")
    if not hasattr(imported, "main"):
        pytest.skip(f"{module} has no main() yet")
    return imported.main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths the rows refer to: corpora good and bad, a trained run, an untrained one."""
    from conftest import TINY_TEXT

    root = tmp_path_factory.mktemp("cli")
    (root / "corpus").mkdir()
    (root / "corpus" / "input.txt").write_text(TINY_TEXT, encoding="utf-8")
    (root / "empty.txt").write_bytes(b"")
    (root / "short.txt").write_text("too short", encoding="utf-8")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (root / "latin1.txt").write_bytes("café crème brûlée\n".encode("latin-1") * 40)
    (root / "bad.yaml").write_text("train: [unclosed\n")
    (root / "list.yaml").write_text("- just\n- a list\n")
    (root / "a_file").write_text("not a directory")
    (root / "empty_runs").mkdir()
    (root / "nonempty").mkdir()
    (root / "nonempty" / "x").write_text("x")
    (root / "runs" / "untrained").mkdir(parents=True)
    config = apply_overrides(Config(), [
        ("data", "corpus", str(root / "corpus" / "input.txt")),
        ("train", "runs_dir", str(root / "runs")), ("data", "batch_size", 4),
        ("data", "seq_length", 8), ("model", "num_layers", 1), ("model", "hidden_size", 8),
        ("model", "embedding_size", 4), ("model", "kernel", "keras"), ("train", "max_steps", 2)])
    train(config, run_name="good", log=lambda *a, **k: None)
    return root


def expand(argv, root):
    return [arg.replace("ROOT", str(root)) for arg in argv]


def check_one_line(err, code, expected_code, fragment):
    """stderr ends in the one line `error: ...` naming the problem; before it there may only be
    what the command reports as it goes (the sampler names its checkpoint), never a traceback."""
    lines = [line for line in err.splitlines() if line.strip() and not TF_NOISE.match(line)]
    assert "Traceback" not in err, err
    assert code == expected_code, err
    assert [line for line in lines if line.startswith("error")] == lines[-1:], err
    assert fragment in lines[-1], lines[-1]
    return lines[-1]


TRAIN = "tf_charrnn.train"
SAMPLE = "tf_charrnn.sample"
EXPORT = "tf_charrnn.export"
CORPUS = ["--corpus", "ROOT/corpus/input.txt", "--runs-dir", "ROOT/runs", "--run", "new"]

ROWS = [
    # train: usage errors (2)
    (TRAIN, ["--max-steps"], 2, "argument --max-steps: expected one argument"),
    (TRAIN, ["--max-steps", "ten"], 2, "argument --max-steps: invalid int value: 'ten'"),
    (TRAIN, ["--learning-rate", "fast"], 2, "argument --learning-rate: invalid float value"),
    (TRAIN, ["--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
    (TRAIN, [*CORPUS, "--max-steps", "0"], 2, "train.max_steps must be positive"),
    (TRAIN, [*CORPUS, "--batch-size", "-3"], 2, "data.batch_size must be positive"),
    (TRAIN, [*CORPUS, "--seq-length", "0"], 2, "data.seq_length must be positive"),
    (TRAIN, [*CORPUS, "--learning-rate", "-1"], 2, "train.learning_rate must be positive"),
    (TRAIN, [*CORPUS, "--val-fraction", "1.5"], 2, "data.val_fraction must be in [0, 1)"),
    (TRAIN, [*CORPUS, "--dropout", "1.0"], 2, "model.dropout must be in [0, 1)"),
    (TRAIN, [*CORPUS, "--cell", "transformer"], 2, "model.cell must be one of rnn, lstm, gru"),
    (TRAIN, [*CORPUS, "--kernel", "magic"], 2, "model.kernel must be one of"),
    (TRAIN, [*CORPUS, "--checkpoint-every", "0"], 2, "train.checkpoint_every must be positive"),
    (TRAIN, [*CORPUS, "--set", "train.max_steps"], 2, "must look like section.field=value"),
    (TRAIN, [*CORPUS, "--set", "nosection.x=1"], 2, "unknown config section 'nosection'"),
    (TRAIN, [*CORPUS, "--set", "train.max_steps=many"], 2, "train.max_steps must be int"),
    (TRAIN, [*CORPUS, "--config", "ROOT/missing.yaml"], 2,
     "config file ROOT/missing.yaml not found"),
    (TRAIN, [*CORPUS, "--config", "ROOT/bad.yaml"], 2, "is not valid YAML"),
    (TRAIN, [*CORPUS, "--config", "ROOT/list.yaml"], 2, "must be a mapping"),
    (TRAIN, [*CORPUS, "--encoding", "klingon"], 2,
     "data.encoding must be a text encoding Python knows (e.g. utf-8, cp949, latin-1), got "
     "'klingon'"),
    (TRAIN, [*CORPUS, "--encoding", "base64"], 2,  # a codec, but bytes to bytes
     "data.encoding must be a text encoding Python knows"),
    (TRAIN, [*CORPUS, "--encoding", "undefined"], 2,  # a text codec that refuses every input
     "cannot decode ROOT/corpus/input.txt as undefined"),
    (TRAIN, [*CORPUS, "--seed", "-1"], 2, "train.seed must be in [0, 2**32), got -1"),
    (TRAIN, [*CORPUS, "--seed", str(2 ** 32)], 2, "train.seed must be in [0, 2**32)"),
    # A UTF-8 locale keeps argv bytes that are not UTF-8 (EUC-KR, here) as lone surrogates.
    (TRAIN, ["--corpus", "\udcbf\udcbe.txt"], 2, "--corpus is not UTF-8 text"),
    # train: runtime errors (1)
    (TRAIN, ["--corpus", "ROOT/no/such.txt", "--runs-dir", "ROOT/runs", *SMALL], 1,
     "ROOT/no/such.txt does not exist"),
    (TRAIN, ["--corpus", "ROOT/empty.txt", "--runs-dir", "ROOT/runs", *SMALL], 1, "is empty"),
    (TRAIN, ["--corpus", "ROOT/short.txt", "--runs-dir", "ROOT/runs", *SMALL], 1,
     "is too short"),
    (TRAIN, ["--corpus", "ROOT/binary.bin", "--runs-dir", "ROOT/runs", *SMALL], 1,
     "looks binary"),
    (TRAIN, ["--corpus", "ROOT/latin1.txt", "--runs-dir", "ROOT/runs", "--encoding", "utf-8",
             *SMALL], 1, "cannot decode"),
    (TRAIN, ["--corpus", "ROOT/corpus/input.txt", "--runs-dir", "ROOT/a_file", "--run", "x",
             *SMALL], 1, "cannot create run directory"),
    (TRAIN, ["--corpus", "ROOT/corpus/input.txt", "--runs-dir", "ROOT/runs", "--run", "nope",
             "--resume", *SMALL], 1, "has no checkpoint to resume from"),
    (TRAIN, ["--corpus", "ROOT/corpus/input.txt", "--runs-dir", "ROOT/empty_runs", "--resume",
             *SMALL], 1, "no trained run found under ROOT/empty_runs"),
    (TRAIN, ["--corpus", "ROOT/corpus/input.txt", "--runs-dir", "ROOT/runs", "--run", "good",
             *SMALL[:-6], "--hidden-size", "16", "--kernel", "keras", "--max-steps", "4"], 1,
     "model.hidden_size differs"),
    # sample: usage errors (2)
    (SAMPLE, ["--length"], 2, "argument -n/--length: expected one argument"),
    (SAMPLE, ["--length", "many"], 2, "invalid int value: 'many'"),
    (SAMPLE, ["--run", "ROOT/runs/good", "--length", "-5"], 2,
     "length must be an integer >= 0, got -5"),
    (SAMPLE, ["--run", "ROOT/runs/good", "--temperature", "0"], 2, "temperature must be > 0"),
    (SAMPLE, ["--run", "ROOT/runs/good", "--temperature", "hot"], 2, "invalid float value"),
    (SAMPLE, ["--run", "ROOT/runs/good", "--top-k", "-1"], 2, "top_k must be an integer >= 0"),
    (SAMPLE, ["--run", "ROOT/runs/good", "--top-p", "1.5"], 2, "top_p must be in (0, 1]"),
    (SAMPLE, ["--run", "ROOT/runs/good", "--num-samples", "0"], 2,
     "num_samples must be an integer >= 1"),
    (SAMPLE, ["--run", "ROOT/runs/good", "--unknown", "ignore"], 2, "invalid choice: 'ignore'"),
    (SAMPLE, ["--run", "ROOT/runs/good", "--checkpoint", "ROOT/runs/good/checkpoints/ckpt-2"], 2,
     "not allowed with argument --run"),
    (SAMPLE, ["--bogus"], 2, "unrecognized arguments: --bogus"),
    (SAMPLE, ["--run", "ROOT/runs/good", "--prime", "\udcbf\udcbe\udcb3\udcaf"], 2,
     "--prime is not UTF-8 text ('\\udcbf\\udcbe\\udcb3\\udcaf'): give it in UTF-8"),
    # sample: runtime errors (1)
    (SAMPLE, ["--run", "ROOT/runs/missing"], 1, "run directory ROOT/runs/missing not found"),
    (SAMPLE, ["--run", "ROOT/runs/untrained"], 1, "ROOT/runs/untrained is not a run directory"),
    (SAMPLE, ["--runs-dir", "ROOT/empty_runs"], 1, "no trained run found under ROOT/empty_runs"),
    (SAMPLE, ["--checkpoint", "ROOT/runs/good/checkpoints/ckpt-99"], 1,
     "no complete checkpoint at ROOT/runs/good/checkpoints/ckpt-99"),
    (SAMPLE, ["--run", "ROOT/runs/good", "--prime", "\u2603"], 1,
     "not in the run's vocabulary"),
    # export: usage errors (2)
    (EXPORT, ["--run", "ROOT/runs/good"], 2, "the following arguments are required: --out"),
    (EXPORT, ["--out"], 2, "argument --out: expected one argument"),
    (EXPORT, ["--run", "ROOT/runs/good", "--out", "ROOT/x", "--frobnicate"], 2,
     "unrecognized arguments: --frobnicate"),
    (EXPORT, ["--run", "ROOT/runs/good", "--out", "ROOT/ex\udcff"], 2,
     "--out is not UTF-8 text"),
    # export: runtime errors (1)
    (EXPORT, ["--run", "ROOT/runs/missing", "--out", "ROOT/out-missing"], 1,
     "run directory ROOT/runs/missing not found"),
    (EXPORT, ["--run", "ROOT/runs/good", "--out", "ROOT/nonempty"], 1,
     "already exists and is not empty"),
    (EXPORT, ["--run", "ROOT/runs/good", "--out", "ROOT/a_file"], 1,
     "--out ROOT/a_file already exists"),
    (EXPORT, ["--runs-dir", "ROOT/empty_runs", "--out", "ROOT/out-none"], 1,
     "no trained run found"),
    (EXPORT, ["--run", "ROOT/runs/good", "--out", "ROOT/a_file/sub"], 1,
     "cannot write the SavedModel to ROOT/a_file/sub (Not a directory): check the path"),
    (EXPORT, ["--checkpoint", "ROOT/runs/good/checkpoints/ckpt-99", "--out", "ROOT/out-ckpt"], 1,
     "no complete checkpoint"),
]


def row_id(row):
    module, argv, code, _ = row
    flags = [arg for arg in argv if arg.startswith("--")][-2:]
    return f"{module.split('.')[-1]}-{code}-{'-'.join(a.strip('-') for a in flags) or 'none'}"


@pytest.mark.parametrize("module, argv, code, fragment", ROWS, ids=[row_id(r) for r in ROWS])
def test_bad_arguments_fail_in_one_line_with_the_right_exit_code(files, capsys, module, argv,
                                                                code, fragment):
    main = main_of(module)
    capsys.readouterr()
    result = run_cli(main, expand(argv, files))
    out, err = capsys.readouterr()
    check_one_line(err, result, code, fragment.replace("ROOT", str(files)))


def test_every_row_table_covers_each_command_and_both_exit_codes():
    for module in MODULES:
        assert {code for m, _, code, _ in ROWS if m == module} == {1, 2}, module


def test_help_exits_zero_for_every_command(capsys):
    for module in MODULES:
        main = main_of(module)
        with pytest.raises(SystemExit) as caught:
            run_cli(main, ["--help"])
        assert caught.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_debug_shows_the_traceback_instead(files):
    main = main_of(TRAIN)
    with pytest.raises(CharRNNError, match="does not exist"):
        run_cli(main, expand(["--corpus", "ROOT/no/such.txt", "--debug", *SMALL], files))


# --- real processes ------------------------------------------------------------------------------

PROCESS_ROWS = [
    (TRAIN, ["--corpus", "ROOT/no/such.txt", "--runs-dir", "ROOT/runs", *SMALL], 1,
     "does not exist"),
    (TRAIN, ["--max-steps", "ten"], 2, "invalid int value"),
    (SAMPLE, ["--run", "ROOT/runs/missing"], 1, "not found"),
    (EXPORT, ["--run", "ROOT/runs/good"], 2, "required: --out"),
]


def start(module, argv, root):
    """The command as a user runs it: without the TF_CPP_MIN_LOG_LEVEL the test session sets."""
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.Popen([sys.executable, "-m", module, *expand(argv, root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def finished(files):
    """[(exit code, stderr)] of every PROCESS_ROWS command, then of one with --debug."""
    for module, *_ in PROCESS_ROWS:
        main_of(module)
    # Started together: most of each one's time is importing TensorFlow.
    processes = [start(module, argv, files) for module, argv, _, _ in PROCESS_ROWS]
    processes.append(start(TRAIN, ["--corpus", "ROOT/no/such.txt", "--debug", *SMALL], files))
    return [(process.returncode, process.communicate(timeout=180)[1])
            if process.wait(timeout=180) is not None else None for process in processes]


def test_real_processes_exit_with_the_code_and_one_line(finished):
    for (module, argv, code, fragment), (returncode, err) in zip(PROCESS_ROWS, finished):
        check_one_line(err, returncode, code, fragment)


def test_real_process_with_debug_shows_the_traceback(finished):
    returncode, err = finished[-1]
    assert returncode == 1 and "Traceback (most recent call last)" in err
    assert "CharRNNError" in err and "does not exist" in err


def test_a_failing_command_prints_nothing_but_its_error_line(finished):
    """TensorFlow's own start-up notices included (tf_charrnn.tfenv keeps them off stderr)."""
    for (module, *_), (_, err) in zip(PROCESS_ROWS, finished):
        assert len(err.strip().splitlines()) == 1, (module, err)


# --- out of memory -------------------------------------------------------------------------------

def test_running_out_of_memory_is_one_line_naming_the_allocation(capsys):
    import tensorflow as tf

    def exhausted(argv):
        raise tf.errors.ResourceExhaustedError(
            None, None, "Exception encountered when calling CharRNN.call().\n\n{{function_node "
                        "x}} OOM when allocating tensor with shape[400000,100000] and type float "
                        "on /job:localhost/replica:0/task:0/device:CPU:0 by allocator mklcpu")

    def numpy_exhausted(argv):
        raise MemoryError

    assert run_cli(exhausted, []) == 1
    check_one_line(capsys.readouterr().err, 1, 1, "out of memory (OOM when allocating tensor "
                                                  "with shape[400000,100000]): use a smaller")
    assert run_cli(numpy_exhausted, []) == 1
    check_one_line(capsys.readouterr().err, 1, 1, "out of memory: use a smaller model")
    with pytest.raises(MemoryError):
        run_cli(numpy_exhausted, ["--debug"])


def test_a_full_disk_is_not_called_out_of_memory(capsys):
    """TensorFlow reports a file write that hits ENOSPC (an event file, a checkpoint) as
    ResourceExhaustedError too."""
    import tensorflow as tf

    def disk_full(argv):
        raise tf.errors.ResourceExhaustedError(
            None, None, "{{function_node __wrapped__FlushSummaryWriter_device_/job:localhost/"
                        "replica:0/task:0/device:CPU:0}} runs/E/events.out.tfevents.1.host.v2; "
                        "No space left on device [Op:FlushSummaryWriter]")

    assert run_cli(disk_full, []) == 1
    check_one_line(capsys.readouterr().err, 1, 1, "a write failed: No space left on device; free "
                                                  "disk space, then resume the run")


def test_other_exceptions_keep_their_traceback():
    def broken(argv):
        raise ZeroDivisionError("a bug, not the user's mistake")

    with pytest.raises(ZeroDivisionError):
        run_cli(broken, [])
