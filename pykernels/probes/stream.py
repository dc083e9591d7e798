"""Scoring inside the forward pass: layer-wise accumulation and streaming state.

`probe_accumulate_(acc, hidden, weight_l)` adds one layer's contribution
hidden @ W_l to a float32 accumulator in place, so a probe over all layers is
the sum of one call per decoder layer, made while the model produces that
layer: no second pass, no stacked activations.

`ProbeStream` keeps per-sequence smoothing state on the device for continuous
batching: sequences occupy slots, `step` advances the active slots by one token
in one kernel launch (`step_varlen` by a segment of tokens each: a prefill
chunk, also one launch), and a flag latches once any head's smoothed score exceeds
its threshold. Stepping a sequence token by token gives the scores
`probe_scores` gives on the whole sequence with the same smoothing (the same
arithmetic from csrc/core/probe_scores.h; bit-identical on the CPU kernels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

from .. import backend as _backend
from .._validation import FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_dim, check_int, check_tensor
from ..reference.probe_guard import SEGMENT_OUT_OF_RANGE, SLOT_DUPLICATED, SLOT_OUT_OF_RANGE
from .scoring import DEFAULT_WINDOW, SMOOTHINGS, resolve_ema_alpha


def probe_accumulate_(
    acc: torch.Tensor, hidden: torch.Tensor, weight_l: torch.Tensor, *, backend: Optional[str] = None
) -> torch.Tensor:
    """acc[n, k] += hidden[n, :] . weight_l[:, k], in place; returns acc.

    Args:
        acc: float32 [N, K] accumulator (start it at the probe's bias).
        hidden: [N, H] activations of one layer (float32, float16 or bfloat16; rows
            may be strided, e.g. the last token of each sequence of a [B, T, H] output).
        weight_l: [H, K] that layer's probe weights. A float32 weight stored as a
            contiguous [K, H] tensor viewed transposed (what LinearProbe keeps) is
            read in place; any other layout or dtype is converted on each call.
        backend: see pykernels.backends(); default: the fastest for the device.
    """
    if not _accumulate_args_ok(acc, hidden, weight_l):  # one cheap test; the messages only on failure
        check_tensor("acc", acc, ndim=2, dtypes=(torch.float32,), shape_doc="[N, K]")
        check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES, device=acc.device, shape_doc="[N, H]")
        check_tensor("weight_l", weight_l, ndim=2, dtypes=_WEIGHT_DTYPES, device=acc.device, shape_doc="[H, K]")
        check_dim("hidden", hidden, 0, acc.shape[0], "the number of rows N of acc")
        check_dim("weight_l", weight_l, 0, hidden.shape[1], "the hidden size H of hidden")
        check_dim("weight_l", weight_l, 1, acc.shape[1], "the number of heads K of acc")
    _backend.resolve("probe_accumulate_", acc.device, backend)(acc, hidden, weight_l)
    return acc


_WEIGHT_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _accumulate_args_ok(acc, hidden, weight_l) -> bool:
    try:
        return (
            acc.dtype == torch.float32
            and hidden.dtype in FLOAT_DTYPES
            and weight_l.dtype in _WEIGHT_DTYPES
            and acc.dim() == 2
            and hidden.dim() == 2
            and weight_l.dim() == 2
            and hidden.shape[0] == acc.shape[0]
            and weight_l.shape[0] == hidden.shape[1]
            and weight_l.shape[1] == acc.shape[1]
            and hidden.device == acc.device == weight_l.device
        )
    except AttributeError:  # not tensors: the detailed checks say which
        return False


SlotIds = Union[torch.Tensor, Sequence[int]]
_SEGMENT_DTYPES = (torch.int64, torch.int32)  # what the kernels take for token_starts / token_counts


class ProbeStream:
    """Per-slot streaming smoothing and latched flags for K probe heads.

    Args:
        max_slots: number of sequences that can be live at once.
        num_heads: K, the probe heads scored per token.
        smoothing: "ema" (default: one number of state per slot and head), "swim"
            (the training-time window mean; a ring of `window` logits per slot) or
            "none". Same semantics as probe_scores.
        ema_alpha: EMA weight of the newest token; default 2 / (window + 1).
        window: SWiM window, and the time scale of the default EMA (default 16).
        threshold: a slot flags once any head's smoothed score is > threshold
            (a float, or K floats). A NaN score also flags (fail closed).
        device: where the state lives (default: CPU).
        backend: kernel backend; default: the fastest for the device.

    `step` and `step_varlen` are one kernel launch for the whole batch and never
    sync with the host; bad slot ids (out of range, or the same slot twice in one
    step) or segments leave the state untouched, return NaN scores with every
    row flagged, and raise:
    at once for CPU state, and from the next `flags()` / `check()` for GPU
    state or inside torch.compile (reading device memory earlier would cost a
    sync, or break the graph). Buffers are allocated once, so a step with
    device-resident slot_ids can be captured in a CUDA graph.

    Thread safety: one ProbeStream must not be stepped or reset from two threads
    at once (its buffers are shared state; guard it with a lock). Separate
    ProbeStreams are independent and safe to use from different threads.
    """

    def __init__(
        self,
        max_slots: int,
        num_heads: int = 1,
        *,
        smoothing: str = "ema",
        ema_alpha: Optional[float] = None,
        window: int = DEFAULT_WINDOW,
        threshold: Union[float, Sequence[float], torch.Tensor] = 0.0,
        device: Optional[Union[str, torch.device]] = None,
        backend: Optional[str] = None,
    ):
        check_int("max_slots", max_slots, minimum=1)
        check_int("num_heads", num_heads, minimum=1)
        check_choice("smoothing", smoothing, SMOOTHINGS)
        check_int("window", window, minimum=1)
        alpha = resolve_ema_alpha(smoothing, window, ema_alpha)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.max_slots, self.num_heads, self.smoothing, self.window = max_slots, num_heads, smoothing, window
        self.ema_alpha = 1.0 if smoothing == "none" else alpha
        self._kernel_window = window if smoothing == "swim" else 0  # 0 selects the EMA ("none" = EMA with a = 1)
        ring = 2 * window if smoothing == "swim" else 1
        self.threshold = self._threshold_tensor(threshold)
        # One spare row past max_slots absorbs out-of-range ids in reset() without a host sync.
        self._state = torch.zeros(max_slots + 1, ring, num_heads, device=self.device)
        self._meta = torch.zeros(max_slots + 1, 3, dtype=torch.int64, device=self.device)
        self._meta[:, 1] = -1
        self._status = torch.zeros(2, dtype=torch.int64, device=self.device)
        self.device = self._state.device  # with its index: "cuda" -> "cuda:0"
        self._live_state, self._live_meta = self._state[:max_slots], self._meta[:max_slots]  # views, made once
        self.backend = _backend.select("probe_stream_step", self.device, _backend.BACKENDS, backend)
        self._op = _backend.resolve("probe_stream_step", self.device, self.backend)
        self._varlen_op = _backend.resolve("probe_stream_step_varlen", self.device, self.backend)

    def _threshold_tensor(self, threshold) -> torch.Tensor:
        t = torch.as_tensor(threshold, dtype=torch.float32).to(self.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(self.num_heads)
        if t.numel() != self.num_heads:
            raise ValueError(f"threshold must be a float or {self.num_heads} floats (one per head), got {t.numel()}")
        return t.clone(memory_format=torch.contiguous_format)  # the stream owns its thresholds

    # ------------------------------------------------------------------ stepping

    def _ids(self, name: str, slot_ids: SlotIds, dtypes: tuple = INDEX_DTYPES) -> torch.Tensor:
        if not isinstance(slot_ids, torch.Tensor):
            slot_ids = torch.as_tensor(list(slot_ids), dtype=torch.int64)
        check_tensor(name, slot_ids, ndim=1, dtypes=dtypes, shape_doc="[n]")
        return slot_ids.to(self.device, non_blocking=True)

    def step(
        self, slot_ids: SlotIds, token_logits: torch.Tensor, active: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance slots by one token.

        Args:
            slot_ids: [n] distinct slots in [0, max_slots) (a device tensor for CUDA graphs).
            token_logits: [n, K] raw probe logits of each slot's new token
                (e.g. the accumulator filled by probe_accumulate_, bias included).
            active: optional [n] bool; rows that are False (padding) leave their slot
                untouched and score 0.

        Returns:
            scores: float32 [n, K] smoothed scores (logits).
            flagged: bool [n], latched: True from the first crossing on.
        """
        ids = self._ids("slot_ids", slot_ids)
        check_tensor("token_logits", token_logits, ndim=2, dtypes=FLOAT_DTYPES, device=self.device, shape_doc="[n, K]")
        check_dim("token_logits", token_logits, 0, ids.shape[0], "the number of slot_ids n")
        check_dim("token_logits", token_logits, 1, self.num_heads, "num_heads K")
        if active is not None:
            check_tensor("active", active, ndim=1, dtypes=(torch.bool,), device=self.device, shape_doc="[n]")
            check_dim("active", active, 0, ids.shape[0], "the number of slot_ids n")
        return self._step_checked_args(ids, token_logits, active)

    def _step_checked_args(
        self, ids: torch.Tensor, token_logits: torch.Tensor, active: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # step() without the argument checks; the kernels still check shapes.
        out = self._step_trusted(ids, token_logits, active)
        if self._check_now():
            self._raise_if_error("step", ids)
        return out

    def _step_trusted(
        self, ids: torch.Tensor, token_logits: torch.Tensor, active: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The bare kernel call, for callers whose slot ids cannot be wrong (ProbeGuard
        # steps slots 0..B-1, once per token): any error still latches in _status
        # and surfaces at the next flags() / check().
        return self._op(
            self._live_state,
            self._live_meta,
            self._status,
            ids,
            token_logits,
            active,
            self.threshold,
            self._kernel_window,
            self.ema_alpha,
        )

    def step_varlen(
        self, slot_ids: SlotIds, token_starts: SlotIds, token_counts: SlotIds, token_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance each slot by a segment of tokens (a prefill chunk), in one launch.

        Slot slot_ids[r] steps through token_logits rows [token_starts[r],
        token_starts[r] + token_counts[r]) in order, exactly as that many `step`
        calls would (bit-identical on the CPU kernels).

        Args:
            slot_ids: [n] distinct slots in [0, max_slots).
            token_starts, token_counts: [n] int64 or int32 segments, inside [0, N), in
                increasing order without overlap; a count of 0 leaves its slot untouched.
                Bad segments are reported like bad slot ids (no state changes, NaN
                scores for the segments' tokens, every row flagged).
            token_logits: [N, K] raw probe logits of the tokens of every segment.

        Returns:
            scores: float32 [N, K] smoothed scores (0 for rows outside every segment).
            flagged: bool [n], each slot's latched flag after its segment.
        """
        ids = self._ids("slot_ids", slot_ids)
        starts = self._ids("token_starts", token_starts, _SEGMENT_DTYPES)
        counts = self._ids("token_counts", token_counts, _SEGMENT_DTYPES)
        check_dim("token_starts", starts, 0, ids.shape[0], "the number of slot_ids n")
        check_dim("token_counts", counts, 0, ids.shape[0], "the number of slot_ids n")
        check_tensor("token_logits", token_logits, ndim=2, dtypes=FLOAT_DTYPES, device=self.device, shape_doc="[N, K]")
        check_dim("token_logits", token_logits, 1, self.num_heads, "num_heads K")
        out = self._step_varlen_trusted(ids, starts, counts, token_logits)
        if self._check_now():
            self._raise_if_error("step", ids, starts, counts, token_logits.shape[0])
        return out

    def _step_varlen_trusted(
        self, ids: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, token_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # step_varlen's bare kernel call (see _step_trusted).
        return self._varlen_op(
            self._live_state,
            self._live_meta,
            self._status,
            ids,
            starts,
            counts,
            token_logits,
            self.threshold,
            self._kernel_window,
            self.ema_alpha,
        )

    def reset(self, slot_ids: Optional[SlotIds] = None) -> None:
        """Clear slots (all by default) for new requests: no state, no flag, no tokens."""
        if slot_ids is None:
            self._state.zero_()
            self._meta[:, 0] = 0
            self._meta[:, 1] = -1
            self._meta[:, 2] = 0
            return
        ids = self._ids("slot_ids", slot_ids).long()
        valid = (ids >= 0) & (ids < self.max_slots)
        self._status[1] |= (~valid).any().long() * SLOT_OUT_OF_RANGE  # device op: no sync
        safe = torch.where(valid, ids, torch.full_like(ids, self.max_slots))
        self._state.index_fill_(0, safe, 0.0)
        self._meta.index_copy_(0, safe, self._meta.new_tensor([0, -1, 0]).expand(ids.shape[0], 3))
        if self._check_now():
            self._raise_if_error("reset", ids)

    # ------------------------------------------------------------------ reading (host sync)

    def flags(self, slot_ids: Optional[SlotIds] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(flagged [n] bool, flag_token [n] int64) on the host: whether each slot has
        flagged, and the 0-based index (tokens since reset) of the token whose smoothed
        score first crossed, or -1. Syncs with the device; raises on a pending error."""
        self.check()
        token = self._read_meta(slot_ids, sync=True)[:, 1].cpu()
        return token >= 0, token

    def tokens_seen(self, slot_ids: Optional[SlotIds] = None) -> torch.Tensor:
        """Tokens stepped into each slot since its reset (a device tensor; ids given
        as a list or CPU tensor are checked at once, device ids by check())."""
        return self._read_meta(slot_ids, sync=False)[:, 0]

    def flag_tokens(self, slot_ids: Optional[SlotIds] = None) -> torch.Tensor:
        """Like flags()' flag_token, as a device tensor without a host sync (for
        serving loops that copy it to the host asynchronously)."""
        return self._read_meta(slot_ids, sync=False)[:, 1]

    def _flag_tokens_trusted(self, ids: torch.Tensor) -> torch.Tensor:
        # flag_tokens for in-range int64 device ids (a serving loop's own slots): no check.
        return self._live_meta[:, 1].index_select(0, ids)

    def _read_meta(self, slot_ids: Optional[SlotIds], sync: bool) -> torch.Tensor:
        if slot_ids is None:
            return self._meta[: self.max_slots]
        on_host = not isinstance(slot_ids, torch.Tensor) or slot_ids.device.type == "cpu"
        ids = self._ids("slot_ids", slot_ids).long()
        if on_host or sync:  # reading host ids is free; flags() syncs anyway
            bad = sorted({i for i in ids.tolist() if not 0 <= i < self.max_slots})
            if bad:
                raise ValueError(f"slot ids must lie in [0, max_slots={self.max_slots}) (got {bad})")
            return self._meta[ids]
        # Device ids: no sync; an out-of-range id reads the spare row and is reported by check().
        valid = (ids >= 0) & (ids < self.max_slots)
        self._status[1] |= (~valid).any().long() * SLOT_OUT_OF_RANGE
        return self._meta[torch.where(valid, ids, torch.full_like(ids, self.max_slots))]

    def check(self) -> None:
        """Raise if an earlier step or reset got bad slot ids (syncs with the device)."""
        self._raise_if_error("an earlier step or reset", None)

    def _check_now(self) -> bool:
        # CPU state is read for free; not while compiling (a data-dependent branch).
        return self.device.type == "cpu" and not torch.compiler.is_compiling()

    def _raise_if_error(
        self,
        where: str,
        ids: Optional[torch.Tensor],
        starts: Optional[torch.Tensor] = None,
        counts: Optional[torch.Tensor] = None,
        tokens: int = 0,
    ) -> None:
        error = int(self._status[1])
        if not error:
            return
        self._status[1] = 0
        problems = []
        if error & SLOT_OUT_OF_RANGE:
            bad = "" if ids is None else f" (got {sorted({i for i in ids.tolist() if not 0 <= i < self.max_slots})})"
            problems.append(f"slot ids must lie in [0, max_slots={self.max_slots}){bad}")
        if error & SLOT_DUPLICATED:
            dup = ""
            if ids is not None:
                seen, twice = set(), set()
                for i in ids.tolist():
                    (twice if i in seen else seen).add(i)
                dup = f" (got {sorted(twice)} more than once)"
            problems.append(f"slot ids must be distinct within one step{dup}")
        if error & SEGMENT_OUT_OF_RANGE:
            bad = ""
            if starts is not None:
                bad = f" (got starts {starts.tolist()}, counts {counts.tolist()} for N={tokens} token rows)"
            problems.append(
                f"token segments must lie in [0, N) with counts >= 0, in increasing order without overlap{bad}"
            )
        effect = {
            "step": "No state was changed; the step returned NaN scores with every row flagged (fail closed).",
            "reset": "The valid slots were reset.",
        }.get(
            where,
            "A bad step changes no state and returns NaN scores with every row flagged; "
            "a bad reset clears only its valid slots.",
        )
        raise ValueError(f"ProbeStream {where}: " + "; ".join(problems) + ". " + effect)
