"""Commands around the engine: ``serve`` and ``demo`` (the embedded demo model and run), ``bench`` (precompute,
query and live-path ratios) and the synthetic 1M-latent run the query benchmark reads.
"""
