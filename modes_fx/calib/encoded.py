"""Calibration inputs with their threshold-independent parts computed once.

Every calibration measurement re-runs the whole model on the same batches, but two parts of a
multimodal forward never depend on the thresholds: the vision encoder (no MoE site inside it)
and the multimodal RoPE position ids (``compute_3d_position_ids``, a Python loop per row in the
Qwen-VL families). :func:`pre_encoded` computes both once per batch with the model's own methods
and passes them through the forward's own arguments (``mm_encoder_outputs``, as ``generate()``
does, and ``position_ids``), so each pass runs only the decoder. The forward then takes the same
code path after those points, and its logits are identical (tested).
"""
from __future__ import annotations

import dataclasses
import inspect

import torch

from .data import CalibrationBatch

PIXEL_KEYS = {"image": ("pixel_values", "pixel_values_images"), "video": ("pixel_values_videos",)}


def pre_encoded(model: torch.nn.Module, batch: CalibrationBatch, site_modules: list[torch.nn.Module]) -> CalibrationBatch:
    """``batch`` with its pixel inputs replaced by ``mm_encoder_outputs`` (the base model's
    ``get_image_features`` / ``get_video_features``) and with ``position_ids`` added (what the
    forward's ``compute_3d_position_ids`` returns for it), each where the model has them;
    otherwise unchanged. ``model`` must not be attached (its eager forward is called).

    ``site_modules``: the model's MoE site modules; an encoder that runs any of them is not
    pre-encoded (its output would depend on the thresholds)."""
    inputs = dict(batch.inputs)
    with torch.no_grad():
        _encode(model, inputs, site_modules)
        _position_ids(model, inputs)
    return dataclasses.replace(batch, inputs=inputs)


def _encode(model: torch.nn.Module, inputs: dict, site_modules: list[torch.nn.Module]) -> None:
    forward = inspect.signature(model.forward).parameters
    if "mm_encoder_outputs" not in forward or "mm_encoder_outputs" in inputs:
        return
    outputs = {}
    for modality, pixel_keys in PIXEL_KEYS.items():
        encoder = getattr(model.base_model, f"get_{modality}_features", None)
        if encoder is None or not any(inputs.get(k) is not None for k in pixel_keys):
            continue
        takes = inspect.signature(encoder).parameters
        kwargs = {k: v for k, v in inputs.items() if k in takes and k != "kwargs"}
        output, ran_a_site = _watching(site_modules, lambda: encoder(**kwargs, return_dict=True))
        if ran_a_site:
            return
        outputs[modality] = output
    if outputs:
        for modality in outputs:
            for key in PIXEL_KEYS[modality]:
                inputs.pop(key, None)
        inputs["mm_encoder_outputs"] = outputs


def _watching(site_modules: list[torch.nn.Module], call) -> tuple[object, bool]:
    """(``call()``, whether it ran any of ``site_modules``), seen by forward pre-hooks."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in site_modules]
    try:
        return call(), bool(calls)
    finally:
        for h in hooks:
            h.remove()


class _Captured(Exception):
    """Raised by the wrapped ``compute_3d_position_ids`` to stop the forward right after it."""


def _position_ids(model: torch.nn.Module, inputs: dict) -> None:
    """Adds ``position_ids`` as the forward itself computes them: the eager ``forward`` runs with
    ``compute_3d_position_ids`` wrapped to record its result and stop the forward there (the
    decoder never runs; the forward derives the method's arguments, e.g. audio lengths)."""
    owner = next((m for m in (model, model.base_model) if "compute_3d_position_ids" in dir(type(m))), None)
    if owner is None or "position_ids" in inputs or "input_ids" not in inputs:
        return
    method = owner.compute_3d_position_ids
    captured = []

    def record(*args, **kwargs):
        captured.append(method(*args, **kwargs))
        raise _Captured

    owner.compute_3d_position_ids = record  # instance attribute, shadows the method
    try:
        model.forward(**inputs)  # not __call__: no compiled forward, no hooks of an attached model
    except _Captured:
        pass
    finally:
        del owner.compute_3d_position_ids
    if captured and captured[0] is not None:
        inputs["position_ids"] = captured[0]
