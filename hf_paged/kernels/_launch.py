"""What the kernel launchers share: checks (devices, dtypes, index tensors, the interpreter) and settled launches.

The launchers validate everything a kernel would otherwise read out of bounds or misinterpret, and raise
`ValueError` (wrong shape, device or layout) or `TypeError` (wrong dtype) with the argument's name in the message.

A decode step calls each launcher once per layer with tensors that differ only in their addresses. What the checks
and the JIT read of them (dtypes, devices, shapes, strides, 16-byte alignment, the integer arguments) is the same, so
each launcher *settles* a call once (`settled`: checks, tile sizes, grid, constexprs) under a key made of exactly
those properties (`tensor_key`), and every later call with the same key skips straight to the launch (`Launch`):
on a GPU, after its first launch, the compiled kernel is launched directly, without the JIT's argument binding
(tens of microseconds for a kernel of 50 arguments). Offset tables are still checked once per table (`check_offsets`).
"""

from __future__ import annotations

import collections
import re
import weakref

import torch
import triton

from ._quant import check_codes, codes_of

#: Storage dtypes the kernels accept for queries, keys and values.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Storage dtypes the kernels accept for key and value pools: float, or 8-bit codes with a float16 magnitude per row
#: (`hf_paged.quant`, `hf_paged.kernels._quant`).
CACHE_DTYPES = FLOAT_DTYPES + (torch.int8, torch.float8_e4m3fn)
#: Compile options every launch passes: FMA contraction on, as Triton 3.9 defaults to (3.10 will default to off).
COMPILE_OPTIONS = {"enable_fp_fusion": True}
#: Dtypes accepted for slot mappings and block-id lists (block tables and lengths must be int32).
INDEX_DTYPES = (torch.int32, torch.int64)
#: Every entry of a block offset table is a multiple of this many elements, so that the kernels keep 16-byte loads
#: and stores (`tl.multiple_of`). Torch allocates storages 64-byte (CPU) or 512-byte (CUDA) aligned, so offsets
#: between slabs qualify whenever the element counts inside a slab (its block stride) are multiples of 16.
OFFSET_ALIGNMENT = 16
#: Offset tables already checked, by id: (weak reference, version); see `check_offsets`.
_CHECKED_TABLES: dict[int, tuple[weakref.ref, int]] = {}
#: `tensor_key`'s numbers: one per distinct tuple of tensor properties; at most `_MOST_PROPERTIES`.
_PROPERTIES: dict[tuple, int] = {}
_MOST_PROPERTIES = 4096
#: `tensor_key`'s memo, by id: (weak reference, in-place version, number); at most `_MOST_TENSOR_KEYS`.
_TENSOR_KEYS: dict[int, tuple[weakref.ref, int, int]] = {}
_MOST_TENSOR_KEYS = 1024
#: Settled calls (`settled`), most recently used last; at most `_MOST_SETTLED` of them.
_SETTLED: collections.OrderedDict[tuple, object] = collections.OrderedDict()
_MOST_SETTLED = 128
#: Triton releases whose compiled kernels are launched directly (`Launch`): the JIT's launch protocol (every bound
#: argument, constexprs included, after the packed metadata) is the one of 3.6 and 3.9, where it was checked.
_DIRECT_LAUNCH = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2]) >= (3, 6)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` before the kernels were built)."""
    return bool(triton.knobs.runtime.interpret)


def check_device(**tensors: torch.Tensor | None) -> torch.device:
    """Return the common device of `tensors` (None entries are skipped) or raise ValueError.

    CUDA tensors run compiled kernels; CPU tensors run only under the Triton interpreter.
    """
    named = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in named.values()}
    if len(devices) != 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in named.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    device = devices.pop()
    if device.type == "cpu" and not interpreting():
        raise ValueError(
            "CPU tensors can only run under the Triton interpreter: set TRITON_INTERPRET=1 before hf_paged.kernels "
            "is imported, or call the PyTorch implementation in hf_paged.ops"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Triton kernels run on CUDA (or CPU under TRITON_INTERPRET=1), got device {device}")
    return device


def check_dtype(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    """Raise TypeError unless ``tensor.dtype`` is one of `allowed`."""
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} must have dtype {names}; got {str(tensor.dtype).removeprefix('torch.')}")


def check_caches(key_cache: torch.Tensor, value_cache: torch.Tensor) -> int:
    """The kernels' ``CODES`` constexpr for a key and a value pool (`hf_paged.kernels._quant`: 0 for float storage),
    after checking their dtypes: float pools of any float dtype, or 8-bit pools of one dtype whose rows can hold
    their float16 magnitudes (`_quant.check_codes`)."""
    check_dtype("key_cache", key_cache, CACHE_DTYPES)
    check_dtype("value_cache", value_cache, CACHE_DTYPES)
    codes = codes_of(key_cache.dtype)
    if codes or codes_of(value_cache.dtype):
        if value_cache.dtype != key_cache.dtype:
            raise TypeError(f"key_cache and value_cache of 8-bit codes must have one dtype; got "
                            f"{str(key_cache.dtype).removeprefix('torch.')} and "
                            f"{str(value_cache.dtype).removeprefix('torch.')}")
        check_codes("key_cache", key_cache)
        check_codes("value_cache", value_cache)
    return codes


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int | None, ...], meaning: str) -> None:
    """Raise ValueError unless `tensor` has ``len(expected)`` dims matching `expected` (None = any size)."""
    ok = tensor.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, tensor.shape, strict=True))
    if not ok:
        want = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} must be {meaning} = [{want}], got shape {list(tensor.shape)}")


def check_offsets(
    name: str, offsets: torch.Tensor | None, cache: torch.Tensor, cache_name: str
) -> torch.Tensor | None:
    """Validate a per-block offset table for `cache` and return it contiguous (None stays None).

    A table addresses a pool made of several separate tensors (slabs): block ``b``'s element (token ``t``, head
    ``h``, dim ``d``) is at element ``offsets[b] + t * cache.stride(1) + h * cache.stride(2) + d * cache.stride(3)``
    of ``cache.data_ptr()``; ``cache.stride(0)`` is not used. It must be int64 ``[N]`` (one entry per block id the
    block tables or slots can name) on the cache's device, every entry a multiple of `OFFSET_ALIGNMENT`. Block ids
    themselves are not checked against ``N`` (that would need a device sync), as without a table they are not
    checked against ``cache.shape[0]``.

    The alignment is checked on the host, as a `ValueError`, once per table and in-place version of it (for a CUDA
    table one small copy to the host and a sync; a `PagedCache` builds a table only when its pool grows, and checks
    it then: `hf_paged.storage.block_offsets`). A device-side assertion would cost no sync, but it reports a bad
    table only at some later synchronisation, as a CUDA error that leaves the context unusable for the rest of
    the process.
    """
    if offsets is None:
        return None
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 block offsets or None, got {type(offsets).__name__}")
    check_dtype(name, offsets, (torch.int64,))
    if offsets.dim() != 1 or offsets.shape[0] == 0:
        raise ValueError(f"{name} must be [N], one int64 element offset per block (N >= 1), got shape "
                         f"{list(offsets.shape)}")
    if offsets.device != cache.device:
        raise ValueError(f"{name} must be on {cache_name}'s device {cache.device}, got {offsets.device}")
    _check_alignment(name, offsets)
    return offsets.contiguous()


def _check_alignment(name: str, offsets: torch.Tensor) -> None:
    """Raise ValueError unless every offset is a multiple of `OFFSET_ALIGNMENT`; a table is checked once per table
    and version (`check_offsets`)."""
    seen = _CHECKED_TABLES.get(id(offsets))
    if seen is not None and seen[0]() is offsets and seen[1] == _version(offsets):
        return
    if offsets.device.type == "meta":
        return
    version = _version(offsets)
    check_alignment(name, offsets.cpu())
    if len(_CHECKED_TABLES) > 256:
        for key in [key for key, (ref, _) in _CHECKED_TABLES.items() if ref() is None]:
            del _CHECKED_TABLES[key]
    _CHECKED_TABLES[id(offsets)] = (weakref.ref(offsets), version)


def check_alignment(name: str, host_offsets: torch.Tensor) -> None:
    """Raise ValueError unless every offset of the host tensor `host_offsets` is a multiple of `OFFSET_ALIGNMENT`."""
    misaligned = host_offsets % OFFSET_ALIGNMENT != 0
    if bool(misaligned.any()):
        raise ValueError(f"{name} must hold multiples of {OFFSET_ALIGNMENT} elements (slabs and blocks 16-element "
                         f"aligned) so the kernels can use 16-byte memory accesses; got "
                         f"{host_offsets[misaligned][:4].tolist()}")


def mark_checked(offsets: torch.Tensor) -> None:
    """Record `offsets` (as it is now) as checked: its owner knows its entries are aligned (it built it so)."""
    _CHECKED_TABLES[id(offsets)] = (weakref.ref(offsets), _version(offsets))


def _version(tensor: torch.Tensor) -> int:
    """The in-place version of `tensor`; -1 for an inference tensor, which keeps none."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


def resolve_offsets(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_offsets: torch.Tensor | None,
    value_offsets: torch.Tensor | None,
    key_name: str = "key_offsets",
    settled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A launcher's ``(key table, value table)`` after checks, or None when neither is given (then
    the kernels address block b at ``b * stride(0)``). Values default to the keys' table; keys given no table while
    values have one get ``arange(key_cache.shape[0]) * key_cache.stride(0)``, today's addressing as a table.
    `settled`: the call's key (`tensor_key`) already passed the checks; only each table's contents are checked
    (once per table)."""
    if key_offsets is None and value_offsets is None:
        return None
    if settled:
        if key_offsets is not None:
            _check_alignment(key_name, key_offsets)
        if value_offsets is not None and value_offsets is not key_offsets:
            _check_alignment("value_offsets", value_offsets)
        key_offsets = None if key_offsets is None else key_offsets.contiguous()
        value_offsets = None if value_offsets is None else value_offsets.contiguous()
    else:
        key_offsets = check_offsets(key_name, key_offsets, key_cache, "key_cache")
        value_offsets = check_offsets("value_offsets", value_offsets, value_cache, "value_cache")
    if key_offsets is None:
        key_offsets = torch.arange(key_cache.shape[0], device=key_cache.device) * key_cache.stride(0)
    return key_offsets, key_offsets if value_offsets is None else value_offsets


def kept(workspace: dict | None, key: tuple, make):
    """``make()``: scratch a launch writes before it reads (uninitialised tensors). With a `workspace`, a dict the
    caller keeps for calls on one stream (such as every layer of a forward step), the same result for every call
    with this `key`: a call's kernels are done with their scratch before the next call's, queued after them on the
    stream, write it again. None: new every call."""
    if workspace is None:
        return make()
    found = workspace.get(key)
    if found is None:
        found = workspace[key] = make()
    return found


def split_buffers(workspace: dict | None, batch: int, q_len: int, heads: int, splits: int, value_dim: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A split-KV launch's float32 scratch (`kept` in `workspace`): partial outputs ``[B, q, H, S, Dv]``, running
    maxima and sums ``[B, q, H, S]``."""
    def make():
        running_max = torch.empty(batch, q_len, heads, splits, dtype=torch.float32, device=device)
        return (torch.empty(batch, q_len, heads, splits, value_dim, dtype=torch.float32, device=device), running_max,
                torch.empty_like(running_max))

    return kept(workspace, ("split", batch, q_len, heads, splits, value_dim, device), make)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 << max(0, n - 1).bit_length()


def tensor_key(*tensors: torch.Tensor | None, fresh: int = 0) -> tuple | None:
    """What the checks and the JIT's specialisation read of each of `tensors`: dtype, device, shape, strides and
    whether its address is 16-byte aligned, as one small int per tensor (-1 for None; equal ints, equal properties).
    None when one is not a tensor (the checks then report it).

    Read once per tensor object and in-place version (a step's tables and a layer's pool views serve every launch of
    the step), at each call for an inference tensor (which keeps no version) and for the first `fresh` tensors (made
    anew for each call, such as a layer's queries: not worth remembering)."""
    if len(_PROPERTIES) + len(tensors) > _MOST_PROPERTIES:  # numbers are about to be reused: forget what used them
        _PROPERTIES.clear()
        _TENSOR_KEYS.clear()
        _SETTLED.clear()
    key = []
    for tensor in tensors[:fresh]:
        if tensor is None:
            key.append(-1)
        elif isinstance(tensor, torch.Tensor):
            key.append(_number(tensor))
        else:
            return None
    for tensor in tensors[fresh:]:
        if tensor is None:
            key.append(-1)
            continue
        seen = _TENSOR_KEYS.get(id(tensor))
        if seen is not None and seen[0]() is tensor and seen[1] == tensor._version:  # only versioned tensors are kept
            key.append(seen[2])
            continue
        if not isinstance(tensor, torch.Tensor):
            return None
        number = _number(tensor)
        try:
            version = tensor._version
        except RuntimeError:  # an inference tensor: nothing proves it unchanged when it is seen again
            key.append(number)
            continue
        if len(_TENSOR_KEYS) >= _MOST_TENSOR_KEYS:
            for known in [known for known, (ref, _, _) in _TENSOR_KEYS.items() if ref() is None]:
                del _TENSOR_KEYS[known]
            if len(_TENSOR_KEYS) >= _MOST_TENSOR_KEYS:
                _TENSOR_KEYS.clear()
        _TENSOR_KEYS[id(tensor)] = (weakref.ref(tensor), version, number)
        key.append(number)
    return tuple(key)


def _number(tensor: torch.Tensor) -> int:
    """`tensor_key`'s number for the properties of `tensor`."""
    properties = (tensor.dtype, tensor.device, tensor.shape, tensor.stride(), tensor.data_ptr() % 16 == 0)
    number = _PROPERTIES.get(properties)
    if number is None:
        number = _PROPERTIES[properties] = len(_PROPERTIES)
    return number


def settled(key: tuple | None, settle):
    """``settle()`` (a launcher's checks and launch settings), once per `key` (None: every time); the last
    `_MOST_SETTLED` results are kept. `key` must hold everything ``settle`` reads (see the module docstring)."""
    if key is None:
        return settle()
    found = _SETTLED.get(key)
    if found is None:
        found = _SETTLED[key] = settle()
        if len(_SETTLED) > _MOST_SETTLED:
            _SETTLED.popitem(last=False)
    else:
        _SETTLED.move_to_end(key)
    return found


class Launch:
    """``kernel[grid](*args, *fixed, **constexprs)`` for calls whose arguments differ only in what the key they were
    settled under allows (`settled`): tensor addresses of the same alignment, runtime scalars the JIT does not
    specialise; `fixed` holds the runtime arguments that key fixes (sizes, strides).

    The first call goes through the JIT (which compiles or finds the kernel); on a GPU (compiled kernels, not the
    interpreter) later calls launch that compiled kernel directly, with the constexprs appended as the JIT does.
    """

    __slots__ = ("kernel", "grid", "constexprs", "fixed", "compiled", "tail", "device")

    def __init__(self, kernel, grid: tuple[int, ...], constexprs: dict, fixed: tuple = ()):
        self.kernel, self.grid, self.constexprs = kernel, tuple(grid) + (1,) * (3 - len(grid)), constexprs
        self.fixed = tuple(fixed)
        self.compiled, self.tail, self.device = None, (), None

    def __call__(self, *args) -> None:
        compiled = self.compiled
        if compiled is not None:
            active = triton.runtime.driver.active
            device = active.get_current_device()
            if device == self.device:
                stream = active.get_current_stream(device)
                full = args + self.tail
                grid = self.grid
                enter, leave = triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook
                if getattr(enter, "calls", True) or getattr(leave, "calls", True):  # hooks to call: as the JIT does
                    metadata = compiled.launch_metadata(grid, stream, *full)
                else:  # empty hook chains: no launch metadata to build, nothing to call
                    metadata = enter = leave = None
                compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, metadata,
                             enter, leave, *full)
                return
        args = args + self.fixed
        compiled = self.kernel[self.grid](*args, **self.constexprs, **COMPILE_OPTIONS)
        if (_DIRECT_LAUNCH and not interpreting() and self.compiled is None
                and isinstance(compiled, triton.compiler.CompiledKernel)):
            names = self.kernel.arg_names[len(args):]
            self.tail = self.fixed + tuple(self.constexprs[name] for name in names)
            self.compiled, self.device = compiled, triton.runtime.driver.active.get_current_device()
