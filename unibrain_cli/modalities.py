"""The modality vocabulary: six canonical names and the aliases seen in the wild."""

from __future__ import annotations

from unibrain_cli.errors import UserError

#: Canonical modality names, in the canonical imputation chain order.
MODALITIES: tuple[str, ...] = ("t1", "t2", "flair", "t1ce", "dwi", "adc")

#: Human-readable names used in instructions and reports.
DISPLAY_NAMES: dict[str, str] = {
    "t1": "T1",
    "t2": "T2",
    "flair": "FLAIR",
    "t1ce": "T1ce",
    "dwi": "DWI",
    "adc": "ADC",
}

_ALIASES: dict[str, str] = {
    "t1": "t1", "t1n": "t1", "t1wi": "t1", "t1w": "t1",
    "t2": "t2", "t2w": "t2", "t2wi": "t2",
    "flair": "flair", "t2f": "flair", "t2flair": "flair", "t2-flair": "flair",
    "t2_flair": "flair",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce", "t1-ce": "t1ce", "t1_ce": "t1ce",
    "dwi": "dwi", "adc": "adc",
}

#: Diagnosis classes (Top-1 is computed over these five).
DISEASES: tuple[str, ...] = ("glioma", "meningioma", "metastasis", "stroke", "wmh")


def canonical_modality(name: str) -> str | None:
    """Return the canonical modality for an alias (case-insensitive), or None if unknown."""
    return _ALIASES.get(name.strip().lower())


def parse_modality(name: str, where: str | None = None) -> str:
    """Canonical modality for ``name``; raise :class:`UserError` naming ``where`` if unknown."""
    canon = canonical_modality(name)
    if canon is None:
        raise UserError(
            f"unknown modality '{name}'; use one of {', '.join(MODALITIES)} "
            "(aliases like t1n, t2w, t2f, t1c are accepted)",
            where,
        )
    return canon
