"""Head circuits of a task: task prompts (built-in generators and JSONL files), each attention head's output, the
seed method of O'Neill & Bui 2024 (one small SAE over all heads' position-mean outputs, argmax codes, node and edge
scores), activation patching and mean-ablation as the reference circuit, and the ``saescope circuit`` files."""
