"""Training a probe: the paper's softmax-weighted BCE (fused kernels), its
cumulative-max and annealed alternatives (references), and `LinearProbe`.

softmax_weighted_bce, for sequence i with label y_i in [0, 1] and n_i valid tokens:
  zbar_t = SWiM of the token logits (window M, default 16), predictions at
  t = M..n_i (1-based); a sequence shorter than M makes one prediction, the mean
  of all its tokens. Tokens before M are excluded.
  w_t = softmax over the predictions of zbar_t / tau (tau = 1; tau -> 0 focuses
  on the most confidently harmful position, tau -> inf weights uniformly).
  L_i = sum_t w_t * BCE(y_i, sigmoid(zbar_t)).
The paper does not say whether w_t is detached; by default it is not (the
gradient flows through the weights too); detach_weights=True stops it.
Gradients reach token_logits (first order; labels get none).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Optional, Union

import torch

from .._validation import INDEX_DTYPES, check_choice, check_dim, check_int, check_tensor
from ..backend import resolve
from ..reference import probe_guard as _ref
from ..reference.probe_scores import probe_logits
from .scoring import DEFAULT_WINDOW, SMOOTHINGS, as_layers, default_ema_alpha, probe_scores, resolve_ema_alpha
from .stream import ProbeStream

REDUCTIONS = ("mean", "none")
LOSSES = ("softmax_bce", "cumulative_max", "annealed")


def _check_loss_inputs(token_logits, labels, lengths, window, reduction):
    check_tensor(
        "token_logits",
        token_logits,
        ndim=2,
        shape_doc="[B, T]",
        dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
    )
    device = token_logits.device
    B, T = token_logits.shape
    check_tensor("labels", labels, ndim=1, device=device, shape_doc="[B]")
    check_dim("labels", labels, 0, B, "the batch size B")
    if labels.requires_grad:
        raise ValueError("labels must not require grad: the loss gives no gradient w.r.t. labels (detach them)")
    check_tensor("lengths", lengths, ndim=1, dtypes=INDEX_DTYPES, device=device, shape_doc="[B]")
    check_dim("lengths", lengths, 0, B, "the batch size B")
    check_int("window", window, minimum=1)
    check_choice("reduction", reduction, REDUCTIONS)
    if B and T == 0:
        raise ValueError("token_logits has T = 0 tokens: every sequence needs at least one")
    capturing = token_logits.is_cuda and torch.cuda.is_current_stream_capturing()
    if not torch.compiler.is_compiling() and not capturing and B:  # value checks: one host sync on a GPU
        lo, hi = (int(v) for v in torch.aminmax(lengths))
        if lo < 1 or hi > T:
            raise ValueError(
                f"lengths must lie in [1, T={T}] (each sequence needs a token), got values in [{lo}, {hi}]"
            )
        y_lo, y_hi = (float(v) for v in torch.aminmax(labels.detach()))
        if not (0.0 <= y_lo and y_hi <= 1.0):  # also catches NaN
            raise ValueError(f"labels must lie in [0, 1] (soft labels allowed), got values in [{y_lo}, {y_hi}]")


def softmax_weighted_bce(
    token_logits: torch.Tensor,
    labels: torch.Tensor,
    lengths: torch.Tensor,
    window: int = DEFAULT_WINDOW,
    tau: float = 1.0,
    detach_weights: bool = False,
    reduction: str = "mean",
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """The paper's probe training loss (see the module docstring), fused forward + backward.

    Args:
        token_logits: [B, T] raw per-token probe logits (float32 or float64; float16 /
            bfloat16 are computed in float32). Tokens at t >= lengths[b] are ignored.
        labels: [B] exchange labels in [0, 1] (soft labels allowed).
        lengths: [B] valid tokens per sequence, in [1, T].
        window: SWiM window M (default 16). tau: softmax temperature (> 0).
        detach_weights: stop the gradient through the softmax weights.
        reduction: "mean" (average of the per-sequence losses) or "none" ([B]).
        backend: see pykernels.backends().
    """
    _check_loss_inputs(token_logits, labels, lengths, window, reduction)
    tau = float(tau)
    if not tau > 0.0 or math.isinf(tau):
        raise ValueError(f"tau must be a positive finite float, got {tau}")
    if token_logits.dtype in (torch.float16, torch.bfloat16):
        token_logits = token_logits.float()
    fused = resolve("softmax_weighted_bce_fwd", token_logits.device, backend)
    if fused is _ref.softmax_weighted_bce_fwd:  # the reference loss is differentiable itself, to any order
        return _ref.softmax_weighted_bce(token_logits, labels, lengths, window, tau, detach_weights, reduction)
    compute_grad = token_logits.requires_grad and torch.is_grad_enabled()
    loss, _ = fused(token_logits, labels.to(token_logits.dtype), lengths, window, tau, detach_weights, compute_grad)
    return loss.mean() if reduction == "mean" else loss


def cumulative_max_bce(token_logits, labels, lengths, window: int = DEFAULT_WINDOW, reduction: str = "mean"):
    """The paper's cumulative-max alternative (reference implementation): mean over the
    predictions t of BCE(y, max_{s <= t} sigmoid(zbar_s)), the max also over predictions only
    (s >= M - 1, where zbar_s is a full window's mean)."""
    _check_loss_inputs(token_logits, labels, lengths, window, reduction)
    return _ref.cumulative_max_bce(token_logits, labels, lengths, window, reduction)


def annealed_bce(token_logits, labels, lengths, mix: float, window: int = DEFAULT_WINDOW, reduction: str = "mean"):
    """The paper's annealed alternative (reference implementation): mean over the
    predictions of BCE(y, (1 - mix) sigmoid(zbar_t) + mix max_{s <= t} sigmoid(zbar_s)), the
    max over predictions as in cumulative_max_bce; raise `mix` from 0 to 1 over training."""
    _check_loss_inputs(token_logits, labels, lengths, window, reduction)
    if not 0.0 <= float(mix) <= 1.0:
        raise ValueError(f"mix must lie in [0, 1], got {mix}")
    return _ref.annealed_bce(token_logits, labels, lengths, float(mix), window, reduction)


def threshold_for_flag_rate(scores: torch.Tensor, target_rate: float) -> float:
    """The threshold at which at most `target_rate` of `scores` are strictly above it
    (scores > threshold flag, as in ProbeStream): the (floor(rate * n) + 1)-th largest."""
    if not 0.0 <= target_rate <= 1.0:
        raise ValueError(f"target flag rate must lie in [0, 1], got {target_rate}")
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    if s.numel() == 0:
        raise ValueError("need at least one score to calibrate a threshold")
    if torch.isnan(s).any():
        raise ValueError(f"{int(torch.isnan(s).sum())} calibration scores are NaN; fix the inputs first")
    k = int(math.floor(target_rate * s.numel()))
    if k >= s.numel():
        return -math.inf
    return float(torch.sort(s, descending=True).values[k])


Batch = tuple  # (hidden_states [L, B, T, H] or L x [B, T, H], labels [B] or [B, K], lengths [B])
FORMAT, VERSION = "pykernels.LinearProbe", 1


class LinearProbe(torch.nn.Module):
    """K linear probes over all L layers: z_t = sum_l h_t^(l) . W_l + b.

    Holds the weights ([L, H, K], stored transposed so probe_accumulate_ reads them
    in place), the inference smoothing config and the per-head flag thresholds.

    Args:
        num_layers, hidden_size: L and H of the activations it reads.
        num_heads: K (default 1).
        smoothing, window, ema_alpha: inference smoothing, as in probe_scores
            (default "ema", window 16, alpha 2 / (window + 1)).
        threshold: flag when a smoothed score is > threshold (float or K floats);
            set it with `calibrate`.
    """

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        num_heads: int = 1,
        *,
        smoothing: str = "ema",
        window: int = DEFAULT_WINDOW,
        ema_alpha: Optional[float] = None,
        threshold: Union[float, Sequence[float]] = 0.0,
        device=None,
    ):
        super().__init__()
        check_int("num_layers", num_layers, minimum=1)
        check_int("hidden_size", hidden_size, minimum=1)
        check_int("num_heads", num_heads, minimum=1)
        check_choice("smoothing", smoothing, SMOOTHINGS)
        check_int("window", window, minimum=1)
        resolve_ema_alpha(smoothing, window, ema_alpha)  # the rule of probe_scores and ProbeStream
        self.smoothing, self.window = smoothing, window
        self.ema_alpha = None if ema_alpha is None else float(ema_alpha)
        self.weight_t = torch.nn.Parameter(torch.zeros(num_layers, num_heads, hidden_size, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(num_heads, device=device))
        thr = torch.as_tensor(threshold, dtype=torch.float32).reshape(-1)
        if thr.numel() not in (1, num_heads):
            raise ValueError(f"threshold must be a float or {num_heads} floats (one per head), got {thr.numel()}")
        self.register_buffer("threshold", thr.expand(num_heads).clone().to(device))

    @property
    def num_layers(self) -> int:
        return self.weight_t.shape[0]

    @property
    def num_heads(self) -> int:
        return self.weight_t.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.weight_t.shape[2]

    @property
    def weight(self) -> torch.Tensor:
        """[L, H, K] view of the weights (the layout probe_scores takes)."""
        return self.weight_t.transpose(1, 2)

    def layer_weight(self, layer: int) -> torch.Tensor:
        """[H, K] weights of one layer, in the layout probe_accumulate_ reads without a copy."""
        return self.weight_t[layer].t()

    @property
    def resolved_ema_alpha(self) -> float:
        return default_ema_alpha(self.window) if self.ema_alpha is None else self.ema_alpha

    @property
    def _smoothing_alpha(self) -> Optional[float]:
        # the ema_alpha argument of probe_scores / ProbeStream: only with EMA smoothing
        return self.ema_alpha if self.smoothing == "ema" else None

    def stream(self, max_slots: int, *, backend: Optional[str] = None) -> ProbeStream:
        """A ProbeStream with this probe's heads, smoothing, window, decay and
        thresholds, on its device: the serving-side state for max_slots sequences."""
        return ProbeStream(
            max_slots,
            self.num_heads,
            smoothing=self.smoothing,
            window=self.window,
            ema_alpha=self._smoothing_alpha,
            threshold=self.threshold,
            device=self.bias.device,
            backend=backend,
        )

    # ------------------------------------------------------------------ scoring

    def token_logits(self, hidden_states) -> torch.Tensor:
        """Raw per-token logits [B, T, K], differentiable w.r.t. the weights (training)."""
        return probe_logits(as_layers(hidden_states), self.weight, self.bias)

    @torch.no_grad()
    def forward(self, hidden_states, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Smoothed scores [B, T, K] with the probe's inference smoothing (fused kernel)."""
        return probe_scores(
            hidden_states,
            self.weight.detach(),
            self.bias.detach(),
            smoothing=self.smoothing,
            window=self.window,
            ema_alpha=self._smoothing_alpha,
            lengths=lengths,
        )

    @torch.no_grad()
    def exchange_scores(self, hidden_states, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, K]: each sequence's highest smoothed score over its valid tokens, the
        number a streaming guard compares with the threshold (flag at any token)."""
        s = self(hidden_states, lengths)
        if lengths is not None:
            t = torch.arange(s.shape[1], device=s.device)
            s = s.masked_fill((t[None, :] >= lengths.to(s.device)[:, None])[:, :, None], float("-inf"))
        return s.amax(dim=1)

    # ------------------------------------------------------------------ training

    def fit(
        self,
        batches: Union[Iterable[Batch], Callable[[], Iterable[Batch]]],
        *,
        epochs: int = 1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        loss: str = "softmax_bce",
        window: Optional[int] = None,
        tau: float = 1.0,
        detach_weights: bool = False,
        progress: bool = True,
    ) -> list[float]:
        """Train on batches of activations streamed from a model (never all in memory).

        Args:
            batches: an iterable of (hidden_states, labels, lengths), or a callable
                returning a fresh one per epoch (needed when epochs > 1 and the
                iterable is a one-shot generator). labels: [B] (or [B, K]) in [0, 1].
            epochs, lr, weight_decay: Adam(W) settings.
            loss: "softmax_bce" (the paper's, default), "cumulative_max" or "annealed"
                (mix rising linearly from 0 to 1 over the epochs).
            window: SWiM window of the loss (default: the probe's window).
            tau, detach_weights: softmax_weighted_bce options.
            progress: print one line per epoch (loss, batches, seconds) to stderr.

        Returns: the mean loss of each epoch.
        """
        check_choice("loss", loss, LOSSES)
        check_int("epochs", epochs, minimum=1)
        window = self.window if window is None else window
        opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)
        history = []
        for epoch in range(epochs):
            source = batches() if callable(batches) else batches
            total, count, start = 0.0, 0, time.perf_counter()
            mix = epoch / max(1, epochs - 1)
            for hidden_states, labels, lengths in source:
                z = self.token_logits(hidden_states)  # [B, T, K]
                labels = labels.to(z.device, z.dtype)
                labels = labels[:, None].expand(-1, self.num_heads) if labels.dim() == 1 else labels
                lengths = lengths.to(z.device)
                value = 0.0
                for k in range(self.num_heads):
                    if loss == "softmax_bce":
                        value = value + softmax_weighted_bce(
                            z[..., k], labels[:, k], lengths, window, tau, detach_weights
                        )
                    elif loss == "cumulative_max":
                        value = value + cumulative_max_bce(z[..., k], labels[:, k], lengths, window)
                    else:
                        value = value + annealed_bce(z[..., k], labels[:, k], lengths, mix, window)
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                total += float(value.detach())
                count += 1
            if count == 0:
                raise ValueError("fit got no batches (a one-shot generator reused across epochs? pass a callable)")
            history.append(total / count)
            if progress:
                print(
                    f"LinearProbe.fit epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f} over {count} batches "
                    f"({time.perf_counter() - start:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
        return history

    @torch.no_grad()
    def calibrate(self, benign_batches: Iterable[tuple], target_flag_rate: float) -> torch.Tensor:
        """Set each head's threshold so that about `target_flag_rate` of benign
        sequences flag (their highest smoothed score is above it).

        benign_batches: iterable of (hidden_states, lengths) (lengths may be None).
        Returns the thresholds [K]. (Each head is calibrated on its own; a sequence
        flags when any head does, so with K heads the joint rate is at most K times it.)
        """
        scores = torch.cat([self.exchange_scores(h, lengths).cpu() for h, lengths in benign_batches])
        thr = torch.tensor([threshold_for_flag_rate(scores[:, k], target_flag_rate) for k in range(self.num_heads)])
        self.threshold.copy_(thr)
        return self.threshold

    # ------------------------------------------------------------------ persistence

    def save(self, path: str) -> None:
        """Weights, bias, thresholds and smoothing config in one safetensors file (versioned)."""
        from safetensors.torch import save_file

        tensors = {
            "weight_t": self.weight_t.detach().cpu().contiguous(),
            "bias": self.bias.detach().cpu(),
            "threshold": self.threshold.cpu(),
        }
        meta = {
            "format": FORMAT,
            "version": str(VERSION),
            "smoothing": self.smoothing,
            "window": str(self.window),
            "ema_alpha": "" if self.ema_alpha is None else repr(self.ema_alpha),
        }
        save_file(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path: str, device=None) -> LinearProbe:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a saved LinearProbe (format {meta.get('format')!r})")
            if meta.get("version") != str(VERSION):
                raise ValueError(
                    f"{path} has LinearProbe format version {meta.get('version')}; "
                    f"this pykernels reads version {VERSION}"
                )
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        L, K, H = tensors["weight_t"].shape
        alpha = meta.get("ema_alpha") or None
        probe = cls(
            L,
            H,
            K,
            smoothing=meta["smoothing"],
            window=int(meta["window"]),
            ema_alpha=None if alpha is None else float(alpha),
        )
        with torch.no_grad():
            probe.weight_t.copy_(tensors["weight_t"])
            probe.bias.copy_(tensors["bias"])
            probe.threshold.copy_(tensors["threshold"])
        return probe.to(device) if device is not None else probe


__all__ = ["LinearProbe", "annealed_bce", "cumulative_max_bce", "softmax_weighted_bce", "threshold_for_flag_rate"]
