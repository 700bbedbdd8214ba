"""Map free-text diagnoses to the five classes (glioma, meningioma, metastasis, stroke, wmh).

The synonym table :data:`SYNONYMS` lists, per class, the regular expressions (case-insensitive,
on word boundaries) that name it:

=========== ==========================================================================
class       phrases
=========== ==========================================================================
glioma      glioma, glioblastoma (multiforme), GBM, astrocytoma, oligodendroglioma,
            oligoastrocytoma, ependymoma, gliomatosis, (high-/low-grade) glial
            tumour / neoplasm / lesion
meningioma  meningioma(s), meningiomatosis, meningothelial tumour
metastasis  metastasis, metastases, metastatic (disease / lesions ...), mets,
            secondary deposits, secondaries, secondary (brain) tumour(s)
stroke      stroke, infarct, infarction(s), infarcted, ischemic / ischaemic, ischemia /
            ischaemia, cerebrovascular accident, CVA
wmh         white matter hyperintensity / hyperintensities, WMH, small vessel disease,
            small vessel ischaemic change(s) / disease, leukoaraiosis,
            microangiopathy / microangiopathic (change), white matter disease
=========== ==========================================================================

Rules of :func:`extract_diagnosis`:

1. If the text has a ``Final Diagnosis:`` (or ``Diagnosis:``) section, the text after the
   last such label is searched first; the whole text is the fallback.
2. All phrase matches of all classes are collected; where matches overlap, the longest wins
   ("small vessel ischaemic disease" is WMH, not stroke).
3. A mention is dropped when it is negated inside its clause (clauses end at ``. ; : ! ?``,
   line breaks and "but / however / although / whereas / though"), NegEx-style:
   a negation cue ("no", "not", "without", "negative for", "absence of", "free of",
   "rather than", "instead of", "exclude(s/d)", "rule(d) out", "nor") among the six words
   before it, unless a scope-ending phrase ("consistent with", "compatible with",
   "in keeping with", "suggest...", "likely", "favour...", "represent...") comes between;
   or a post-negation right after it, before any comma ("is excluded", "ruled out",
   "unlikely", "not seen / identified / present / likely"). "Cannot be excluded" is not a
   negation.
4. The first remaining mention (in reading order) is the diagnosis; None when none remains.
"""

from __future__ import annotations

import re

#: Class -> regular expressions (case-insensitive, matched on word boundaries).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "glioma": (
        r"glioblastomas?(?:\s+multiforme)?",
        r"gbm",
        r"(?:oligo)?astrocytomas?",
        r"oligodendrogliomas?",
        r"ependymomas?",
        r"gliomatosis(?:\s+cerebri)?",
        r"(?:high|low)[- ]grade\s+gliomas?",
        r"gliomas?",
        r"(?:(?:high|low)[- ]grade\s+)?glial\s+(?:tumou?rs?|neoplasms?|lesions?)",
    ),
    "meningioma": (
        r"meningiomas?",
        r"meningiomatosis",
        r"meningothelial\s+(?:tumou?rs?|neoplasms?)",
    ),
    "metastasis": (
        r"metastasis",
        r"metastases",
        r"metastatic(?:\s+(?:disease|lesions?|deposits?|tumou?rs?))?",
        r"mets",
        r"secondary\s+deposits?",
        r"secondaries",
        r"secondary\s+(?:brain\s+)?tumou?rs?",
    ),
    "stroke": (
        r"(?:acute|subacute|chronic|ischa?emic|hemorrhagic|haemorrhagic)?\s*strokes?",
        r"(?:cerebral\s+|lacunar\s+)?infarcts?",
        r"(?:cerebral\s+)?infarctions?",
        r"infarcted",
        r"ischa?emic",
        r"ischa?emia",
        r"cerebrovascular\s+accidents?",
        r"cva",
    ),
    "wmh": (
        r"(?:periventricular\s+|deep\s+)?white[- ]matter\s+hyperintensit(?:y|ies)",
        r"wmhs?",
        r"(?:cerebral\s+)?small[- ]vessel\s+(?:isch(?:a)?emic\s+)?(?:disease|changes?)",
        r"leu[ck]oaraiosis",
        r"microangiopath(?:y|ic)(?:\s+changes?)?",
        r"white[- ]matter\s+disease",
    ),
}

_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    (cls, re.compile(rf"\b{p}\b", re.IGNORECASE)) for cls, pats in SYNONYMS.items() for p in pats
]

_SECTION = re.compile(r"(?:final\s+)?diagnosis\s*[:\-]", re.IGNORECASE)
_CLAUSE_BREAK = re.compile(r"[.;:!?\n]|\b(?:but|however|although|whereas|though)\b", re.IGNORECASE)
#: Phrases that end a negation's scope looking forward ("no mass effect, consistent with glioma").
_SCOPE_END = re.compile(
    r"\b(?:consistent\s+with|compatible\s+with|in\s+keeping\s+with|suggest\w*|likely|representing|"
    r"favou?rs?|favou?ring|represents?|diagnosis|impression)\b",
    re.IGNORECASE,
)
_PRE_NEGATION = re.compile(
    r"\b(?:no|not|without|negative\s+for|absence\s+of|absent|free\s+of|rather\s+than|instead\s+of|"
    r"excludes?|excluded|rules?\s+out|ruled\s+out|nor)\b",
    re.IGNORECASE,
)
_POST_NEGATION = re.compile(
    r"^\W*(?:(?:is|are|was|were|has\s+been|have\s+been|being)\s+)?(?:excluded|ruled\s+out|unlikely|"
    r"not\s+(?:seen|identified|present|detected|demonstrated|likely|favou?red))\b",
    re.IGNORECASE,
)
#: Number of words before a mention that a negation cue may reach (NegEx uses about five).
_PRE_WINDOW_WORDS = 6


def _mentions(text: str) -> list[tuple[int, int, str]]:
    """All (start, end, class) matches, overlaps resolved in favour of the longest match."""
    found = [(m.start(), m.end(), cls) for cls, pat in _PATTERNS for m in pat.finditer(text)]
    found.sort(key=lambda x: (-(x[1] - x[0]), x[0]))
    kept: list[tuple[int, int, str]] = []
    for s, e, cls in found:
        if all(e <= ks or s >= ke for ks, ke, _ in kept):
            kept.append((s, e, cls))
    return sorted(kept)


def _clause_bounds(text: str, start: int, end: int) -> tuple[int, int]:
    """Start and end offsets of the clause around the span [start, end)."""
    left = 0
    for m in _CLAUSE_BREAK.finditer(text, 0, start):
        left = m.end()
    nxt = _CLAUSE_BREAK.search(text, end)
    return left, (nxt.start() if nxt else len(text))


def _negated(text: str, start: int, end: int) -> bool:
    """True when the mention at [start, end) is negated inside its clause."""
    left, right = _clause_bounds(text, start, end)
    before = text[left:start]
    ends = list(_SCOPE_END.finditer(before))
    if ends:
        before = before[ends[-1].end():]
    window = " ".join(before.split()[-_PRE_WINDOW_WORDS:])
    if _PRE_NEGATION.search(window):
        return True
    after = text[end:right].split(",")[0]
    return bool(_POST_NEGATION.match(after))


def _first_class(text: str) -> str | None:
    for s, e, cls in _mentions(text):
        if not _negated(text, s, e):
            return cls
    return None


def extract_diagnosis(text: str) -> str | None:
    """The diagnosis class named in free ``text`` (one of DISEASES), or None.

    See the module docstring for the synonym table and the rules (Final Diagnosis section
    first, longest match, negation, first mention wins).
    """
    if not text:
        return None
    sections = list(_SECTION.finditer(text))
    if sections:
        found = _first_class(text[sections[-1].end():])
        if found is not None:
            return found
    return _first_class(text)

