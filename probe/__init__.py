"""Evaluation of a (CLIPTeX) image encoder: frozen-encoder probes (``python -m probe``, paper
Section 4.3, Tables 1-3, 5-7, 9), zero-shot classification and retrieval (``python -m
probe.zeroshot``, Table 4) and the tables gathered from runs (``python -m probe.table``).
See docs/PROBE.md."""
