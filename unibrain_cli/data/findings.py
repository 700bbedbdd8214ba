"""3D-to-2D descriptor reformulation of report text (the paper's size-phrase rewriting).

Reports describe lesions in 3D ("76*72*69mm", "7.6 x 7.2 x 6.9 cm"). A training slice shows
only a 2D cut, so each size phrase is replaced by the lesion's extent on that slice,
written ``"W * H mm"`` (W: left-right, H: anterior-posterior, in mm).
"""

from __future__ import annotations

import re

_NUM = r"\d+(?:\.\d+)?"
_UNIT = r"(?:mm|cm)"
_SEP = r"\s*[*x×X]\s*"
#: Two or three numbers joined by '*', 'x' or '×', each optionally followed by a unit and the
#: last one always followed by mm/cm: "76*72*69mm", "76 x 72 x 69 mm", "7.6*7.2*6.9cm",
#: "30mm x 20mm", "7.6 x 7.2 cm".
SIZE_PHRASE = re.compile(
    rf"(?<![\w.])(?P<a>{_NUM})\s*(?:{_UNIT})?{_SEP}(?P<b>{_NUM})\s*(?:{_UNIT})?"
    rf"(?:{_SEP}(?P<c>{_NUM}))?\s*(?P<unit>{_UNIT})(?![A-Za-z])",
    re.IGNORECASE,
)


def format_mm(value: float) -> str:
    """Millimetres with at most one decimal and no trailing zeros: 12.0 -> '12', 7.25 -> '7.2'."""
    text = f"{round(float(value), 1):.1f}"
    return text[:-2] if text.endswith(".0") else text


def find_size_phrases(text: str) -> list[tuple[float, ...]]:
    """All size phrases in ``text`` as tuples of millimetres (cm converted)."""
    out = []
    for m in SIZE_PHRASE.finditer(text):
        scale = 10.0 if m.group("unit").lower() == "cm" else 1.0
        nums = [m.group(g) for g in ("a", "b", "c") if m.group(g) is not None]
        out.append(tuple(float(n) * scale for n in nums))
    return out


def rewrite_size_phrases(text: str, w_mm: float, h_mm: float) -> str:
    """Replace every 2D/3D size phrase in ``text`` by ``"W * H mm"``.

    ``w_mm``/``h_mm`` are the lesion's width (left-right) and height (anterior-posterior) on
    the slice in mm. When the slice shows no lesion (either is 0) the text is returned
    unchanged, since there is no 2D extent to state.
    """
    if w_mm <= 0 or h_mm <= 0:
        return text
    replacement = f"{format_mm(w_mm)} * {format_mm(h_mm)} mm"
    return SIZE_PHRASE.sub(replacement, text)
