"""Hugging Face `transformers` integration: a streaming probe guard inside generation.

    guard = ProbeGuard(model, probe)             # hooks on every decoder layer
    out = guard.generate(input_ids, attention_mask=mask, max_new_tokens=64)
    out.flagged, out.flag_index                  # per sequence: stopped? at which token?

Each decoder layer's forward hook adds that layer's contribution to a float32
accumulator (probe_accumulate_, one kernel per layer, the layer's output read
in place); after the model's forward, one ProbeStream step (a segmented one
for several new tokens per row) smooths and latches the flags on the device.
With a KV cache each decode step scores only the new token; the prompt is
scored in the first forward (its padding skipped via the attention mask). A flagged sequence stops at the
next step through a StoppingCriteria, in batched generation too.

What is scored: the output of each decoder layer (the residual stream), which
is what `capture` returns for training. (Hugging Face's output_hidden_states
differs for the last layer, which it returns after the final norm.) A token's
activations exist once it has been fed to the model, so the token a flag
points at is an input of the forward that flagged it; the last sampled token
is scored only if generation continues.

Timers: `guard.timer` accumulates the wall time spent in the hooks and the
stream step. On a CPU that is the probe's whole cost; on a GPU it is only the
launch cost (kernels run asynchronously), so measure GPU overhead A/B.
Not thread-safe: one guard per model per thread. With your own
`model.generate(..., stopping_criteria=[guard.stopping_criteria()])`, call
`guard.reset()` first; beam search and num_return_sequences > 1 are not
supported (the per-sequence state would not follow reordered beams).
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Sequence
from typing import Optional

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..backend import resolve
from .training import LinearProbe


def random_llama(
    hidden_size: int = 512, num_layers: int = 8, vocab_size: int = 32000, seed: int = 0, device=None
) -> torch.nn.Module:
    """A small Llama-architecture causal LM with random weights, built offline from a
    config (for demos, tests and the overhead benchmark). eos 2, pad 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, hidden_size // 64)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).to(device).eval()


def find_decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of decoder layers: the one whose length is the config's
    num_hidden_layers (Llama/Qwen/Mistral `model.layers`, GPT-2 `transformer.h`, ...)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    matching = [m for m in candidates if n is None or len(m) == n]
    if len(matching) != 1:
        raise ValueError(
            f"could not find the decoder layers of {type(model).__name__} "
            f"({len(matching)} ModuleLists of length {n}); pass layers=model.<path>.layers"
        )
    return matching[0]


@dataclasses.dataclass
class Timer:
    """Wall time spent in the guard (hooks + stream steps) and what it scored."""

    seconds: float = 0.0
    forwards: int = 0
    tokens: int = 0  # tokens scored (rows x new positions, padding included)

    def reset(self) -> None:
        self.seconds, self.forwards, self.tokens = 0.0, 0, 0


@dataclasses.dataclass
class GuardedOutput:
    sequences: torch.Tensor  # [B, prompt + new] as generate returns them
    flagged: torch.Tensor  # [B] bool: the probe flagged the sequence before it ended
    flag_index: torch.Tensor  # [B] position in `sequences` of the token whose score crossed, or -1
    prompt_length: int


class ProbeGuard:
    """A LinearProbe scoring a causal LM's tokens as they are generated.

    Args:
        model: a transformers causal LM (PreTrainedModel).
        probe: LinearProbe with num_layers == the model's decoder layers and
            hidden_size == its hidden size, on the model's device. Its smoothing,
            window, ema_alpha and threshold configure the stream.
        max_batch: largest batch to guard (stream slots; default 64).
        layers: the decoder layers, if find_decoder_layers cannot tell.
        backend: kernel backend (default: the fastest for the device).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        probe: LinearProbe,
        *,
        max_batch: int = 64,
        layers: Optional[Sequence[torch.nn.Module]] = None,
        backend: Optional[str] = None,
    ):
        self.model, self.probe = model, probe
        self.layers = list(layers) if layers is not None else list(find_decoder_layers(model))
        device = probe.weight_t.device
        if probe.num_layers != len(self.layers):
            raise ValueError(f"probe has {probe.num_layers} layers but the model has {len(self.layers)} decoder layers")
        hidden = getattr(getattr(model, "config", None), "hidden_size", probe.hidden_size)
        if probe.hidden_size != hidden:
            raise ValueError(f"probe hidden_size is {probe.hidden_size} but the model's is {hidden}")
        model_device = next(model.parameters()).device
        if model_device != device:
            raise ValueError(f"probe is on {device} but the model is on {model_device}; move it with probe.to(...)")
        self.stream = probe.stream(max_batch, backend=backend)
        self._accumulate = resolve("probe_accumulate_", device, self.stream.backend)
        self._weights = [probe.layer_weight(l).detach() for l in range(len(self.layers))]
        self._bias = probe.bias.detach()
        self._slots = torch.arange(max_batch, device=device)
        self._slot_views: dict[int, torch.Tensor] = {}  # slots[:B] per batch size, made once
        self.timer = Timer()
        self.flagged: Optional[torch.Tensor] = None  # [B] after each forward, on the device
        self._acc: Optional[torch.Tensor] = None
        self._positions_scored = 0  # sequence positions stepped since reset()
        self._accumulators: dict[int, torch.Tensor] = {}
        self._mask: Optional[torch.Tensor] = None
        self._capture: Optional[list] = None
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward),
        ]
        self._handles += [layer.register_forward_hook(self._layer_hook(l)) for l, layer in enumerate(self.layers)]

    # ------------------------------------------------------------------ hooks

    def _before_forward(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._acc = None

    def _layer_hook(self, l: int):
        def hook(module, args, output):
            start = time.perf_counter()
            h = output[0] if isinstance(output, tuple) else output
            if self._capture is not None:  # capture() collects activations and scores nothing
                self._capture.append(h.detach())
                return
            hidden = h.reshape(-1, h.shape[-1])
            if self._acc is None:
                self._acc = self._fresh_accumulator(hidden.shape[0])
            self._accumulate(self._acc, hidden, self._weights[l])
            self.timer.seconds += time.perf_counter() - start

        return hook

    def _fresh_accumulator(self, rows: int) -> torch.Tensor:
        # One buffer per row count, refilled with the bias (never a view of it:
        # the kernels write into the accumulator). The stream step reads it before
        # the next forward refills it.
        buffer = self._accumulators.get(rows)
        if buffer is None:
            buffer = self._accumulators[rows] = torch.empty(rows, self._bias.shape[0], device=self._bias.device)
        return buffer.copy_(self._bias)

    def _after_forward(self, module, args, output):
        if self._acc is None:
            return
        start = time.perf_counter()
        logits = getattr(output, "logits", None)
        B = logits.shape[0] if logits is not None else self._mask.shape[0]
        if B > self.stream.max_slots:
            raise ValueError(f"batch of {B} exceeds the guard's max_batch={self.stream.max_slots}")
        T = self._acc.shape[0] // B
        slots = self._slot_views.get(B)
        if slots is None:
            slots = self._slot_views[B] = self._slots[:B]
        if T == 1:
            # Decoding with a KV cache: the accumulator already is the step's [B, K] input. The
            # fast path matters on a CPU, where the LM head has just evicted the guard's data
            # from the caches and every extra tensor op costs several microseconds.
            _, flagged = self.stream._step_trusted(slots, self._acc, None)
            first_new = 0
        else:
            # Without a KV cache every forward feeds the whole sequence again: only the
            # positions past those already scored are new. With a cache all T are new.
            first_new = self._positions_scored if T > self._positions_scored else 0
            begin, end = self._new_positions(B, T, first_new)
            # Row b's new positions are one segment of the flattened [B * T, K] accumulator:
            # every row steps through its own in one launch.
            starts = torch.arange(0, B * T, T, device=self._acc.device) + begin
            _, flagged = self.stream._step_varlen_trusted(slots, starts, (end - begin).clamp_(min=0), self._acc)
        self._positions_scored += T - first_new
        self.flagged = flagged
        self.timer.seconds += time.perf_counter() - start
        self.timer.forwards += 1
        self.timer.tokens += B * T
        self._acc = None

    def _new_positions(self, B: int, T: int, first_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the positions [begin, end) of this forward's T to score: from first_new
        on, and, in a prompt, only the attention mask's run of real tokens (left or right
        padding skipped). Decoding (one new position) feeds real tokens only."""
        device = self._acc.device
        if self._mask is None or T - first_new == 1:
            return torch.full((B,), first_new, device=device), torch.full((B,), T, device=device)
        real = self._mask[:, -T:] != 0
        if device.type == "cpu":  # free on the CPU; on a GPU it would cost a sync
            runs = (real[:, 1:] & ~real[:, :-1]).sum(1) + real[:, 0]
            if bool((runs > 1).any()):
                raise ValueError(
                    "ProbeGuard: each attention_mask row must hold one run of real tokens (left or "
                    f"right padding only), got {self._mask.tolist()}"
                )
        first_real = real.int().argmax(1)  # first 1 (0 for a row of padding only, which has no real tokens)
        end = first_real + real.sum(1)
        return torch.clamp(first_real, min=first_new), end

    # ------------------------------------------------------------------ use

    def reset(self) -> None:
        """Clear every slot (a new batch of requests) and the last flags, and take the
        probe's current thresholds (e.g. after probe.calibrate)."""
        self.stream.reset()
        self.stream.threshold.copy_(self.probe.threshold)
        self.flagged = None
        self._positions_scored = 0

    def stopping_criteria(self) -> ProbeStoppingCriteria:
        return ProbeStoppingCriteria(self)

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **generate_kwargs
    ) -> GuardedOutput:
        """model.generate with the guard: resets the stream, stops flagged sequences.

        Prompts must be left-padded (as for any batched decoder-only generation).
        Returns the sequences and, per sequence, whether it was flagged before it
        ended (EOS) and where. Every token after a flag is replaced by the pad token
        (pad_token_id, else the EOS id; a ValueError before generating if there is
        neither), whatever the generation config: the token sampled from the forward
        that flagged, and any sampled later.
        """
        for name in ("num_beams", "num_return_sequences"):
            # Beams are reordered and sequences duplicated inside generate; the
            # per-slot stream state would not follow them.
            if generate_kwargs.get(name, 1) != 1:
                raise ValueError(f"ProbeGuard.generate supports {name}=1 only, got {generate_kwargs[name]}")
        pad_id = self._pad_token_id(generate_kwargs)
        self.reset()
        criteria = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", None) or [])
        criteria.append(self.stopping_criteria())
        sequences = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, stopping_criteria=criteria, **generate_kwargs
        )
        if not isinstance(sequences, torch.Tensor):  # return_dict_in_generate=True
            sequences = sequences.sequences
        B, P = input_ids.shape
        flagged, token = self.stream.flags(list(range(B)))
        pads = P - (attention_mask.sum(1).cpu() if attention_mask is not None else torch.full((B,), P))
        index = torch.where(flagged, token + pads, torch.full_like(token, -1))
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is not None:  # scores of pad tokens fed after a sequence ended do not count
            eos_ids = torch.as_tensor(eos).reshape(-1)
            is_eos = torch.isin(sequences[:, P:].cpu(), eos_ids)
            ended = torch.where(is_eos.any(1), P + is_eos.float().argmax(1), torch.full((B,), sequences.shape[1]))
            index = torch.where(index <= ended, index, torch.full_like(index, -1))
        return GuardedOutput(_pad_after(sequences, index, pad_id), index >= 0, index, P)

    def _pad_token_id(self, generate_kwargs: dict) -> int:
        """The id that replaces tokens after a flag: pad_token_id (argument, then the
        generation config), else the first EOS id; generate pads finished rows with it."""
        config = self.model.generation_config
        for candidate in (
            generate_kwargs.get("pad_token_id"),
            getattr(config, "pad_token_id", None),
            generate_kwargs.get("eos_token_id"),
            getattr(config, "eos_token_id", None),
        ):
            if candidate is not None:
                return int(torch.as_tensor(candidate).reshape(-1)[0])
        raise ValueError(
            "ProbeGuard.generate needs a pad_token_id (or an eos_token_id) to blank the tokens "
            "after a flag: pass pad_token_id=... or set model.generation_config.pad_token_id"
        )

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """The decoder layers' outputs [B, T, H] for a forward pass: the activations the
        hooks score, for training and calibrating the probe."""
        kwargs = {}
        if attention_mask is not None and "position_ids" in inspect.signature(self.model.forward).parameters:
            # Left padding shifts each row's tokens; generate positions them from the
            # attention mask, and models with absolute position embeddings (GPT-2) need
            # the same positions here to produce the activations the guard scores.
            kwargs["position_ids"] = positions_from_mask(attention_mask)
        self._capture = []
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
            return self._capture
        finally:
            self._capture = None

    def remove(self) -> None:
        """Detach every hook from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> ProbeGuard:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows as generate assigns them: 0 at each row's first
    real token, counting real tokens only (padding gets 1, a value never read)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill_(attention_mask == 0, 1)


def _pad_after(sequences: torch.Tensor, flag_index: torch.Tensor, pad_id: int) -> torch.Tensor:
    """sequences with every token after a row's flag replaced by pad_id: generate keeps
    sampling a stopped row when the config has no EOS, and those tokens must not be returned."""
    if not bool((flag_index >= 0).any()):
        return sequences
    position = torch.arange(sequences.shape[1])[None, :]
    after = (flag_index[:, None] >= 0) & (position > flag_index[:, None])
    return sequences.masked_fill(after.to(sequences.device), pad_id)


class ProbeStoppingCriteria(StoppingCriteria):
    """Stops each sequence once the guard has flagged it (a device tensor, no sync)."""

    def __init__(self, guard: ProbeGuard):
        self.guard = guard

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        flagged = self.guard.flagged
        if flagged is None or flagged.shape[0] != input_ids.shape[0]:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return flagged.to(input_ids.device)
