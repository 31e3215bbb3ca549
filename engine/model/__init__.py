"""The language model: loading a Hugging Face causal LM and choosing its dtype, its family record, hook points
with scoped thread-isolated hooks, the forward resumed after a hook, one layer's attention pattern and values,
token display, tiny random models for tests.
"""
