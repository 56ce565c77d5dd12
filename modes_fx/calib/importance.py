"""GMLG layer importance α[l, m]: how much removing layer l's routed experts for the tokens of
modality m alone moves the answer distribution (KL), normalised so Σ_l α[l, m] = 1."""
from __future__ import annotations

from collections.abc import Iterable, MutableMapping

import torch
from tqdm.auto import tqdm

from .data import prepare
from .session import CalibrationSession, default_modalities


def importance_kls(session: CalibrationSession, cache: MutableMapping[str, float] | None = None, progress: bool = True) -> list[list[float]]:
    """KL [L][M] of each single (layer, modality) ablation; one pass per pair, cached by "l,m"."""
    cache = {} if cache is None else cache
    L, M = session.num_sites, len(session.modalities)
    kls = [[0.0] * M for _ in range(L)]
    with tqdm(total=L * M, desc="layer importance", disable=not progress) as bar:
        for layer in range(L):
            for column in range(M):
                key = f"{layer},{column}"
                if key not in cache:
                    cache[key] = session.measure_table(session.ablation_table(layer, column)).kl
                kls[layer][column] = cache[key]
                bar.update()
    return kls


GAMMAS = (0.0, 0.5, 1.0)
"""Temperings γ of the layer importance the default calibration chooses among: α ∝ KL^γ, so
γ = 0 is uniform α (DMT without GMLG), γ = 1 the paper's GMLG α (docs/calibration.md)."""


def normalise(kls: list[list[float]], modalities: list[str], gamma: float = 1.0) -> list[list[float]]:
    """α [L][M] ∝ ``kls`` ** ``gamma`` per column, each column summing to 1 (γ = 1: the paper's
    GMLG α; γ = 0: uniform 1/L). Raises when a column of ``kls`` sums to 0 (the data has no
    tokens of that modality, or its answers do not depend on them), whatever ``gamma``."""
    L = len(kls)
    alpha = [[0.0] * len(modalities) for _ in range(L)]
    for m, name in enumerate(modalities):
        if not sum(kls[l][m] for l in range(L)) > 0:
            raise ValueError(
                f"removing the routed experts of {name!r} tokens changes no answer in any layer: "
                f"the calibration data has no {name} tokens, or its answers do not depend on them"
            )
        weights = [kls[l][m] ** gamma for l in range(L)]  # 0 ** 0 = 1: γ = 0 is uniform
        total = sum(weights)
        for l in range(L):
            alpha[l][m] = weights[l] / total
    return alpha


def layer_importance(
    model: torch.nn.Module,
    data: Iterable[dict],
    modalities: list[str] | None = None,
    inner: str = "eager",
    progress: bool = True,
) -> list[list[float]]:
    """α [L][M] for ``model`` on calibration ``data`` (see calib/data.py for the format).

    modalities: schedule columns, default text plus vision/audio when present in the data.
    One pass per (MoE layer, modality), plus one reference pass."""
    batches = prepare(data)
    modalities = modalities or default_modalities(model, batches)
    with CalibrationSession(model, batches, modalities, inner) as session:
        return normalise(importance_kls(session, progress=progress), modalities)
