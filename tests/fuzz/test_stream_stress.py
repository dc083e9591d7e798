"""ProbeStream under a long random sequence of steps and resets over 32 slots, against a
pure-Python model of each slot's EMA / SWiM state and latched flag (float64 arithmetic).

Every op is one of: a step of a random set of distinct slots (some rows inactive, rare NaN /
Inf logits), a varlen step (a segment of 0-5 tokens per slot, with gaps between segments),
a step with bad slot ids (out of range or repeated) or a varlen step with bad segments
(overlapping, out of order, past the last row, negative): both must raise and change
nothing, a reset of some slots, a reset of all; after each, scores, flags and token counts
must match the model."""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from pykernels.probes import ProbeStream

from .common import PROFILE, device_of, record, runnable_backends

SLOTS, HEADS = 32, 3
# Operations per backend. Each Triton step runs through the interpreter (~20 ms of CPU), so the
# bounded CI profile gives it 3,000; `./dev.sh fuzz` (long) gives every backend 10,000 or more.
_OPERATIONS = {"ci": {"triton": 3_000}, "long": {"triton": 10_000}}
_DEFAULT_OPERATIONS = {"ci": 10_000, "long": 50_000}


def operations(backend: str) -> int:
    if "PYKERNELS_STREAM_OPS" in os.environ:
        return int(os.environ["PYKERNELS_STREAM_OPS"])
    return _OPERATIONS[PROFILE].get(backend, _DEFAULT_OPERATIONS[PROFILE])


CONFIGS = (  # (smoothing, window, ema_alpha): one stream each, ops interleaved at random
    ("ema", 16, None),
    ("ema", 4, 1.0),
    ("swim", 5, None),
    ("swim", 1, None),
    ("none", 16, None),
)
THRESHOLD = [1.2, 0.8, 2.0]


class SlotModel:
    """One slot: tokens since reset, smoothing state, the latched flag token (-1: none)."""

    def __init__(self):
        self.count, self.flag, self.ema, self.history = 0, -1, [0.0] * HEADS, []

    def score(self, z, smoothing, window, alpha):
        if smoothing == "swim":
            self.history = (self.history + [z])[-window:]
            return [sum(col) / len(self.history) for col in zip(*self.history)]  # oldest first
        if smoothing == "ema" and self.count > 0 and alpha != 1.0:
            self.ema = [alpha * zk + (1.0 - alpha) * ek for zk, ek in zip(z, self.ema)]
        else:  # first token, alpha 1, or no smoothing: the token itself (no 0 * NaN from the past)
            self.ema = list(z)
        return self.ema


class StreamModel:
    def __init__(self, smoothing, window, alpha):
        self.smoothing, self.window = smoothing, window
        self.alpha = 2.0 / (window + 1) if alpha is None else alpha
        self.slots = [SlotModel() for _ in range(SLOTS)]

    def step(self, ids, z, active, kernel_flagged, tol):
        scores, flagged = [], []
        for r, s in enumerate(ids):
            slot = self.slots[s]
            if not active[r]:
                scores.append([0.0] * HEADS)
                flagged.append(slot.flag >= 0)
                continue
            score = slot.score(z[r], self.smoothing, self.window, self.alpha)
            crossed = any(not v <= thr for v, thr in zip(score, THRESHOLD))  # NaN crosses (fail closed)
            near = any(abs(v - thr) <= tol * (1 + abs(thr)) for v, thr in zip(score, THRESHOLD))
            clear = any(not v <= thr + tol * (1 + abs(thr)) for v, thr in zip(score, THRESHOLD))
            if near and not clear and slot.flag < 0:  # within rounding of the threshold: float32 decides
                crossed = kernel_flagged[r]
            if crossed and slot.flag < 0:
                slot.flag = slot.count
            slot.count += 1
            scores.append(list(score))
            flagged.append(slot.flag >= 0)
        return scores, flagged

    def reset(self, ids):
        for s in ids:
            self.slots[s] = SlotModel()


def _random_segments(rng, ids):
    """Increasing, non-overlapping [start, start + count) per slot, with gaps: (starts, counts, N)."""
    starts, counts, row = [], [], 0
    for _ in ids:
        row += rng.choice([0, 0, 1, 2])  # rows no segment covers score 0
        count = rng.choice([0, 1, 1, 2, 3, 5])
        starts.append(row)
        counts.append(count)
        row += count
    return starts, counts, row + rng.choice([0, 1])


def _bad_segments(rng, n_ids):
    """Segments the op must refuse: (starts, counts, N)."""
    kind = rng.choice(["overlap", "order", "past_end", "negative"])
    starts, counts = list(range(0, 2 * n_ids, 2)), [2] * n_ids
    N = 2 * n_ids
    if kind == "overlap":
        counts[-1] = 3 if n_ids == 1 else counts[-1]
        if n_ids == 1:
            N = 2  # 0..3 past the 2 rows
        else:
            counts[0] = 3
    elif kind == "order" and n_ids > 1:
        starts[0], starts[1] = starts[1], starts[0]
    elif kind == "negative":
        counts[rng.randrange(n_ids)] = -1
    else:  # past the last row (also "order" with one slot)
        N -= 1
    return starts, counts, N


def _random_logits(rng, n):
    rows = []
    for _ in range(n):
        row = [rng.gauss(0.0, 1.0) for _ in range(HEADS)]
        if rng.random() < 0.002:
            row[rng.randrange(HEADS)] = rng.choice([math.nan, math.inf, -math.inf])
        rows.append(row)
    return rows


def _compare(stream, model, where):
    flagged, token = stream.flags()
    assert token.tolist() == [slot.flag for slot in model.slots], f"{where}: flag tokens"
    assert flagged.tolist() == [slot.flag >= 0 for slot in model.slots], f"{where}: flags"
    assert stream.tokens_seen().cpu().tolist() == [slot.count for slot in model.slots], f"{where}: tokens seen"


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # inf/NaN in the interpreter
def test_stream_matches_python_model(backend):
    device = device_of(backend)
    rng = random.Random(20261130)
    tol = 2e-5
    streams = [
        ProbeStream(
            SLOTS, HEADS, smoothing=s, window=w, ema_alpha=a, threshold=THRESHOLD, device=device, backend=backend
        )
        for s, w, a in CONFIGS
    ]
    models = [StreamModel(s, w, a) for s, w, a in CONFIGS]
    for op in range(operations(backend)):
        which = rng.randrange(len(streams))
        stream, model = streams[which], models[which]
        where = f"op {op}, stream {CONFIGS[which]}"
        kind = rng.random()
        if kind < 0.75:  # a step of distinct slots
            ids = rng.sample(range(SLOTS), rng.randint(1, SLOTS))
            z = _random_logits(rng, len(ids))
            active = [rng.random() < 0.9 for _ in ids]
            got_scores, got_flagged = stream.step(
                torch.tensor(ids, device=device),
                torch.tensor(z, dtype=torch.float32, device=device),
                torch.tensor(active, device=device),
            )
            record("ProbeStream.step (stress)", backend)
            got_flagged = got_flagged.cpu().tolist()
            scores, flagged = model.step(ids, z, active, got_flagged, tol)
            torch.testing.assert_close(
                got_scores.cpu().double(),
                torch.tensor(scores, dtype=torch.float64),
                rtol=tol,
                atol=tol,
                equal_nan=True,
                msg=lambda m: f"{where}: scores: {m}",
            )
            assert got_flagged == flagged, f"{where}: flagged"
        elif kind < 0.85:  # a varlen step: each slot steps through its segment, token by token
            ids = rng.sample(range(SLOTS), rng.randint(1, 8))
            starts, counts, N = _random_segments(rng, ids)
            z = _random_logits(rng, N)
            logits = torch.tensor(z, dtype=torch.float32, device=device).reshape(N, HEADS)  # N may be 0
            got_scores, got_flagged = stream.step_varlen(ids, starts, counts, logits)
            record("ProbeStream.step_varlen (stress)", backend)
            flag_token = dict(zip(range(SLOTS), stream.flags()[1].tolist()))
            expect = [[0.0] * HEADS for _ in range(N)]
            for slot, start, count in zip(ids, starts, counts):
                for row in range(start, start + count):
                    # Within rounding of the threshold, the kernel's flag token decides.
                    kernel_crossed = flag_token[slot] == model.slots[slot].count
                    (expect[row],), _ = model.step([slot], [z[row]], [True], [kernel_crossed], tol)
            torch.testing.assert_close(
                got_scores.cpu().double(),
                torch.tensor(expect, dtype=torch.float64).reshape(N, HEADS),
                rtol=tol,
                atol=tol,
                equal_nan=True,
                msg=lambda m: f"{where}: scores: {m}",
            )
            assert got_flagged.cpu().tolist() == [model.slots[s].flag >= 0 for s in ids], f"{where}: flagged"
        elif kind < 0.86:  # bad segments: raises, and no state changes
            ids = rng.sample(range(SLOTS), rng.randint(1, 4))
            starts, counts, N = _bad_segments(rng, len(ids))
            with pytest.raises(ValueError, match="token segments"):
                stream.step_varlen(ids, starts, counts, torch.zeros(N, HEADS, device=device))
            record("ProbeStream.step_varlen (stress)", backend)
        elif kind < 0.88:  # bad slot ids: raises, and no state changes
            ids = rng.choice([[SLOTS], [-1], [3, 3], [0, SLOTS + 5, 1], [7, 2, 7]])
            with pytest.raises(ValueError, match="slot ids"):
                stream.step(ids, torch.zeros(len(ids), HEADS, device=device))
            record("ProbeStream.step (stress)", backend)
        elif kind < 0.995:  # reset some slots
            ids = rng.sample(range(SLOTS), rng.randint(1, 6))
            stream.reset(ids)
            model.reset(ids)
            record("ProbeStream.reset (stress)", backend)
        else:
            stream.reset()
            model.reset(range(SLOTS))
            record("ProbeStream.reset (stress)", backend)
        if op % 50 == 0 or kind >= 0.75:
            _compare(stream, model, where)
    for stream, model, config in zip(streams, models, CONFIGS):
        _compare(stream, model, f"end, stream {config}")
