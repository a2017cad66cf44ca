"""What each forward step of ``generate`` cost: host time, device time, Triton launches and compiles.

`StepRecorder` hooks a model's forward (one call per ``generate`` step: the prefill, then one per new token) and
Triton's runtime hooks (``triton.knobs.runtime``), so the device check can say why a run was slow:

* host time: from the forward's entry to its return, on the host clock. Generate synchronises once per step (its
  stopping criteria), so a step starts with the device idle and this is the time the Python side took to issue it.
* device time: CUDA events recorded at the same two points; the device's time from the step's first queued work to
  its last. Device time close to host time means the device waited for the host (launch- or Python-bound); device
  time well above it means the device was the bottleneck.
* launches: Triton kernel launches during the step (hf_paged's kernels; PyTorch's own kernels are not counted).
* compiles: Triton kernels compiled (JIT) while the recorder was attached. A timed run should have none.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

__all__ = ["StepRecorder", "StepSummary"]


@dataclass
class StepSummary:
    """Medians over the decode steps (every step after the prefill) of one or more ``generate`` calls.

    Attributes:
        decode_steps: how many decode steps were recorded.
        host_ms: median host time of a decode step's forward, in milliseconds.
        device_ms: median device time of a decode step (CUDA events), or None on the CPU.
        launches: median Triton launches per decode step.
        prefill_launches: Triton launches of the first step (the prefill) of the last call.
        compiles: Triton compiles while recording (0 in a properly warmed run).
    """

    decode_steps: int
    host_ms: float | None
    device_ms: float | None
    launches: float | None
    prefill_launches: int | None
    compiles: int


class StepRecorder:
    """Attach to `model` for a ``with`` block; `summary()` afterwards. Re-entrant use is not supported.

    Args:
        model: the module whose forward is one generate step (the ``*ForCausalLM``).
        device_events: record CUDA events (only when the model runs on CUDA).
    """

    def __init__(self, model: torch.nn.Module, device_events: bool):
        self.model = model
        self.device_events = device_events
        self.steps: list[dict] = []  # per step: host_s, events, launches; a new call starts at a prefill
        self.compiles = 0
        self._launches = 0
        self._handles: list = []
        self._saved_compile_hook = None
        self._triton = None

    # Triton's hooks: a launch hook chain (3.4+) and one post-compile hook slot.
    def _on_launch(self, *args, **kwargs) -> None:
        self._launches += 1

    def _on_compile(self, *args, **kwargs) -> None:
        self.compiles += 1
        if self._saved_compile_hook is not None:
            self._saved_compile_hook(*args, **kwargs)

    def _before(self, module, args, kwargs) -> None:
        step = {"launches_at": self._launches, "host_start": time.perf_counter(), "events": None}
        if self.device_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step["events"] = (start, end)
        ids = kwargs.get("input_ids", args[0] if args else None)
        step["tokens"] = int(ids.shape[-1]) if isinstance(ids, torch.Tensor) else None
        self.steps.append(step)

    def _after(self, module, args, kwargs, output) -> None:
        step = self.steps[-1]
        if step["events"] is not None:
            step["events"][1].record()
        step["host_s"] = time.perf_counter() - step["host_start"]
        step["launches"] = self._launches - step.pop("launches_at")

    def __enter__(self) -> StepRecorder:
        triton = triton_with_hooks()
        if triton is not None:
            self._triton = triton
            triton.knobs.runtime.launch_enter_hook.add(self._on_launch)
            self._saved_compile_hook = triton.knobs.runtime.jit_post_compile_hook
            triton.knobs.runtime.jit_post_compile_hook = self._on_compile
        self._handles = [self.model.register_forward_pre_hook(self._before, with_kwargs=True),
                         self.model.register_forward_hook(self._after, with_kwargs=True)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        if self._triton is not None:
            self._triton.knobs.runtime.launch_enter_hook.remove(self._on_launch)
            self._triton.knobs.runtime.jit_post_compile_hook = self._saved_compile_hook

    def decode_periods(self) -> list[float]:
        """Seconds from each decode step's forward start to the next forward's start (one iteration of generate's
        loop: forward, logits processing, token choice, stopping criteria, the next step's input preparation), for
        every decode step followed by another decode step; host clock."""
        return [after["host_start"] - step["host_start"] for step, after in zip(self.steps, self.steps[1:], strict=False)
                if step["tokens"] == 1 and after["tokens"] == 1]

    def summary(self) -> StepSummary:
        """Medians over decode steps; a step whose input holds more than one token per row is a prefill."""
        if self.device_events and self.steps:
            torch.cuda.synchronize()
        prefills = [i for i, step in enumerate(self.steps) if i == 0 or (step["tokens"] or 0) > 1]
        decode = [step for i, step in enumerate(self.steps) if i not in prefills and "host_s" in step]

        def median(values):
            return statistics.median(values) if values else None

        device = median([s["events"][0].elapsed_time(s["events"][1]) for s in decode]) if self.device_events else None
        host = median([s["host_s"] * 1e3 for s in decode])
        last_prefill = self.steps[prefills[-1]] if prefills else None
        return StepSummary(
            decode_steps=len(decode), host_ms=host, device_ms=device,
            launches=median([s["launches"] for s in decode]) if self._triton is not None else None,
            prefill_launches=last_prefill.get("launches") if last_prefill and self._triton is not None else None,
            compiles=self.compiles,
        )


def triton_with_hooks():
    """Triton, if it is importable and has runtime hooks (``triton.knobs``, 3.4 on), else None."""
    try:
        import triton
    except ImportError:
        return None
    return triton if hasattr(triton, "knobs") else None
