"""The prompt lens: which latents fire on each token of a prompt, and what the SAE misses there."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..analysis.interventions import check_sae_fits
from ..data.activations import stats_mask
from ..model.loading import LoadedModel
from ..model.tail import can_resume, resume_logits
from ..model.tokens import display_tokens
from ..saes import SAE


@dataclass(frozen=True)
class TokenLens:
    """One prompt token: its top latents and its reconstruction error."""

    position: int
    token_id: int
    token: str
    top_latents: list[tuple[int, float]]
    l0: int
    x_norm: float
    err_norm: float
    err_linear_norm: float | None
    """Norm of the error part the run's linear map predicts from x (None without a map)."""
    err_nonlinear_norm: float | None
    ce_delta: float | None
    """Loss of predicting the next token with the SAE spliced in minus clean (None for the last token)."""
    included: bool
    """False for position 0 and special tokens, which the SAE leaves untouched."""


@dataclass(frozen=True)
class LensResult:
    tokens: list[TokenLens]
    codes: torch.Tensor
    """The active codes, sparse: a ``[pos, d_sae]`` float32 COO tensor on the CPU (nothing where not included).
    A dense one is 2 MB per token at 1M latents, and the app caches 16 results."""
    truncated: bool
    n_input_tokens: int

    def latent_acts(self, latent: int) -> list[float]:
        """Activation of ``latent`` on every token."""
        index, values = self.codes.indices(), self.codes.values()
        out = torch.zeros(self.codes.shape[0])
        hit = index[1] == latent
        out[index[0][hit]] = values[hit]
        return out.tolist()

    def max_per_latent(self) -> torch.Tensor:
        """Each latent's largest activation over the tokens (0 where it never fires), ``[d_sae]``."""
        index, values = self.codes.indices(), self.codes.values()
        return torch.zeros(self.codes.shape[1]).scatter_reduce(0, index[1], values, reduce="amax")


MAX_PROMPT_CHARS = 1 << 16
"""Characters of a typed prompt, checked before tokenizing: a prompt is capped in tokens by the model's context
(``prompt_lens`` truncates, ``steering.generate`` and ``attribution.dfa`` refuse), and 64k characters is several
times that for any tokenizer, so a pasted book is refused before it costs a tokenizer pass."""


def tokenize_prompt(lm: LoadedModel, text: str, *, chat: bool = False) -> list[int]:
    """Token ids of ``text`` (as a user chat message rendered with the model's template when ``chat``); a
    ``ValueError`` past ``MAX_PROMPT_CHARS``."""
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt is {len(text):,} characters: at most {MAX_PROMPT_CHARS:,} (the model reads "
                         f"{lm.max_context:,} tokens at most)")
    tok = lm.tokenizer
    if chat:
        if not getattr(tok, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template")
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        assert isinstance(rendered, str)  # tokenize=False renders the text
        return tok(rendered, add_special_tokens=False)["input_ids"]
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def prompt_lens(
    lm: LoadedModel,
    sae: SAE,
    token_ids: list[int],
    *,
    top_k: int = 8,
    max_tokens: int | None = None,
    linear_map: tuple[torch.Tensor, torch.Tensor] | None = None,
    with_ce: bool = True,
    encode_kwargs: dict | None = None,
) -> LensResult:
    """Run the prompt once (a batch of clean + SAE-spliced rows when ``with_ce``) and describe every token."""
    if not token_ids:
        raise ValueError("the prompt is empty: type some text first")
    hook = check_sae_fits(lm, sae)
    limit = min(max_tokens or lm.max_context, lm.max_context)
    truncated = len(token_ids) > limit
    n_input = len(token_ids)
    ids = torch.tensor([token_ids[:limit]], dtype=torch.long)
    mask = stats_mask(ids, lm.special_token_ids)[0].to(lm.device)
    captured: dict[str, torch.Tensor] = {}
    kwargs = encode_kwargs or {}

    def record(row: torch.Tensor) -> torch.Tensor:
        """Encode the prompt's activation ``row`` at the hook; the row with the SAE spliced in (not position 0)."""
        x_in = sae.select_input(row)
        out = sae(x_in, **kwargs)
        captured.update(x=x_in.float(), codes=out.codes.float(), error=out.error)
        keep = mask.reshape(-1, *([1] * (x_in.ndim - 1)))
        return sae.replace_input(row, torch.where(keep, out.x_hat.to(row.dtype), x_in))

    def splice_last_row(x: torch.Tensor) -> torch.Tensor:
        new = x.clone()
        new[-1] = record(x[-1])
        return new

    logits = None
    if sae.is_transcoder:
        logits = _transcoder_rows(lm, sae, ids, mask, captured, kwargs, with_ce)
    elif with_ce and can_resume(lm, hook):
        # the layers before the hook run once; the layers after it run on [clean, spliced] as one batch
        x = lm.capture(ids, hook)[hook][0]
        logits = resume_logits(lm, hook, torch.stack([x, record(x)]))
    elif with_ce:
        with lm.hooks.intervene(hook, splice_last_row):
            logits = lm.logits(ids.repeat(2, 1))
    else:
        record(lm.capture(ids, hook)[hook][0])
    return _describe(lm, ids[0], captured, mask, logits, top_k, linear_map, truncated, n_input)


def _transcoder_rows(lm: LoadedModel, sae: SAE, ids: torch.Tensor, mask: torch.Tensor, captured: dict,
                     kwargs: dict, with_ce: bool) -> torch.Tensor | None:
    """A transcoder's lens: codes from its input hook, the error against its output hook (the true MLP output) and,
    with ``with_ce``, the logits of [clean, output hook replaced by the prediction] in one batch."""
    seen: dict[str, torch.Tensor] = {}

    def read(x: torch.Tensor) -> None:
        seen["x"] = x[-1]

    def write(y: torch.Tensor) -> torch.Tensor | None:
        out = sae(seen["x"], y[-1], **kwargs)
        captured.update(x=seen["x"].float(), codes=out.codes.float(), error=out.error)
        if not with_ce:
            return None
        new = y.clone()
        new[-1] = torch.where(mask[:, None], out.x_hat.to(y.dtype), y[-1])
        return new

    with lm.hooks.intervene(sae.hook_in, read), lm.hooks.intervene(sae.hook_out, write):
        if with_ce:
            return lm.logits(ids.repeat(2, 1))
        lm.capture(ids, sae.hook_out)
    return None


def _describe(lm, ids, cap, mask, logits, top_k, linear_map, truncated, n_input) -> LensResult:
    x, codes, error = cap["x"], cap["codes"], cap["error"]
    if x.ndim == 3:  # attn.hook_z: [pos, heads, d_head]
        x, error = x.flatten(-2), error.flatten(-2)
    codes = codes * mask.unsqueeze(-1)
    x_norm, err_norm = x.norm(dim=-1), error.norm(dim=-1)
    lin = nonlin = None
    if linear_map is not None:
        W, b = (t.to(x.device, torch.float32) for t in linear_map)
        pred = x @ W + b
        lin, nonlin = pred.norm(dim=-1), (error - pred).norm(dim=-1)
    delta = None
    if logits is not None:
        targets = ids[1:].to(logits.device)
        clean = F.cross_entropy(logits[0, :-1].float(), targets, reduction="none")
        spliced = F.cross_entropy(logits[1, :-1].float(), targets, reduction="none")
        delta = (spliced - clean).tolist()
    values, latents = codes.topk(min(top_k, codes.shape[-1]), dim=-1)
    strings = display_tokens(lm.tokenizer, ids.tolist())
    rows = []
    for p, tid in enumerate(ids.tolist()):
        tops = [(int(i), float(v)) for i, v in zip(latents[p].tolist(), values[p].tolist(), strict=True) if v > 0]
        rows.append(
            TokenLens(
                position=p, token_id=tid, token=strings[p], top_latents=tops, l0=int((codes[p] > 0).sum()),
                x_norm=float(x_norm[p]), err_norm=float(err_norm[p]),
                err_linear_norm=None if lin is None else float(lin[p]),
                err_nonlinear_norm=None if nonlin is None else float(nonlin[p]),
                ce_delta=None if delta is None or p >= len(delta) else float(delta[p]),
                included=bool(mask[p]),
            )
        )
    return LensResult(rows, codes.float().cpu().to_sparse().coalesce(), truncated, n_input)
