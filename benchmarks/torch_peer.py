#!/usr/bin/env python
"""PyTorch peer of the tf_charrnn trainer, used by the benchmark to compute speed ratios.

This file is deliberately standalone: it imports neither ``tf_charrnn`` nor
TensorFlow, and torch is *not* a dependency of the package.  It is only needed
when the benchmark wants a PyTorch reference number.

It trains the same model math as our trainer:

    Embedding(V, E) -> stacked nn.LSTM / nn.GRU (batch_first, num_layers) -> Linear(H, V)

with cross-entropy averaged over the B*T positions of a batch, Adam (lr 0.002),
gradient clipping by global norm 5, and the recurrent state carried (detached)
across batch-major batches and reset at the start of every epoch.  Everything
runs in plain eager mode, the way a typical user writes a PyTorch loop.

Batch layout (identical for training and validation): the split's id array of
length N is cut into B rows of L = (N - 1) // B consecutive characters
(row r holds ids[r*L:(r+1)*L]); targets are the same rows shifted by one
character inside the corpus (ids[r*L+1:(r+1)*L+1]), so nothing wraps.  Batch i
is the T-wide column slice [i*T, (i+1)*T) of those rows, so row r of batch i+1
continues row r of batch i.  Training drops the last partial slice; validation
also evaluates it so that every one of the B*L positions is scored.

Threads: torch.set_num_threads(os.cpu_count()) by default, as a typical user
gets.  On a machine whose cores are busy with other work, torch's intra-op
thread pool waits on descheduled threads and throughput can drop several-fold
(measured 5-30x on a shared 2-core box); ``--threads 1`` shows the single-thread
figure for comparison.  Every result records the thread count it ran with.

Usage (CLI):

    python benchmarks/torch_peer.py --recipe lecture --recipe medium --seconds 10 \
        [--val-budget 120] [--json out.json]

Usage (import):

    from torch_peer import run, RECIPES
    result = run("lecture", "../shared/data/tinyshakespeare/input.txt", seconds=10)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# The shared tiny-shakespeare copy beside the repository checkout.
DEFAULT_CORPUS = str(Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt")

LEARNING_RATE = 0.002
CLIP_NORM = 5.0
WARMUP_STEPS = 5
TIMING_REPEATS = 3
SAMPLE_SECONDS = 2.0
SAMPLE_WARMUP_CHARS = 20

# Recipes mirror the trainer's configurations (min_char_rnn is numpy-only and
# has no PyTorch counterpart here).
RECIPES: Dict[str, Dict[str, Any]] = {
    "lecture": dict(cell="lstm", num_layers=2, hidden=128, embed=128, batch=50, seq=50),
    "medium": dict(cell="lstm", num_layers=2, hidden=256, embed=64, batch=64, seq=100),
    "large": dict(cell="lstm", num_layers=3, hidden=512, embed=128, batch=50, seq=50),
    "gru": dict(cell="gru", num_layers=2, hidden=128, embed=128, batch=50, seq=50),
}

State = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None]


# --------------------------------------------------------------------------- data


def load_corpus(path: str, val_fraction: float = 0.1) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Read a UTF-8 text file and return (train_ids, val_ids, vocab).

    The vocabulary is the sorted set of characters of the whole file; ids are
    computed vectorised through the code points (sorting str by Python's
    default order is sorting by code point, so searchsorted gives the index).
    The first (1 - val_fraction) of the ids is the training split, the rest
    the validation split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    with open(path, "r", encoding="utf-8") as fh:
        text = fh.read()
    if len(text) < 2:
        raise ValueError(f"corpus {path!r} is too short ({len(text)} chars)")
    vocab = sorted(set(text))
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab_cp = np.fromiter((ord(c) for c in vocab), dtype=np.uint32, count=len(vocab))
    ids = np.searchsorted(vocab_cp, codepoints).astype(np.int64)
    n_train = int(len(ids) * (1.0 - val_fraction))
    return ids[:n_train], ids[n_train:], vocab


def make_rows(ids: np.ndarray, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cut a split into B rows of L chars: inputs and next-char targets, [B, L] each."""
    cols = (len(ids) - 1) // batch
    if cols < 1:
        raise ValueError(f"split of {len(ids)} chars is too short for batch size {batch}")
    x = ids[: batch * cols].reshape(batch, cols)
    y = ids[1 : batch * cols + 1].reshape(batch, cols)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def train_batches(x_rows: torch.Tensor, y_rows: torch.Tensor, seq: int) -> Iterator[Tuple[bool, torch.Tensor, torch.Tensor]]:
    """Endless stream of (epoch_start, x, y) batches of shape [B, T], epoch after epoch."""
    n_batches = x_rows.shape[1] // seq
    if n_batches < 1:
        raise ValueError(f"training split has {x_rows.shape[1]} columns, fewer than seq={seq}")
    while True:
        for i in range(n_batches):
            sl = slice(i * seq, (i + 1) * seq)
            yield i == 0, x_rows[:, sl], y_rows[:, sl]


# -------------------------------------------------------------------------- model


class CharRNN(nn.Module):
    """Embedding -> stacked LSTM/GRU -> Linear, the same math as our trainer's model.

    dropout > 0 drops each layer's output in training, as our model.dropout does: nn.LSTM's
    dropout between the layers, then one more on the last layer's output.
    """

    def __init__(self, vocab_size: int, embed: int, hidden: int, num_layers: int, cell: str,
                 dropout: float = 0.0) -> None:
        super().__init__()
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.embedding = nn.Embedding(vocab_size, embed)
        self.rnn = rnn_cls(embed, hidden, num_layers=num_layers, batch_first=True,
                           dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor, state: State = None) -> Tuple[torch.Tensor, State]:
        out, state = self.rnn(self.embedding(x), state)
        return self.head(self.drop(out)), state


def detach_state(state: State) -> State:
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


def flops_per_char(cell: str, num_layers: int, hidden: int, embed: int, vocab_size: int) -> int:
    """Forward FLOPs per character (multiply-add = 2): gate matmuls plus the output layer."""
    gates = {"lstm": 4, "gru": 3}[cell] * hidden
    total = 2 * (embed * gates + hidden * gates)
    total += (num_layers - 1) * 2 * (hidden * gates + hidden * gates)
    total += 2 * hidden * vocab_size
    return total


class Trainer:
    """Plain eager training loop with carried, detached state reset at each epoch."""

    def __init__(self, model: CharRNN, x_rows: torch.Tensor, y_rows: torch.Tensor, seq: int) -> None:
        self.model = model
        self.vocab_size = model.head.out_features
        self.optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        self.batches = train_batches(x_rows, y_rows, seq)
        self.state: State = None
        self.steps = 0
        self.epochs_started = 0
        self.last_loss: Optional[torch.Tensor] = None

    def step(self) -> None:
        epoch_start, x, y = next(self.batches)
        if epoch_start:
            self.state = None
            self.epochs_started += 1
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        logits, state = self.model(x, self.state)
        loss = F.cross_entropy(logits.reshape(-1, self.vocab_size), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_NORM)
        self.optimizer.step()
        self.state = detach_state(state)
        self.last_loss = loss.detach()
        self.steps += 1


@torch.no_grad()
def evaluate(model: CharRNN, ids: np.ndarray, batch: int, seq: int) -> Tuple[float, int]:
    """Mean validation loss (nats/char) over the whole split with carried state; returns (loss, chars)."""
    model.eval()
    x_rows, y_rows = make_rows(ids, batch)
    vocab_size = model.head.out_features
    cols = x_rows.shape[1]
    state: State = None
    total = 0.0
    count = 0
    for start in range(0, cols, seq):
        x = x_rows[:, start : start + seq]
        y = y_rows[:, start : start + seq]
        logits, state = model(x, state)
        total += F.cross_entropy(logits.reshape(-1, vocab_size), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    return total / count, count


@torch.no_grad()
def sample_speed(model: CharRNN, vocab_size: int, seconds: float, seed: int) -> Tuple[float, int]:
    """Naive per-character sampling loop: forward on [1,1], softmax, multinomial, feed back."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros((1, 1), dtype=torch.long)
    state: State = None
    out: List[int] = []

    def one_char() -> None:
        nonlocal x, state
        logits, state = model(x, state)
        probs = F.softmax(logits[:, -1, :], dim=-1)
        nxt = torch.multinomial(probs, num_samples=1, generator=gen)
        out.append(int(nxt.item()))
        x = nxt.view(1, 1)

    for _ in range(SAMPLE_WARMUP_CHARS):
        one_char()
    n = 0
    t0 = time.perf_counter()
    while True:
        one_char()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    return n / elapsed, n


# ------------------------------------------------------------------------ measure


def _resolve_recipe(recipe: Union[str, Dict[str, Any]]) -> Tuple[str, Dict[str, Any]]:
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise KeyError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
        return recipe, dict(RECIPES[recipe])
    cfg = dict(recipe)
    return str(cfg.pop("name", "custom")), cfg


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)


def run(
    recipe: Union[str, Dict[str, Any]],
    corpus_path: str,
    seconds: float,
    val_budget_seconds: Optional[float] = None,
    seed: int = 0,
    *,
    val_fraction: float = 0.1,
    threads: Optional[int] = None,
    sample_seconds: float = SAMPLE_SECONDS,
    val_dropout: float = 0.0,
    verbose: bool = False,
) -> Dict[str, Any]:
    """Measure one recipe and return a JSON-serialisable dict.

    Keys: recipe, cell, num_layers, hidden, embed, batch, seq, vocab_size,
    train_chars, val_chars, params, torch_version, threads, seed,
    flops_per_char (forward), train_flops_per_char (3x forward),
    train_chars_per_sec (median over repeats), train_chars_per_sec_repeats,
    train_gflops_per_sec, timed_steps, sample_chars_per_sec_1, sample_chars,
    and, when val_budget_seconds is given: val_budget_seconds, val_dropout,
    steps_at_budget, epochs_at_budget, train_loss_at_budget,
    val_loss_at_budget (nats/char), val_eval_chars. The throughput runs have no
    dropout; the budget run drops each layer's output with val_dropout.
    """
    name, cfg = _resolve_recipe(recipe)
    cell, layers, hidden = cfg["cell"], int(cfg["num_layers"]), int(cfg["hidden"])
    embed, batch, seq = int(cfg["embed"]), int(cfg["batch"]), int(cfg["seq"])

    torch.set_num_threads(int(threads) if threads else (os.cpu_count() or 1))
    train_ids, val_ids, vocab = load_corpus(corpus_path, val_fraction)
    vocab_size = len(vocab)
    x_rows, y_rows = make_rows(train_ids, batch)
    chars_per_step = batch * seq

    def new_model(dropout: float = 0.0) -> CharRNN:
        torch.manual_seed(seed)
        return CharRNN(vocab_size, embed, hidden, layers, cell, dropout)

    fpc = flops_per_char(cell, layers, hidden, embed, vocab_size)
    result: Dict[str, Any] = dict(
        recipe=name, cell=cell, num_layers=layers, hidden=hidden, embed=embed,
        batch=batch, seq=seq, vocab_size=vocab_size,
        train_chars=int(len(train_ids)), val_chars=int(len(val_ids)),
        torch_version=torch.__version__, threads=torch.get_num_threads(), seed=seed,
        flops_per_char=fpc, train_flops_per_char=3 * fpc,
    )

    # Throughput: warm up, then several timed windows of ~seconds/3; median chars/s.
    model = new_model()
    result["params"] = sum(p.numel() for p in model.parameters())
    trainer = Trainer(model, x_rows, y_rows, seq)
    for _ in range(WARMUP_STEPS):
        trainer.step()
    window = max(float(seconds), 1e-3) / TIMING_REPEATS
    rates: List[float] = []
    timed_steps = 0
    for rep in range(TIMING_REPEATS):
        n = 0
        t0 = time.perf_counter()
        while True:
            trainer.step()
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= window:
                break
        rates.append(n * chars_per_step / elapsed)
        timed_steps += n
        _log(f"[{name}] repeat {rep + 1}/{TIMING_REPEATS}: {n} steps, {rates[-1]:.0f} chars/s", verbose)
    result["train_chars_per_sec"] = statistics.median(rates)
    result["train_chars_per_sec_repeats"] = rates
    result["train_gflops_per_sec"] = result["train_chars_per_sec"] * 3 * fpc / 1e9
    result["timed_steps"] = timed_steps

    # Sampling speed with the (partly trained) model: the naive per-char loop.
    rate, n_chars = sample_speed(model, vocab_size, sample_seconds, seed)
    result["sample_chars_per_sec_1"] = rate
    result["sample_chars"] = n_chars
    _log(f"[{name}] sampling: {rate:.0f} chars/s", verbose)
    del trainer, model

    # Quality at a fixed wall-time budget: fresh model, train S seconds (steps only), evaluate.
    if val_budget_seconds is not None:
        model = new_model(val_dropout)
        trainer = Trainer(model, x_rows, y_rows, seq)
        spent = 0.0
        while spent < val_budget_seconds:
            t0 = time.perf_counter()
            trainer.step()
            spent += time.perf_counter() - t0
        val_loss, n_eval = evaluate(model, val_ids, batch, seq)
        result.update(
            val_budget_seconds=float(val_budget_seconds),
            val_dropout=float(val_dropout),
            steps_at_budget=trainer.steps,
            epochs_at_budget=trainer.steps / (x_rows.shape[1] // seq),
            train_loss_at_budget=float(trainer.last_loss) if trainer.last_loss is not None else math.nan,
            val_loss_at_budget=val_loss,
            val_eval_chars=n_eval,
        )
        _log(f"[{name}] budget {val_budget_seconds:g}s: {trainer.steps} steps, val loss {val_loss:.4f}", verbose)
    return result


# ---------------------------------------------------------------------------- CLI


def format_table(results: Dict[str, Dict[str, Any]]) -> str:
    cols = [
        ("recipe", "recipe", "{}"),
        ("model", None, "{}"),
        ("B x T", None, "{}"),
        ("train chars/s", "train_chars_per_sec", "{:.0f}"),
        ("train GFLOP/s", "train_gflops_per_sec", "{:.2f}"),
        ("sample chars/s", "sample_chars_per_sec_1", "{:.0f}"),
        ("steps@budget", "steps_at_budget", "{}"),
        ("val loss@budget", "val_loss_at_budget", "{:.4f}"),
    ]
    rows = []
    for r in results.values():
        row = []
        for title, key, fmt in cols:
            if title == "model":
                row.append(f"{r['cell'].upper()} {r['num_layers']}x{r['hidden']} e{r['embed']}")
            elif title == "B x T":
                row.append(f"{r['batch']}x{r['seq']}")
            elif key in r:
                row.append(fmt.format(r[key]))
            else:
                row.append("-")
        rows.append(row)
    widths = [max(len(t), *(len(row[i]) for row in rows)) for i, (t, _, _) in enumerate(cols)]
    lines = ["  ".join(t.ljust(w) for (t, _, _), w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="PyTorch peer of the tf_charrnn trainer (benchmark reference).")
    p.add_argument("--recipe", action="append", choices=sorted(RECIPES),
                   help="recipe to measure; repeat for several (default: all)")
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="UTF-8 text file (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=10.0, help="timed training seconds per recipe")
    p.add_argument("--val-budget", type=float, default=None, metavar="S",
                   help="also train from scratch for S seconds and report validation loss")
    p.add_argument("--val-dropout", type=float, default=0.0, metavar="P",
                   help="dropout on each layer's output in the --val-budget run (default: 0)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: os.cpu_count())")
    p.add_argument("--sample-seconds", type=float, default=SAMPLE_SECONDS)
    p.add_argument("--json", default=None, metavar="PATH", help="write {recipe: {...}} here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)

    recipes = args.recipe or list(RECIPES)
    results: Dict[str, Dict[str, Any]] = {}
    for name in dict.fromkeys(recipes):
        results[name] = run(
            name, args.corpus, args.seconds, args.val_budget, args.seed,
            val_fraction=args.val_fraction, threads=args.threads,
            sample_seconds=args.sample_seconds, val_dropout=args.val_dropout,
            verbose=not args.quiet,
        )
    first = next(iter(results.values()))
    print(f"torch {first['torch_version']}, {first['threads']} threads, corpus {args.corpus}")
    print(format_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2, sort_keys=True)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
