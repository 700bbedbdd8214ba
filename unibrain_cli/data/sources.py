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

Nothing here reads voxels: it only decides which files belong to which case. Every input
that cannot be used becomes a :class:`Problem` row (``case_id, file, kind, reason``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
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
_SUBSET_BY_NAME = (
    (re.compile(r"^BraTS-GLI-", re.I), "BraTS_GLI"),
    (re.compile(r"^BraTS-MEN-", re.I), "BraTS_MEN"),
    (re.compile(r"^BraTS-MET-", re.I), "BraTS_MET"),
    (re.compile(r"^BraTS-", re.I), "BraTS"),
    (re.compile(r"^sub-strokecase", re.I), "ISLES22"),
    (re.compile(r"^(Utrecht|Singapore|GE3T|Amsterdam)_", re.I), "WMH"),
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
    """A NIfTI file attributed to a case. ``modality`` is canonical, ``"seg"``, or None (unknown)."""

    case_id: str
    seq: str
    modality: str | None
    path: Path
    layout: str  # "brats" | "flat" | "isles" | "wmh"


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


def split_image_id(image_id: str) -> tuple[str, str]:
    """``"<case>-<seq>"`` -> (case, seq). Case ids may contain dashes; the seq never does."""
    case, _, seq = image_id.rpartition("-")
    return (case, seq) if case else (image_id, "")


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
        case, seq = split_image_id(str(image_id))
        if not seq:
            problems.append(Problem(case, str(files[0]), "bad_json", f"key '{image_id}' is not '<case>-<sequence>'"))
            continue
        e = entry(case)
        e.findings[seq] = str(text)
        e.finding_file = str(files[0])
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


def read_split(path: Path | None, known_cases: Iterable[str]) -> tuple[dict[str, str], list[Problem]]:
    """Read the split file tolerantly; returns (case id -> split, problems).

    Accepts lists of image ids (``<case>-<seq>``) or case ids under keys like
    train/training, val/valid/validation, test/testing (any letter case), also nested one
    level per subset. Unknown keys and ids that match no known case are reported.
    """
    problems: list[Problem] = []
    if path is None:
        problems.append(Problem("", SPLIT_FILE, "missing_split", "no split file found; every case is 'unsplit'"))
        return {}, problems
    data = read_json(path, problems)
    if data is None:
        return {}, problems
    known = set(known_cases)
    votes: dict[str, set[str]] = {}

    def visit(node: Any, trail: str) -> None:
        for key, value in node.items():
            split = _SPLIT_ALIASES.get(str(key).strip().lower())
            if split is not None and isinstance(value, list):
                for item in value:
                    case = _case_of_id(str(item), known)
                    if case is None:
                        problems.append(Problem(
                            str(item), str(path), "split_unknown_id",
                            f"'{item}' under '{trail}{key}' matches no case with reports or images; ignored",
                        ))
                    else:
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


def _case_of_id(item: str, known: set[str]) -> str | None:
    if item in known:
        return item
    case, seq = split_image_id(item)
    return case if seq and case in known else None


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


def scan_images(roots: Sequence[Path], skip: Sequence[Path] = ()) -> tuple[dict[str, list[ImageFile]], list[Problem]]:
    """Find all NIfTI files under ``roots`` and attribute them to cases.

    Files inside ``orig/`` (WMH's unprocessed copies) are ignored; other files that match no
    layout are reported as ``unrecognised_file``. Paths are resolved and de-duplicated.
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
                cases.setdefault(case, []).append(ImageFile(case, seq, modality, path, layout))
    return cases, problems


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


# --------------------------------------------------------------------------- join


def collect_cases(
    radgenome_dir: Path, images: Sequence[Path] = (), skip: Sequence[Path] = ()
) -> tuple[list[CaseSource], list[Problem]]:
    """Join reports, split and volumes into :class:`CaseSource` records.

    A case is kept only when it has reports (findings + impression with a known disease), at
    least one image modality, a volume for every sequence its findings mention, and no image
    file with an unknown modality or a duplicate. Everything else is a Problem row.
    """
    radgenome_dir = Path(radgenome_dir)
    entries, split_path, problems = find_reports(radgenome_dir)
    roots = [radgenome_dir, *[Path(p) for p in images]]
    image_cases, scan_problems = scan_images(roots, skip=skip)
    problems += scan_problems
    splits, split_problems = read_split(split_path, set(entries) | set(image_cases))
    problems += split_problems

    out: list[CaseSource] = []
    for case in sorted(set(entries) | set(image_cases)):
        files = image_cases.get(case, [])
        entry = entries.get(case)
        if entry is None:
            problems.append(Problem(case, str(files[0].path), "no_report",
                                    "images found but no report mentions this case; skipped"))
            continue
        if not files:
            where = entry.finding_file or entry.impression_file or entry.global_file
            problems.append(Problem(case, where, "no_images",
                                    "the reports mention this case but no volume was found under the "
                                    "report root or --images roots; skipped"))
            continue
        source, case_problems = _join_case(entry, files, splits.get(case))
        problems += case_problems
        if source is not None:
            out.append(source)
    return out, problems


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
