"""Runs one vLLM engine on a JSON spec (stdin) and prints what it generated as JSON
(the last line of stdout). tests/probes/test_vllm.py runs it in a subprocess, so
each engine gets a fresh process and the test process never imports vLLM.

Spec: {"model": path, "probe": path or null, "engine": {LLM kwargs},
       "record_scores": bool, "requests": [{"prompt": [ids], "max_tokens": n, "arrive": step}]}
Requests with "arrive" = s are added before engine step s (staggered arrivals).
The output also counts the scheduler's preemptions (in-process engines only).
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")


def main() -> None:
    spec = json.load(sys.stdin)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from pykernels.probes.vllm import flag_of, guard_kwargs, worker_guards

    engine_kwargs = {
        "model": spec["model"],
        "skip_tokenizer_init": True,
        "dtype": "float32",
        "max_model_len": 512,
        "seed": 0,
        **spec.get("engine", {}),
    }
    preemptions = _count_preemptions()
    if spec.get("probe"):
        guard = guard_kwargs(spec["probe"])
        guard["additional_config"]["pykernels_probe"].update(spec.get("probe_config", {}))
        if spec.get("record_scores"):
            guard["additional_config"]["pykernels_probe"]["record_scores"] = True
        engine_kwargs = {**guard, **engine_kwargs}  # the spec may turn prefix caching back on
    try:
        llm = LLM(**engine_kwargs)
    except Exception as error:  # the refusal tests read the message
        print(json.dumps({"error": f"{type(error).__name__}: {error}"}))
        return
    engine = llm.llm_engine
    requests = spec["requests"]
    pending = sorted(range(len(requests)), key=lambda i: requests[i].get("arrive", 0))
    finished, step = {}, 0
    while pending or engine.has_unfinished_requests():
        while pending and requests[pending[0]].get("arrive", 0) <= step:
            i = pending.pop(0)
            params = SamplingParams(max_tokens=requests[i]["max_tokens"], temperature=0.0)
            engine.add_request(str(i), TokensPrompt(prompt_token_ids=requests[i]["prompt"]), params)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        step += 1
    guards = worker_guards()
    results = []
    for i in range(len(requests)):
        out = finished[str(i)]
        completion = out.outputs[0]
        flagged, index = flag_of(out)
        result = {
            "tokens": list(completion.token_ids),
            "finish_reason": completion.finish_reason,
            "stop_reason": completion.stop_reason,
            "flagged": flagged,
            "flag_index": index,
        }
        if spec.get("record_scores") and guards:
            recorded = [k for k in guards[0].scores if k == str(i) or k.startswith(f"{i}-")]
            result["scores"] = guards[0].recorded_scores(recorded[0]).tolist() if recorded else []
        results.append(result)
    print(json.dumps({"results": results, "steps": step, "preemptions": preemptions[0]}))


def _count_preemptions() -> list:
    from vllm.v1.core.sched.scheduler import Scheduler

    count, preempt = [0], Scheduler._preempt_request

    def counted(self, *args, **kwargs):
        count[0] += 1
        return preempt(self, *args, **kwargs)

    Scheduler._preempt_request = counted
    return count


if __name__ == "__main__":
    main()
