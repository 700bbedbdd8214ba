"""Missing-modality scenarios (Table 1) and imputation chains (Table 2) of the paper.

Scenarios name the modalities a case is *given*:

=============== ==================================================
scenario        input modalities
=============== ==================================================
``t1``          T1
``t1_t2``       T1, T2
``t1_t2_flair`` T1, T2, FLAIR
``complete``    every modality the case has (and the model knows)
=============== ==================================================

A case belongs to a scenario's cohort when it has the scenario's inputs. The modalities to
impute are then the case's other modalities, in canonical order (:data:`MODALITIES`: T2,
FLAIR, T1ce, then DWI, ADC), so that every imputed image has a ground truth.

Chains are the paper's imputation tasks: T1 -> T2; T1,T2 -> FLAIR; T1,T2,FLAIR -> T1ce, each from
*real* inputs (:data:`unibrain_cli.evaluation.baselines.CHAINS`); a case is in a chain's cohort when
it has all of the chain's modalities.
"""

from __future__ import annotations

from collections.abc import Sequence

from unibrain_cli.errors import UserError
from unibrain_cli.evaluation.baselines import CHAINS, chain_key
from unibrain_cli.modalities import MODALITIES

#: Scenario -> given modalities (None: every modality of the case).
SCENARIO_INPUTS: dict[str, tuple[str, ...] | None] = {
    "t1": ("t1",),
    "t1_t2": ("t1", "t2"),
    "t1_t2_flair": ("t1", "t2", "flair"),
    "complete": None,
}
SCENARIOS: tuple[str, ...] = tuple(SCENARIO_INPUTS)
#: Chain keys in paper order: "t1->t2", "t1,t2->flair", "t1,t2,flair->t1ce".
CHAIN_KEYS: tuple[str, ...] = tuple(chain_key(i, t) for i, t in CHAINS)


def parse_scenarios(value: str | Sequence[str], where: str = "--scenario") -> tuple[str, ...]:
    """``"all"``, one scenario or a comma-separated list (or a sequence) -> scenario keys in paper order.

    Unknown names are a :class:`UserError` naming ``where`` and the valid names.
    """
    items = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if not items:
        raise UserError(f"no scenario given; choose from {', '.join(SCENARIOS)} or all", where)
    if "all" in items:
        return SCENARIOS
    bad = [v for v in items if v not in SCENARIO_INPUTS]
    if bad:
        raise UserError(f"unknown scenario '{bad[0]}'; choose from {', '.join(SCENARIOS)} or all "
                        "(comma-separated for several)", where)
    return tuple(s for s in SCENARIOS if s in items)


def canonical(mods: Sequence[str]) -> tuple[str, ...]:
    """``mods`` in canonical :data:`MODALITIES` order (duplicates dropped)."""
    return tuple(m for m in MODALITIES if m in mods)


def scenario_inputs(scenario: str, present: Sequence[str], known: Sequence[str] = MODALITIES) -> tuple[str, ...] | None:
    """The given modalities of a case with ``present`` modalities in ``scenario``, or None when the case
    is not in the scenario's cohort (lacks an input, or the model does not know one)."""
    usable = [m for m in present if m in known]
    wanted = SCENARIO_INPUTS[scenario]
    if wanted is None:
        return canonical(usable) or None
    return wanted if all(m in usable for m in wanted) else None


def scenario_targets(inputs: Sequence[str], present: Sequence[str], known: Sequence[str] = MODALITIES) -> tuple[str, ...]:
    """Modalities to impute: the case's known modalities that are not given, in canonical order."""
    return tuple(m for m in MODALITIES if m in present and m in known and m not in inputs)


def chain_applies(inputs: Sequence[str], target: str, present: Sequence[str], known: Sequence[str] = MODALITIES) -> bool:
    """Whether a case with ``present`` modalities is in the cohort of the chain ``inputs -> target``."""
    need = (*inputs, target)
    return all(m in present and m in known for m in need)


# ---------------------------------------------------------------------------------------------
# what the authors' convention scores (``unibrain evaluate --convention paper``)
# ---------------------------------------------------------------------------------------------


def middle_lesion_index(lesion_ks: Sequence[int]) -> int:
    """The authors' middle lesion slice: the middle element of the sorted axial indices that hold
    lesion, ``ks[len(ks) // 2]`` (for an even count the upper of the two middle slices).

    Their ``evaluate_metrics.py`` takes ``np.where(np.any(mask > 0, axis=(1, 2)))[0]`` and that element.
    Note it is not the centre of the lesion's axial extent (``unibrain slice``'s eval slice): for a
    lesion on z = 3..6 it is 5, the extent centre is 4.
    """
    ks = sorted({int(k) for k in lesion_ks})
    if not ks:
        raise ValueError("no lesion slice given")
    return ks[len(ks) // 2]


def paper_slice_position(slice_ks: Sequence[int], lesion_px: Sequence[float], is_eval: Sequence[bool]) -> int:
    """Which of ONE case's stored slices the authors' convention scores (a position into the arguments).

    ``slice_ks`` are the stored slices' axial indices, ``lesion_px`` their lesion pixel counts,
    ``is_eval`` the slicer's eval flag (the lesion slice nearest the centre of the lesion's axial
    extent, or the central brain slice of a case without lesion). With lesion on some stored slice:
    the stored slice nearest :func:`middle_lesion_index` of the stored lesion slices (it is one of
    them), ties to the lower index. It is the authors' slice when every lesion slice of the case is
    stored (``unibrain slice --all-lesion-slices``); otherwise the middle is over the stored ones
    only. Without lesion on any stored slice: the eval slice (the authors take the volume's middle
    slice, which a slices folder does not store); the first slice when none is flagged.
    """
    if not (len(slice_ks) == len(lesion_px) == len(is_eval)) or not slice_ks:
        raise ValueError("need one or more slices with a k, a lesion pixel count and an eval flag each")
    lesion = [int(k) for k, px in zip(slice_ks, lesion_px) if float(px) > 0]
    if lesion:
        mid = middle_lesion_index(lesion)
        return min(range(len(slice_ks)), key=lambda i: (abs(int(slice_ks[i]) - mid), int(slice_ks[i])))
    flagged = [i for i, e in enumerate(is_eval) if bool(e)]
    return flagged[0] if flagged else 0


def scored_targets(targets: Sequence[str], convention: str) -> tuple[str, ...]:
    """The imputed ``targets`` of one chain (in generation order) whose image is scored.

    ``ours``: every target; ``paper``: only the last one (the authors score the last target of a
    chain, ``all_gt_img[-1]``). An empty chain scores nothing.
    """
    if convention not in ("ours", "paper"):
        raise ValueError(f"unknown convention {convention!r}; expected 'ours' or 'paper'")
    targets = tuple(targets)
    return targets[-1:] if convention == "paper" else targets
