"""docs/models.md is the table tests/model_support.py rebuilds from the tiny models and the
collected test ids: it cannot drift from what the suite checks."""
import os

from model_support import DOC, render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_models_doc_matches_the_models_and_the_test_suite():
    with open(DOC, encoding="utf-8") as f:
        written = f.read()
    assert written == render(ROOT), "docs/models.md is stale: regenerate it with `python tests/model_support.py`"
