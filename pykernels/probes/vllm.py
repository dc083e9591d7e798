"""The probe guard inside vLLM: every token a vLLM engine computes is scored by a
LinearProbe as the forward pass produces its activations, and a request whose
smoothed score crosses the threshold stops in the step that flagged it.

    from vllm import LLM, SamplingParams
    from pykernels.probes.vllm import flag_of, guard_kwargs

    llm = LLM(model=path, **guard_kwargs("probe.safetensors"))
    for out in llm.generate(prompts, SamplingParams(max_tokens=256)):
        flagged, index = flag_of(out)   # index: position in prompt + output tokens, or -1

Server: `vllm serve PATH --additional-config '{"pykernels_probe": {"path": "/abs/probe.safetensors"}}'
--no-enable-prefix-caching`; a flagged completion has finish_reason "stop" and
stop_reason "probe_flagged:<index>" (docs/probes.md, "Serving with vLLM").

additional_config["pykernels_probe"] keys: "path" (required), "backend" and
"device" (see guard_kwargs); for tests and benchmarks only: "record_scores" (keep
every request's scores in the worker; `worker_guards()` reads them in-process) and
"noop_control" (the guard's subclasses without their work).

How it works (one worker process, vLLM's V1 model runner):
- pykernels registers the `vllm.general_plugins` entry point `pykernels_probe_guard`
  (`install`), which vLLM runs in every process it starts. It wraps two constructors
  and nothing else: the worker's `load_model` and the scheduler's `__init__`. An
  engine whose `additional_config` has no "pykernels_probe" runs untouched.
- At model load the decoder layers get a subclass whose forward adds the layer's
  residual stream into a float32 accumulator with the registered op
  `pykernels::probe_accumulate_` (so it is part of vLLM's compiled graph; module
  hooks would silently never fire under torch.compile). vLLM's Llama-style layers
  return (mlp_out, residual): the stream is their sum, which is what Hugging Face
  layers return and what `ProbeGuard` scores; each part is accumulated separately.
- After each forward the runner steps one `ProbeStream` slot per live request with
  one variable-length stream step (`probe_stream_step_varlen`): request i's
  scheduled tokens are rows query_start_loc[i]:query_start_loc[i+1]. Tokens
  already scored (recompute after preemption) are skipped, so every position is
  scored exactly once; a slot is taken when a request first appears and freed
  when the runner drops the request.
- The flag positions ride to the scheduler on the step's ModelRunnerOutput (the
  worker may be another process); the scheduler keeps the tokens up to the
  flagged one, drops the rest and finishes the request with stop_reason
  "probe_flagged:<index>".

Refused at engine start with a message (never run unguarded): prefix caching,
speculative decoding, pipeline / tensor / data parallel serving (more than one
worker process), Model Runner V2, a vLLM other than the tested version, a probe
whose layer count or hidden size differ from the model's, or a probe device that
is not the model's.
"""

from __future__ import annotations

import collections
import copy
import functools
import logging
import os
import threading
import time
from typing import Any, Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

CONFIG_KEY = "pykernels_probe"  # the key of vLLM's additional_config
PLUGIN_NAME = "pykernels_probe_guard"  # the vllm.general_plugins entry point (pyproject.toml)
FLAG_REASON = "probe_flagged"  # stop_reason = f"{FLAG_REASON}:{index}"

# ---------------------------------------------------------------------------------------
# Every vLLM internal this module touches, pinned to the version it was tested with.
# Changing vLLM version means re-reading each of these in the new source.
TESTED_VLLM = "0.32"
#   vllm.v1.worker.gpu_worker.Worker.load_model          wrapped: installs the guard after loading
#   vllm.v1.worker.gpu_model_runner.GPUModelRunner        V1 runner; CPUModelRunner subclasses it
#       ._model_forward(...)                              overridden: steps the stream after forward
#       .sample_tokens(...)                               overridden: flags ride on its output
#   vllm.v1.outputs.{ModelRunnerOutput, AsyncModelRunnerOutput.get_output}
#       .model, .input_batch.{num_reqs, req_ids, num_computed_tokens_cpu},
#       .query_start_loc.np, .requests, .max_num_tokens   read
#   vllm.v1.core.sched.scheduler.Scheduler.__init__        wrapped: guards a configured scheduler
#       .update_from_output, ._update_request_with_output  overridden (sync and async schedulers)
#       .requests, Request.{num_tokens, append_output_token_ids, status, stop_reason}
#   vllm.v1.request.RequestStatus.FINISHED_STOPPED
#   vllm_config.{additional_config, cache_config.enable_prefix_caching, speculative_config,
#       parallel_config.world_size, use_v2_model_runner, scheduler_config.max_num_seqs}
#   decoder layers: the nn.ModuleList at model.model.layers (or found by length)
# ---------------------------------------------------------------------------------------


def guard_kwargs(probe: str, *, backend: Optional[str] = None, device: Optional[str] = None) -> dict:
    """Keyword arguments for `vllm.LLM(...)` that install the probe guard.

    Args:
        probe: path of a LinearProbe saved with `LinearProbe.save` (safetensors).
        backend: pykernels backend for the guard's kernels (default: the fastest
            for the model's device).
        device: where the probe must live; default the model's device. A device other
            than the model's is refused at engine start.

    Also turns prefix caching off (cached prompt tokens would never be scored).
    Raises if the pykernels plugin cannot run in vLLM's processes.
    """
    path = os.path.abspath(os.fspath(probe))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"probe file {path} does not exist (save one with LinearProbe.save)")
    _check_plugin_enabled()
    config: dict[str, Any] = {"path": path}
    if backend is not None:
        config["backend"] = backend
    if device is not None:
        config["device"] = str(device)
    return {"additional_config": {CONFIG_KEY: config}, "enable_prefix_caching": False}


def flag_of(request_output) -> tuple[bool, int]:
    """(flagged, index) of a finished vLLM RequestOutput (or CompletionOutput):
    whether the guard stopped it, and the position in prompt + output tokens of the
    token whose smoothed score crossed the threshold, or -1."""
    outputs = getattr(request_output, "outputs", None)
    completion = outputs[0] if outputs else request_output
    reason = getattr(completion, "stop_reason", None)
    return parse_stop_reason(reason)


def parse_stop_reason(reason) -> tuple[bool, int]:
    """(flagged, index) from a stop_reason value (the OpenAI server's `stop_reason` field)."""
    if isinstance(reason, str) and reason.startswith(FLAG_REASON + ":"):
        index = reason.split(":", 1)[1]
        return True, int(index) if index.isdigit() else -1  # "unscored": stopped, fail closed
    return False, -1


def _check_plugin_enabled() -> None:
    from importlib.metadata import entry_points

    if not any(ep.name == PLUGIN_NAME for ep in entry_points(group="vllm.general_plugins")):
        raise RuntimeError(
            f"the pykernels vLLM plugin ({PLUGIN_NAME}) is not registered: install pykernels into this "
            "environment (pip install pykernels, or pip install -e . in a checkout) so that vLLM's "
            "engine processes load it"
        )
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        raise RuntimeError(f"VLLM_PLUGINS={allowed!r} excludes {PLUGIN_NAME}: the guard would not run")


# ------------------------------------------------------------------------- the plugin


_install_lock = threading.Lock()
_installed = False


def install() -> None:
    """The vllm.general_plugins entry point: wrap the worker's load_model and the
    scheduler's constructor (idempotent; vLLM calls it once per process)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.worker.gpu_worker import Worker

        Worker.load_model = _wrap_load_model(Worker.load_model)
        Scheduler.__init__ = _wrap_scheduler_init(Scheduler.__init__)
        _installed = True


def _guard_config(vllm_config) -> Optional[dict]:
    extra = getattr(vllm_config, "additional_config", None) or {}
    config = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    if config is None:
        return None
    if isinstance(config, str):
        config = {"path": config}
    if not isinstance(config, dict) or "path" not in config:
        raise ValueError(
            f"additional_config[{CONFIG_KEY!r}] must be a probe path or a dict with 'path', got {config!r}"
        )
    unknown = set(config) - {"path", "backend", "device", "record_scores", "noop_control"}
    if unknown:
        raise ValueError(f"additional_config[{CONFIG_KEY!r}] has unknown keys {sorted(unknown)}")
    return config


def _refuse_unsupported(vllm_config) -> None:
    """Every configuration the guard cannot score completely is refused, naming the fix."""
    import vllm

    if not vllm.__version__.startswith(TESTED_VLLM + ".") and os.environ.get("PYKERNELS_VLLM_UNTESTED") != "1":
        raise RuntimeError(
            f"the pykernels probe guard is tested with vLLM {TESTED_VLLM}.x, not {vllm.__version__}; "
            "set PYKERNELS_VLLM_UNTESTED=1 to try anyway"
        )
    if vllm_config.cache_config.enable_prefix_caching:
        raise ValueError(
            "the probe guard needs prefix caching off (cached prompt tokens are never computed, so "
            "never scored): pass enable_prefix_caching=False (guard_kwargs does) or "
            "--no-enable-prefix-caching"
        )
    if vllm_config.speculative_config is not None:
        raise ValueError(
            "the probe guard does not support speculative decoding (rejected draft tokens would be scored)"
        )
    if vllm_config.parallel_config.world_size > 1 or vllm_config.parallel_config.data_parallel_size > 1:
        raise ValueError("the probe guard supports one worker process (no tensor, pipeline or data parallelism yet)")
    if vllm_config.use_v2_model_runner:
        raise ValueError("the probe guard runs with vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0")


def _wrap_load_model(load_model):
    @functools.wraps(load_model)
    def wrapped(worker, *args, **kwargs):
        config = _guard_config(worker.vllm_config)
        if config is not None:
            _refuse_unsupported(worker.vllm_config)  # before the (slow) load
        load_model(worker, *args, **kwargs)
        if config is not None:
            _guard_runner(worker.model_runner, config)

    return wrapped


def _wrap_scheduler_init(init):
    @functools.wraps(init)
    def wrapped(scheduler, *args, **kwargs):
        init(scheduler, *args, **kwargs)
        config = _guard_config(scheduler.vllm_config)
        if config is not None:
            _refuse_unsupported(scheduler.vllm_config)
            scheduler.__class__ = _guarded_scheduler_class(type(scheduler))
            scheduler._pk_flags = {}

    return wrapped


# ------------------------------------------------------------- worker: scoring tokens


def _decoder_layers(model: torch.nn.Module, num_layers: int) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers]
    if len(lists) != 1:
        raise ValueError(f"could not find the decoder layers of {type(model).__name__}")
    return lists[0]


class _LayerScoring:
    """What a guarded decoder layer needs: the shared accumulator and its weight."""

    def __init__(self, accumulator: torch.Tensor, weight: torch.Tensor, accumulate):
        self.accumulator, self.weight, self.accumulate = accumulator, weight, accumulate


@functools.cache
def _guarded_layer_class(cls: type) -> type:
    class GuardedDecoderLayer(cls):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            scoring = self._pk_scoring
            if scoring is None:  # noop_control
                return out
            parts = out if isinstance(out, tuple) else (out,)
            for part in parts[:2]:  # (hidden, residual): the stream is their sum; or the stream alone
                if isinstance(part, torch.Tensor):
                    rows = part.shape[0]
                    scoring.accumulate(scoring.accumulator[:rows], part.reshape(rows, -1), scoring.weight)
            return out

    GuardedDecoderLayer.__name__ = GuardedDecoderLayer.__qualname__ = f"Guarded{cls.__name__}"
    return GuardedDecoderLayer


class VllmProbeGuard:
    """Worker-side state: the probe, its accumulator, one stream slot per live request."""

    def __init__(self, runner, config: dict):
        from .._validation import same_device
        from ..backend import resolve
        from .training import LinearProbe

        model = runner.model
        model_device = next(model.parameters()).device
        device = torch.device(config.get("device") or model_device)
        if not same_device(device, model_device):
            raise ValueError(f"the probe is configured for {device} but the model is on {model_device}")
        probe = LinearProbe.load(config["path"], device=device)
        layers = _decoder_layers(model, probe.num_layers)
        if probe.num_layers != len(layers):
            raise ValueError(
                f"probe {config['path']} has {probe.num_layers} layers but the model has {len(layers)} decoder layers"
            )
        hidden = runner.model_config.get_hidden_size()
        if probe.hidden_size != hidden:
            raise ValueError(f"probe {config['path']} has hidden_size {probe.hidden_size} but the model's is {hidden}")
        max_slots = runner.scheduler_config.max_num_seqs
        self.probe = probe
        self.stream = probe.stream(max_slots, backend=config.get("backend"))
        self.bias = probe.bias.detach()
        # Rows: every token a forward can carry (padded batches and dummy runs included).
        self.accumulator = self.bias.repeat(runner.max_num_tokens, 1)
        accumulate = resolve("probe_accumulate_", device, self.stream.backend)
        # noop_control (benchmarks only): the same subclasses and calls, no scoring work,
        # so an A/B against it isolates what the guard's kernels cost.
        self.noop_control = bool(config.get("noop_control", False))
        for l, layer in enumerate(layers):
            layer._pk_scoring = (
                None
                if self.noop_control
                else _LayerScoring(self.accumulator, probe.layer_weight(l).detach(), accumulate)
            )
            layer.__class__ = _guarded_layer_class(type(layer))
        self.live: dict[str, _LiveRequest] = {}
        self.free_slots = list(range(max_slots - 1, -1, -1))
        self.slot_scored = np.zeros(max_slots, dtype=np.int64)  # positions stepped into each slot
        # Each step's segments, written in place (one host buffer, one copy to the device).
        self.segments = torch.zeros((3, max_slots), dtype=torch.int64)
        self.segments_np = self.segments.numpy()
        self.record_scores = bool(config.get("record_scores", False))
        self.scores: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
        self.step_flags: Optional[_StepFlags] = None  # this step's flag positions, until sampling
        # CPU time this thread spends in step() (robust to other processes on the machine; the
        # kernels inside the model's graph show only in an A/B of whole engines).
        self.step_cpu_seconds, self.steps = 0.0, 0
        _WORKER_GUARDS.append(self)

    def step(self, runner) -> None:
        """Steps every scheduled request's new tokens through its slot, in one launch."""
        start = time.thread_time()
        if not self.noop_control:
            self._step(runner)
        self.step_cpu_seconds += time.thread_time() - start
        self.steps += 1

    def _step(self, runner) -> None:
        # Host bookkeeping in numpy over the whole batch (no per-request Python arithmetic):
        # it runs every engine step, between the forward and sampling.
        batch = runner.input_batch
        n = batch.num_reqs
        req_ids = batch.req_ids[:n]
        self._free_finished(runner.requests)
        live = self.live
        for req_id in req_ids:
            if req_id not in live:
                live[req_id] = self._admit(runner.requests[req_id])
        segments = self.segments[:, :n]  # rows: slot, first token row, token count
        slots, starts, counts = self.segments_np[:, :n]
        slots[:] = [live[r].slot for r in req_ids]
        query_start = runner.query_start_loc.np[: n + 1]
        first = batch.num_computed_tokens_cpu[:n]
        np.subtract(query_start[1:], query_start[:-1], out=counts)
        scored = self.slot_scored[slots]
        # Positions never computed here cannot happen without prefix caching: fail closed.
        unscored = [req_ids[i] for i in np.flatnonzero(first > scored)]
        skip = np.minimum(np.maximum(scored - first, 0), counts)  # recomputed after a preemption: scored already
        self.slot_scored[slots] = np.maximum(scored, first + counts)
        np.add(query_start[:-1], skip, out=starts)
        counts -= skip
        ids, starts, counts = segments.to(self.accumulator.device, non_blocking=True).unbind(0)
        scores, _ = self.stream._step_varlen_trusted(ids, starts, counts, self.accumulator[: int(query_start[n])])
        if self.record_scores:
            host = scores.cpu()
            for req_id, start, k in zip(req_ids, starts.tolist(), counts.tolist()):
                if k:
                    self.scores[req_id].append(host[start : start + k])
        self.step_flags = _StepFlags(list(req_ids), self.stream._flag_tokens_trusted(ids), unscored)

    def _admit(self, state) -> _LiveRequest:
        if not self.free_slots:
            raise RuntimeError(f"probe guard: more live requests than max_num_seqs={self.stream.max_slots}")
        slot = self.free_slots.pop()
        self.stream.reset([slot])
        self.slot_scored[slot] = 0
        return _LiveRequest(slot, state)

    def _free_finished(self, requests: dict) -> None:
        # The runner drops a finished request's state; an id resubmitted after an abort
        # comes back with a new state object and is a new request.
        gone = [r for r, live in self.live.items() if requests.get(r) is not live.state]
        for req_id in gone:
            self.free_slots.append(self.live.pop(req_id).slot)

    def recorded_scores(self, req_id: str) -> torch.Tensor:
        """Smoothed scores [positions, K] of one request, if record_scores was set."""
        parts = self.scores.get(req_id)
        if not parts:
            raise KeyError(f"no scores recorded for request {req_id!r} (record_scores is {self.record_scores})")
        return torch.cat(parts)


class _LiveRequest:
    __slots__ = ("slot", "state")

    def __init__(self, slot: int, state):
        self.slot, self.state = slot, state


_WORKER_GUARDS: list[VllmProbeGuard] = []  # this process's guards (tests read recorded scores)


def worker_guards() -> list[VllmProbeGuard]:
    """The guards installed in this process (in-process engines only)."""
    return list(_WORKER_GUARDS)


@functools.cache
def _guarded_runner_class(cls: type) -> type:
    from vllm.v1.outputs import AsyncModelRunnerOutput

    class GuardedModelRunner(cls):
        def _model_forward(self, *args, **kwargs):
            positions = kwargs["positions"] if "positions" in kwargs else args[1]
            guard = self._pk_guard
            # Every row this forward carries starts from the bias (dummy and profile
            # runs call the model directly and leave sums behind).
            guard.accumulator[: positions.shape[-1]].copy_(guard.bias)
            out = super()._model_forward(*args, **kwargs)
            guard.step(self)
            return out

        def sample_tokens(self, *args, **kwargs):
            out = super().sample_tokens(*args, **kwargs)
            step_flags, self._pk_guard.step_flags = self._pk_guard.step_flags, None
            if isinstance(out, AsyncModelRunnerOutput):  # the flags follow its own host sync
                get_output = out.get_output
                out.get_output = lambda: _attach_flags(get_output(), step_flags)
                return out
            return _attach_flags(out, step_flags)

    GuardedModelRunner.__name__ = GuardedModelRunner.__qualname__ = f"Guarded{cls.__name__}"
    return GuardedModelRunner


def _guard_runner(runner, config: dict) -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not isinstance(runner, GPUModelRunner):
        raise ValueError(
            f"the probe guard runs with vLLM's V1 model runner, not {type(runner).__name__}: "
            "set VLLM_USE_V2_MODEL_RUNNER=0"
        )
    runner._pk_guard = VllmProbeGuard(runner, config)
    runner.__class__ = _guarded_runner_class(type(runner))
    logger.info("pykernels probe guard installed: %s", config["path"])


# ---------------------------------------------------- worker -> scheduler: the flags


class _StepFlags:
    """One step's flag positions on their way to the scheduler, which may live in
    another process: they ride on the step's ModelRunnerOutput (pickled between
    processes) as the attribute `pykernels_flags`, {request id: position}.

    On a GPU the positions are copied to pinned host memory asynchronously, before
    sampling; the runner reads them only once it has synced for the sampled tokens,
    so the guard adds no host sync of its own."""

    def __init__(self, req_ids: list, flag_tokens: torch.Tensor, unscored: list):
        if flag_tokens.device.type == "cuda":
            host = torch.empty(flag_tokens.shape, dtype=flag_tokens.dtype, pin_memory=True)
            flag_tokens = host.copy_(flag_tokens, non_blocking=True)
        self.req_ids, self.flag_tokens, self.unscored = req_ids, flag_tokens, unscored

    def read(self) -> dict[str, int]:
        flags = {r: t for r, t in zip(self.req_ids, self.flag_tokens.tolist()) if t >= 0}
        flags.update((r, UNSCORED) for r in self.unscored)
        return flags


UNSCORED = -2  # a position was never computed: stop the request (fail closed)


def _attach_flags(output, step_flags: Optional[_StepFlags]):
    from vllm.v1.outputs import ModelRunnerOutput

    if step_flags is None or not isinstance(output, ModelRunnerOutput):
        return output
    flags = step_flags.read()
    if not flags:
        return output
    output = copy.copy(output)  # never tag a shared output (vLLM reuses an empty one)
    output.pykernels_flags = flags
    return output


# -------------------------------------------------------- scheduler: stopping requests


@functools.cache
def _guarded_scheduler_class(cls: type) -> type:
    from vllm.v1.request import RequestStatus

    class GuardedScheduler(cls):
        def update_from_output(self, scheduler_output, model_runner_output):
            for req_id, position in getattr(model_runner_output, "pykernels_flags", {}).items():
                self._pk_flags.setdefault(req_id, position)
            if self._pk_flags:
                model_runner_output = self._route_flagged(scheduler_output, model_runner_output)
            outputs = super().update_from_output(scheduler_output, model_runner_output)
            if self._pk_flags:
                for req_id in [r for r in self._pk_flags if r not in self.requests]:
                    del self._pk_flags[req_id]
            return outputs

        def _route_flagged(self, scheduler_output, model_runner_output):
            # A flagged request in a step that sampled nothing for it (a prefill chunk)
            # still has to reach _update_request_with_output, which stops it.
            sampled = model_runner_output.sampled_token_ids
            index = model_runner_output.req_id_to_index
            patched = None
            for req_id in scheduler_output.num_scheduled_tokens:
                if req_id in self._pk_flags and req_id in index and not (sampled and sampled[index[req_id]]):
                    if patched is None:
                        patched = list(sampled) if sampled else [[] for _ in model_runner_output.req_ids]
                    patched[index[req_id]] = [_NO_TOKEN]
            if patched is None:
                return model_runner_output
            model_runner_output = copy.copy(model_runner_output)
            model_runner_output.sampled_token_ids = patched
            return model_runner_output

        def _update_request_with_output(self, request, new_token_ids, *args, **kwargs):
            flag = self._pk_flags.get(request.request_id)
            first = request.num_tokens  # position of the first new token
            if flag is None or (flag >= 0 and flag >= first + len(new_token_ids)):  # not reached yet
                real = [t for t in new_token_ids if t != _NO_TOKEN]
                return super()._update_request_with_output(request, real, *args, **kwargs)
            # Keep the tokens up to the flagged one (it can be new under async scheduling),
            # through the parent so its bookkeeping (async placeholders, block caching) runs.
            kept = [t for i, t in enumerate(new_token_ids) if t != _NO_TOKEN and first + i <= flag]
            kept, _ = super()._update_request_with_output(request, kept, *args, **kwargs)
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = f"{FLAG_REASON}:{flag}" if flag >= 0 else f"{FLAG_REASON}:unscored"
            if flag == UNSCORED:
                logger.error(
                    "probe guard: request %s had positions that were never scored; stopped (fail closed)",
                    request.request_id,
                )
            return kept, True

    GuardedScheduler.__name__ = GuardedScheduler.__qualname__ = f"Guarded{cls.__name__}"
    return GuardedScheduler


_NO_TOKEN = -1  # stands in for "no sampled token" in a flagged prefill chunk
