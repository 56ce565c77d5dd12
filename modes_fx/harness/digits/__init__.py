"""The embedded benchmark model: a tiny real ``Qwen3VLMoeForConditionalGeneration`` trained on a
visual question answering task over scikit-learn's handwritten digits (see docs/digits.md).

- ``data``: vocabulary, question types, splits by image, batched model inputs;
- ``model``: the config, ``build`` (fresh) and ``load`` (the committed checkpoint);
- ``train``: ``python -m modes_fx.harness.digits.train --out DIR``;
- ``evaluate``: accuracy per question type / modality, top-1 and routed-experts-removed figures.
"""
