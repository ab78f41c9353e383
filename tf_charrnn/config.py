"""Configuration: one frozen dataclass per section, YAML recipes, dotted command-line overrides.

One name per field everywhere: the YAML key, the `--set section.field=value` override, the dataclass
field and the keyword argument are the same word. Unknown keys and wrong types fail naming the key.
Named options are validated here, in one place, against the `*_CHOICES` tuples.
"""

import codecs
import dataclasses
import math
import os
import typing
from pathlib import Path

import yaml

from tf_charrnn.errors import UsageError

CELL_CHOICES = ("rnn", "lstm", "gru")
PRECISION_CHOICES = ("float32", "mixed_float16", "mixed_bfloat16")
KERNEL_CHOICES = ("auto", "keras", "fused")
OPTIMIZER_CHOICES = ("adam", "rmsprop", "adagrad", "sgd")
SCHEDULE_CHOICES = ("exponential", "cosine", "wsd", "constant")
CLIP_CHOICES = ("global_norm", "value", "none")
LOSS_REDUCTION_CHOICES = ("mean", "sum_over_time")
STRATEGY_CHOICES = ("auto", "one_device", "mirrored", "multi_worker")

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    corpus: str = "shakespeare"          # a known corpus name or a path (file, or dir with input.txt)
    data_dir: str = "data"               # where named corpora are built and fetched
    source: typing.Optional[str] = None  # linux_kernel: a kernel tree or tarball
    max_bytes: typing.Optional[int] = None  # linux_kernel: cap on the concatenated source
    url: typing.Optional[str] = None     # shakespeare: download URL override
    encoding: typing.Optional[str] = None  # force a text encoding instead of detecting it
    hangul_jamo: bool = False            # train on conjoining jamo instead of Hangul syllables
    batch_size: int = 50
    seq_length: int = 50
    val_fraction: float = 0.05           # the last fraction of the corpus, held out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    cell: str = "lstm"
    num_layers: int = 2
    hidden_size: int = 128
    one_hot: bool = False                # one-hot input, no embedding (the min-char-rnn model)
    embedding_size: int = 128            # must be 0 when one_hot is true
    dropout: float = 0.0                 # on each layer's output, training only
    precision: str = "float32"
    kernel: str = "auto"                 # auto: fused CPU kernel on CPU, Keras (cuDNN) on GPU


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adam"
    learning_rate: float = 0.002
    schedule: str = "exponential"        # lr * decay_rate ** epoch; cosine or wsd over the steps,
                                         # or over max_seconds when that ends first; constant
    decay_rate: float = 0.97
    warmup_steps: int = 0
    min_learning_rate: float = 0.0       # where cosine and wsd end
    cooldown_fraction: float = 0.2       # wsd: the last share of the run, decaying linearly
    clip: str = "global_norm"
    clip_threshold: float = 5.0          # global norm, or element value for clip: value
    loss_reduction: str = "mean"         # sum_over_time: min-char-rnn's loss, summed over the chunk
    epochs: int = 50
    max_steps: typing.Optional[int] = None
    max_seconds: typing.Optional[float] = None  # stop (and save) when the run has trained this
                                                # long, over all its resumptions
    seed: int = 0
    eval_every: int = 1000
    sample_every: int = 1000
    sample_length: int = 300
    checkpoint_every: int = 500
    keep_checkpoints: int = 5
    log_every: int = 20                  # TensorBoard scalars and the progress line
    loss_smoothing: float = 0.0          # >0: also report min-char-rnn's smoothed chunk loss
    steps_per_call: int = 10             # train steps run inside one compiled call
    jit_compile: bool = False
    strategy: str = "auto"
    runs_dir: str = "runs"


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    prime: typing.Optional[str] = None   # None: the most frequent character
    length: int = 1000
    temperature: float = 1.0
    top_k: int = 0                       # 0: off
    top_p: float = 1.0                   # 1.0: off


@dataclasses.dataclass(frozen=True)
class Config:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()


SECTIONS = {field.name: field.type for field in dataclasses.fields(Config)}
# Fields naming a path (the corpus may be one): a leading ~ is expanded, in a recipe, a --set and
# a flag (there even when quoted), as a shell expands it unquoted.
PATH_FIELDS = {"data": ("corpus", "data_dir", "source"), "train": ("runs_dir",)}


def _check_type(key, value, annotation):
    """Return value converted to the field's type, or raise UsageError naming the key."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)][0]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _check_type(key, value, inner)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise UsageError(f"{key} must be {annotation.__name__}, got {value!r}")


def _section_from_dict(name, values):
    section_type = SECTIONS[name]
    if not isinstance(values, dict):
        raise UsageError(f"config section '{name}' must be a mapping of keys to values")
    hints = typing.get_type_hints(section_type)
    known = set(hints)
    for key in values:
        if key not in known:
            raise UsageError(f"unknown config key '{name}.{key}': known keys are "
                             f"{', '.join(sorted(known))}")
    checked = {key: _check_type(f"{name}.{key}", value, hints[key])
               for key, value in values.items()}
    for key in PATH_FIELDS.get(name, ()):  # `runs_dir: ~/runs` in a recipe, as a shell would
        if isinstance(checked.get(key), str):
            checked[key] = os.path.expanduser(checked[key])
    return section_type(**checked)


def config_from_dict(values):
    """Build a validated Config from a nested dict (as read from YAML)."""
    values = values or {}
    if not isinstance(values, dict):
        raise UsageError("a config file must be a mapping with sections data, model, train, sample")
    for name in values:
        if name not in SECTIONS:
            raise UsageError(f"unknown config section '{name}': known sections are "
                             f"{', '.join(SECTIONS)}")
    config = Config(**{name: _section_from_dict(name, section) for name, section in values.items()})
    validate(config)
    return config


def config_to_dict(config):
    return dataclasses.asdict(config)


def load_config(path):
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"config file {path} not found: give an existing YAML file, e.g. "
                         f"configs/lecture.yaml") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read config file {path} ({error}): give a UTF-8 YAML file") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        line = getattr(getattr(error, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise UsageError(f"config file {path} is not valid YAML{where}: fix its syntax") from None
    return config_from_dict(values)


def save_config(config, path):
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False,
                                         allow_unicode=True), encoding="utf-8")


def recipe_path(name):
    """configs/<name>.yaml when such a recipe exists, else None."""
    path = CONFIGS_DIR / f"{name}.yaml"
    return path if path.is_file() else None


def parse_override(text):
    """'section.field=value' -> ('section', 'field', value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    section, dot, field = key.strip().partition(".")
    if not sep or not dot or not field:
        raise UsageError(f"override '{text}' must look like section.field=value, "
                         f"e.g. train.learning_rate=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return section, field, value


def apply_overrides(config, overrides):
    """Return config with each (section, field, value) replaced, type-checked and validated."""
    values = config_to_dict(config)
    for section, field, value in overrides:
        if section not in values:
            raise UsageError(f"unknown config section '{section}': known sections are "
                             f"{', '.join(SECTIONS)}")
        _section_from_dict(section, {field: value})  # its type, even if a later one replaces it
        values[section][field] = value
    return config_from_dict(values)


def is_text_codec(name):
    """A codec that decodes bytes to text (Python's base64, hex and rot13 codecs do not)."""
    try:
        return getattr(codecs.lookup(name), "_is_text_encoding", True)
    except LookupError:
        return False


def _require(condition, key, message):
    if not condition:
        raise UsageError(f"{key} {message}")


def _require_choice(key, value, choices):
    _require(value in choices, key, f"must be one of {', '.join(choices)}, got '{value}'")


def validate_model(model):
    """The model section's checks (build_model runs them on a ModelConfig alone)."""
    for key in ("num_layers", "hidden_size", "embedding_size"):
        value = getattr(model, key)
        _require(isinstance(value, int) and not isinstance(value, bool), f"model.{key}",
                 f"must be an integer, got {value!r}")
    _require_choice("model.cell", model.cell, CELL_CHOICES)
    _require(model.num_layers > 0, "model.num_layers", f"must be positive, got {model.num_layers}")
    _require(model.hidden_size > 0, "model.hidden_size",
             f"must be positive, got {model.hidden_size}")
    if model.one_hot:
        _require(model.embedding_size == 0, "model.embedding_size",
                 f"must be 0 when model.one_hot is true (a one-hot model has no embedding), "
                 f"got {model.embedding_size}")
    else:
        _require(model.embedding_size > 0, "model.embedding_size",
                 f"must be positive (or set model.one_hot: true), got {model.embedding_size}")
    _require(0.0 <= model.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {model.dropout}")
    _require_choice("model.precision", model.precision, PRECISION_CHOICES)
    _require_choice("model.kernel", model.kernel, KERNEL_CHOICES)


def validate(config):
    """Check ranges and named options; raise UsageError naming the first bad field."""
    data, model, train, sample = config.data, config.model, config.train, config.sample
    for key, path in (("data.corpus", data.corpus), ("data.data_dir", data.data_dir),
                      ("train.runs_dir", train.runs_dir)):
        _require(path.strip() != "", key, "must not be empty: give a name or a path")
    _require(data.batch_size > 0, "data.batch_size", f"must be positive, got {data.batch_size}")
    _require(data.seq_length > 0, "data.seq_length", f"must be positive, got {data.seq_length}")
    _require(0.0 <= data.val_fraction < 1.0, "data.val_fraction",
             f"must be in [0, 1), got {data.val_fraction}")
    _require(data.max_bytes is None or data.max_bytes > 0, "data.max_bytes", "must be positive")
    _require(data.encoding is None or is_text_codec(data.encoding), "data.encoding",
             f"must be a text encoding Python knows (e.g. utf-8, cp949, latin-1), got "
             f"'{data.encoding}'")
    validate_model(model)
    _require_choice("train.optimizer", train.optimizer, OPTIMIZER_CHOICES)
    _require(0 < train.learning_rate < math.inf, "train.learning_rate",
             f"must be positive and finite, got {train.learning_rate}")
    _require_choice("train.schedule", train.schedule, SCHEDULE_CHOICES)
    _require(0.0 < train.decay_rate <= 1.0, "train.decay_rate",
             f"must be in (0, 1], got {train.decay_rate}")
    _require(train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _require(0 <= train.min_learning_rate <= train.learning_rate, "train.min_learning_rate",
             f"must be in [0, train.learning_rate], got {train.min_learning_rate} (the floor "
             f"cosine and wsd decay to)")
    _require(0.0 < train.cooldown_fraction <= 1.0, "train.cooldown_fraction",
             f"must be in (0, 1], got {train.cooldown_fraction}")
    _require_choice("train.clip", train.clip, CLIP_CHOICES)
    _require(0 < train.clip_threshold < math.inf, "train.clip_threshold",
             f"must be positive and finite, got {train.clip_threshold}")
    _require_choice("train.loss_reduction", train.loss_reduction, LOSS_REDUCTION_CHOICES)
    _require(train.epochs > 0, "train.epochs", f"must be positive, got {train.epochs}")
    _require(train.max_steps is None or train.max_steps > 0, "train.max_steps",
             f"must be positive, got {train.max_steps}")
    _require(train.max_seconds is None or train.max_seconds > 0, "train.max_seconds",
             f"must be positive, got {train.max_seconds}")
    for key in ("eval_every", "sample_every", "sample_length", "checkpoint_every",
                "keep_checkpoints", "log_every", "steps_per_call"):
        value = getattr(train, key)
        _require(value > 0, f"train.{key}", f"must be positive, got {value}")
    _require(0.0 <= train.loss_smoothing < 1.0, "train.loss_smoothing", "must be in [0, 1)")
    _require(0 <= train.seed < 2 ** 32, "train.seed", f"must be in [0, 2**32), got {train.seed}")
    _require_choice("train.strategy", train.strategy, STRATEGY_CHOICES)
    _require(sample.length >= 0, "sample.length", f"must be >= 0, got {sample.length}")
    _require(sample.temperature > 0, "sample.temperature",
             f"must be > 0, got {sample.temperature} (use --argmax for greedy sampling)")
    _require(sample.top_k >= 0, "sample.top_k", f"must be >= 0, got {sample.top_k}")
    _require(0.0 < sample.top_p <= 1.0, "sample.top_p", f"must be in (0, 1], got {sample.top_p}")
