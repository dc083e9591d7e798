"""The production cascade: a probe screens every exchange, an expensive
classifier sees only the exchanges the probe escalates, and the final decision
ensembles both logits.

  z_probe <= escalate_threshold        -> pass (the probe alone decides)
  otherwise: z = alpha * z_probe + (1 - alpha) * z_classifier
             z > final_threshold       -> flag, else pass
Defaults follow the paper: alpha = 0.55. The two thresholds live on different
scales (probe logit vs ensembled logit), so either may be the larger; calibrate
them with `Cascade.calibrated` from benign score samples.

Fail closed: a probe score that is NaN, or a classifier that raises or returns
something that is not a finite number, flags the exchange; the decision says
why and a warning counts them.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from .training import threshold_for_flag_rate

PASS, ESCALATED_PASS, FLAG, FAIL_CLOSED = "pass", "escalated-pass", "flag", "fail-closed"


@dataclasses.dataclass
class CascadeReport:
    """What the cascade cost and decided on a run of exchanges.

    relative_compute is (cost of running the classifier on every exchange) /
    (cost of the cascade); the paper's ~40x figure is this ratio. Costs are
    measured seconds unless the Cascade was given explicit per-call costs.
    """

    exchanges: int
    escalated: int
    flagged: int
    fail_closed: int
    probe_seconds: float
    classifier_seconds: float
    relative_compute: float
    tokens: Optional[int] = None

    @property
    def escalation_rate(self) -> float:
        return self.escalated / self.exchanges if self.exchanges else float("nan")

    @property
    def classifier_calls_per_1k(self) -> float:
        return 1000.0 * self.escalation_rate

    @property
    def flag_rate(self) -> float:
        return self.flagged / self.exchanges if self.exchanges else float("nan")

    @property
    def probe_us_per_token(self) -> Optional[float]:
        return 1e6 * self.probe_seconds / self.tokens if self.tokens else None

    def __str__(self) -> str:
        per_token = self.probe_us_per_token
        lines = [
            f"exchanges                 {self.exchanges}",
            f"escalation rate           {100 * self.escalation_rate:.2f}%",
            f"classifier calls per 1k   {self.classifier_calls_per_1k:.1f}",
            f"flag rate                 {100 * self.flag_rate:.2f}%  ({self.fail_closed} failed closed)",
            f"relative compute          {self.relative_compute:.1f}x less than the classifier on every exchange",
            f"probe time                {1e3 * self.probe_seconds:.2f} ms"
            + (f" ({per_token:.3f} us per token)" if per_token is not None else ""),
            f"classifier time           {1e3 * self.classifier_seconds:.2f} ms",
        ]
        return "\n".join(lines)


@dataclasses.dataclass
class CascadeResult:
    flagged: torch.Tensor  # [n] bool
    decisions: list[str]  # PASS, ESCALATED_PASS, FLAG or "fail-closed: <why>"
    probe_logits: torch.Tensor  # [n]
    classifier_logits: torch.Tensor  # [n], NaN where the classifier was not called
    report: CascadeReport


def _check_threshold(name: str, value) -> float:
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number (or +/-inf), got NaN")
    return value


class Cascade:
    """Probe screening, classifier escalation, ensembled decision.

    Args:
        probe: callable taking a sequence of exchanges and returning one probe logit
            per exchange ([n] tensor or sequence of floats), e.g. the highest
            smoothed score of a LinearProbe over the exchange's tokens.
        classifier: callable taking one exchange and returning its logit (float).
        escalate_threshold: exchanges whose probe logit is above it go to the classifier.
        final_threshold: an escalated exchange flags when its ensembled logit is above it.
        alpha: ensemble weight of the probe (paper: 0.55).
        probe_cost, classifier_cost: optional cost per exchange / per call (e.g.
            FLOPs) for relative_compute; default: the measured seconds.
    """

    def __init__(
        self,
        probe: Callable[[Sequence[Any]], Any],
        classifier: Callable[[Any], float],
        escalate_threshold: float,
        final_threshold: float,
        alpha: float = 0.55,
        *,
        probe_cost: Optional[float] = None,
        classifier_cost: Optional[float] = None,
    ):
        if not callable(probe) or not callable(classifier):
            raise TypeError("probe and classifier must be callables")
        self.probe, self.classifier = probe, classifier
        self.escalate_threshold = _check_threshold("escalate_threshold", escalate_threshold)
        self.final_threshold = _check_threshold("final_threshold", final_threshold)
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.alpha = alpha
        for name, cost in (("probe_cost", probe_cost), ("classifier_cost", classifier_cost)):
            if cost is not None and not cost > 0:
                raise ValueError(f"{name} must be positive, got {cost}")
        self.probe_cost, self.classifier_cost = probe_cost, classifier_cost
        self.calibration: Optional[dict] = None

    # ------------------------------------------------------------------ calibration

    @staticmethod
    def calibrate_thresholds(
        benign_probe, benign_classifier, target_escalation_rate: float, target_flag_rate: float, alpha: float = 0.55
    ) -> tuple[float, float]:
        """(escalate_threshold, final_threshold) so that on the benign samples about
        `target_escalation_rate` of exchanges escalate and `target_flag_rate` flag.

        benign_probe, benign_classifier: [n] logits of the same benign exchanges.
        """
        if not 0.0 <= target_flag_rate <= target_escalation_rate <= 1.0:
            raise ValueError(
                "rates out of order: need 0 <= target_flag_rate <= target_escalation_rate <= 1 (only escalated "
                f"exchanges can flag), got flag {target_flag_rate}, escalation {target_escalation_rate}"
            )
        zp = torch.as_tensor(benign_probe, dtype=torch.float64).reshape(-1)
        zc = torch.as_tensor(benign_classifier, dtype=torch.float64).reshape(-1)
        if zp.shape != zc.shape:
            raise ValueError(f"benign_probe has {zp.numel()} scores but benign_classifier has {zc.numel()}")
        escalate = threshold_for_flag_rate(zp, target_escalation_rate)
        up = zp > escalate
        if not up.any():
            return escalate, math.inf
        ensembled = alpha * zp[up] + (1 - alpha) * zc[up]
        rate_among_escalated = min(1.0, target_flag_rate * zp.numel() / int(up.sum()))
        return escalate, threshold_for_flag_rate(ensembled, rate_among_escalated)

    @classmethod
    def calibrated(
        cls,
        probe,
        classifier,
        benign_probe,
        benign_classifier,
        *,
        target_escalation_rate: float,
        target_flag_rate: float,
        alpha: float = 0.55,
        harmful_probe=None,
        harmful_classifier=None,
        **kwargs,
    ) -> Cascade:
        """A Cascade with thresholds from `calibrate_thresholds`. With harmful
        samples, `cascade.calibration` also reports their detection rate."""
        esc, final = cls.calibrate_thresholds(
            benign_probe, benign_classifier, target_escalation_rate, target_flag_rate, alpha
        )
        cascade = cls(probe, classifier, esc, final, alpha, **kwargs)
        summary = {
            "escalate_threshold": esc,
            "final_threshold": final,
            "benign_flag_rate": cascade.decide(benign_probe, benign_classifier).float().mean().item(),
            "benign_escalation_rate": (torch.as_tensor(benign_probe).double() > esc).float().mean().item(),
        }
        if harmful_probe is not None:
            zp = torch.as_tensor(harmful_probe).double()
            summary["harmful_detection_rate"] = cascade.decide(zp, harmful_classifier).float().mean().item()
            summary["harmful_escalation_rate"] = (zp > esc).float().mean().item()
        cascade.calibration = summary
        return cascade

    def decide(self, probe_logits, classifier_logits) -> torch.Tensor:
        """Flags [n] from precomputed logits (classifier logits are read only where the
        probe escalates; a non-finite one there, or a NaN probe logit, flags)."""
        zp = torch.as_tensor(probe_logits, dtype=torch.float64).reshape(-1)
        zc = torch.as_tensor(classifier_logits, dtype=torch.float64).reshape(-1)
        if zc.shape != zp.shape:
            raise ValueError(f"classifier_logits has {zc.numel()} values but probe_logits has {zp.numel()}")
        up = ~(zp <= self.escalate_threshold)
        ensembled = self.alpha * zp + (1 - self.alpha) * zc
        return up & (~torch.isfinite(zc) | ~(ensembled <= self.final_threshold))

    # ------------------------------------------------------------------ running

    def __call__(self, exchanges: Sequence[Any], num_tokens: Optional[int] = None) -> CascadeResult:
        """Screen `exchanges`; num_tokens (their total tokens) gives probe time per token."""
        n = len(exchanges)
        start = time.perf_counter()
        zp = torch.as_tensor(self.probe(exchanges), dtype=torch.float64).reshape(-1).cpu()
        probe_seconds = time.perf_counter() - start
        if zp.numel() != n:
            raise ValueError(f"probe returned {zp.numel()} logits for {n} exchanges")
        zc = torch.full((n,), float("nan"), dtype=torch.float64)
        flagged = torch.zeros(n, dtype=torch.bool)
        decisions: list[str] = []
        classifier_seconds, calls, failures = 0.0, 0, 0
        for i in range(n):
            if math.isnan(zp[i]):
                decisions.append(f"{FAIL_CLOSED}: probe logit is NaN")
            elif zp[i] <= self.escalate_threshold:
                decisions.append(PASS)
                continue
            else:
                calls += 1
                t0 = time.perf_counter()
                try:
                    value = float(self.classifier(exchanges[i]))
                except Exception as exc:  # any classifier failure flags (fail closed)
                    decisions.append(f"{FAIL_CLOSED}: classifier raised {type(exc).__name__}: {exc}")
                else:
                    if math.isfinite(value):
                        zc[i] = value
                        z = self.alpha * float(zp[i]) + (1 - self.alpha) * value
                        decisions.append(FLAG if z > self.final_threshold else ESCALATED_PASS)
                    else:
                        decisions.append(f"{FAIL_CLOSED}: classifier returned {value}")
                finally:
                    classifier_seconds += time.perf_counter() - t0
            flagged[i] = decisions[-1] != ESCALATED_PASS
            failures += decisions[-1].startswith(FAIL_CLOSED)
        if failures:
            warnings.warn(
                f"Cascade: {failures} of {n} exchanges flagged because the probe or the classifier "
                "failed (fail closed); see result.decisions",
                RuntimeWarning,
                stacklevel=2,
            )
        report = CascadeReport(
            n,
            calls,
            int(flagged.sum()),
            failures,
            probe_seconds,
            classifier_seconds,
            self._relative_compute(n, calls, probe_seconds, classifier_seconds),
            num_tokens,
        )
        return CascadeResult(flagged, decisions, zp, zc, report)

    def _relative_compute(self, n: int, calls: int, probe_seconds: float, classifier_seconds: float) -> float:
        per_probe = self.probe_cost if self.probe_cost is not None else probe_seconds / max(n, 1)
        if self.classifier_cost is not None:
            per_call = self.classifier_cost
        elif calls:
            per_call = classifier_seconds / calls
        else:
            return float("nan")  # no measured classifier call and no given cost
        return n * per_call / (n * per_probe + calls * per_call)
