"""What a latent means: explainers (a local Hugging Face chat model or any OpenAI-compatible endpoint) read a
latent's examples and write one short explanation; delphi-style scorers (detection, fuzzing, embedding) measure
it on held-out contexts; explanation embeddings make latents searchable by meaning. ``explain`` drives it.
"""
