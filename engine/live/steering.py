"""Live steering: token-by-token generation with per-step scoped interventions, steered vs baseline."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from ..analysis.interventions import add_vector, check_sae_fits, check_strengths, clamp_latents, steering_vector
from ..model.compat import cache_argument, output_cache
from ..model.loading import LoadedModel
from ..saes import SAE

InterventionFactory = Callable[[], AbstractContextManager]


@dataclass(frozen=True)
class SteeringSpec:
    """What to do to which latents."""

    strengths: Mapping[int, float] = field(default_factory=dict)
    """latent -> strength (units of its max activation when ``unit='max_act'``), or clamp value."""
    mode: str = "add"
    """``add``: add strength * decoder row at every position; ``clamp``: set the latent to the value."""
    unit: str = "max_act"
    """``max_act``: strength is a multiple of the latent's max activation; ``raw``: a plain coefficient."""

    def __post_init__(self) -> None:
        if self.mode not in ("add", "clamp"):
            raise ValueError(f"steering mode must be 'add' or 'clamp', got {self.mode!r}")
        if self.unit not in ("max_act", "raw"):
            raise ValueError(f"steering unit must be 'max_act' or 'raw', got {self.unit!r}")
        check_strengths(self.strengths)  # at most MAX_STEERED_LATENTS, integer ids, finite strengths


def steering_intervention(
    lm: LoadedModel, sae: SAE, spec: SteeringSpec, max_acts: Mapping[int, float] | None = None
) -> InterventionFactory:
    """A factory of context managers applying ``spec`` (one fresh scope per forward step)."""
    hook = check_sae_fits(lm, sae)
    if spec.unit == "max_act" and spec.strengths and max_acts is None:
        raise ValueError("strength in units of max activation needs the latents' max activations (from a run)")
    scales = {i: float(max_acts[i]) for i in spec.strengths} if spec.unit == "max_act" and max_acts is not None else None
    if scales is not None:
        bad = {i: v for i, v in scales.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"the max activations of latents {bad} are not finite: steer them in raw units")
    if spec.mode == "clamp":
        values = check_strengths({i: s * (scales[i] if scales else 1.0) for i, s in spec.strengths.items()}, sae.cfg.d_sae)
        return lambda: clamp_latents(lm, sae, values)
    vector = steering_vector(sae, spec.strengths, scales).to(lm.device)
    # where the SAE writes: a transcoder's decoder rows live at its output hook
    return lambda: add_vector(lm, sae.hook_out if sae.is_transcoder else hook, vector, head_index=sae.cfg.hook_head_index)


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    prompt_ids: list[int],
    *,
    max_new_tokens: int = 40,
    temperature: float = 0.8,
    seed: int = 0,
    intervention: InterventionFactory | None = None,
    stop_at_eos: bool = True,
) -> Iterator[int]:
    """Yield sampled token ids one at a time (KV cache); the intervention applies to every forward step."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: type some text first")
    if len(prompt_ids) + max_new_tokens > lm.max_context:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + {max_new_tokens} new tokens exceed the model's context ({lm.max_context})"
        )
    gen = torch.Generator().manual_seed(seed)
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    cur = torch.tensor([prompt_ids], dtype=torch.long, device=lm.device)
    past, cache_arg = None, cache_argument(lm.model.forward)
    for _ in range(max_new_tokens):
        with intervention() if intervention else contextlib.nullcontext():
            out = lm.model(input_ids=cur, use_cache=True, **{cache_arg: past})
        past = output_cache(out)
        logits = out.logits[0, -1].float().cpu()
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        yield token
        if stop_at_eos and token == eos:
            return
        cur = torch.tensor([[token]], dtype=torch.long, device=lm.device)


def compare(
    lm: LoadedModel,
    prompt_ids: list[int],
    intervention: InterventionFactory,
    **kwargs,
) -> Iterator[tuple[int | None, int | None]]:
    """Baseline and steered generations from the same seed, advanced in lock-step: yields (baseline, steered)."""
    base = generate(lm, prompt_ids, **kwargs)
    steered = generate(lm, prompt_ids, intervention=intervention, **kwargs)
    while True:
        a, b = next(base, None), next(steered, None)
        if a is None and b is None:
            return
        yield a, b
