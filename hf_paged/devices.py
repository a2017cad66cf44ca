"""Where each layer of a model runs, for a `PagedCache` whose layers sit on several devices (accelerate's
``device_map``).

A model loaded with ``device_map`` has an ``hf_device_map`` (module name -> ``0`` / ``"cuda:1"`` / ``"cpu"`` /
``"disk"``) and accelerate hooks whose ``execution_device`` is where a module's inputs are moved, so where its
keys and values are computed: a layer offloaded to ``"cpu"`` or ``"disk"`` runs on the main device. A
`PagedCache` gives each device-map entry its own pool, on the layers' execution device (`layer_placements`).
"""

from __future__ import annotations

import torch

from . import compat

__all__ = ["as_device", "layer_placements"]


def as_device(value: torch.device | str | int) -> torch.device:
    """``0`` -> ``cuda:0``, ``"cpu"`` -> ``cpu``, a `torch.device` unchanged."""
    if isinstance(value, torch.device):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cuda", value)
    return torch.device(value)


def _execution_device(model: torch.nn.Module, name: str) -> torch.device | None:
    """The ``execution_device`` of the nearest accelerate hook on module `name` or one of its parents."""
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:end]))
        hook = getattr(module, "_hf_hook", None)
        for one in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
            device = getattr(one, "execution_device", None)
            if device is not None:
                return as_device(device)
    return None


def _map_entry(device_map: dict, name: str):
    """The value of the longest key of `device_map` that is `name` or one of its parents (``""``: the whole model)."""
    best = None
    for key, value in device_map.items():
        if (key == "" or name == key or name.startswith(key + ".")) and (best is None or len(key) > len(best[0])):
            best = (key, value)
    return None if best is None else best[1]


def layer_placements(model: torch.nn.Module) -> list[tuple[str, torch.device]] | None:
    """Per layer (in ``layer_idx`` order), ``(device-map entry, execution device)`` of its attention, or None when
    the model has no ``hf_device_map`` or some layer's module (or where it runs) cannot be found.

    The entry is the ``hf_device_map`` value as a string (``"0"``, ``"cpu"``, ``"disk"``); layers with equal pairs
    share a pool.
    """
    device_map = getattr(model, "hf_device_map", None)
    config = compat.text_config(model.config)
    num_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(device_map, dict) or not isinstance(num_layers, int):
        return None
    placements: dict[int, tuple[str, torch.device]] = {}
    for name, module in model.named_modules():
        layer_idx = getattr(module, "layer_idx", None)
        if not isinstance(layer_idx, int) or layer_idx in placements or not 0 <= layer_idx < num_layers:
            continue
        entry = _map_entry(device_map, name)
        if entry is None:
            return None
        device = _execution_device(model, name)
        if device is None:
            if entry in ("cpu", "disk"):
                return None  # offloaded without a hook saying where it runs
            device = as_device(entry)
        placements[layer_idx] = (str(entry), device)
    if len(placements) != num_layers:
        return None
    return [placements[layer] for layer in range(num_layers)]
