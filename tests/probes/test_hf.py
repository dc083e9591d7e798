"""The transformers integration on a tiny random-weight Llama: the hooks score
what probe_scores scores on the captured activations, the guard stops flagged
sequences in batched generation with a KV cache, and reports the token."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pykernels.probes import LinearProbe, probe_scores  # noqa: E402
from pykernels.probes.hf import ProbeGuard, find_decoder_layers  # noqa: E402

VOCAB, H, L = 97, 32, 3


def _tiny_model(arch):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=H, n_layer=L, n_head=4, n_positions=128, **common)
        return transformers.GPT2LMHeadModel(cfg).eval()
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    cfg = config_class(
        hidden_size=H,
        intermediate_size=64,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **common,
    )
    return model_class(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return _tiny_model("llama")


def _probe(threshold, smoothing="swim", seed=0):
    probe = LinearProbe(L, H, smoothing=smoothing, window=4, threshold=threshold)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        probe.weight_t.copy_(torch.randn(L, 1, H, generator=g) * 0.3)
        probe.bias.fill_(0.1)
    return probe


def _prompts():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    ids[mask == 0] = 0
    return ids, mask


GEN = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)


def _full_scores(guard, probe, sequences, mask, pads):
    """probe_scores of every row's unpadded tokens, from one full forward."""
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], sequences.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    acts = guard.capture(sequences, full_mask)
    return [
        probe_scores(
            [a[b : b + 1, p:] for a in acts],
            probe.weight.detach(),
            probe.bias.detach(),
            smoothing=probe.smoothing,
            window=probe.window,
        )[0, :, 0]
        for b, p in enumerate(pads)
    ]


def test_find_decoder_layers(model):
    assert find_decoder_layers(model) is model.model.layers


def test_capture_reads_the_decoder_layer_outputs(model):
    ids, mask = _prompts()
    with ProbeGuard(model, _probe(0.0), max_batch=4) as guard:
        acts = guard.capture(ids, mask)
    ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(acts) == L
    for l in range(L - 1):  # HF returns the last layer after the final norm
        torch.testing.assert_close(acts[l], ref[l + 1])


def test_guard_flags_where_the_full_sequence_scores_cross(model):
    ids, mask = _prompts()
    pads = (mask.shape[1] - mask.sum(1)).tolist()
    with ProbeGuard(model, _probe(1e9), max_batch=4) as guard:
        free = guard.generate(ids, attention_mask=mask, **GEN)
        assert not free.flagged.any()
        scores = _full_scores(guard, guard.probe, free.sequences, mask, pads)
    # Row 0 flags at the first new running maximum that clears the previous one by a margin.
    s0 = scores[0][:-1]  # the last token is never fed back, so never scored
    run = s0.cummax(0).values
    jumps = [t for t in range(4, len(s0)) if s0[t] > run[t - 1] + 0.01]
    assert jumps, f"test setup: no clear crossing in row 0: {s0}"
    threshold = float(run[jumps[0] - 1] + s0[jumps[0]]) / 2
    expect = []
    for b, s in enumerate(scores):
        above = (s[:-1] > threshold).nonzero()
        margin = (s[:-1] - threshold).abs().min()
        expect.append((int(above[0]) + pads[b] if len(above) else -1, float(margin)))
    with ProbeGuard(model, _probe(threshold), max_batch=4) as guard:
        out = guard.generate(ids, attention_mask=mask, **GEN)
    for b, (index, margin) in enumerate(expect):
        if margin < 1e-4:
            continue  # too close to call after KV-cache rounding
        assert int(out.flag_index[b]) == index, (b, out.flag_index, expect)
        assert bool(out.flagged[b]) == (index >= 0)
    # The flagged row stopped, and nothing after the flagged token is returned.
    i0 = int(out.flag_index[0])
    assert torch.equal(out.sequences[0, : i0 + 1], free.sequences[0, : i0 + 1])
    assert (out.sequences[0, i0 + 1 :] == 0).all()
    assert out.prompt_length == ids.shape[1]


def test_guard_matches_for_ema_and_batch_one(model):
    ids, mask = _prompts()
    probe = _probe(1e9, smoothing="ema")
    with ProbeGuard(model, probe, max_batch=1) as guard:
        out = guard.generate(ids[:1], attention_mask=mask[:1], **GEN)
        s = _full_scores(guard, probe, out.sequences, mask[:1], [0])[0]
        # The stream saw every token but the last: its state is the EMA there.
        assert guard.stream.tokens_seen([0]).item() == out.sequences.shape[1] - 1
        torch.testing.assert_close(guard.stream._state[0, 0, 0], s[-2], rtol=0, atol=1e-4)
        assert guard.timer.forwards == GEN["max_new_tokens"] and guard.timer.seconds > 0
    assert torch.equal(probe.bias, torch.full((1,), 0.1)), "the guard must never write into the probe"


def test_guard_without_a_kv_cache_scores_each_position_once(model):
    # Without a cache every forward re-feeds the whole sequence; only new positions count.
    ids, mask = _prompts()
    probe = _probe(1e9, smoothing="ema")
    with ProbeGuard(model, probe, max_batch=1) as guard:
        cached = guard.generate(ids[:1], attention_mask=mask[:1], **GEN)
        state_cached = guard.stream._state[0].clone()
        uncached = guard.generate(ids[:1], attention_mask=mask[:1], use_cache=False, **GEN)
        assert torch.equal(uncached.sequences, cached.sequences)
        assert guard.stream.tokens_seen([0]).item() == uncached.sequences.shape[1] - 1
        torch.testing.assert_close(guard.stream._state[0], state_cached, rtol=0, atol=1e-4)


def test_guard_refuses_beams_and_duplicated_sequences(model):
    ids, mask = _prompts()
    with ProbeGuard(model, _probe(0.0), max_batch=4) as guard:
        for kwargs in ({"num_beams": 2}, {"num_return_sequences": 2, "do_sample": True}):
            with pytest.raises(ValueError, match="supports .*=1 only"):
                guard.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0, **kwargs)


def test_stopping_criteria_with_the_users_generate(model):
    ids, mask = _prompts()
    with ProbeGuard(model, _probe(-1e9), max_batch=4) as guard:  # everything flags at once
        guard.reset()
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            stopping_criteria=[guard.stopping_criteria()],
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
        )
        assert out.shape[1] == ids.shape[1] + 1  # stopped after the first step
        flagged, token = guard.stream.flags([0, 1, 2])
        assert flagged.all() and (token == 0).all()


def test_guard_argument_errors(model):
    with pytest.raises(ValueError, match="probe has 2 layers but the model has 3 decoder layers"):
        ProbeGuard(model, LinearProbe(2, H))
    with pytest.raises(ValueError, match="probe hidden_size is 16 but the model's is 32"):
        ProbeGuard(model, LinearProbe(L, 16))
    with ProbeGuard(model, _probe(0.0), max_batch=2) as guard:
        ids, mask = _prompts()
        with pytest.raises(ValueError, match="batch of 3 exceeds the guard's max_batch=2"):
            guard.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)


def test_remove_detaches_the_hooks(model):
    guard = ProbeGuard(model, _probe(0.0))
    guard.remove()
    model(input_ids=torch.tensor([[5, 6, 7]]))
    assert guard.timer.forwards == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_capture_of_a_left_padded_batch_equals_each_unpadded_row(arch):
    # Absolute position embeddings (GPT-2) see the padding unless positions come from the mask,
    # as generate assigns them; every architecture must give each row its own activations.
    model = _tiny_model(arch)
    ids, mask = _prompts()
    pads = (mask.shape[1] - mask.sum(1)).tolist()
    with ProbeGuard(model, _probe(0.0), max_batch=4) as guard:
        batch = guard.capture(ids, mask)
        for b, p in enumerate(pads):
            row = guard.capture(ids[b : b + 1, p:])
            for l in range(L):
                torch.testing.assert_close(batch[l][b : b + 1, p:], row[l], rtol=1e-5, atol=1e-5)


def test_no_token_after_a_flag_is_returned_without_an_eos_in_the_config():
    # Without an EOS id, generate keeps sampling a row the guard stopped; those tokens must not
    # reach the caller (generate's output is padded after the flagged token).
    model = _tiny_model("llama")
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    ids, mask = _prompts()
    pads = (mask.shape[1] - mask.sum(1)).tolist()
    gen = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    probe = _probe(1e9, smoothing="none")
    with ProbeGuard(model, probe, max_batch=4) as guard:
        free = guard.generate(ids, attention_mask=mask, **gen)
        scores = _full_scores(guard, probe, free.sequences, mask, pads)
        peaks = torch.stack([s[:-1].max() for s in scores])
        # Between the lowest and the highest row peak: some row flags, another never does.
        threshold = float(peaks.min() + peaks.max()) / 2
        with torch.no_grad():
            probe.threshold.fill_(threshold)
        out = guard.generate(ids, attention_mask=mask, **gen)
    assert out.flagged.any() and not out.flagged.all(), (peaks, out.flag_index)
    assert out.sequences.shape == free.sequences.shape  # an unflagged row ran to max_new_tokens
    for b in out.flagged.nonzero()[:, 0].tolist():
        i = int(out.flag_index[b])
        assert i < out.sequences.shape[1] - 1, "test setup: the flag must leave tokens after it"
        assert torch.equal(out.sequences[b, : i + 1], free.sequences[b, : i + 1])
        assert (out.sequences[b, i + 1 :] == 0).all(), out.sequences[b]


def test_generate_without_any_pad_or_eos_id_is_refused():
    model = _tiny_model("llama")
    model.config.eos_token_id = model.config.pad_token_id = None
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = None
    ids, mask = _prompts()
    with ProbeGuard(model, _probe(0.0), max_batch=4) as guard:
        with pytest.raises(ValueError, match="needs a pad_token_id"):
            guard.generate(ids, attention_mask=mask, max_new_tokens=2)
