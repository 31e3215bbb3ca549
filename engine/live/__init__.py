"""Per-request work on a loaded model and SAE (what the app does while a user waits): interventions (splice,
add, clamp), steered generation side by side with the baseline, the prompt lens, and which heads and source
tokens make an attention-output SAE's latent fire (attribution).
"""
