"""The harness around the library: tiny real transformers models and inputs for tests and
examples (``testing``), the embedded benchmark models (``bench_models``: ``digits``), ``modes
demo`` (``demo``), ``modes bench accuracy`` (``accuracy_bench``, with ``ranking``) and ``modes
bench speed`` (``speed_bench``). Product code (everything outside this
package except the ``modes`` CLI front end) never imports it."""
