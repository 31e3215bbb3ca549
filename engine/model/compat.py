"""Where transformers releases differ in an API saescope calls, the one place that bridges them.

transformers 5.25 renamed ``past_key_values`` to ``cache`` in the models' ``forward``, their outputs and the mask
builders (the old name warns until 5.40 removes it); the lock's release and the newest both work through these.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any


def cache_argument(function: Callable[..., Any]) -> str:
    """The name ``function`` (a model's ``forward`` or a mask builder) takes the KV cache by."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


def output_cache(output: Mapping[str, Any]) -> Any:
    """The KV cache a forward with ``use_cache=True`` returned (a ``ModelOutput``), under either name."""
    return output["cache"] if "cache" in output else output.get("past_key_values")
