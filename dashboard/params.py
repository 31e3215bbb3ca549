"""Steering settings <-> URL query parameters, so a result can be shared as a link. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PROMPT = "The best thing about this city is"
DEFAULT_STRENGTH = 4.0
DEFAULT_CONCEPTS = "python-docs-code-prose.jsonl"
"""APP's labelled texts (a bare name is looked up in the data folder's concepts/)."""
MODES = ("add", "clamp", "app")
STRENGTH_RANGE = (-20.0, 20.0)


@dataclass
class SteerSettings:
    """Everything that determines a steering result."""

    latents: dict[int, float] = field(default_factory=dict)
    """latent id -> strength (units of its max activation, or raw)."""
    mode: str = "add"
    unit: str = "max_act"
    prompt: str = DEFAULT_PROMPT
    chat: bool = False
    max_new: int = 40
    temperature: float = 0.8
    seed: int = 0
    concepts: str = DEFAULT_CONCEPTS
    """APP mode: the labelled texts the concept's densities are fitted on."""
    concept: str = ""
    """APP mode: the label to suppress (empty: the file's first)."""

    def to_query(self) -> dict[str, str]:
        """The query parameters of a link reproducing these settings."""
        return {
            "latents": format_latents(self.latents),
            "mode": self.mode,
            "unit": self.unit,
            "chat": "1" if self.chat else "0",
            "max_new": str(self.max_new),
            "temp": f"{self.temperature:g}",
            "seed": str(self.seed),
            "prompt": self.prompt,
            "concepts": self.concepts,
            "concept": self.concept,
        }

    @classmethod
    def from_query(cls, query: dict[str, str]) -> SteerSettings:
        """Settings from query parameters; ``ValueError`` names the first malformed one."""
        out = cls()
        if "latents" in query:
            out.latents = parse_latents(query["latents"])
        if query.get("mode", "add") not in MODES:
            raise ValueError(f"mode must be 'add', 'clamp' or 'app', got {query['mode']!r}")
        if query.get("unit", "max_act") not in ("max_act", "raw"):
            raise ValueError(f"unit must be 'max_act' or 'raw', got {query['unit']!r}")
        out.mode = query.get("mode", out.mode)
        out.unit = query.get("unit", out.unit)
        out.prompt = query.get("prompt", out.prompt)
        out.chat = query.get("chat", "0") in ("1", "true", "yes")
        out.max_new = _number(query, "max_new", int, out.max_new, 1, 256)
        out.temperature = _number(query, "temp", float, out.temperature, 0.0, 2.0)
        out.seed = _number(query, "seed", int, out.seed, 0, 2**31 - 1)
        out.concepts = query.get("concepts", out.concepts) or DEFAULT_CONCEPTS
        out.concept = query.get("concept", out.concept)
        return out


def _number(query: dict[str, str], key: str, kind, default, lo, hi):
    if key not in query:
        return default
    try:
        value = kind(query[key])
    except ValueError:
        raise ValueError(f"{key} must be a number, got {query[key]!r}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{key} must be between {lo} and {hi}, got {value}")
    return value


def parse_latents(text: str) -> dict[int, float]:
    """``"12:4,77:-2.5"`` -> ``{12: 4.0, 77: -2.5}`` (a bare id gets the default strength)."""
    out: dict[int, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        ident, _, strength = part.partition(":")
        try:
            latent = int(ident)
            value = float(strength) if strength else DEFAULT_STRENGTH
        except ValueError:
            raise ValueError(f"latents must look like 12:4.0,77:-2; could not read {part!r}") from None
        if latent < 0:
            raise ValueError(f"latent ids are non-negative, got {latent}")
        out[latent] = min(max(value, STRENGTH_RANGE[0]), STRENGTH_RANGE[1])
    return out


def format_latents(latents: dict[int, float]) -> str:
    """Inverse of ``parse_latents``."""
    return ",".join(f"{i}:{s:g}" for i, s in latents.items())


STEER_KEYS = tuple(SteerSettings().to_query())
"""The query parameters the Steering page owns."""
