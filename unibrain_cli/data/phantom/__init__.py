"""Physics-based brain MRI phantom behind `unibrain synth` (DESIGN.md section 3).

Anatomy from nilearn's MNI152 2009a maps with per-subject warps (:mod:`.anatomy`), contrasts by
MR signal equations (:mod:`.physics`), five diseases as tissue-parameter compartments
(:mod:`.lesions`), rendering (:mod:`.simulate`), reports true to the image (:mod:`.reports`),
source-style layouts (:mod:`.layouts`) and the preview figure (:mod:`.preview`).
"""

from unibrain_cli.data.phantom.synth import SynthResult, synthesize

__all__ = ["SynthResult", "synthesize"]
