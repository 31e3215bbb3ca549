"""Evaluating and comparing SAEs offline: ``matching`` (decoder-cosine matches, one-to-one assignment),
``pairstats`` (activation correlation and co-firing of latent pairs in one pass over a token sample),
``splitting`` (latents of a narrow SAE split by a wider one), ``compare`` (runs side by side, into a comparison
folder), ``probe`` / ``probing_data`` / ``sparse_probing`` (SAEBench-style k-sparse probing), ``absorption``
(first-letter feature absorption), ``matryoshka`` (EV and CE recovered per nested prefix), ``core`` (L2 ratio,
relative reconstruction bias, cosine, firing fractions), ``evaluate`` (all of them into the run's
``evaluation.parquet``); ``storage`` holds their files' schemas.
"""
