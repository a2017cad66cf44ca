"""Host synchronisations and host-to-device copies of each ``generate`` step, with the file:line that caused each.

`TransferCounter` is a ``torch.overrides.TorchFunctionMode`` entered around ``generate()`` calls: it sees every torch
function and tensor method that Python code calls (calls made inside PyTorch's own functions are not seen again, so
each event is counted once, where Python asked for it), and a forward pre-hook on the model cuts the events into
steps. It works on any path (sdpa, hf_paged's PyTorch ops, hf_paged's Triton kernels) and also counts Triton kernel
launches (``triton.knobs.runtime.launch_enter_hook``).

What counts. The *device* is where the model's tensors live, the *host* is Python and host tensors.

* **D2H read** (the host waits for the device; one per call): the host reads a device tensor's values,
  ``.item()``, ``.tolist()``, ``bool()`` / ``int()`` / ``float()`` / ``operator.index()`` (``if t:``, ``range(t)``),
  ``.numpy()``, ``str()`` / ``repr()`` / formatting, ``x in t``; ``.cpu()``, ``.to("cpu")`` and ``copy_`` of a device
  tensor into a host one; and the ops whose result's shape depends on the values (PyTorch syncs for them on CUDA):
  ``nonzero``, ``argwhere``, ``masked_select``, ``unique``, ``unique_consecutive``, ``bincount``, ``equal``,
  ``allclose``, one-argument ``where``, ``repeat_interleave`` with tensor repeats and no ``output_size``, and
  indexing (``t[mask]``, ``t[mask] = v``, ``index_put_``) with a boolean device tensor.
* **H2D copy** (one per call): a tensor made on the device from Python data (``torch.tensor`` / ``as_tensor`` /
  ``asarray`` with a device, ``t.new_tensor``); a host tensor moved or copied to the device (``.to(device)``,
  ``.cuda()``, ``copy_``); a host tensor of one or more dimensions used as an operand together with device tensors
  (PyTorch copies it, e.g. ``t[host_index]``; 0-dimensional host tensors are scalars passed by value and not counted);
  a Python list inside an index of a device tensor (``t[[0, 2]]``). An empty tensor made or moved
  (``torch.tensor([], device=d)``) carries nothing and is not counted.

Which tensors are on the host. On a real device (a model on CUDA), a tensor's ``device``. On the CPU (the bench's
``host`` scenario, where the launch-stub device of `hf_paged.bench.stub_device` stands for a GPU), every tensor is
on the CPU, so the counter *emulates* a device (``emulate=True``, the default for a model on the CPU) and follows
where each tensor would be:

* a tensor made from Python data (or a factory such as ``torch.arange``) without a device, or with the device
  named by the string ``"cpu"``, is a host tensor; so are the results of ``.cpu()``, ``.to("cpu")`` and of any op
  whose tensor operands are all host tensors;
* a device given as a ``torch.device`` object (code takes it from a tensor: ``device=ids.device``) names the device,
  so ``torch.tensor(data, device=x.device)`` is an H2D copy and ``host.to(x.device)`` another;
* every other tensor (the model's weights, its activations, the inputs given to ``generate``) is a device tensor.

Limits: tensors made by functions PyTorch does not route through modes (``torch.from_numpy``, ``torch.frombuffer``)
count as device tensors; explicit synchronisations (``torch.cuda.synchronize``, events) and the host work of a kernel
launch are not counted; ``torch.device("cpu")`` passed as an object in emulation names the device.

Attribution. Each event goes to the innermost Python frame outside PyTorch (``torch/``) and outside this module:
the line of hf_paged, Transformers or the model that asked for it. An event is *hf_paged's* when that frame is in
the ``hf_paged`` package (the bench harness, ``hf_paged/bench``, excepted); everything else (Transformers' generate
loop, the model's code) counts only in the totals.

Steps. Step ``k`` is everything from the start of the model's ``k``-th forward to the start of the next forward:
one iteration of generate's loop (forward, logits processing, token selection, stopping criteria, the next
``prepare_inputs_for_generation``). A call's first forward (or any forward of more than one token per row) is a
prefill; the *decode steps* are the steps that start with a one-token forward and end at the next forward, so the
last forward of a call (its interval runs into generate's epilogue) and everything before the first forward (setup)
are not decode steps. `TransferSummary` gives the mean per decode step (periodic events, such as a new block every
``block_size`` tokens, are amortised, not hidden by a median).
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from .steps import triton_with_hooks

__all__ = ["D2H", "H2D", "Source", "TransferCounter", "TransferSummary"]

D2H = "D2H"
H2D = "H2D"

# Methods that hand a device tensor's values to Python.
_READS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "numpy",
                    "__array__", "__repr__", "__str__", "__format__", "__contains__"})
# Ops whose result's shape depends on the values: the host must wait for the device.
_VALUE_SHAPED = frozenset({"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount",
                           "equal", "allclose"})
_FROM_DATA = frozenset({"tensor", "as_tensor", "asarray", "new_tensor"})
_INDEXING = frozenset({"__getitem__", "__setitem__", "index_put_", "index_put"})
_HOST_MARK = "_hf_paged_host"

_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep
_THIS_FILE = str(Path(__file__).resolve())
_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent) + os.sep  # hf_paged/
_BENCH_DIR = str(Path(__file__).resolve().parent) + os.sep  # hf_paged/bench/


@dataclass
class Source:
    """One place that caused events: ``site`` is ``path:line`` (path from its package's root, e.g.
    ``hf_paged/cache.py:1604``), ``function`` the function there, ``hf_paged`` whether it is hf_paged's own code,
    ``per_step`` the events of `kind` it caused per decode step (mean), ``ops`` the torch calls (by name)."""

    kind: str
    site: str
    function: str
    hf_paged: bool
    per_step: float
    ops: list[str] = field(default_factory=list)


@dataclass
class TransferSummary:
    """Per decode step (means over `decode_steps`; see the module docstring for what counts).

    Attributes:
        decode_steps: decode steps seen (over every call counted).
        d2h, h2d: D2H reads and H2D copies per decode step, all code.
        d2h_hf_paged, h2d_hf_paged: those whose innermost frame outside PyTorch is hf_paged's.
        launches: Triton kernel launches per decode step (None without Triton).
        setup_d2h, setup_h2d: events before the first forward of each call, summed over the calls.
        prefill_d2h, prefill_h2d: events of the prefill steps, summed over the calls.
        sources: per kind and site, decode-step events, most frequent first.
    """

    decode_steps: int
    d2h: float
    h2d: float
    d2h_hf_paged: float
    h2d_hf_paged: float
    launches: float | None
    setup_d2h: int
    setup_h2d: int
    prefill_d2h: int
    prefill_h2d: int
    sources: list[Source]


def _tensors(value, depth: int = 0):
    """The tensors in `value` (a tensor, or tensors inside lists, tuples and dict values, two levels deep)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 2 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item, depth + 1)
    elif depth < 2 and isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, depth + 1)


def _has_list(index) -> bool:
    """Whether an index holds a Python list (advanced indexing from host data)."""
    if isinstance(index, list):
        return True
    return isinstance(index, tuple) and any(isinstance(part, list) for part in index)


def _short_path(filename: str) -> str:
    """`filename` from its package's root: the longest ``sys.path`` entry it lies under is cut off."""
    best = ""
    for entry in sys.path:
        root = str(Path(entry or ".").resolve()) + os.sep
        if filename.startswith(root) and len(root) > len(best):
            best = root
    return filename[len(best):] if best else filename


class TransferCounter(TorchFunctionMode):
    """Count D2H reads, H2D copies and Triton launches per ``generate`` step of `model` (see the module docstring).

    Use as ``with TransferCounter(model) as counter: model.generate(...)``, then `summary()`. The mode costs time
    (every torch call goes through Python): count in runs that are not timed.

    Args:
        model: the module whose forward is one generate step (the ``*ForCausalLM``).
        emulate: follow host and device tensors by where they were made (see the module docstring); default: when
            `model` is on the CPU.
    """

    def __init__(self, model: torch.nn.Module, emulate: bool | None = None):
        super().__init__()
        self.model = model
        if emulate is None:
            parameter = next(model.parameters(), None)
            emulate = parameter is None or parameter.device.type == "cpu"
        self.emulate = emulate
        # Per step: the forward's tokens per row and its events; the bucket before a call's first forward is a
        # step with tokens None.
        self.steps: list[dict] = []
        self._frames: dict = {}
        self._handle = None
        self._triton = None

    # ------------------------------------------------------------------------------------------------- the side
    def _is_host(self, tensor: torch.Tensor) -> bool:
        if self.emulate:
            return getattr(tensor, _HOST_MARK, False)
        return tensor.device.type == "cpu"

    def _names_host(self, device) -> bool:
        """Whether a ``device`` argument names the host (see the module docstring)."""
        if self.emulate:
            return isinstance(device, str) and device.split(":")[0] == "cpu"
        return torch.device(device).type == "cpu"

    def _target(self, name: str, args, kwargs):
        """For a move (``to``, ``cpu``, ``cuda``, ``as_tensor`` of a tensor): True to the host, False to the device,
        None when it names no device (a dtype change)."""
        if name == "cpu":
            return True
        if name == "cuda":
            return False
        device = kwargs.get("device")
        if device is None and name == "to":
            for arg in args[1:]:
                if isinstance(arg, (str, torch.device, int)) and not isinstance(arg, bool):
                    device = arg
                    break
                if isinstance(arg, torch.Tensor):  # to(other): other's side
                    return self._is_host(arg)
        return None if device is None else self._names_host(device)

    # ------------------------------------------------------------------------------------------------- the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        events, host_out = self._classify(name, args, kwargs)
        out = func(*args, **kwargs)
        if host_out is not None and isinstance(out, torch.Tensor) and out.numel() == 0:
            events = []  # an empty tensor made or moved: nothing crosses
        if host_out is not None and isinstance(out, torch.Tensor):
            if self._is_host(out) != host_out and any(out is t for t in _tensors(args)):
                out = out.view_as(out)  # a move that returned its operand (all on the CPU): a new tensor to mark
            if host_out and self.emulate:
                setattr(out, _HOST_MARK, True)
        elif host_out is None and self.emulate:
            self._propagate(name, args, kwargs, out)
        for kind in events:
            self._record(kind, name)
        return out

    def _classify(self, name: str, args, kwargs) -> tuple[list[str], bool | None]:
        """The events of one call, and for moves and tensors made from data which side the result is on (None: the
        result follows its operands, `_propagate`)."""
        first = args[0] if args else None
        if name in _FROM_DATA:
            data = args[1] if name == "new_tensor" else first
            if name != "new_tensor" and isinstance(data, torch.Tensor):  # as_tensor(tensor, device=...): a move
                return self._move(data, self._target("to", args, kwargs))
            device = kwargs.get("device")
            if device is not None:
                host = self._names_host(device)
            elif name == "new_tensor":
                host = self._is_host(first)
            else:
                host = True
            return ([] if host else [H2D]), host
        if name in ("to", "cpu", "cuda") and isinstance(first, torch.Tensor):
            return self._move(first, self._target(name, args, kwargs))
        if name == "copy_" and len(args) > 1:
            target, source = args[0], args[1]
            if self._is_host(source) and not self._is_host(target):
                return [H2D], None
            if not self._is_host(source) and self._is_host(target):
                return [D2H], None
            return [], None
        tensors = list(_tensors(args)) + list(_tensors(kwargs))
        device = [t for t in tensors if not self._is_host(t)]
        events = []
        if device:
            if name in _READS and isinstance(first, torch.Tensor) and not self._is_host(first):
                events.append(D2H)
            elif name in _VALUE_SHAPED or (name == "where" and len(args) == 1 and not kwargs):
                events.append(D2H)
            elif name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) > 1 and \
                    isinstance(args[1], torch.Tensor) and not self._is_host(args[1]):
                events.append(D2H)
            elif name in _INDEXING and len(args) > 1:
                index = args[1]
                masks = [t for t in _tensors(index) if t.dtype in (torch.bool, torch.uint8) and not self._is_host(t)]
                if masks:
                    events.append(D2H)
                if _has_list(index) and not self._is_host(first):
                    events.append(H2D)
            events += [H2D for t in tensors if self._is_host(t) and t.dim() > 0]
        return events, None

    def _move(self, tensor: torch.Tensor, to_host: bool | None) -> tuple[list[str], bool | None]:
        if to_host is None:  # a dtype change: the result follows its operand
            return [], None
        if self._is_host(tensor) == to_host:
            return [], to_host
        return [D2H if to_host else H2D], to_host

    def _propagate(self, name: str, args, kwargs, out) -> None:
        """Emulation: mark `out` as a host tensor when its operands all are, or it was made without a device."""
        tensors = list(_tensors(args)) + list(_tensors(kwargs))
        device = kwargs.get("device")
        if tensors:
            host = all(self._is_host(t) for t in tensors) and (device is None or self._names_host(device))
        else:  # a factory: the host unless it names the device
            host = device is None or self._names_host(device)
        if not host:
            return
        for result in _tensors(out):
            if not any(result is t for t in tensors):
                setattr(result, _HOST_MARK, True)

    def _record(self, kind: str, op: str) -> None:
        frame = sys._getframe(2)
        while frame is not None:
            filename = frame.f_code.co_filename
            if not (filename.startswith(_TORCH_DIR) or filename == _THIS_FILE):
                break
            frame = frame.f_back
        if frame is None:
            site, function, ours = "?", "?", False
        else:
            key = frame.f_code.co_filename
            if key not in self._frames:
                resolved = str(Path(key).resolve()) if not key.startswith("<") else key
                self._frames[key] = (_short_path(resolved),
                                     resolved.startswith(_PACKAGE_DIR) and not resolved.startswith(_BENCH_DIR))
            path, ours = self._frames[key]
            site, function = f"{path}:{frame.f_lineno}", frame.f_code.co_name
        if not self.steps:
            self.steps.append(self._step(None))
        self.steps[-1]["events"][(kind, site, function, ours)][op] += 1

    # ------------------------------------------------------------------------------------------ steps and hooks
    @staticmethod
    def _step(tokens: int | None) -> dict:
        return {"tokens": tokens, "events": collections.defaultdict(collections.Counter), "launches": 0}

    def _on_forward(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
            tokens = int(ids.shape[1]) if isinstance(ids, torch.Tensor) else 1
        else:
            tokens = int(ids.shape[-1])
        self.steps.append(self._step(tokens))

    def _on_launch(self, *args, **kwargs) -> None:
        if not self.steps:
            self.steps.append(self._step(None))
        self.steps[-1]["launches"] += 1

    def __enter__(self) -> TransferCounter:
        self.steps.append(self._step(None))  # this call's setup, until its first forward
        self._handle = self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        triton = triton_with_hooks()
        if triton is not None:
            self._triton = triton
            triton.knobs.runtime.launch_enter_hook.add(self._on_launch)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._handle.remove()
        if self._triton is not None:
            self._triton.knobs.runtime.launch_enter_hook.remove(self._on_launch)

    # ----------------------------------------------------------------------------------------------- the result
    def decode_steps(self) -> list[dict]:
        """The decode steps: a one-token forward's step followed by another forward of the same call."""
        return [step for step, after in zip(self.steps, self.steps[1:], strict=False)
                if step["tokens"] == 1 and after["tokens"] == 1]

    def summary(self, top: int = 12) -> TransferSummary:
        """Means per decode step, the events outside them, and the `top` sources of each kind."""
        decode = self.decode_steps()
        count = max(len(decode), 1)

        def total(steps, kind, ours_only=False):
            return sum(sum(ops.values()) for step in steps for (k, _, _, ours), ops in step["events"].items()
                       if k == kind and (ours or not ours_only))

        steps = self.steps
        setups = [s for s in steps if s["tokens"] is None]
        prefills = [s for i, s in enumerate(steps) if s["tokens"] is not None
                    and (s["tokens"] > 1 or i == 0 or steps[i - 1]["tokens"] is None)]
        by_site: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
        for step in decode:
            for key, ops in step["events"].items():
                by_site[key].update(ops)
        sources = [Source(kind, site, function, ours, sum(ops.values()) / count, sorted(ops))
                   for (kind, site, function, ours), ops in by_site.items()]
        sources.sort(key=lambda s: (-s.per_step, s.site))
        kept = [s for kind in (D2H, H2D) for s in [s for s in sources if s.kind == kind][:top]]
        return TransferSummary(
            decode_steps=len(decode),
            d2h=total(decode, D2H) / count, h2d=total(decode, H2D) / count,
            d2h_hf_paged=total(decode, D2H, True) / count, h2d_hf_paged=total(decode, H2D, True) / count,
            launches=statistics.fmean(s["launches"] for s in decode) if self._triton is not None and decode else None,
            setup_d2h=total(setups, D2H), setup_h2d=total(setups, H2D),
            prefill_d2h=total(prefills, D2H), prefill_h2d=total(prefills, H2D),
            sources=kept,
        )
