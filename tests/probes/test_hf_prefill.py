"""ProbeGuard's prompt (prefill) scoring: one segmented stream step per forward,
whatever the padding, equal to probe_scores on each row's real tokens."""

import pytest
import torch

pytest.importorskip("transformers")

from pykernels.probes import probe_scores  # noqa: E402
from pykernels.probes.hf import ProbeGuard  # noqa: E402
from tests.probes.test_hf import _probe, _prompts, model  # noqa: E402,F401  (model: the fixture)


def _real_token_scores(guard, probe, ids, mask):
    """Per row, probe_scores over its real tokens (from captured activations)."""
    acts = guard.capture(ids, mask)
    return [
        probe_scores(
            [a[b : b + 1, mask[b].bool()] for a in acts],
            probe.weight.detach(),
            probe.bias.detach(),
            smoothing=probe.smoothing,
            window=probe.window,
        )[0, :, 0]
        for b in range(ids.shape[0])
    ]


@pytest.mark.parametrize("padding", ["left", "right"])
def test_a_prompt_is_one_varlen_step_scoring_the_real_tokens(model, padding):  # noqa: F811 (the fixture)
    ids, mask = _prompts()  # left padding
    if padding == "right":
        ids, mask = torch.stack([r.roll(-int((m == 0).sum())) for r, m in zip(ids, mask)]), mask.flip(1)
    probe = _probe(threshold=0.0)
    with ProbeGuard(model, probe) as guard:
        scores = _real_token_scores(guard, probe, ids, mask)
        probe.threshold.fill_(sorted(float(s.max()) for s in scores)[1])  # flags the top row only
        expect = [int(above[0]) if len(above) else -1 for above in ((s > probe.threshold).nonzero() for s in scores)]
        assert sorted(expect)[:2] == [-1, -1] and expect != [-1] * 3
        calls = {"varlen": 0, "one token": 0}
        varlen, one_token = guard.stream._step_varlen_trusted, guard.stream._step_trusted

        def count(name, fn):
            def wrapped(*args):
                calls[name] += 1
                return fn(*args)

            return wrapped

        guard.stream._step_varlen_trusted = count("varlen", varlen)
        guard.stream._step_trusted = count("one token", one_token)
        guard.reset()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        assert calls == {"varlen": 1, "one token": 0}
        assert guard.stream.tokens_seen(list(range(3))).tolist() == mask.sum(1).tolist()
        assert guard.stream.flags(list(range(3)))[1].tolist() == expect


def test_a_mask_with_a_hole_is_refused(model):  # noqa: F811 (the fixture)
    ids, mask = _prompts()
    mask[0, 2] = 0
    with ProbeGuard(model, _probe(threshold=0.0)), torch.no_grad():
        with pytest.raises(ValueError, match="each attention_mask row must hold one run of real tokens"):
            model(input_ids=ids, attention_mask=mask)
