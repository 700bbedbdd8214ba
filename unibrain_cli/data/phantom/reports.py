"""Radiology-style text for phantom cases, measured from the rendered case so it is true to the image.

Facts (:class:`LesionFacts`) come from the written lesion mask and the lesion plan:

- the *measured region*: all lesion voxels (glioma, meningioma, stroke) or the largest
  connected lesion (metastasis; WMH: largest label-1 focus);
- size: bounding-box extents of the measured region in mm along world x, y, z ("W*H*Dmm");
- side: 'bilateral' when each hemisphere holds >= 20 % of the location voxels, else the
  majority side; lobe: the most frequent :func:`~.anatomy.lobe_at` lobe of those voxels
  (location voxels: the measured region; for WMH all WMH voxels), in MNI space;
- signal words: each compartment's pure signal over the reference tissue's (white matter;
  grey matter for meningioma) for each contrast, from the same signal equations as the images.

Texts name the main lesion's side, lobe and size before anything else, so the first side,
lobe and size phrase of every text is the measured one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from unibrain_cli.data.phantom.anatomy import lobe_at
from unibrain_cli.data.phantom.lesions import WMH_LESION, LesionPlan
from unibrain_cli.data.phantom.physics import NORMAL, contrast_signal
from unibrain_cli.modalities import DISPLAY_NAMES, MODALITIES

LOCATION_SHARE = 0.2


@dataclass(frozen=True)
class LesionFacts:
    """What a report may state about a case (all measured or true by construction)."""

    disease: str
    side: str
    lobe: str
    lobes: tuple[str, ...]
    size_mm: tuple[int, int, int]
    count: int
    oedema: str
    pattern: str
    mass_effect: bool
    midline_shift_mm: float
    appearance: dict[str, dict[str, str]]
    adc: dict[str, float]
    other_lobes: tuple[str, ...] = ()
    info: dict[str, object] = field(default_factory=dict)


def extent_mm(mask: np.ndarray, spacing: np.ndarray) -> tuple[int, int, int]:
    """Bounding-box extents (mm, rounded) of a boolean 3D ``mask`` on an axis-aligned grid."""
    idx = np.argwhere(mask)
    span = idx.max(0) - idx.min(0) + 1
    return tuple(int(round(float(s))) for s in span * np.asarray(spacing))  # type: ignore[return-value]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean ``mask``."""
    lab, n = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (1 + int(np.argmax(sizes)))


def measured_region(labels: np.ndarray, disease: str) -> np.ndarray:
    """Boolean mask of the region whose size a report states (see the module docstring)."""
    if disease == "wmh":
        return largest_component(labels == WMH_LESION)
    if disease == "metastasis":
        return largest_component(labels > 0)
    return labels > 0


def count_lesions(labels: np.ndarray, disease: str) -> int:
    """Separate lesions: 26-connected components of enhancing tissue (label 3) for metastases,
    of any lesion label otherwise."""
    mask = labels == 3 if disease == "metastasis" else labels > 0
    return int(ndi.label(mask, structure=np.ones((3, 3, 3), bool))[1])


def location_region(labels: np.ndarray, disease: str) -> np.ndarray:
    """Boolean mask of the voxels that define side and lobe."""
    if disease == "wmh":
        return labels == WMH_LESION
    return measured_region(labels, disease)


def side_of(x_mni: np.ndarray) -> str:
    """'left', 'right' or 'bilateral' from the MNI x of the location voxels."""
    left = float(np.mean(x_mni < 0))
    if min(left, 1 - left) >= LOCATION_SHARE:
        return "bilateral"
    return "left" if left >= 0.5 else "right"


def lobes_of(mni: np.ndarray) -> tuple[str, ...]:
    """Lobes holding >= 20 % of the points (N, 3), most frequent first (always at least one)."""
    counts = Counter(lobe_at(mni).tolist()).most_common()
    top = [counts[0][0]] + [name for name, c in counts[1:] if c >= LOCATION_SHARE * len(mni)]
    return tuple(top)


def intensity_word(ratio: float) -> str:
    """Signal relative to the reference tissue -> radiology word."""
    if ratio < 0.6:
        return "markedly hypointense"
    if ratio < 0.88:
        return "hypointense"
    if ratio < 0.95:
        return "slightly hypointense"
    if ratio <= 1.06:
        return "isointense"
    if ratio <= 1.15:
        return "slightly hyperintense"
    if ratio <= 1.8:
        return "hyperintense"
    return "markedly hyperintense"


def measure(plan: LesionPlan, labels: np.ndarray, mni_of: np.ndarray, spacing: np.ndarray) -> LesionFacts:
    """Facts of a case from its mask ``labels`` (3D), MNI coordinates ``mni_of`` (3, *labels.shape)
    of its voxels (lesion space) and voxel ``spacing`` (mm)."""
    disease = plan.disease
    region = measured_region(labels, disease)
    if not region.any():
        raise ValueError(f"{disease} lesion is empty on this grid")
    loc = location_region(labels, disease)
    pts = mni_of[:, loc].T
    lobes = lobes_of(pts)
    side = side_of(pts[:, 0])
    n_lesions = count_lesions(labels, disease)
    others: tuple[str, ...] = ()
    if disease == "metastasis" and n_lesions > 1:
        rest = (labels > 0) & ~region
        others = tuple(dict.fromkeys(lobe_at(mni_of[:, rest].T).tolist()))
    core = np.isin(labels, (1, 3)).sum()
    oed = (labels == 2).sum()
    if disease in ("stroke", "wmh") or oed == 0:
        oedema = "none"
    else:
        ratio = oed / max(core, 1)
        oedema = "mild" if ratio < 0.5 else "moderate" if ratio < 2.0 else "extensive"
    shift = plan.midline_shift_mm()
    mass = any(me.amplitude * me.radius >= 3.0 for me in plan.mass_effects)
    ref = NORMAL["gm"] if disease == "meningioma" else NORMAL["wm"]
    appearance: dict[str, dict[str, str]] = {}
    adc: dict[str, float] = {}
    for comp in plan.compartments:
        if comp.role in adc:
            continue
        adc[comp.role] = comp.params.adc
        for mod in MODALITIES:
            ratio = contrast_signal(comp.params, mod) / contrast_signal(ref, mod)
            appearance.setdefault(mod, {})[comp.role] = intensity_word(ratio)
        gain = contrast_signal(comp.params, "t1ce") / contrast_signal(comp.params, "t1")
        appearance.setdefault("enhancement", {})[comp.role] = "enhancing" if gain >= 1.15 else "non-enhancing"
    count = int(plan.info.get("count", n_lesions)) if disease == "wmh" else n_lesions
    return LesionFacts(disease, side, lobes[0], lobes, extent_mm(region, spacing), count, oedema,
                       str(plan.info.get("pattern", "none")), mass, shift, appearance, adc, others, dict(plan.info))


# ----------------------------------------------------------------------------------------------
# text

def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def size_text(size: tuple[int, int, int]) -> str:
    return f"{size[0]}*{size[1]}*{size[2]}mm"


def location_text(f: LesionFacts) -> str:
    """E.g. 'left frontal lobe', 'right frontal and parietal lobes', 'bilateral frontal lobes'."""
    names = list(f.lobes[:2])
    noun = "lobes" if len(names) > 1 or f.side == "bilateral" else "lobe"
    if f.lobe == "cerebellum":
        return f"{f.side} cerebellar hemisphere" if f.side != "bilateral" else "cerebellum bilaterally"
    return f"{f.side} {' and '.join(n for n in names if n != 'cerebellum') or names[0]} {noun}"


_SUBJECT = {
    "glioma": ["an irregular intra-axial mass", "a heterogeneous space-occupying lesion", "an infiltrative mass"],
    "meningioma": ["a well-circumscribed extra-axial mass", "a dural-based extra-axial mass",
                   "a broad-based extra-axial lesion"],
    "metastasis": ["a round lesion", "a well-defined rounded lesion", "a nodular lesion"],
    "stroke": ["a wedge-shaped lesion", "a territorial area of abnormal signal", "a wedge-shaped cortical-subcortical lesion"],
    "wmh": ["patchy white matter lesions", "multiple white matter foci", "scattered white matter lesions"],
}

_ROLE_NOUN = {
    "enhancing": "solid tumour", "necrosis": "necrotic centre", "core": "tumour", "oedema": "surrounding oedema",
    "meningioma": "mass", "tail": "dural tail", "infarct": "lesion", "wmh": "lesions", "lacune": "lacune",
}

_PLURAL = {"lesions"}

_MAIN_ROLE = {"glioma": ("enhancing", "core"), "meningioma": ("meningioma",), "metastasis": ("enhancing",),
              "stroke": ("infarct",), "wmh": ("wmh",)}


def _be(noun: str) -> str:
    return "are" if noun in _PLURAL else "is"


def _main_role(f: LesionFacts) -> str:
    return next(r for r in _MAIN_ROLE[f.disease] if r in f.adc)


def _intro(f: LesionFacts, rng: np.random.Generator) -> str:
    """First sentence: subject, location and size (always in this order)."""
    loc, size = location_text(f), size_text(f.size_mm)
    subj = _pick(rng, _SUBJECT[f.disease])
    if f.disease == "metastasis" and f.count > 1:
        subj = f"{f.count} round lesions, the largest"
        return _pick(rng, [f"There are {subj} in the {loc}, measuring {size}.",
                           f"{subj.capitalize()} located in the {loc} measures about {size}."])
    if f.disease == "wmh":
        where = "periventricular and deep white matter" if f.side == "bilateral" else "white matter"
        return _pick(rng, [
            f"There are {subj} in the {where}, {f.side}, predominantly in the {location_text(f)}; "
            f"the largest measures {size}.",
            f"{subj.capitalize()} are seen in the {location_text(f)} ({where}), the largest about {size}.",
        ])
    return _pick(rng, [
        f"There is {subj} in the {loc}, measuring {size}.",
        f"{subj[0].upper() + subj[1:]} is seen in the {loc}, about {size} in size.",
        f"In the {loc} there is {subj} measuring approximately {size}.",
    ])


def _appearance(f: LesionFacts, mod: str, rng: np.random.Generator) -> str:
    """Signal of the lesion parts on ``mod`` (T1, T2, FLAIR, T1ce, DWI or ADC)."""
    name = DISPLAY_NAMES[mod]
    words = f.appearance[mod]
    main = _main_role(f)
    if mod == "t1ce":
        return _enhancement_text(f, rng)
    if mod == "adc":
        return _adc_text(f, rng)
    noun = _ROLE_NOUN[main]
    parts = [_pick(rng, [f"The {noun} {_be(noun)} {words[main]} on {name}",
                         f"{'They appear' if _be(noun) == 'are' else 'It appears'} {words[main]} on {name}"])]
    if "necrosis" in words:
        parts.append(f"with a {words['necrosis']} {_ROLE_NOUN['necrosis']}")
    if mod == "dwi":
        restricted = f.adc[main] < 0.6
        parts.append("consistent with restricted diffusion" if restricted
                     else _pick(rng, ["without restricted diffusion", "with no diffusion restriction"]))
    text = " ".join(parts) + "."
    if "oedema" in words and mod in ("t1", "t2", "flair"):
        text += " " + _pick(rng, [f"There is {f.oedema} perilesional oedema, {words['oedema']} on {name}.",
                                  f"The {f.oedema} surrounding oedema is {words['oedema']} on {name}."])
    if "lacune" in words and mod in ("t1", "flair"):
        text += f" A small lacune with CSF-like signal is also seen ({words['lacune']} on {name})."
    return text


def _enhancement_text(f: LesionFacts, rng: np.random.Generator) -> str:
    if f.pattern == "ring":
        text = _pick(rng, ["After contrast there is irregular ring enhancement around a non-enhancing necrotic core.",
                           "Post-contrast T1 shows rim enhancement surrounding central necrosis."])
        if f.disease == "metastasis" and len(set(f.info.get("patterns", ()))) > 1:
            text += " Smaller lesions enhance nodularly."
        return text
    if f.pattern == "homogeneous":
        text = _pick(rng, ["The mass shows intense homogeneous enhancement after contrast",
                           "Post-contrast T1 shows avid, homogeneous enhancement"])
        return text + (", with a dural tail." if f.info.get("dural_tail") else ".")
    if f.pattern == "nodular":
        return _pick(rng, ["The lesions show nodular enhancement after contrast.",
                           "Post-contrast T1 shows solid nodular enhancement."])
    return _pick(rng, ["No abnormal enhancement after contrast.", "There is no enhancement on post-contrast T1."])


def _adc_text(f: LesionFacts, rng: np.random.Generator) -> str:
    main = _main_role(f)
    val = f.adc[main]
    word = f.appearance["adc"][main]
    if val < 0.6:
        text = (f"The {_ROLE_NOUN[main]} {_be(_ROLE_NOUN[main])} {word} on ADC (about {val:.2f} x10^-3 mm^2/s), "
                "confirming restricted diffusion.")
    else:
        text = _pick(rng, [f"The {_ROLE_NOUN[main]} {_be(_ROLE_NOUN[main])} {word} on ADC (about {val:.2f} x10^-3 mm^2/s), without restriction.",
                           f"ADC of the {_ROLE_NOUN[main]} is about {val:.2f} x10^-3 mm^2/s ({word}); no restricted diffusion."])
    if "necrosis" in f.adc:
        text += f" The necrotic centre has high ADC (about {f.adc['necrosis']:.2f} x10^-3 mm^2/s)."
    if "oedema" in f.adc:
        text += f" The oedema shows increased ADC (about {f.adc['oedema']:.2f} x10^-3 mm^2/s)."
    return text


def _mass_text(f: LesionFacts, rng: np.random.Generator) -> str:
    if not f.mass_effect:
        return _pick(rng, ["No significant mass effect.", "There is no mass effect."])
    shift = round(f.midline_shift_mm)
    tail = (f"with midline shift of about {shift} mm" if shift >= 2 else "without midline shift")
    return _pick(rng, [f"There is mass effect on the adjacent sulci and ventricle, {tail}.",
                       f"Local mass effect is present, {tail}."])


def _extra_location(f: LesionFacts) -> str:
    if f.disease == "metastasis" and f.other_lobes:
        return f" Further lesions are seen in the {' and '.join(f.other_lobes)} {'lobes' if len(f.other_lobes) > 1 else 'lobe'}."
    if f.disease == "stroke":
        return f" The distribution corresponds to the {f.info['territory']} territory."
    if f.disease == "wmh":
        return f" The appearance corresponds to Fazekas grade {f.info['grade']}."
    return ""


def modality_finding(f: LesionFacts, mod: str, rng: np.random.Generator) -> str:
    """Finding for one modality: location and size first, then that modality's appearance."""
    text = _intro(f, rng) + " " + _appearance(f, mod, rng) + _extra_location(f)
    if mod in ("t1", "t2", "flair", "t1ce") and f.disease in ("glioma", "meningioma", "metastasis"):
        text += " " + _mass_text(f, rng)
    return text


def global_finding(f: LesionFacts, modalities: tuple[str, ...], rng: np.random.Generator) -> str:
    """Case-level finding over the modalities present (canonical names)."""
    main = _main_role(f)
    groups: dict[str, list[str]] = {}
    for mod in modalities:
        if mod in ("t1", "t2", "flair", "dwi"):
            groups.setdefault(f.appearance[mod][main], []).append(DISPLAY_NAMES[mod])
    signal = "; ".join(f"{w} on {' and '.join(ms)}" for w, ms in groups.items())
    text = _intro(f, rng)
    if signal:
        text += f" The {_ROLE_NOUN[main]} {_be(_ROLE_NOUN[main])} {signal}."
    if "oedema" in f.adc and f.oedema != "none":
        text += f" There is {f.oedema} perilesional oedema."
    if "t1ce" in modalities:
        text += " " + _enhancement_text(f, rng)
    if "adc" in modalities or "dwi" in modalities:
        text += (" Diffusion is restricted." if f.adc[main] < 0.6 else " There is no restricted diffusion.")
    text += _extra_location(f)
    if f.disease in ("glioma", "meningioma", "metastasis"):
        text += " " + _mass_text(f, rng)
    text += " " + _pick(rng, ["The rest of the brain parenchyma is unremarkable.",
                              "No other abnormality is seen.", "The remaining brain appears normal."])
    return text


def impression(f: LesionFacts, rng: np.random.Generator) -> dict[str, object]:
    """{"impression": str, "disease": [str]} for the case."""
    loc = location_text(f)
    if f.disease == "glioma":
        text = (f"{loc.capitalize()} intra-axial mass with ring enhancement and central necrosis, "
                f"{_pick(rng, ['consistent with', 'suggestive of'])} a high-grade glioma."
                if f.pattern == "ring" else
                f"{loc.capitalize()} non-enhancing infiltrative mass, {_pick(rng, ['consistent with', 'suggestive of'])} "
                "a low-grade glioma.")
    elif f.disease == "meningioma":
        text = f"{loc.capitalize()} extra-axial enhancing mass with dural tail, {_pick(rng, ['consistent with', 'typical of'])} a meningioma."
    elif f.disease == "metastasis":
        many = f.count > 1
        text = (f"{'Multiple' if many else 'Solitary'} enhancing {'lesions' if many else 'lesion'} with "
                f"disproportionate oedema, the {'largest' if many else 'lesion'} in the {loc}, "
                f"{_pick(rng, ['consistent with', 'suggestive of'])} {'metastases' if many else 'a metastasis'}.")
    elif f.disease == "stroke":
        text = f"Acute ischaemic infarct in the {loc} ({f.info['territory']} territory) with restricted diffusion."
    else:
        text = (f"{_pick(rng, ['White matter hyperintensities', 'White matter lesions'])}, {loc}, "
                f"Fazekas grade {f.info['grade']}, consistent with small vessel disease.")
    return {"impression": text, "disease": [f.disease]}
