"""Find RadGenome-Brain MRI reports and their source volumes, and join them into cases.

Reports come in one of two layouts (both may be present; entries are merged):

* the **release tree**: ``train_val_test_split.json`` plus one folder per subset
  (``BraTS_GLI``, ``ISLES22``, ``WMH`` ...) holding ``modal_wise_finding.json``
  (``{"<case>-<seq>": text}``), ``impression.json`` (``{"<case>": {"impression", "disease"}}``)
  and ``global_finding.json`` (``{"<case>": text}``);
* the **flat layout** of the official UniBrain code: ``combined_modal_wise_finding.json``,
  ``combined_impression.json``, ``combined_global_finding.json`` (+ the split file).

Volumes are found under the report root and any extra image roots, in these layouts:

* BraTS 2023 / flat ``all_data_Reg``: ``<case>/<case>-<seq>.nii.gz`` (``seq`` = ``t1n``,
  ``t2f``, ``t1``, ``flair`` ..., ``seg``);
* ISLES'22 BIDS: ``sub-X/ses-Y/{dwi,anat}/sub-X_ses-Y_<seq>.nii.gz`` and
  ``derivatives/sub-X/ses-Y/sub-X_ses-Y_msk.nii.gz`` (case id ``sub-X``);
* WMH 2017: ``<Site>/<n>/pre/{T1,FLAIR}.nii.gz`` and ``<Site>/<n>/wmh.nii.gz``
  (case id ``<Site>_<n>``; the ``orig/`` folders are not used).

The release does not document how its report keys spell these ids, so keys are read
tolerantly (:func:`parse_image_key`, :class:`CaseIndex`):

* ``<case>-<seq>`` or ``<case>_<seq>``: the sequence is the known sequence name (any alias,
  any letter case; a two-part alias such as ``t2-flair`` counts as one) after the last
  ``-``/``_``; case ids keep their own dashes and underscores (``BraTS-GLI-00000-000``);
* BIDS ids with or without the session (``sub-X``, ``sub-X_ses-Y``) meet the images under
  ``sub-X/ses-Y/`` or ``sub-X/``; a subject with several sessions gets one case per session
  (``sub-X_ses-Y``) and a report key without the session is reported as ambiguous;
* WMH ids with their site (``Utrecht_0``, ``Utrecht/0``, ``GE3T_100``, ``Amsterdam_GE3T_100``)
  or without it (``0``) when the number is unique among the WMH images.

Every case keeps the id its images give it (``sub-X``, ``Utrecht_0`` ...), whatever spelling
the reports used; :class:`SubsetMatching` records how each subset's reports were matched.

Nothing here reads voxels: it only decides which files belong to which case. Every input
that cannot be used becomes a :class:`Problem` row (``case_id, file, kind, reason``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from unibrain_cli.modalities import DISEASES, MODALITIES, canonical_modality

SPLITS: tuple[str, ...] = ("train", "val", "test")
UNSPLIT = "unsplit"
SPLIT_FILE = "train_val_test_split.json"
RELEASE_FILES = ("modal_wise_finding.json", "impression.json", "global_finding.json")
FLAT_FILES = ("combined_modal_wise_finding.json", "combined_impression.json", "combined_global_finding.json")

#: Sequence names that denote a lesion label volume rather than an image.
_SEG_NAMES = frozenset({"seg", "msk", "mask", "wmh", "label", "labels", "lesion"})
_SPLIT_ALIASES = {
    "train": "train", "training": "train", "tr": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test", "ts": "test",
}
#: Where a case's split is contested, the most held-out split wins (no test leakage).
_SPLIT_PRIORITY = {"test": 0, "val": 1, "train": 2}
_NII = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_BRATS_ID = re.compile(r"^(BraTS-[A-Za-z]+-\d+-\d+)-([A-Za-z0-9_]+)$")
_BIDS = re.compile(r"^(sub-[A-Za-z0-9]+)(?:_ses-[A-Za-z0-9]+)?(?:_[A-Za-z]+-[A-Za-z0-9]+)*_([A-Za-z0-9]+)$")
_BIDS_SESSION = re.compile(r"(?:^|_)(ses-[A-Za-z0-9]+)(?=_|$)")
#: A report-side BIDS case id: subject, optional session, other entities ignored.
_BIDS_CASE = re.compile(r"^(sub-[A-Za-z0-9]+)(?:[_-](ses-[A-Za-z0-9]+))?(?:_[A-Za-z]+-[A-Za-z0-9]+)*$", re.I)
#: A report-side WMH case id: optional site (any separators), then the case number.
_WMH_CASE = re.compile(r"^(.*?)[\s_/\\-]*(\d+)$")
_KEY_SEPARATORS = "-_"
_SUBSET_BY_NAME = (
    (re.compile(r"^BraTS-GLI-", re.I), "BraTS_GLI"),
    (re.compile(r"^BraTS-MEN-", re.I), "BraTS_MEN"),
    (re.compile(r"^BraTS-MET-", re.I), "BraTS_MET"),
    (re.compile(r"^BraTS-", re.I), "BraTS"),
    (re.compile(r"^sub-strokecase", re.I), "ISLES22"),
    (re.compile(r"^(Utrecht|Singapore|GE3T|Amsterdam)[_/\\-]", re.I), "WMH"),
)
_DISEASE_WORDS = (
    ("glioma", "glioma"), ("glioblastoma", "glioma"), ("mening", "meningioma"),
    ("metasta", "metastasis"), ("stroke", "stroke"), ("infarct", "stroke"), ("ischem", "stroke"),
    ("wmh", "wmh"), ("white matter", "wmh"),
)


@dataclass(frozen=True)
class Problem:
    """One input that could not be used: the row of ``problems.csv``."""

    case_id: str
    file: str
    kind: str
    reason: str


@dataclass(frozen=True)
class ImageFile:
    """A NIfTI file attributed to a case. ``modality`` is canonical, ``"seg"``, or None (unknown).

    ``session`` is the BIDS session (``ses-0001``) of an ISLES file, None elsewhere.
    """

    case_id: str
    seq: str
    modality: str | None
    path: Path
    layout: str  # "brats" | "flat" | "isles" | "wmh"
    session: str | None = None


@dataclass
class ReportEntry:
    """The report side of one case, merged from the JSON files that mention it."""

    case_id: str
    subset: str
    layout: str = "release"  # "release" (per-subset folders) | "flat" (combined_*.json)
    findings: dict[str, str] = field(default_factory=dict)  # source seq -> text
    finding_file: str = ""
    impression: str | None = None
    diseases: list[str] | None = None
    impression_file: str = ""
    global_finding: str | None = None
    global_file: str = ""
    separators: Counter[str] = field(default_factory=Counter)  # "-" / "_" before the seq -> keys


@dataclass
class CaseSource:
    """Everything ``prepare`` needs for one case: files, report texts, split.

    ``volumes`` maps canonical modality -> file; ``lesion_labels`` lists the label values
    that count as lesion (None: every value > 0).
    """

    case_id: str
    subset: str
    split: str
    diseases: tuple[str, ...]
    volumes: dict[str, Path]
    seg: Path | None
    findings: dict[str, str]
    global_finding: str
    impression: str
    lesion_labels: tuple[int, ...] | None = None

    def report_digest(self) -> str:
        """sha256 of the report-side fields (changes here never need re-resampling)."""
        blob = json.dumps(
            [self.subset, self.split, list(self.diseases), self.findings, self.global_finding, self.impression],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------- helpers


def infer_subset(case_id: str) -> str:
    """Subset name from a source-style case id (``BraTS-GLI-...`` -> ``BraTS_GLI``), else ``flat``."""
    for pattern, subset in _SUBSET_BY_NAME:
        if pattern.search(case_id):
            return subset
    return "flat"


def normalise_diseases(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Map free disease names onto the five classes; returns (classes in DISEASES order, unknown)."""
    found: set[str] = set()
    unknown: list[str] = []
    for raw in names:
        low = str(raw).strip().lower()
        hit = next((cls for word, cls in _DISEASE_WORDS if word in low), None)
        if hit is None:
            unknown.append(str(raw))
        else:
            found.add(hit)
    return [d for d in DISEASES if d in found], unknown


@dataclass(frozen=True)
class ImageKey:
    """A report key or split id read as ``<case><sep><seq>`` (``sep`` is ``-`` or ``_``).

    ``seq`` is empty (and ``case`` the whole id) when the id holds no separator at all.
    """

    case: str
    seq: str
    sep: str


def is_sequence_name(name: str) -> bool:
    """Whether ``name`` is a modality alias or a lesion-label name, in any letter case."""
    return canonical_modality(name) is not None or name.strip().lower() in _SEG_NAMES


def parse_image_key(image_id: str) -> ImageKey:
    """Split an image id into case and sequence.

    The sequence is the known sequence name after the last ``-`` or ``_`` that is followed
    by one (a two-part alias such as ``t2-flair`` or ``t1_ce`` counts as one name), so case
    ids keep their own dashes and underscores: ``BraTS-GLI-00000-000-t1n``,
    ``Utrecht_0_FLAIR``, ``sub-strokecase0001_ses-0001_dwi`` and ``...ses-0001-dwi`` all
    split before the sequence. Without a known name the last separator is used (the
    sequence then fails as an unknown modality, naming the case).
    """
    cuts = [i for i, ch in enumerate(image_id) if ch in _KEY_SEPARATORS and 0 < i < len(image_id) - 1]
    known = [i for i in cuts if is_sequence_name(image_id[i + 1:])]
    if known:
        cut = known[-1]
        previous = [i for i in cuts if i < cut]
        if previous and previous[-1] in known:  # a two-part name (t2-flair, t1_ce) starts there
            cut = previous[-1]
    elif cuts:
        cut = cuts[-1]
    else:
        return ImageKey(image_id, "", "")
    return ImageKey(image_id[:cut], image_id[cut + 1:], image_id[cut])


def split_image_id(image_id: str) -> tuple[str, str]:
    """(case, seq) of an image id; see :func:`parse_image_key` (seq is "" if there is none)."""
    key = parse_image_key(image_id)
    return key.case, key.seq


def read_json(path: Path, problems: list[Problem], expect: type = dict) -> Any | None:
    """Load a JSON file tolerantly: a missing, empty, invalid or wrong-typed file is a Problem."""
    if not path.is_file():
        problems.append(Problem("", str(path), "missing_file", "expected report file not found"))
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem("", str(path), "bad_json", f"cannot read ({exc})"))
        return None
    if not text.strip():
        problems.append(Problem("", str(path), "bad_json", "empty file; re-download the release"))
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        problems.append(Problem("", str(path), "bad_json", f"invalid JSON ({exc.msg} at line {exc.lineno})"))
        return None
    if not isinstance(data, expect):
        problems.append(Problem("", str(path), "bad_json", f"expected a JSON {expect.__name__} at the top"))
        return None
    if not data:
        problems.append(Problem("", str(path), "bad_json", "the JSON holds no entries"))
        return None
    return data


def _walk(root: Path, max_depth: int, skip: Sequence[Path] = ()) -> Iterable[tuple[Path, list[str]]]:
    """(dir, file names) below ``root`` up to ``max_depth``, skipping hidden dirs and ``skip``."""
    root = root.resolve()
    skip_set = {p.resolve() for p in skip}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".") and depth < max_depth and (here / d).resolve() not in skip_set
        )
        yield here, sorted(filenames)


# --------------------------------------------------------------------------- reports


def _merge_reports(
    entries: dict[str, ReportEntry],
    subset: str | None,
    findings: dict | None,
    impressions: dict | None,
    globals_: dict | None,
    files: tuple[Path, Path, Path],
    problems: list[Problem],
) -> None:
    def entry(case: str) -> ReportEntry:
        if case not in entries:
            entries[case] = ReportEntry(case, subset or infer_subset(case), "release" if subset else "flat")
        return entries[case]

    for image_id, text in (findings or {}).items():
        key = parse_image_key(str(image_id))
        if not key.seq:
            problems.append(Problem(key.case, str(files[0]), "bad_json",
                                    f"key '{image_id}' is not '<case>-<sequence>' or '<case>_<sequence>'"))
            continue
        e = entry(key.case)
        e.findings[key.seq] = str(text)
        e.finding_file = str(files[0])
        e.separators[key.sep] += 1
    for case, value in (impressions or {}).items():
        e = entry(str(case))
        e.impression_file = str(files[1])
        if isinstance(value, dict):
            e.impression = str(value.get("impression", "") or "")
            raw = value.get("disease", value.get("diseases", []))
            e.diseases = [raw] if isinstance(raw, str) else [str(d) for d in (raw or [])]
        else:
            e.impression = str(value)
            e.diseases = []
    for case, text in (globals_ or {}).items():
        e = entry(str(case))
        e.global_finding = str(text) if not isinstance(text, dict) else str(text.get("global_finding", ""))
        e.global_file = str(files[2])


def find_reports(root: Path, max_depth: int = 3) -> tuple[dict[str, ReportEntry], Path | None, list[Problem]]:
    """Read every report JSON under ``root`` (release tree and/or flat layout).

    Returns (case id -> merged entry, the split file or None, problems).
    """
    problems: list[Problem] = []
    entries: dict[str, ReportEntry] = {}
    split_path: Path | None = None
    found_any = False
    for here, names in _walk(root, max_depth):
        if SPLIT_FILE in names and split_path is None:
            split_path = here / SPLIT_FILE
        if RELEASE_FILES[0] in names:
            found_any = True
            files = tuple(here / n for n in RELEASE_FILES)
            data = [read_json(f, problems) for f in files]
            _merge_reports(entries, here.name, *data, files=files, problems=problems)  # type: ignore[arg-type]
        if FLAT_FILES[0] in names:
            found_any = True
            files = tuple(here / n for n in FLAT_FILES)
            data = [read_json(f, problems) for f in files]
            _merge_reports(entries, None, *data, files=files, problems=problems)  # type: ignore[arg-type]
    if not found_any:
        problems.append(Problem(
            "", str(root), "no_reports",
            f"no {RELEASE_FILES[0]} (release tree) or {FLAT_FILES[0]} (flat layout) found",
        ))
    return entries, split_path, problems


def read_split(
    path: Path | None,
    known_cases: Iterable[str],
    resolve: Callable[[str], Sequence[str]] | None = None,
) -> tuple[dict[str, str], list[Problem]]:
    """Read the split file tolerantly; returns (case id -> split, problems).

    Accepts lists of image ids (``<case>-<seq>``, ``<case>_<seq>``) or case ids under keys
    like train/training, val/valid/validation, test/testing (any letter case), also nested
    one level per subset. Unknown keys and ids that match no known case are reported.
    ``resolve`` maps one listed id to the case ids it names (default: ``known_cases`` only).
    """
    problems: list[Problem] = []
    if path is None:
        problems.append(Problem("", SPLIT_FILE, "missing_split", "no split file found; every case is 'unsplit'"))
        return {}, problems
    data = read_json(path, problems)
    if data is None:
        return {}, problems
    known = set(known_cases)
    resolve = resolve or (lambda item: _cases_of_id(item, known))
    votes: dict[str, set[str]] = {}

    def visit(node: Any, trail: str) -> None:
        for key, value in node.items():
            split = _SPLIT_ALIASES.get(str(key).strip().lower())
            if split is not None and isinstance(value, list):
                for item in value:
                    cases = resolve(str(item))
                    if not cases:
                        problems.append(Problem(
                            str(item), str(path), "split_unknown_id",
                            f"'{item}' under '{trail}{key}' matches no case with reports or images; ignored",
                        ))
                    for case in cases:
                        votes.setdefault(case, set()).add(split)
            elif isinstance(value, dict) and not trail:
                visit(value, f"{key}.")
            else:
                problems.append(Problem(
                    "", str(path), "split_unknown_key",
                    f"key '{trail}{key}' is not train/val/validation/test with a list; ignored",
                ))

    visit(data, "")
    splits: dict[str, str] = {}
    for case, options in votes.items():
        chosen = min(options, key=_SPLIT_PRIORITY.__getitem__)
        if len(options) > 1:
            problems.append(Problem(
                case, str(path), "split_conflict",
                f"images of this case are listed in {sorted(options)}; using '{chosen}'",
            ))
        splits[case] = chosen
    return splits, problems


def _cases_of_id(item: str, known: set[str]) -> tuple[str, ...]:
    """The known case a split id names, as itself or as ``<case>-<seq>`` / ``<case>_<seq>``."""
    if item in known:
        return (item,)
    key = parse_image_key(item)
    return (key.case,) if key.seq and key.case in known else ()


# --------------------------------------------------------------------------- images


def classify_image(path: Path) -> tuple[str, str, str] | None:
    """(case id, source sequence name, layout) for a NIfTI path, or None if no layout matches."""
    stem = _NII.sub("", path.name)
    parent = path.parent.name
    if stem.startswith(parent + "-") and len(stem) > len(parent) + 1:
        layout = "brats" if _BRATS_ID.match(stem) else "flat"
        return parent, stem[len(parent) + 1:], layout
    m = _BRATS_ID.match(stem)
    if m:
        return m.group(1), m.group(2), "brats"
    m = _BIDS.match(stem)
    if m:
        return m.group(1), m.group(2), "isles"
    if parent == "pre" and len(path.parts) >= 4:
        return f"{path.parent.parent.parent.name}_{path.parent.parent.name}", stem, "wmh"
    if stem.lower() == "wmh" and len(path.parts) >= 3:
        return f"{path.parent.parent.name}_{parent}", stem, "wmh"
    return None


def bids_session(path: Path) -> str | None:
    """The BIDS session (``ses-0001``) of a file, from its name or else a ``ses-*`` folder."""
    m = _BIDS_SESSION.search(_NII.sub("", path.name))
    if m:
        return m.group(1)
    return next((part for part in reversed(path.parent.parts[-3:]) if part.startswith("ses-")), None)


def split_sessions(cases: dict[str, list[ImageFile]]) -> dict[str, list[ImageFile]]:
    """One case per session for BIDS subjects imaged in several sessions.

    A subject with one session (or none) keeps the case id ``sub-X``; a subject with several
    gets ``sub-X_ses-Y`` per session (``sub-X`` for files without a session).
    """
    out: dict[str, list[ImageFile]] = {}
    for case, files in cases.items():
        sessions = {f.session for f in files if f.layout == "isles"}
        if len(sessions) < 2:
            out.setdefault(case, []).extend(files)
            continue
        for f in files:
            cid = f"{case}_{f.session}" if f.session else case
            out.setdefault(cid, []).append(replace(f, case_id=cid))
    return out


def scan_images(roots: Sequence[Path], skip: Sequence[Path] = ()) -> tuple[dict[str, list[ImageFile]], list[Problem]]:
    """Find all NIfTI files under ``roots`` and attribute them to cases.

    Files inside ``orig/`` (WMH's unprocessed copies) are ignored; other files that match no
    layout are reported as ``unrecognised_file``. Paths are resolved and de-duplicated.
    BIDS subjects with several sessions become one case per session (:func:`split_sessions`).
    """
    problems: list[Problem] = []
    seen: set[Path] = set()
    cases: dict[str, list[ImageFile]] = {}
    for root in roots:
        if not Path(root).is_dir():
            problems.append(Problem("", str(root), "missing_root", "image root is not a directory"))
            continue
        for here, names in _walk(Path(root), max_depth=8, skip=skip):
            if here.name == "orig":
                continue
            for name in names:
                if not _NII.search(name) or name.startswith("."):
                    continue
                path = (here / name).resolve()
                if path in seen:
                    continue
                seen.add(path)
                hit = classify_image(path)
                if hit is None:
                    problems.append(Problem(
                        "", str(path), "unrecognised_file",
                        "matches no known layout (BraTS, ISLES BIDS, WMH, flat all_data_Reg); ignored",
                    ))
                    continue
                case, seq, layout = hit
                modality = "seg" if seq.lower() in _SEG_NAMES else canonical_modality(seq)
                session = bids_session(path) if layout == "isles" else None
                cases.setdefault(case, []).append(ImageFile(case, seq, modality, path, layout, session))
    return split_sessions(cases), problems


def expected_path(files: Sequence[ImageFile], case: str, seq: str) -> str:
    """Where a missing ``<case>-<seq>`` volume would be, judged from the case's other files."""
    if not files:
        return f"{case}-{seq}.nii.gz"
    ref = files[0]
    if ref.layout in ("brats", "flat"):
        return str(ref.path.parent / f"{case}-{seq}.nii.gz")
    if ref.layout == "wmh":
        base = ref.path.parent if ref.path.parent.name == "pre" else ref.path.parent / "pre"
        return str(base / f"{seq}.nii.gz")
    prefix = ref.path.name.rsplit("_", 1)[0]
    folder = "anat" if canonical_modality(seq) in ("t1", "t2", "flair", "t1ce") else "dwi"
    ses_dir = ref.path.parent.parent if ref.path.parent.name in ("anat", "dwi") else ref.path.parent
    return str(ses_dir / folder / f"{prefix}_{seq}.nii.gz")


# --------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class Match:
    """What one report case id names among the image cases.

    ``cases`` holds one image case id (matched), several (ambiguous) or none; ``method`` is
    how the id was read: ``case_id`` (as is), ``subject`` / ``subject_session`` (BIDS),
    ``site_id`` / ``id`` (WMH 2017); ``reason`` says why none or several matched ("" if no hint).
    """

    cases: tuple[str, ...]
    method: str
    reason: str = ""

    @property
    def ambiguous(self) -> bool:
        return len(self.cases) > 1


def _site_key(site: str) -> str:
    """Normalised WMH site: lower case, any run of separators -> ``_`` (``"Amsterdam/GE3T"`` ->
    ``"amsterdam_ge3t"``)."""
    return re.sub(r"[\s_/\\-]+", "_", site.strip().lower()).strip("_")


def _wmh_key(site: str, number: str) -> str:
    """Normalised WMH id: ``"Amsterdam/GE3T", "0100"`` -> ``"amsterdam_ge3t_100"``; ``"", "7"`` -> ``"7"``."""
    key = _site_key(site)
    return f"{key}_{int(number)}" if key else str(int(number))


class CaseIndex:
    """The image cases under every id a report may use for them.

    BIDS cases are indexed by subject and session, WMH 2017 cases by ``<site>_<n>`` (also
    with the folder above the site, e.g. ``Amsterdam_GE3T_100``) and by ``<n>`` alone.
    """

    def __init__(self, image_cases: Mapping[str, Sequence[ImageFile]]) -> None:
        self.layouts = {case: files[0].layout for case, files in image_cases.items() if files}
        self.subjects: dict[str, dict[str | None, str]] = {}  # subject -> session -> case
        self.wmh: dict[str, set[str]] = {}  # normalised WMH id -> cases
        self.wmh_sites: set[str] = set()
        for case, files in image_cases.items():
            self._add_bids(case, files)
            self._add_wmh(case, files)

    def _add_bids(self, case: str, files: Sequence[ImageFile]) -> None:
        m = _BIDS_CASE.match(case)
        if m is None:
            return
        sessions = {f.session for f in files if f.layout == "isles"}
        session = next(iter(sessions)) if len(sessions) == 1 else m.group(2)
        self.subjects.setdefault(m.group(1).lower(), {})[session.lower() if session else None] = case

    def _add_wmh(self, case: str, files: Sequence[ImageFile]) -> None:
        f = next((f for f in files if f.layout == "wmh"), None)
        if f is not None:
            folder = f.path.parent.parent if f.path.parent.name == "pre" else f.path.parent
            site, upper, number = folder.parent.name, folder.parent.parent.name, folder.name
            if not number.isdigit():
                return
            keys = {_wmh_key(site, number), _wmh_key(f"{upper}_{site}", number), _wmh_key(upper, number),
                    _wmh_key("", number)}
            self.wmh_sites.add(_site_key(site))
        else:
            m = _WMH_CASE.match(case)
            if m is None or infer_subset(case) != "WMH":
                return
            keys = {_wmh_key(m.group(1), m.group(2)), _wmh_key("", m.group(2))}
        for key in keys:
            self.wmh.setdefault(key, set()).add(case)

    def resolve(self, report_id: str) -> Match:
        """The image case(s) that ``report_id`` (a case id as the reports spell it) names."""
        bids = _BIDS_CASE.match(report_id)
        if bids:
            return self._resolve_bids(report_id, bids.group(1), bids.group(2))
        if report_id in self.layouts:
            return Match((report_id,), "site_id" if self.layouts[report_id] == "wmh" else "case_id")
        wmh = _WMH_CASE.match(report_id)
        if wmh and self._looks_wmh(report_id, wmh.group(1)):
            return self._resolve_wmh(report_id, wmh.group(1), wmh.group(2))
        return Match((), "case_id")

    def _looks_wmh(self, report_id: str, site: str) -> bool:
        norm = _site_key(site)
        return not norm or infer_subset(report_id) == "WMH" or any(
            norm == s or norm.endswith("_" + s) for s in self.wmh_sites)

    def _resolve_bids(self, report_id: str, subject: str, session: str | None) -> Match:
        method = "subject_session" if session else "subject"
        groups = self.subjects.get(subject.lower(), {})
        if not groups:
            return Match((), method, f"no images of BIDS subject '{subject}' "
                                     f"(looked for {subject}/[ses-*/]{{anat,dwi}}/{subject}_*.nii.gz)")
        if session:
            hit = groups.get(session.lower()) or (groups[None] if set(groups) == {None} else None)
            if hit:
                return Match((hit,), method)
            held = ", ".join(sorted(g or "none" for g in groups))
            return Match((), method, f"the images of {subject} are of session(s) {held}, not {session}")
        if len(groups) == 1:
            return Match((next(iter(groups.values())),), method)
        cases = tuple(sorted(groups.values()))
        return Match(cases, method, f"'{report_id}' names no session but {subject} has images of several "
                                    f"({', '.join(cases)}); key its reports '<subject>_<session>'")

    def _resolve_wmh(self, report_id: str, site: str, number: str) -> Match:
        key = _wmh_key(site, number)
        method = "id" if key.isdigit() else "site_id"
        cases = tuple(sorted(self.wmh.get(key, ())))
        if len(cases) == 1:
            return Match(cases, method)
        if cases:
            return Match(cases, method, f"'{report_id}' fits several WMH cases ({', '.join(cases)}); "
                                        "key its reports '<site>_<id>'")
        where = f"{site.strip(' _/-')}/{int(number)}" if method == "site_id" else f"<site>/{int(number)}"
        return Match((), method, f"no WMH 2017 folder {where}/ with pre/T1.nii.gz or pre/FLAIR.nii.gz")


@dataclass
class SubsetMatching:
    """How one subset's report case ids met the image cases: one line of ``prepare``'s output.

    ``methods`` counts matched cases by :attr:`Match.method` (``"a+b"`` when a case's reports
    spell it both ways); ``separators`` counts the matched finding keys by the separator
    before the sequence.
    """

    subset: str
    methods: Counter[str] = field(default_factory=Counter)
    separators: Counter[str] = field(default_factory=Counter)
    unmatched: int = 0
    ambiguous: int = 0
    images_without_report: int = 0

    @property
    def matched(self) -> int:
        return sum(self.methods.values())

    def line(self) -> str:
        """E.g. ``WMH: 60 reports matched by site_id with '_' before the sequence; 0 unmatched``."""
        head = f"{self.subset}: {self.matched} report{'' if self.matched == 1 else 's'} matched"
        if len(self.methods) == 1:
            head += f" by {next(iter(self.methods))}"
        elif self.methods:
            head += " by " + ", ".join(f"{m} ({n})" for m, n in sorted(self.methods.items()))
        if len(self.separators) == 1:
            head += f" with '{next(iter(self.separators))}' before the sequence"
        elif self.separators:
            head += " with " + " and ".join(f"'{s}' ({n} keys)" for s, n in sorted(self.separators.items()))
            head += " before the sequence"
        parts = [head, f"{self.unmatched} unmatched" + (f" ({self.ambiguous} ambiguous)" if self.ambiguous else "")]
        if self.images_without_report:
            parts.append(f"{self.images_without_report} image case{'' if self.images_without_report == 1 else 's'}"
                         " without a report")
        return "; ".join(parts)


@dataclass
class ReportMatch:
    """Reports joined to image cases by :func:`match_reports`.

    ``entries``: image case id -> report entry (merged over the spellings that name it);
    ``unmatched``: report case id -> (entry, what was tried) for ids that name no single case.
    """

    entries: dict[str, ReportEntry]
    unmatched: dict[str, tuple[ReportEntry, Match]]
    subsets: dict[str, SubsetMatching]
    problems: list[Problem]


def _merge_entry(into: ReportEntry, other: ReportEntry, names: tuple[str, str], problems: list[Problem]) -> None:
    """Fold ``other`` into ``into`` (two spellings ``names`` of one case); the first text wins."""
    clashes: list[str] = []
    for seq, text in other.findings.items():
        if into.findings.setdefault(seq, text) != text:
            clashes.append(f"{seq} finding")
    into.finding_file = into.finding_file or other.finding_file
    if other.impression is not None:
        if into.impression is None:
            into.impression, into.diseases, into.impression_file = other.impression, other.diseases, other.impression_file
        elif (into.impression, into.diseases) != (other.impression, other.diseases):
            clashes.append("impression")
    if other.global_finding is not None:
        if into.global_finding is None:
            into.global_finding, into.global_file = other.global_finding, other.global_file
        elif into.global_finding != other.global_finding:
            clashes.append("global finding")
    into.separators.update(other.separators)
    if into.layout == "flat" and other.layout == "release":
        into.layout, into.subset = other.layout, other.subset
    if clashes:
        problems.append(Problem(into.case_id, other.finding_file or other.impression_file or other.global_file,
                                "report_conflict",
                                f"'{names[0]}' and '{names[1]}' name the same case with a different "
                                f"{', '.join(clashes)}; kept the text of '{names[0]}'"))


def match_reports(entries: Mapping[str, ReportEntry], index: CaseIndex) -> ReportMatch:
    """Join each report case id to its image case (see :meth:`CaseIndex.resolve`).

    Report entries that name one case (in any spelling) are merged under the image case id.
    """
    out: dict[str, ReportEntry] = {}
    first_name: dict[str, str] = {}
    methods: dict[str, set[str]] = {}
    unmatched: dict[str, tuple[ReportEntry, Match]] = {}
    subsets: dict[str, SubsetMatching] = {}
    problems: list[Problem] = []
    for report_id in sorted(entries):
        entry = entries[report_id]
        stats = subsets.setdefault(entry.subset, SubsetMatching(entry.subset))
        match = index.resolve(report_id)
        if len(match.cases) != 1:
            unmatched[report_id] = (entry, match)
            continue
        stats.separators.update(entry.separators)
        case = match.cases[0]
        methods.setdefault(case, set()).add(match.method)
        if case in out:
            _merge_entry(out[case], entry, (first_name[case], report_id), problems)
        else:
            out[case] = replace(entry, case_id=case, findings=dict(entry.findings), separators=Counter(entry.separators))
            first_name[case] = report_id
    for case, entry in out.items():
        subsets.setdefault(entry.subset, SubsetMatching(entry.subset)).methods["+".join(sorted(methods[case]))] += 1
    for entry, match in unmatched.values():
        stats = subsets[entry.subset]
        stats.unmatched += 1
        stats.ambiguous += match.ambiguous
    return ReportMatch(out, unmatched, subsets, problems)


def _unmatched_problem(entry: ReportEntry, match: Match) -> Problem:
    where = entry.finding_file or entry.impression_file or entry.global_file
    if match.ambiguous:
        return Problem(entry.case_id, where, "ambiguous_case", f"{match.reason}; skipped")
    hint = f" ({match.reason})" if match.reason else ""
    return Problem(entry.case_id, where, "no_images",
                   f"the reports mention this case but no volume was found under the report root or "
                   f"--images roots{hint}; skipped")


def split_resolver(index: CaseIndex, report_only: set[str]) -> Callable[[str], tuple[str, ...]]:
    """Map a split-file id (case or image id, any spelling) to the case ids it names.

    A BIDS subject listed without session names all its sessions (they share the split).
    """
    def as_case(item: str) -> tuple[str, ...]:
        match = index.resolve(item)
        if len(match.cases) == 1 or (match.ambiguous and match.method == "subject"):
            return match.cases
        return (item,) if item in report_only else ()

    def resolve(item: str) -> tuple[str, ...]:
        cases = as_case(item)
        key = parse_image_key(item)
        return cases or (as_case(key.case) if key.seq else ())

    return resolve


# --------------------------------------------------------------------------- join


@dataclass
class Collection:
    """What :func:`collect` found: the usable cases, the problem rows, and per subset how
    its reports met their images (:class:`SubsetMatching`, sorted by subset)."""

    cases: list[CaseSource]
    problems: list[Problem]
    matching: list[SubsetMatching]


def collect(radgenome_dir: Path, images: Sequence[Path] = (), skip: Sequence[Path] = ()) -> Collection:
    """Join reports, split and volumes into :class:`CaseSource` records.

    A case is kept only when it has reports (findings + impression with a known disease), at
    least one image modality, a volume for every sequence its findings mention, and no image
    file with an unknown modality or a duplicate. Everything else is a Problem row. Report
    ids are matched to image cases by :class:`CaseIndex` (the module docstring lists the
    accepted spellings); a case is named by its images.
    """
    radgenome_dir = Path(radgenome_dir)
    entries, split_path, problems = find_reports(radgenome_dir)
    roots = [radgenome_dir, *[Path(p) for p in images]]
    image_cases, scan_problems = scan_images(roots, skip=skip)
    problems += scan_problems
    index = CaseIndex(image_cases)
    matched = match_reports(entries, index)
    problems += matched.problems
    known = set(matched.entries) | set(image_cases) | set(matched.unmatched)
    splits, split_problems = read_split(split_path, known, split_resolver(index, set(matched.unmatched)))
    problems += split_problems

    out: list[CaseSource] = []
    for case in sorted(known):
        if case in matched.unmatched:
            problems.append(_unmatched_problem(*matched.unmatched[case]))
        if case not in image_cases:
            continue
        files = image_cases[case]
        entry = matched.entries.get(case)
        if entry is None:
            subset = infer_subset(case)
            matched.subsets.setdefault(subset, SubsetMatching(subset)).images_without_report += 1
            problems.append(Problem(case, str(files[0].path), "no_report",
                                    "images found but no report mentions this case; skipped"))
            continue
        source, case_problems = _join_case(entry, files, splits.get(case))
        problems += case_problems
        if source is not None:
            out.append(source)
    return Collection(out, problems, [matched.subsets[k] for k in sorted(matched.subsets)])


def collect_cases(
    radgenome_dir: Path, images: Sequence[Path] = (), skip: Sequence[Path] = ()
) -> tuple[list[CaseSource], list[Problem]]:
    """(cases, problems) of :func:`collect`."""
    found = collect(radgenome_dir, images, skip)
    return found.cases, found.problems


def _join_case(
    entry: ReportEntry, files: list[ImageFile], split: str | None
) -> tuple[CaseSource | None, list[Problem]]:
    case = entry.case_id
    fatal: list[Problem] = []
    notes: list[Problem] = []
    volumes: dict[str, Path] = {}
    segs: list[Path] = []
    for f in files:
        if f.modality is None:
            fatal.append(Problem(case, str(f.path), "unknown_modality",
                                 f"sequence '{f.seq}' is not a known modality ({', '.join(MODALITIES)} or "
                                 "aliases); rename or remove the file"))
        elif f.modality == "seg":
            segs.append(f.path)
        elif f.modality in volumes:
            fatal.append(Problem(case, str(f.path), "duplicate_volume",
                                 f"a second {f.modality} volume (first: {volumes[f.modality]}); keep one"))
        else:
            volumes[f.modality] = f.path
    if len(segs) > 1:
        fatal.append(Problem(case, str(segs[1]), "duplicate_volume",
                             f"a second lesion label file (first: {segs[0]}); keep one"))
    findings: dict[str, str] = {}
    for seq, text in entry.findings.items():
        mod = canonical_modality(seq)
        if mod is None:
            fatal.append(Problem(case, entry.finding_file, "unknown_modality",
                                 f"finding key '{case}-{seq}': '{seq}' is not a known modality"))
            continue
        if mod not in volumes:
            fatal.append(Problem(case, expected_path(files, case, seq), "missing_volume",
                                 f"the report has a {seq} finding but the volume file is missing"))
        findings[mod] = text
    if not entry.findings:
        fatal.append(Problem(case, entry.impression_file or entry.global_file, "missing_report",
                             "no modality-wise finding for this case"))
    diseases: list[str] = []
    if entry.impression is None:
        fatal.append(Problem(case, entry.finding_file, "missing_report", "no impression entry for this case"))
    else:
        diseases, unknown = normalise_diseases(entry.diseases or [])
        if unknown:
            notes.append(Problem(case, entry.impression_file, "unknown_disease",
                                 f"disease names {unknown} are not among {', '.join(DISEASES)}; dropped"))
        if not diseases:
            fatal.append(Problem(case, entry.impression_file, "unknown_disease",
                                 f"no disease among {', '.join(DISEASES)}; skipped"))
    if not volumes:
        fatal.append(Problem(case, str(files[0].path), "no_images", "only label files, no image modality"))
    if entry.global_finding is None and not fatal:
        notes.append(Problem(case, entry.finding_file, "missing_global_finding",
                             "no global finding; kept with an empty one"))
    if segs == [] and not fatal:
        notes.append(Problem(case, str(files[0].path.parent), "missing_mask",
                             "no lesion label file; kept with an empty mask (central slices only)"))
    if split is None and not fatal:
        notes.append(Problem(case, "", "unsplit", "no entry in the split file; kept in group 'unsplit'"))
    if fatal:
        return None, fatal + notes
    subset = entry.subset
    # WMH 2017 labels: 1 = WMH, 2 = other pathology. The release tree knows the source by its
    # subset folder; the flat layout stores each subject's seg in its disease's convention.
    wmh_convention = subset == "WMH" if entry.layout == "release" else diseases == ["wmh"]
    return CaseSource(
        case_id=case,
        subset=subset,
        split=split or UNSPLIT,
        diseases=tuple(diseases),
        volumes={m: volumes[m] for m in MODALITIES if m in volumes},
        seg=segs[0] if segs else None,
        findings={m: findings[m] for m in MODALITIES if m in findings},
        global_finding=entry.global_finding or "",
        impression=entry.impression or "",
        lesion_labels=(1,) if wmh_convention else None,
    ), notes
