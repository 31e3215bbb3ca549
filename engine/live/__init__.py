"""Per-request work on a loaded model and SAE (what the app does while a user waits): interventions (splice,
add, clamp), steered generation side by side with the baseline, and the prompt lens.
"""
