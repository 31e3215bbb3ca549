"""``saescope precompute``: corpus -> packed contexts -> one streaming pass (activations, SAE codes, statistics,
example reservoirs, dark-matter moments, CE on a context sample, head attribution of attn.hook_z SAEs) -> the
run's files, with snapshots on the way.
``pipeline`` drives the pass; the other modules are its parts.
"""
