"""The second embedded benchmark model, in the paper's regime: a tiny real
``Qwen3VLMoeForConditionalGeneration`` with 8 MoE layers of 32 experts (top-8), trained on 4×4
grids of scikit-learn's handwritten digits (16 image tokens per prompt, one per digit; see docs/grids.md).

- ``data``: vocabulary, grids, question types, splits by digit image, batched model inputs;
- ``model``: the config, ``build`` (fresh) and ``load`` (the shipped checkpoint);
- ``train``: ``python -m modes_fx.harness.grids.train --out DIR``;
- ``evaluate``: accuracy per question type / modality, top-1 and routed-experts-removed figures
  (``python -m modes_fx.harness.grids.evaluate``).
"""
