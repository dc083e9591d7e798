"""One vLLM engine serving timing commands on stdin (a JSON line each), answering on
stdout; run by pykernels/bench/vllm_guard.py so that the guarded, unguarded and
no-op-control engines live side by side and are timed in interleaved rounds.

argv: model path, probe path or "-" (no guard), "noop" to install the guard's
subclasses without their work, "eager" for enforce_eager.
Command {"batch": B, "new_tokens": N} -> {"seconds": wall s, "cpu_seconds": process CPU s,
"steps": n, "guard_cpu_seconds": CPU s of the guard's per-step host work}.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    model, probe, mode, eager = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "eager"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from pykernels.probes.vllm import guard_kwargs, worker_guards

    kwargs = {}
    if probe != "-":
        kwargs = guard_kwargs(probe)
        kwargs["additional_config"]["pykernels_probe"]["noop_control"] = mode == "noop"
    else:
        kwargs = {"enable_prefix_caching": False}  # as the guarded engines run
    llm = LLM(
        model=model,
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=256,
        seed=0,
        enforce_eager=eager,
        max_num_seqs=64,
        **kwargs,
    )
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        batch, new = command["batch"], command["new_tokens"]
        prompts = [TokensPrompt(prompt_token_ids=[3 + (7 * i + j) % 500 for j in range(16)]) for i in range(batch)]
        params = SamplingParams(max_tokens=new, min_tokens=new, temperature=0.0)
        guards = worker_guards()
        before = (guards[0].step_cpu_seconds, guards[0].steps) if guards else (0.0, 0)
        start, start_cpu = time.perf_counter(), time.process_time()
        llm.generate(prompts, params, use_tqdm=False)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        after = (guards[0].step_cpu_seconds, guards[0].steps) if guards else (0.0, 0)
        print(
            json.dumps(
                {
                    "seconds": seconds,
                    "cpu_seconds": cpu_seconds,
                    "guard_cpu_seconds": after[0] - before[0],
                    "steps": after[1] - before[1],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
