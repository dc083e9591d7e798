"""The probe guard's targets, measured against what a user would otherwise run.

probe_accumulate_     one decode step (N sequences x H hidden, K = 1 head) vs a
                      bare GEMV of the same size (addmm into the accumulator),
                      through the public function (argument checks included)
                      and as the registered op the guard's hooks call.
                      Target: within 2x.
decode_dispatch       what one decode-step call costs beyond its kernel: the public
                      probe_accumulate_ (default backend: argument checks and
                      pykernels.backend.resolve) and ProbeStream.step, on tensors
                      so small that the kernel is negligible, vs the bare op.
                      Read the median (us per call); x = bare op / public call.
probe_stream_step     one decode step of EMA smoothing + latched flags for 16
                      slots vs the same in eager PyTorch ops.
probe_stream_step_varlen  a 512-token prefill (8 slots x 64 tokens, EMA and
                      SWiM) in one segmented step vs one probe_stream_step per
                      position (ProbeGuard's prefill before the varlen op).
softmax_weighted_bce  fused forward + backward vs eager autograd of the
                      reference (and torch.compile of it on full runs), B = 64,
                      T = 512. Target: >= 2x on the CPU.
guard_overhead        greedy generate on a random-weight Llama (hidden 512, 8
                      layers) with and without the guard, batch 1 and 16. The
                      target (<= 1% of decode time on a CPU) is read from the
                      guard's accumulated timers, printed under the table; the
                      A/B ratio in the table is the GPU criterion (<= 0.3%) and
                      is noise-dominated on a shared CPU.
"""

from __future__ import annotations

import torch

import pykernels
from pykernels.backend import resolve
from pykernels.bench._core import BenchContext, Case
from pykernels.probes import LinearProbe, ProbeStream, probe_accumulate_, softmax_weighted_bce
from pykernels.reference import probe_guard as ref


def _ours(ctx: BenchContext) -> list[str]:
    status = pykernels.backends()
    return [b for b in (["cuda", "triton"] if ctx.is_cuda else ["cpu"]) if status[b].available]


def _accumulate_impls(ours, acc, hidden, w):
    impls = {b: (lambda b=b: probe_accumulate_(acc, hidden, w, backend=b)) for b in ours}
    for b in ours:  # what ProbeGuard's hooks call: the registered op, checked once up front
        op = resolve("probe_accumulate_", acc.device, b)
        impls[f"{b} (op)"] = lambda op=op: op(acc, hidden, w)
    return impls


def _accumulate_cases(ctx: BenchContext, ours: list[str]) -> list[Case]:
    cases = []
    g = torch.Generator().manual_seed(0)
    for H in (1024, 4096):
        for N in (1, 16):
            for dtype in (torch.float32, torch.bfloat16):
                hidden = torch.randn(N, H, generator=g).to(ctx.device, dtype)
                w_t = torch.randn(1, H, generator=g).to(ctx.device)  # LinearProbe's layout
                acc = torch.zeros(N, 1, device=ctx.device)
                w_native = w_t.t().contiguous().to(dtype)
                if dtype == torch.float32:
                    gemv = lambda acc=acc, h=hidden, w=w_native: acc.addmm_(h, w)
                else:  # widen, then the float32 GEMV (a native bf16 GEMV is far slower on CPUs)
                    w_native = w_native.float()
                    gemv = lambda acc=acc, h=hidden, w=w_native: acc.addmm_(h.float(), w)
                cases.append(
                    Case(
                        op="probe_accumulate_",
                        shape=f"N={N} H={H} K=1",
                        dtype=str(dtype).replace("torch.", ""),
                        implementations=_accumulate_impls(ours, acc, hidden, w_t.t()),
                        baselines={"gemv": gemv},
                        bytes_read=N * H * hidden.element_size() + H * 4,
                        notes="one layer of one decode step; x = GEMV time / our time (target >= 0.5x)",
                    )
                )
    return cases


def _dispatch_cases(ctx: BenchContext) -> list[Case]:
    acc, hidden = torch.zeros(1, 1, device=ctx.device), torch.randn(1, 8, device=ctx.device)
    w = torch.randn(1, 8, device=ctx.device).t()  # LinearProbe's layout
    bare_accumulate = resolve("probe_accumulate_", ctx.device)
    stream = ProbeStream(4, 1, threshold=1e9, device=ctx.device)
    ids, z = torch.tensor([0], device=ctx.device), torch.zeros(1, 1, device=ctx.device)
    bare_step = resolve("probe_stream_step", ctx.device, stream.backend)
    state, meta, status = stream._live_state, stream._live_meta, stream._status
    notes = "dispatch-bound: read the median as the per-call cost; x = bare op time / public call time"
    return [
        Case(
            op="decode_dispatch",
            shape="probe_accumulate_ N=1 H=8 K=1",
            dtype="float32",
            implementations={"probe_accumulate_": lambda: probe_accumulate_(acc, hidden, w)},
            baselines={"bare op": lambda: bare_accumulate(acc, hidden, w)},
            notes=notes,
        ),
        Case(
            op="decode_dispatch",
            shape="ProbeStream.step n=1 K=1",
            dtype="float32",
            implementations={"ProbeStream.step": lambda: stream.step(ids, z)},
            baselines={
                "bare op": lambda: bare_step(state, meta, status, ids, z, None, stream.threshold, 0, stream.ema_alpha)
            },
            notes=notes,
        ),
    ]


def _eager_stream_step(state, flagged, ids, z, alpha, threshold):
    e = alpha * z + (1 - alpha) * state[ids]
    state[ids] = e
    flagged[ids] |= (e > threshold).any(-1)
    return e, flagged[ids]


def _stream_cases(ctx: BenchContext, ours: list[str]) -> list[Case]:
    n, K = 16, 1
    z = torch.randn(n, K, device=ctx.device)
    ids = torch.arange(n, device=ctx.device)
    streams = {b: ProbeStream(64, K, threshold=1e9, device=ctx.device, backend=b) for b in ours}
    state, flagged = torch.zeros(64, K, device=ctx.device), torch.zeros(64, dtype=torch.bool, device=ctx.device)
    thr = torch.full((K,), 1e9, device=ctx.device)
    return [
        Case(
            op="probe_stream_step",
            shape=f"slots=64 n={n} K={K} ema",
            dtype="float32",
            implementations={b: (lambda s=s: s.step(ids, z)) for b, s in streams.items()},
            baselines={"eager": lambda: _eager_stream_step(state, flagged, ids, z, 2 / 17, thr)},
            notes="one decode step: smoothing + latched flags (the eager baseline has no slot-id checks)",
        )
    ]


def _varlen_cases(ctx: BenchContext, ours: list[str]) -> list[Case]:
    slots, T, K = 8, 64, 1
    z = torch.randn(slots * T, K, device=ctx.device)
    ids = torch.arange(slots, device=ctx.device)
    starts, counts = ids * T, torch.full((slots,), T, device=ctx.device)
    rows = z.view(slots, T, K)
    cases = []
    for smoothing in ("ema", "swim"):
        streams = {
            b: ProbeStream(slots, K, smoothing=smoothing, threshold=1e9, device=ctx.device, backend=b) for b in ours
        }

        def token_loop(s):  # what ProbeGuard's prefill did before the varlen op: one step per position
            for t in range(T):
                s._step_trusted(ids, rows[:, t], None)

        implementations = {b: (lambda s=s: s._step_varlen_trusted(ids, starts, counts, z)) for b, s in streams.items()}
        baselines = {f"{b} per-token loop": (lambda s=s: token_loop(s)) for b, s in streams.items()}
        cases.append(
            Case(
                op="probe_stream_step_varlen",
                shape=f"prefill {slots}x{T} tokens K={K} {smoothing}",
                dtype="float32",
                implementations=implementations,
                baselines=baselines,
                notes="a 512-token prefill over 8 slots: one varlen launch vs one stream step per position",
            )
        )
    return cases


def _loss_cases(ctx: BenchContext, ours: list[str]) -> list[Case]:
    B, T = 64, 512
    g = torch.Generator().manual_seed(1)
    z = torch.randn(B, T, generator=g).to(ctx.device).requires_grad_()
    y = torch.rand(B, generator=g).to(ctx.device)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g).to(ctx.device)

    def fused(b):
        z.grad = None
        softmax_weighted_bce(z, y, lengths, backend=b).backward()

    def eager():
        z.grad = None
        ref.softmax_weighted_bce(z, y, lengths).backward()

    baselines = {"eager autograd": eager}
    if ctx.is_cuda or not ctx.quick:
        compiled = torch.compile(ref.softmax_weighted_bce)

        def compiled_step():
            z.grad = None
            compiled(z, y, lengths).backward()

        baselines["compile"] = compiled_step
    return [
        Case(
            op="softmax_weighted_bce",
            shape=f"B={B} T={T} M=16",
            dtype="float32",
            implementations={b: (lambda b=b: fused(b)) for b in ours},
            baselines=baselines,
            notes="forward + backward; x = baseline time / our time (target >= 2x vs eager autograd on the CPU)",
        )
    ]


def _overhead_cases(ctx: BenchContext, ours: list[str]) -> list[Case]:
    try:
        from pykernels.probes.hf import ProbeGuard, random_llama
    except ImportError:  # transformers is optional
        return []
    model = random_llama(512, 8, device=ctx.device)
    new_tokens = 16 if ctx.quick else 48
    cases = []
    for batch in (1, 16):
        ids = torch.randint(3, model.config.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(batch))
        ids, mask = ids.to(ctx.device), torch.ones_like(ids, device=ctx.device)
        kwargs = dict(
            attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
        probe = LinearProbe(8, 512, threshold=1e9, device=ctx.device)  # never flags: full-length decode
        totals = {"seconds": 0.0, "guard": 0.0, "steps": 0}

        def guarded(probe=probe, ids=ids, kwargs=kwargs, totals=totals, batch=batch):
            import time

            with ProbeGuard(model, probe, max_batch=batch) as guard:
                start = time.perf_counter()
                guard.generate(ids, **kwargs)
                totals["seconds"] += time.perf_counter() - start
                totals["guard"] += guard.timer.seconds
                totals["steps"] += guard.timer.forwards

        def unguarded(ids=ids, kwargs=kwargs):
            with torch.no_grad():
                model.generate(input_ids=ids, **kwargs)

        def noop_hooks(ids=ids, kwargs=kwargs):
            # The control: hooks where the guard hooks, doing nothing (hook dispatch alone).
            handles = [
                model.register_forward_pre_hook(lambda *a, **k: None, with_kwargs=True),
                model.register_forward_hook(lambda *a: None),
            ]
            handles += [layer.register_forward_hook(lambda *a: None) for layer in model.model.layers]
            try:
                unguarded(ids, kwargs)
            finally:
                for h in handles:
                    h.remove()

        def summary(batch=batch, totals=totals):
            share = 100 * totals["guard"] / totals["seconds"]
            per_step = 1e6 * totals["guard"] / max(1, totals["steps"])
            return (
                f"guard overhead at batch {batch} (accumulated timers, every guarded run): {share:.2f}% of "
                f"generate time, {per_step:.0f} us per forward (target <= 1% on a CPU)"
            )

        cases.append(
            Case(
                op="guard_overhead",
                shape=f"llama H=512 L=8 batch={batch} new={new_tokens}",
                dtype="float32",
                implementations={"guarded generate": guarded},
                baselines={"generate": unguarded, "no-op hooks": noop_hooks},
                notes="x = baseline / guarded generate time, A/B interleaved, median of rounds (no-op hooks: the "
                "same hooks doing nothing, so x against it is the guard's work without hook dispatch)",
                summary=summary,
                interleaved_rounds=5 if ctx.quick else 15,
            )
        )
    return cases


# The tables this suite fills (the runner skips the suite when --ops names none of them).
OPS = (
    "probe_accumulate_",
    "decode_dispatch",
    "probe_stream_step",
    "probe_stream_step_varlen",
    "softmax_weighted_bce",
    "guard_overhead",
)


def cases(ctx: BenchContext) -> list[Case]:
    ours = _ours(ctx)
    return (
        _accumulate_cases(ctx, ours)
        + _dispatch_cases(ctx)
        + _stream_cases(ctx, ours)
        + _varlen_cases(ctx, ours)
        + _loss_cases(ctx, ours)
        + _overhead_cases(ctx, ours)
    )
