"""The authors' released UniBrain checkpoint, run with EXACTLY their protocol.

The released weights (Hugging Face ``Astrostellar/UniBrain``, a BAGEL-7B-MoT fine-tune) were
trained and evaluated on one particular token sequence (``zhiyuns/UniBrain``, commit f7c4df7,
``evaluate_metrics.py`` / ``inferencer.py``); ``/work/shared/released-checkpoint-protocol.md``
lists its facts. They differ from our own protocol (:mod:`unibrain_cli.inference.engine`) in
almost every detail (text items, system prompt, instructions, image sizes, intensity mapping,
VAE posterior sampling, guidance contexts, sampler settings), so they live in this package:

- :mod:`~unibrain_cli.released.protocol` — the strings, ids and numbers of the protocol;
- :mod:`~unibrain_cli.released.folder` — ``--protocol`` choice, ``--ckpt`` / ``--base`` resolution,
  loading (weights by BAGEL key names incl. the stored position tables, Qwen2 tokenizer, FLUX AE);
- :mod:`~unibrain_cli.released.images` — LPI slices, the uint8 1-255 intensity mapping, 256-px
  padding, the VAE / ViT inputs and the decoded image;
- :mod:`~unibrain_cli.released.engine` — contexts over the KV cache, the three tasks
  (imputation only, unified chain, understanding only) with their guidance contexts;
- :mod:`~unibrain_cli.released.impute`, :mod:`~unibrain_cli.released.diagnose`,
  :mod:`~unibrain_cli.released.report` — the ``impute`` / ``diagnose`` / ``report`` commands;
- :mod:`~unibrain_cli.released.evaluate` — ``evaluate --protocol released`` (Tables 1-2 on a slices folder).
"""
