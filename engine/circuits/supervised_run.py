"""An SAE against IOI's supervised dictionary at its hook, on the three axes of Makelov et al. 2024.

The dictionary and the SAE's F1 scores are computed on ``fit_prompts`` prompts; approximation and control are measured
on ``eval_prompts`` other prompts (drawn with another seed, dropped when one of their attribute values was never seen
in the fit prompts). At each position (``end``: the last token; ``s2``: the subject's second mention) the activation
of that one token is replaced in a full forward; the model's answer is read at the last token.

- Approximation: the mean logit difference ``LD = logit(IO) - logit(S)`` with the activation replaced by the SAE's
  reconstruction, by the supervised reconstruction, or by the fit prompts' mean (mean-ablation); reported as the
  reference's score ``|LD_r - LD_mean| / |LD_clean - LD_mean|`` (1 = as clean, 0 = as mean-ablation) and as
  ``LD_r / LD_clean``.
- Control: each prompt's IO is moved to another name (the counterfactual prompt: same template, names and words,
  another IO). The target is the model's answer with the counterfactual's activation patched in; an edit succeeds on a
  prompt when the edited run's top token is that answer (the reference's "agreement with the counterfactual patch"),
  counted over the prompts where the patch changes the answer at all (elsewhere agreement is had by doing nothing).
  Where the patch changes fewer than ``MIN_MOVED`` answers (a position the answer is not read from), the success rate
  is NaN: control cannot be measured there. Also reported over all prompts: how often the new IO's logit beats the
  old one's.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..analysis.interventions import check_sae_fits
from ..model.loading import LoadedModel
from ..saes import SAE
from .ioi_attributes import ATTRIBUTES, POSITIONS, IoiPrompt, io_counterfactual, ioi_prompts
from .supervised import F1Table, SupervisedDictionary, exchange_codes, f1_table, mean_codes
from .tasks import ioi_names

MIN_MOVED = 5
"""Prompts whose answer the counterfactual patch must change for a control success rate to be given."""


@dataclass(frozen=True)
class SupervisedConfig:
    """An SAE against IOI's supervised dictionary."""

    fit_prompts: int = 200
    """IOI prompts the dictionary and the latents' F1 scores are computed on."""
    eval_prompts: int = 50
    """Other IOI prompts approximation and control are measured on."""
    positions: tuple[str, ...] = POSITIONS
    """Token positions (end: the last token; s2: the subject's second mention)."""
    max_exchange: int = 16
    """Control edits exchange k = 1, 2, 4, ... up to this many latents each way."""

    def __post_init__(self) -> None:
        if self.fit_prompts < 4 or self.eval_prompts < 1 or self.max_exchange < 1:
            raise ValueError(f"fit_prompts must be >= 4, eval_prompts and max_exchange >= 1, got {self.fit_prompts}, "
                             f"{self.eval_prompts}, {self.max_exchange}")
        bad = [p for p in self.positions if p not in POSITIONS]
        if bad or not self.positions:
            raise ValueError(f"positions must be some of {', '.join(POSITIONS)}, got {', '.join(self.positions)}")

    def exchanges(self) -> list[int]:
        """0 (no edit), then 1, 2, 4, ... ``max_exchange``."""
        ks, k = [0], 1
        while k < self.max_exchange:
            ks.append(k)
            k *= 2
        return [*ks, self.max_exchange]


@dataclass(frozen=True)
class Approximation:
    """Mean logit differences at one position, and the recovered fractions."""

    ld_clean: float
    ld_sae: float
    ld_supervised: float
    ld_mean: float

    def recovered(self, ld: float) -> float:
        """The reference's ``|LD - LD_mean| / |LD_clean - LD_mean|`` (NaN when mean-ablation changes nothing)."""
        gap = abs(self.ld_clean - self.ld_mean)
        return abs(ld - self.ld_mean) / gap if gap > 0 else float("nan")


@dataclass(frozen=True)
class ControlPoint:
    """One edit's outcome over the eval prompts."""

    method: str
    """'sae', 'supervised', 'none' (no edit) or 'patch' (the counterfactual activation itself)."""
    k: int
    """Latents removed and added each (0 for the other methods)."""
    success: float
    """Fraction of the prompts the patch moves whose top token is the patch's (NaN when it moves < MIN_MOVED)."""
    new_io_wins: float
    """Fraction where the new IO's logit beats the old IO's."""
    changed: float
    """Mean number of latents actually changed (removed + added; fewer than 2k when fewer are active)."""


@dataclass(frozen=True)
class PositionResult:
    position: str
    approximation: Approximation
    control: tuple[ControlPoint, ...]
    f1: dict[str, F1Table]
    n_eval: int
    n_moved: int
    """Eval prompts whose answer the counterfactual patch changes (those control success counts)."""


@dataclass(frozen=True)
class SupervisedResult:
    hook: str
    accuracy: float
    """Fraction of eval prompts where the model prefers IO over S."""
    positions: tuple[PositionResult, ...]
    config: SupervisedConfig
    n_fit: int
    timings: dict[str, float]


def _groups(prompts: Sequence[IoiPrompt]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        out.setdefault(len(p.ids), []).append(i)
    return out


@torch.inference_mode()
def capture_at(lm: LoadedModel, sae: SAE, hook: str, prompts: Sequence[IoiPrompt], position: str) -> torch.Tensor:
    """``[n, d_in]``: the SAE's input at ``hook`` at each prompt's ``position``."""
    out = torch.zeros(len(prompts), sae.cfg.d_in)
    for members in _groups(prompts).values():
        ids = torch.tensor([prompts[i].ids for i in members], dtype=torch.long)
        x = sae.select_input(lm.capture(ids, hook)[hook])
        at = torch.tensor([prompts[i].position(position) for i in members])
        out[members] = x[torch.arange(len(members)), at].reshape(len(members), -1).float().cpu()
    return out


def _replacer(sae: SAE, at: torch.Tensor, values: torch.Tensor):
    """A hook function setting row ``i``'s SAE input at token ``at[i]`` to ``values[i]``."""

    def fn(act: torch.Tensor) -> torch.Tensor:
        x = sae.select_input(act).clone()
        rows, cols = torch.arange(len(at), device=x.device), at.to(x.device)
        x[rows, cols] = values.reshape(x[rows, cols].shape).to(x.device, x.dtype)
        return sae.replace_input(act, x)

    return fn


@torch.inference_mode()
def last_logits(lm: LoadedModel, sae: SAE, hook: str, prompts: Sequence[IoiPrompt], position: str,
                values: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, vocab]`` last-token logits, with the SAE's input at ``position`` replaced by ``values [n, d_in]``."""
    out: torch.Tensor | None = None
    for members in _groups(prompts).values():
        ids = torch.tensor([prompts[i].ids for i in members], dtype=torch.long)
        if values is None:
            logits = lm.logits(ids)[:, -1].float().cpu()
        else:
            at = torch.tensor([prompts[i].position(position) for i in members])
            with lm.hooks.intervene(hook, _replacer(sae, at, values[members])):
                logits = lm.logits(ids)[:, -1].float().cpu()
        if out is None:
            out = torch.zeros(len(prompts), logits.shape[-1])
        out[members] = logits
    assert out is not None
    return out


def logit_diff(logits: torch.Tensor, right: Sequence[int], wrong: Sequence[int]) -> np.ndarray:
    rows = torch.arange(len(right))
    return (logits[rows, list(right)] - logits[rows, list(wrong)]).numpy()


def sae_edit(sae: SAE, x: torch.Tensor, delta_codes: torch.Tensor) -> torch.Tensor:
    """``x`` plus the decoder's image of a change of codes, in the activation's own scale."""
    with torch.inference_mode():
        _, norm, _ = sae.process_in(x)
        zero = torch.zeros_like(delta_codes)
        moved = sae._denormalize(sae.decode(delta_codes), norm) - sae._denormalize(sae.decode(zero), norm)
    return x + moved.float().reshape(x.shape)


def _control(lm: LoadedModel, sae: SAE, hook: str, position: str, cfg: SupervisedConfig, prompts: list[IoiPrompt],
             cfs: list[IoiPrompt], dictionary: SupervisedDictionary, f1: F1Table) -> tuple[list[ControlPoint], int]:
    x, x_cf = capture_at(lm, sae, hook, prompts, position), capture_at(lm, sae, hook, cfs, position)
    old, new = [p.io_id for p in prompts], [c.io_id for c in cfs]

    patched = last_logits(lm, sae, hook, prompts, position, x_cf)
    target = patched.argmax(-1)
    clean = last_logits(lm, sae, hook, prompts, position)
    moved = target != clean.argmax(-1)

    def point(method: str, k: int, logits: torch.Tensor, target: torch.Tensor, changed: float = 0.0) -> ControlPoint:
        agree = (logits.argmax(-1) == target)[moved]
        return ControlPoint(method, k, float(agree.float().mean()) if len(agree) >= MIN_MOVED else float("nan"),
                            float((logit_diff(logits, new, old) > 0).mean()), changed)

    points = [point("patch", 0, patched, target), point("none", 0, clean, target)]
    supervised = dictionary.edit(x, "io", [p.io for p in prompts], [c.io for c in cfs])
    points.append(point("supervised", 0, last_logits(lm, sae, hook, prompts, position, supervised), target))
    with torch.inference_mode():
        codes, cf_codes = sae.encode(x).float(), sae.encode(x_cf).float()
    ranked = {v: f1.ranked(v) for v in f1.values}
    remove, add = [ranked[p.io] for p in prompts], [ranked[c.io] for c in cfs]
    for k in cfg.exchanges()[1:]:
        delta, removed, added = exchange_codes(codes, cf_codes, remove, add, k)
        edited = sae_edit(sae, x, delta)
        changed = float(np.mean([len(r) + len(a) for r, a in zip(removed, added, strict=True)]))
        points.append(point("sae", k, last_logits(lm, sae, hook, prompts, position, edited), target, changed))
    return points, int(moved.sum())


def _mean_ld(lm: LoadedModel, sae: SAE, hook: str, prompts: Sequence[IoiPrompt], position: str,
             values: torch.Tensor | None) -> float:
    logits = last_logits(lm, sae, hook, prompts, position, values)
    return float(logit_diff(logits, [p.io_id for p in prompts], [p.s_id for p in prompts]).mean())


def labels(prompts: Sequence[IoiPrompt]) -> dict[str, list[str]]:
    return {a: [p.attribute(a) for p in prompts] for a in ATTRIBUTES}


def check_hook(lm: LoadedModel, sae: SAE, hook: str | None) -> str:
    """The SAE's hook, after checking it is ``hook`` (when given) and fits the model."""
    own = sae.cfg.hook_name
    if hook and own and hook != own:
        raise ValueError(f"the SAE reads {own}, not {hook}: pass an SAE trained at {hook} (--sae) or leave --hook out")
    return check_sae_fits(lm, sae, hook or own)


def run_supervised(lm: LoadedModel, sae: SAE, cfg: SupervisedConfig, *, hook: str | None = None, seed: int = 0,
                   min_accuracy: float = 0.6) -> SupervisedResult:
    """The three axes at each of ``cfg.positions``; a ValueError when the model does not do IOI."""
    start, cpu = time.perf_counter(), time.process_time()
    hook = check_hook(lm, sae, hook)
    names = ioi_names(lm.tokenizer)
    fit = ioi_prompts(lm.tokenizer, cfg.fit_prompts, seed, names)
    fit_labels = labels(fit)
    seen = {a: set(v) for a, v in fit_labels.items()}
    held = [p for p in ioi_prompts(lm.tokenizer, cfg.eval_prompts, seed + 1, names)
            if all(p.attribute(a) in seen[a] for a in ATTRIBUTES)]
    if not held:
        raise ValueError("no eval prompt has attribute values seen in the fit prompts: raise --fit-prompts")
    rng = random.Random(seed + 2)
    cfs = [io_counterfactual(lm.tokenizer, p, sorted(seen["io"]), rng) for p in held]
    clean = last_logits(lm, sae, hook, held, "end")
    ld = logit_diff(clean, [p.io_id for p in held], [p.s_id for p in held])
    accuracy = float((ld > 0).mean())
    if min_accuracy > 0 and accuracy < min_accuracy:
        raise ValueError(f"the model does not do IOI: {accuracy:.0%} of {len(held)} prompts prefer the IO over S "
                         f"(needs {min_accuracy:.0%}); no supervised dictionary is computed")
    results = []
    for position in cfg.positions:
        x_fit = capture_at(lm, sae, hook, fit, position)
        dictionary = mean_codes(x_fit, fit_labels)
        with torch.inference_mode():
            active = (sae.encode(x_fit) > 0).cpu().numpy()
        f1 = {a: f1_table(active, fit_labels[a]) for a in ATTRIBUTES}
        x = capture_at(lm, sae, hook, held, position)
        with torch.inference_mode():
            x_sae = sae(x).x_hat.float().reshape(x.shape)
        approximation = Approximation(*(_mean_ld(lm, sae, hook, held, position, v) for v in (
            None, x_sae, dictionary.reconstruct(labels(held)), dictionary.mean.expand_as(x))))
        control, n_moved = _control(lm, sae, hook, position, cfg, held, cfs, dictionary, f1["io"])
        results.append(PositionResult(position, approximation, tuple(control), f1, len(held), n_moved))
    timings = {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}
    return SupervisedResult(hook, accuracy, tuple(results), cfg, len(fit), timings)
