"""docs/models.md is the table tests/model_support.py rebuilds from the tiny models and the
collected test ids: it cannot drift from what the suite checks."""
import os

import pytest

from extra_models import missing
from model_support import DOC, FAMILIES, render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_models_doc_matches_the_models_and_the_test_suite():
    absent = [reason for name in FAMILIES if (reason := missing(name))]
    if absent:  # the compatibility pass's older transformers: the table is generated with the newest
        pytest.skip("docs/models.md lists families this transformers lacks: " + "; ".join(absent))
    with open(DOC, encoding="utf-8") as f:
        written = f.read()
    assert written == render(ROOT), "docs/models.md is stale: regenerate it with `python tests/model_support.py`"
