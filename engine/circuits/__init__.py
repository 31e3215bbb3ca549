"""Head circuits of a task: task prompts (built-in generators and JSONL files), each attention head's output, the
seed method of O'Neill & Bui 2024 (one small SAE over all heads' position-mean outputs, argmax codes, node and edge
scores), activation patching, mean-ablation and direct-path patching as the reference circuit, the ``saescope
circuit`` files; an SAE against IOI's supervised dictionary (Makelov et al. 2024: ``supervised*``); one head's part
in an attention-output SAE's latents (``head_latents``)."""
