"""The harness around the library: tiny real transformers models and inputs for tests and
examples (``testing``), the embedded digits benchmark model (``digits``), ``modes demo``
(``demo``) and ``modes bench speed`` (``speed_bench``). Product code (everything outside this
package except the ``modes`` CLI front end) never imports it."""
