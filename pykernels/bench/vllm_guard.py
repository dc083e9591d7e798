"""The probe guard inside vLLM (pykernels/probes/vllm.py): decode throughput with
and without it.

  vllm_guard_overhead   generate 16-token prompts + N new tokens at batch 1, 8, 32 on
                        a random Llama (H=512, L=8) in three engines side by side:
                        unguarded, guarded, and guarded with no-op hooks (the same
                        subclasses, no scoring work); A/B interleaved over >= 15 rounds.
                        Also the CPU time of the guard's per-step host work
                        (bookkeeping + the varlen stream step) as a share of the
                        engine's CPU time (robust to other load on the machine).

Needs vLLM (`./dev.sh vllm-test` makes .venv-vllm): `.venv-vllm/bin/pykernels bench
--ops vllm_guard_overhead`. vLLM's default compiled mode; --quick runs eager.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

from pykernels.bench._core import BenchContext, Case

OPS = ("vllm_guard_overhead",)
REQUIRES = ("vllm",)  # without it the suite builds no case (and says so)
BATCHES = (1, 8, 32)


class _Engine:
    def __init__(self, model: str, probe: str, mode: str, eager: bool):
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pykernels.bench._vllm_engine",
                model,
                probe,
                mode,
                "eager" if eager else "compiled",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        atexit.register(self.proc.kill)
        self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"vLLM engine exited ({self.proc.wait()})")

    def run(self, batch: int, new_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"batch": batch, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read()


def cases(ctx: BenchContext) -> list[Case]:
    if importlib.util.find_spec("vllm") is None:
        print(
            "vllm_guard_overhead: vLLM is not installed here; run .venv-vllm/bin/pykernels bench "
            "--ops vllm_guard_overhead (./dev.sh vllm-test makes .venv-vllm)",
            file=sys.stderr,
        )
        return []
    import torch

    from pykernels.probes import LinearProbe
    from pykernels.probes.hf import random_llama

    folder = tempfile.mkdtemp(prefix="pykernels-vllm-bench-")
    model_dir = os.path.join(folder, "llama")
    random_llama(512, 8, vocab_size=1000).save_pretrained(model_dir)
    probe_path = os.path.join(folder, "probe.safetensors")
    probe = LinearProbe(8, 512, threshold=1e9)  # never flags: every request decodes in full
    with torch.no_grad():
        probe.weight_t.normal_(0, 0.05)
    probe.save(probe_path)
    eager = ctx.quick
    engines = {
        "unguarded": _Engine(model_dir, "-", "plain", eager),
        "no-op hooks": _Engine(model_dir, probe_path, "noop", eager),
        "guarded": _Engine(model_dir, probe_path, "guard", eager),
    }
    new_tokens = 16 if ctx.quick else 64
    out = []
    for batch in BATCHES:
        timers = {"cpu_seconds": 0.0, "guard_cpu_seconds": 0.0, "steps": 0}

        def call(name, batch=batch, timers=timers):
            result = engines[name].run(batch, new_tokens)
            if name == "guarded":
                for key in timers:
                    timers[key] += result[key]

        def summary(batch=batch, timers=timers):
            share = 100 * timers["guard_cpu_seconds"] / max(timers["cpu_seconds"], 1e-9)
            per_step = 1e6 * timers["guard_cpu_seconds"] / max(1, timers["steps"])
            return (
                f"vLLM guard at batch {batch}: its per-step host work takes {share:.2f}% of the engine's CPU "
                f"time, {per_step:.0f} us CPU per engine step (bookkeeping + varlen stream step; the per-layer "
                f"accumulation runs inside the model's graph and shows only in the A/B)"
            )

        out.append(
            Case(
                op="vllm_guard_overhead",
                shape=f"llama H=512 L=8 batch={batch} new={new_tokens}{' eager' if eager else ' compiled'}",
                dtype="float32",
                implementations={"guarded": lambda call=call: call("guarded")},
                baselines={
                    "unguarded": lambda call=call: call("unguarded"),
                    "no-op hooks": lambda call=call: call("no-op hooks"),
                },
                notes="x = baseline time / guarded time (1.00 = no overhead); A/B interleaved, median of rounds",
                summary=summary,
                interleaved_rounds=5 if ctx.quick else 15,
            )
        )
    return out
