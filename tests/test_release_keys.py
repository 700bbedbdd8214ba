"""`prepare` on report keys spelled as a real release may spell them (issue 15, item 3).

The RadGenome-Brain MRI release does not document how its JSON keys name the source cases.
These tests build tiny trees in the challenges' own layouts (BraTS 2023
``<case>/<case>-t1n.nii.gz``, ISLES'22 BIDS ``sub-X/ses-Y/dwi/sub-X_ses-Y_dwi.nii.gz`` +
``derivatives/.../*_msk``, WMH 2017 ``<site>/<n>/pre/FLAIR.nii.gz`` + ``wmh.nii.gz``) and
re-key the reports the ways seen in the wild: ``_`` before the sequence, BIDS ids with the
session, WMH ids with their site in several spellings or without it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from test_prepare import SEQS, finding_text, head, make_release, write_isles, write_nii, write_wmh
from typer.testing import CliRunner

from unibrain_cli.data.prepare import prepare
from unibrain_cli.data.sources import CaseIndex, parse_image_key, read_split, scan_images, split_resolver
from unibrain_cli.errors import UserError

BRATS, ISLES, WMH = "BraTS-GLI-00000-000", "sub-strokecase0001", "Utrecht_0"


# --------------------------------------------------------------------------- helpers


def rekey(
    rg: Path,
    subset: str,
    finding_case: Callable[[str], str],
    sep: str,
    report_case: Callable[[str], str] | None = None,
) -> None:
    """Rewrite one subset's release JSON (and its ids in the split file) with other keys.

    Finding keys become ``finding_case(case) + sep + seq``; impression and global-finding keys
    ``report_case(case)`` (default: ``finding_case(case)``); split ids follow the finding keys.
    """
    report_case = report_case or finding_case
    folder = rg / subset
    renamed: dict[str, str] = {}
    mwf = json.loads((folder / "modal_wise_finding.json").read_text())
    new_mwf = {}
    for key, text in mwf.items():
        case, _, seq = key.rpartition("-")
        renamed[key] = f"{finding_case(case)}{sep}{seq}"
        new_mwf[renamed[key]] = text
    (folder / "modal_wise_finding.json").write_text(json.dumps(new_mwf))
    for name in ("impression.json", "global_finding.json"):
        data = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({report_case(k): v for k, v in data.items()}))
    split = json.loads((rg / "train_val_test_split.json").read_text())
    split = {k: [renamed.get(i, i) for i in ids] for k, ids in split.items()}
    (rg / "train_val_test_split.json").write_text(json.dumps(split))


def add_report(rg: Path, subset: str, finding_keys: dict[str, str], case_key: str, disease: str) -> None:
    """Add one case's reports to a release subset folder (created if needed)."""
    folder = rg / subset
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in (("modal_wise_finding.json", finding_keys),
                        ("impression.json", {case_key: {"impression": f"Impression {case_key}.",
                                                        "disease": [disease]}}),
                        ("global_finding.json", {case_key: f"Global {case_key}."})):
        path = folder / name
        data = json.loads(path.read_text()) if path.is_file() else {}
        data.update(value)
        path.write_text(json.dumps(data))


def write_isles_session(images: Path, subject: str, session: str) -> None:
    """One ISLES'22 BIDS session: dwi/adc + derivatives mask (2 mm grid)."""
    root, stem = images / "ISLES-2022", f"{subject}_{session}"
    aff = np.array([[-2.0, 0, 0, 11.0], [0, 2.0, 0, -12.0], [0, 0, 2.0, -7.0], [0, 0, 0, 1]])
    for c, seq in enumerate(("dwi", "adc")):
        img, lesion = head((12, 12, 8), aff, "isles", c)
        write_nii(root / subject / session / "dwi" / f"{stem}_{seq}.nii.gz", img, aff)
    write_nii(root / "derivatives" / subject / session / f"{stem}_msk.nii.gz", lesion.astype(np.uint8), aff)


def touch(root: Path, *relpaths: str) -> None:
    """Empty files: scanning and matching never read voxels."""
    for rel in relpaths:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")


def problem_rows(out: Path) -> dict[tuple[str, str], str]:
    """(case_id, kind) -> reason of problems.csv."""
    frame = pd.read_csv(out / "problems.csv", keep_default_na=False)
    return {(r.case_id, r.kind): r.reason for r in frame.itertuples()}


# --------------------------------------------------------------------------- keys and ids


@pytest.mark.parametrize(("key", "case", "seq", "sep"), [
    ("BraTS-GLI-00000-000-t1n", "BraTS-GLI-00000-000", "t1n", "-"),
    ("BraTS-MEN-00004-000_T2F", "BraTS-MEN-00004-000", "T2F", "_"),
    ("Utrecht_0_FLAIR", "Utrecht_0", "FLAIR", "_"),
    ("Singapore_50_T1", "Singapore_50", "T1", "_"),
    ("Singapore_50-t1", "Singapore_50", "t1", "-"),
    ("GE3T_100_flair", "GE3T_100", "flair", "_"),
    ("sub-strokecase0001_ses-0001-dwi", "sub-strokecase0001_ses-0001", "dwi", "-"),
    ("sub-strokecase0001_ses-0001_ADC", "sub-strokecase0001_ses-0001", "ADC", "_"),
    ("sub-strokecase0001-dwi", "sub-strokecase0001", "dwi", "-"),
    ("sub-strokecase0001_FLAIR", "sub-strokecase0001", "FLAIR", "_"),
    ("patient_7-t2-flair", "patient_7", "t2-flair", "-"),  # a two-part alias is one name
    ("BraTS-GLI-00007-000-t3x", "BraTS-GLI-00007-000", "t3x", "-"),  # unknown: last separator
    ("Utrecht0FLAIR", "Utrecht0FLAIR", "", ""),
])
def test_parse_image_key(key, case, seq, sep):
    parsed = parse_image_key(key)
    assert (parsed.case, parsed.seq, parsed.sep) == (case, seq, sep)


def test_index_bids_subject_and_session(tmp_path):
    touch(tmp_path,
          "sub-strokecase0001/ses-0001/dwi/sub-strokecase0001_ses-0001_dwi.nii.gz",
          "derivatives/sub-strokecase0001/ses-0001/sub-strokecase0001_ses-0001_msk.nii.gz",
          "sub-strokecase0002/dwi/sub-strokecase0002_dwi.nii.gz",  # no session level
          "sub-strokecase0003/ses-0001/dwi/sub-strokecase0003_ses-0001_dwi.nii.gz",
          "sub-strokecase0003/ses-0002/dwi/sub-strokecase0003_ses-0002_dwi.nii.gz")
    cases, problems = scan_images([tmp_path])
    assert problems == []
    # one session: the subject id; several: one case per session
    assert sorted(cases) == ["sub-strokecase0001", "sub-strokecase0002",
                             "sub-strokecase0003_ses-0001", "sub-strokecase0003_ses-0002"]
    assert {f.session for f in cases["sub-strokecase0001"]} == {"ses-0001"}
    index = CaseIndex(cases)
    hit = index.resolve
    assert (hit("sub-strokecase0001").cases, hit("sub-strokecase0001").method) == (
        ("sub-strokecase0001",), "subject")
    assert (hit("sub-strokecase0001_ses-0001").cases, hit("sub-strokecase0001_ses-0001").method) == (
        ("sub-strokecase0001",), "subject_session")
    assert hit("sub-strokecase0002_ses-0001").cases == ("sub-strokecase0002",)  # images without session
    assert hit("sub-strokecase0003_ses-0002").cases == ("sub-strokecase0003_ses-0002",)
    several = hit("sub-strokecase0003")
    assert several.ambiguous and several.cases == ("sub-strokecase0003_ses-0001", "sub-strokecase0003_ses-0002")
    assert "names no session" in several.reason
    wrong = hit("sub-strokecase0001_ses-0002")
    assert wrong.cases == () and "ses-0001" in wrong.reason and "ses-0002" in wrong.reason
    assert hit("sub-strokecase0009").cases == () and "sub-strokecase0009" in hit("sub-strokecase0009").reason


def test_index_wmh_site_spellings(tmp_path):
    touch(tmp_path,
          "WMH/training/Utrecht/0/pre/FLAIR.nii.gz", "WMH/training/Utrecht/0/wmh.nii.gz",
          "WMH/training/Singapore/50/pre/T1.nii.gz",
          "WMH/test/Utrecht/50/pre/T1.nii.gz",  # number 50 at two sites
          "WMH/training/Amsterdam/GE3T/100/pre/FLAIR.nii.gz")
    cases, _ = scan_images([tmp_path])
    assert sorted(cases) == ["GE3T_100", "Singapore_50", "Utrecht_0", "Utrecht_50"]
    hit = CaseIndex(cases).resolve
    for spelling in ("Utrecht_0", "Utrecht/0", "utrecht-0", "Utrecht_000"):
        assert (hit(spelling).cases, hit(spelling).method) == (("Utrecht_0",), "site_id"), spelling
    for spelling in ("GE3T_100", "Amsterdam_GE3T_100", "Amsterdam/GE3T/100", "Amsterdam_100"):
        assert hit(spelling).cases == ("GE3T_100",), spelling
    assert (hit("0").cases, hit("0").method) == (("Utrecht_0",), "id")
    assert hit("100").cases == ("GE3T_100",)
    fifty = hit("50")
    assert fifty.ambiguous and fifty.cases == ("Singapore_50", "Utrecht_50") and "<site>_<id>" in fifty.reason
    missing = hit("Utrecht_7")
    assert missing.cases == () and "Utrecht/7/" in missing.reason
    # a BraTS id ending in digits is not taken for a WMH one
    assert hit("BraTS-GLI-00099-000").reason == ""


def test_split_ids_in_every_spelling(tmp_path):
    touch(tmp_path,
          "Utrecht/0/pre/FLAIR.nii.gz",
          "sub-strokecase0003/ses-0001/dwi/sub-strokecase0003_ses-0001_dwi.nii.gz",
          "sub-strokecase0003/ses-0002/dwi/sub-strokecase0003_ses-0002_dwi.nii.gz",
          "sub-strokecase0004/ses-0001/dwi/sub-strokecase0004_ses-0001_dwi.nii.gz")
    cases, _ = scan_images([tmp_path])
    index = CaseIndex(cases)
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["Utrecht_0_FLAIR", "sub-strokecase0003"],
                                "test": ["sub-strokecase0004_ses-0001-dwi", "Utrecht_9_T1"]}))
    splits, problems = read_split(path, set(cases), split_resolver(index, set()))
    # a subject listed without its session puts all its sessions in that split
    assert splits == {"Utrecht_0": "train", "sub-strokecase0003_ses-0001": "train",
                      "sub-strokecase0003_ses-0002": "train", "sub-strokecase0004": "test"}
    assert [(p.case_id, p.kind) for p in problems] == [("Utrecht_9_T1", "split_unknown_id")]


# --------------------------------------------------------------------------- prepare end to end


@pytest.fixture(scope="module")
def wild_release(tmp_path_factory):
    """BraTS as documented; WMH keyed ``<site>_<id>_<SEQ>``; ISLES keyed with the session,
    findings with ``-`` before the sequence and impressions without the session."""
    tmp = tmp_path_factory.mktemp("wild")
    make_release(tmp, {BRATS: "train", ISLES: "val", WMH: "test", "Singapore_50": "train"})
    rg = tmp / "radgenome"
    rekey(rg, "WMH", lambda c: c, "_")
    rekey(rg, "ISLES22", lambda c: f"{c}_ses-0001", "-", report_case=lambda c: c)
    res = prepare(rg, tmp / "prepared", images=[tmp / "images"])
    return tmp, res


def test_wild_keys_keep_every_case(wild_release):
    tmp, res = wild_release
    man = res.manifest.set_index("case_id")
    assert sorted(man.index) == [BRATS, "Singapore_50", WMH, ISLES]
    assert man.loc[WMH, ["subset", "split", "diseases", "modalities"]].tolist() == ["WMH", "test", "wmh", "t1|flair"]
    assert man.loc["Singapore_50", "split"] == "train"
    # findings keyed by subject + session and the impression keyed by subject meet in one case
    assert man.loc[ISLES, ["subset", "split", "diseases", "modalities"]].tolist() == [
        "ISLES22", "val", "stroke", "flair|dwi|adc"]
    assert man.loc[ISLES, "impression"] == f"Impression for {ISLES}."
    assert json.loads(man.loc[ISLES, "findings"])["dwi"] == finding_text(ISLES, "dwi")
    assert json.loads(man.loc[WMH, "findings"]) == {"t1": finding_text(WMH, "T1"), "flair": finding_text(WMH, "FLAIR")}
    assert (tmp / "prepared" / "cases" / WMH / "flair.nii.gz").is_file()
    assert problem_rows(tmp / "prepared") == {}


def test_wild_keys_matching_summary(wild_release):
    _, res = wild_release
    assert res.matching == [
        "BraTS_GLI: 1 report matched by case_id with '-' before the sequence; 0 unmatched",
        "ISLES22: 1 report matched by subject+subject_session with '-' before the sequence; 0 unmatched",
        "WMH: 2 reports matched by site_id with '_' before the sequence; 0 unmatched",
    ]


def test_isles_underscore_keys_and_several_sessions(tmp_path):
    """Subject 1: one session, keys ``..._ses-0001_dwi``. Subject 2: two sessions keyed by
    session (both kept). Subject 3: two sessions, reports without the session (ambiguous)."""
    images, rg = tmp_path / "images", tmp_path / "radgenome"
    write_isles(images, "sub-strokecase0001")
    for subject in ("sub-strokecase0002", "sub-strokecase0003"):
        for session in ("ses-0001", "ses-0002"):
            write_isles_session(images, subject, session)
    add_report(rg, "ISLES22", {f"sub-strokecase0001_ses-0001_{s}": finding_text("sub-strokecase0001", s)
                               for s in SEQS["isles"]}, "sub-strokecase0001_ses-0001", "stroke")
    for session in ("ses-0001", "ses-0002"):
        cid = f"sub-strokecase0002_{session}"
        add_report(rg, "ISLES22", {f"{cid}_{s}": finding_text(cid, s) for s in ("DWI", "ADC")}, cid, "stroke")
    add_report(rg, "ISLES22", {f"sub-strokecase0003_{s}": "text" for s in ("dwi", "adc")},
               "sub-strokecase0003", "stroke")
    (rg / "train_val_test_split.json").write_text(json.dumps({
        "train": ["sub-strokecase0001_ses-0001_dwi", "sub-strokecase0002_ses-0001_DWI"],
        "test": ["sub-strokecase0002_ses-0002_ADC", "sub-strokecase0003_dwi"],
    }))

    res = prepare(rg, tmp_path / "prep", images=[images])

    man = res.manifest.set_index("case_id")
    assert man["split"].to_dict() == {"sub-strokecase0001": "train", "sub-strokecase0002_ses-0001": "train",
                                      "sub-strokecase0002_ses-0002": "test"}
    assert man.loc["sub-strokecase0001", "modalities"] == "flair|dwi|adc"
    assert man.loc["sub-strokecase0002_ses-0002", "modalities"] == "dwi|adc"
    src = json.loads(man.loc["sub-strokecase0002_ses-0002", "source_files"])
    assert all("ses-0002" in p for p in src.values())
    rows = problem_rows(tmp_path / "prep")
    assert set(rows) == {("sub-strokecase0003", "ambiguous_case"),
                         ("sub-strokecase0003_ses-0001", "no_report"), ("sub-strokecase0003_ses-0002", "no_report")}
    reason = rows[("sub-strokecase0003", "ambiguous_case")]
    assert "sub-strokecase0003_ses-0001" in reason and "sub-strokecase0003_ses-0002" in reason
    assert "names no session" in reason
    assert res.matching == [
        "ISLES22: 3 reports matched by subject_session with '_' before the sequence; 1 unmatched (1 ambiguous); "
        "2 image cases without a report",
    ]


def test_wmh_sites_spellings_and_ids_without_site(tmp_path):
    """WMH 2017 tree with the Amsterdam/GE3T nesting; reports keyed ``Utrecht/0``,
    ``Amsterdam_GE3T_100`` and ``50`` (id alone, unique) with ``-`` or ``_`` before the sequence."""
    images, rg = tmp_path / "images", tmp_path / "radgenome"
    write_wmh(images, "Utrecht_0")
    write_wmh(images, "Singapore_50")
    write_wmh(images, "Amsterdam/GE3T_100")  # -> WMH2017/training/Amsterdam/GE3T/100/{pre/*,wmh}.nii.gz
    add_report(rg, "WMH", {f"Utrecht/0-{s}": finding_text("Utrecht/0", s) for s in SEQS["wmh"]}, "Utrecht/0", "wmh")
    add_report(rg, "WMH", {f"Amsterdam_GE3T_100_{s}": "text" for s in ("t1", "t2f")}, "Amsterdam_GE3T_100", "wmh")
    add_report(rg, "WMH", {f"50_{s}": "text" for s in SEQS["wmh"]}, "50", "WMH")
    add_report(rg, "WMH", {"Utrecht_7_FLAIR": "text"}, "Utrecht_7", "wmh")  # no such folder
    # a key with no separator; and the impression of 'Utrecht/0' again, spelled and worded otherwise
    add_report(rg, "WMH", {"Utrecht0FLAIR": "text"}, "Utrecht_0", "wmh")
    (rg / "train_val_test_split.json").write_text(json.dumps({"train": ["Utrecht/0", "GE3T_100_FLAIR"],
                                                              "test": ["50_T1"]}))

    res = prepare(rg, tmp_path / "prep", images=[images])

    man = res.manifest.set_index("case_id")
    assert man["split"].to_dict() == {"GE3T_100": "train", "Singapore_50": "test", "Utrecht_0": "train"}
    assert set(man["subset"]) == {"WMH"} and set(man["modalities"]) == {"t1|flair"}
    assert json.loads(man.loc["Utrecht_0", "findings"])["t1"] == finding_text("Utrecht/0", "T1")
    assert json.loads(man.loc["GE3T_100", "findings"]) == {"t1": "text", "flair": "text"}
    labels = np.asarray(nib.load(str(tmp_path / "prep" / "cases" / "GE3T_100" / "labels.nii.gz")).dataobj)
    assert set(np.unique(labels)) == {0, 1, 2}  # the WMH label convention holds for the nested site too
    assert man.loc["Utrecht_0", "impression"] == "Impression Utrecht/0."
    rows = problem_rows(tmp_path / "prep")
    assert set(rows) == {("Utrecht_7", "no_images"), ("Utrecht0FLAIR", "bad_json"), ("Utrecht_0", "report_conflict")}
    assert rows[("Utrecht_0", "report_conflict")] == (
        "'Utrecht/0' and 'Utrecht_0' name the same case with a different impression, global finding; "
        "kept the text of 'Utrecht/0'")
    assert "no WMH 2017 folder Utrecht/7/" in rows[("Utrecht_7", "no_images")]
    assert "'<case>_<sequence>'" in rows[("Utrecht0FLAIR", "bad_json")]
    assert res.matching == [
        "WMH: 3 reports matched by id (1), site_id (2) with '-' (2 keys) and '_' (4 keys) before the sequence; "
        "1 unmatched",
    ]


def test_nothing_matched_is_still_one_user_error(tmp_path):
    """Reports whose ids meet no image: no case, one UserError, problems.csv says why."""
    images, rg = tmp_path / "images", tmp_path / "radgenome"
    write_wmh(images, "Utrecht_0")
    add_report(rg, "WMH", {"Utrecht_3_FLAIR": "text"}, "Utrecht_3", "wmh")
    lines: list[str] = []
    with pytest.raises(UserError, match="no case could be prepared"):
        prepare(rg, tmp_path / "prep", images=[images], echo=lines.append)
    # the matching summary came before the failure
    assert lines == ["WMH: 0 reports matched; 1 unmatched; 1 image case without a report"]
    assert set(problem_rows(tmp_path / "prep")) == {("Utrecht_3", "no_images"), ("Utrecht_0", "no_report"),
                                                    ("", "missing_split")}
    assert not (tmp_path / "prep" / "manifest.parquet").exists()


# --------------------------------------------------------------------------- the command


def test_cli_prints_matching_lines(wild_release, tmp_path):
    from unibrain_cli.cli.app import app

    tmp, _ = wild_release
    runner = CliRunner()
    res = runner.invoke(app, ["prepare", str(tmp / "radgenome"), "--images", str(tmp / "images"),
                              "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert "WMH: 2 reports matched by site_id with '_' before the sequence; 0 unmatched" in res.output
    assert "ISLES22: 1 report matched by subject+subject_session" in res.output
    res = runner.invoke(app, ["prepare", str(tmp / "radgenome"), "--images", str(tmp / "images"),
                              "--out", str(tmp_path / "p"), "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["prepared"] == 0 and len(payload["matching"]) == 3


def test_cli_bad_input_one_line_exit_2(tmp_path):
    from unibrain_cli.cli.app import app

    res = CliRunner().invoke(app, ["prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "p")])
    assert res.exit_code == 2
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "nope" in lines[0] and "Traceback" not in res.output
    assert not (tmp_path / "p").exists()
