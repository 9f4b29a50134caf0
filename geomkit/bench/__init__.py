"""The embedded default benchmark (docs/method.md#embedded-benchmark): invented facts, no downloads.

:mod:`geomkit.bench.data` builds a deterministic TOFU-style "fictitious knowledge" benchmark
(forget and retain entities, QA pairs, a general-capability probe), and
:mod:`geomkit.bench.tokenizer` holds the tiny word-level tokenizer saved with the model.
"""
