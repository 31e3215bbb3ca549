"""What ``RunStore`` hands out: one small immutable row type per kind of result, in one place.

Rows are ``NamedTuple``s (like ``engine.saes.ForwardOutput``): typed attribute access for callers and type
checkers, and built from a DuckDB result tuple with no per-field Python work. Fields mirror the Parquet
columns of ``engine.run.schema`` (same names, same order) and ``docs/run-format.md``; list columns are Python
lists; a null becomes ``None``. The run summaries (``RunSnapshot``, ``RunMetrics``, ``DarkMatterSummary``) are
typed views of sections of ``manifest.json``: a key the manifest lacks is ``None``.
"""

from __future__ import annotations

from typing import NamedTuple


# --- features.parquet ---------------------------------------------------------------------------
class FeatureSummary(NamedTuple):
    """One latent's summary columns (``engine.run.sql.SUMMARY_COLUMNS``): a row of ``RunStore.top_features``
    and ``RunStore.search``."""

    feature_id: int
    """Latent index."""
    fire_count: int
    """Statistic tokens where the latent fires."""
    density: float
    """``fire_count / n_tokens`` (statistic tokens only)."""
    max_act: float
    """Largest activation."""
    mean_act: float
    """Mean activation over the tokens where it fires (0 if dead)."""
    dead: bool
    """Never fires."""
    label: str
    """Automatic label from its top tokens (``""`` if dead)."""
    explanation: str | None
    """Written explanation (None: none)."""
    fires_on: bool | None = None
    """``search(by="token")`` only: the token is among the latent's ``top_token_ids``; None in other results."""
    promotes: bool | None = None
    """``search(by="token")`` only: the token is among the latent's ``top_logit_ids``; None in other results."""


class Example(NamedTuple):
    """One top or quantile example of a latent (an ``examples.parquet`` row without ``feature_id``) with the
    tokens of the window ``acts`` covers."""

    kind: str
    """``'top'`` or ``'quantile'``."""
    rank: int
    """Order within (latent, kind), from 0."""
    quantile_bin: int | None
    """For ``quantile``: the interval ``b`` of ``[b, b+1) * max_act / 10`` holding the example's maximum; None for
    ``top``."""
    context_id: int
    """The context (see ``RunStore.context``)."""
    max_pos: int
    """Position of the maximum activation within the context."""
    max_act: float
    """The latent's maximum activation in this context."""
    start: int
    """First context position that ``acts`` covers."""
    acts: list[float]
    """The latent's activation on each token of the window: token ``start + i`` gets ``acts[i]``."""
    token_ids: list[int]
    """Token ids of the window: the context's ``token_ids[start : start + len(acts)]``."""
    tokens: list[str]
    """Display strings of ``token_ids``."""


class FeatureRow(NamedTuple):
    """Every ``features.parquet`` column of one latent, plus its examples: what ``RunStore.feature`` returns."""

    feature_id: int
    """Latent index."""
    fire_count: int
    """Statistic tokens where the latent fires."""
    density: float
    """``fire_count / n_tokens`` (statistic tokens only)."""
    max_act: float
    """Largest activation."""
    mean_act: float
    """Mean activation over the tokens where it fires (0 if dead)."""
    dead: bool
    """Never fires."""
    hist_counts: list[int]
    """Firing activations per bin."""
    hist_edges: list[float]
    """``len(hist_counts) + 1`` bin edges from 0 (empty if dead)."""
    top_logit_ids: list[int] | None
    """The tokens the latent's decoder row promotes most (through the final norm and the unembedding); None in a run
    wider than its ``logits_on_demand_above`` (the feature page computes them)."""
    top_logit_values: list[float] | None
    """Logit change of each ``top_logit_ids`` token per unit activation."""
    bottom_logit_ids: list[int] | None
    """The tokens it suppresses most (empty when the SAE does not write to the residual stream)."""
    bottom_logit_values: list[float] | None
    """Logit change of each ``bottom_logit_ids`` token per unit activation."""
    neighbor_ids: list[int]
    """The other latents with the highest decoder cosine similarity."""
    neighbor_cos: list[float]
    """Decoder cosine similarity of each ``neighbor_ids`` latent."""
    top_token_ids: list[int]
    """Tokens carrying most of the latent's activation in its examples."""
    label: str
    """Automatic label from its top tokens (``""`` if dead)."""
    explanation: str | None
    """Written explanation (None: none)."""
    head_weight_shares: list[float] | None
    """``attn.hook_z`` SAEs: each head's share of ``||W_dec[i]||^2`` (None for other SAEs and older runs); Kissane
    et al.'s share of the unsquared norms is ``head_norm_shares``."""
    head_data_shares: list[float] | None
    """``attn.hook_z`` SAEs: each head's share of the pre-activation (minus bias) at the top examples' max tokens,
    summed over them (sums to 1; negative for a head that works against the latent; None without examples)."""
    gradient_only_count: int | None
    """g-SAE runs: the statistic tokens where the latent fired only because of the gradient term (it would not
    under plain TopK over ``z``); None for other SAEs and older runs."""
    examples: list[Example]
    """Top examples (by rank), then quantile examples (by bin, then rank)."""

    @property
    def head_norm_shares(self) -> list[float] | None:
        """Each head's share of the decoder row as Kissane et al. (2024) define it: ``||W_dec[i, h]|| / sum_g
        ||W_dec[i, g]||`` over the heads' blocks (unsquared norms), derived exactly from ``head_weight_shares``
        (the squared-norm shares: the norms are proportional to their square roots)."""
        if self.head_weight_shares is None:
            return None
        roots = [max(s, 0.0) ** 0.5 for s in self.head_weight_shares]
        total = sum(roots)
        return [r / total if total > 0 else 0.0 for r in roots]


class ExampleDFA(NamedTuple):
    """The head and source-token attribution of one top example of an ``attn.hook_z`` SAE's latent (an
    ``attribution.parquet`` row without ``feature_id``): what ``RunStore.attribution`` returns."""

    rank: int
    """The top example's rank (its ``Example.rank``)."""
    context_id: int
    """Its context."""
    max_pos: int
    """The destination token: the example's max position."""
    dfa_heads: list[int]
    """Head of each kept (head, source) contribution, largest magnitude first."""
    dfa_sources: list[int]
    """Source position (in the context, ``<= max_pos``) of each."""
    dfa_values: list[float]
    """Each one's contribution to the latent's pre-activation at ``max_pos``."""
    dfa_rest: float
    """The sum of every other (head, source) contribution."""
    dfa_bias: float
    """The part of the pre-activation no source contributes."""
    head_terms: list[float]
    """Contributions summed over all sources, per head."""

    def pre(self) -> float:
        """The latent's pre-activation at ``max_pos``: kept contributions + rest + bias."""
        return float(sum(self.dfa_values)) + self.dfa_rest + self.dfa_bias


# --- contexts.parquet and tokens.parquet -----------------------------------------------------------
class Context(NamedTuple):
    """One context of the run: what ``RunStore.context`` returns."""

    context_id: int
    """0, 1, 2, ... in corpus order."""
    token_ids: list[int]
    """The context's ``context_len`` token ids."""
    tokens: list[str]
    """Display strings of ``token_ids``."""


class TokenRow(NamedTuple):
    """One sampled token's reconstruction and dark-matter row (a ``tokens.parquet`` row) with its display string:
    a row of ``RunStore.token_rows``."""

    context_id: int
    """The context."""
    position: int
    """Position within the context."""
    token_id: int
    """The token."""
    l0: int
    """Latents firing on the token."""
    x_norm: float
    """``||x||``."""
    err_norm: float
    """``||e||`` with ``e = x - x_hat``."""
    cos: float
    """cosine(x, x_hat)."""
    err_linear_norm: float
    """``||x @ W + b||``: the part of the error the linear map predicts."""
    err_nonlinear_norm: float
    """``||e - (x @ W + b)||``: what it leaves."""
    ce_clean: float | None
    """Loss predicting token ``position + 1`` from this position, clean (None at the last position and outside the
    CE sample)."""
    ce_sae: float | None
    """The same loss with the SAE spliced in."""
    ce_delta: float | None
    """``ce_sae - ce_clean``."""
    token: str
    """Display string of ``token_id``."""


class ContextErrors(NamedTuple):
    """A sampled context with its per-position error norms: a row of ``RunStore.worst_contexts``."""

    context_id: int
    """The context."""
    mean_err_norm: float
    """Mean ``||e||`` over its sampled positions."""
    max_err_norm: float
    """Largest ``||e||`` among them."""
    positions: list[int]
    """The sampled (statistic) positions, ascending."""
    err_norms: list[float | None]
    """``||e||`` at every position of the context (None where the position is excluded from statistics)."""
    err_nonlinear_norms: list[float | None]
    """The nonlinear part's norm at every position (None where excluded)."""
    token_ids: list[int]
    """The context's token ids."""
    tokens: list[str]
    """Display strings of ``token_ids``."""


# --- manifest.json sections --------------------------------------------------------------------------
class RunSnapshot(NamedTuple):
    """Where a run stands (``manifest.snapshot``): what ``RunStore.snapshot`` returns."""

    final: bool
    """True for a finished run (also for runs written before snapshots existed)."""
    index: int | None  # pyright: ignore[reportIncompatibleMethodOverride]  (a NamedTuple field named as in the manifest; tuple.index is unused on rows)
    """Snapshot number (1, 2, ...; a finished run carries the count of snapshots before it)."""
    n_tokens: int | None
    """Statistic tokens covered (for a run without a ``snapshot`` section: the corpus' ``n_tokens``)."""
    seen_tokens: int | None
    """Tokens processed so far (all positions)."""
    target_tokens: int | None
    """Tokens the run will cover (None: the whole corpus, length not counted)."""
    host: str | None
    """Host of the writing process."""
    pid: int | None
    """Process id of the writing process."""


class RunMetrics(NamedTuple):
    """Aggregate reconstruction and CE metrics over statistic tokens (``manifest.metrics``): what
    ``RunStore.metrics`` returns. The CE metrics are None when the run has no CE sample."""

    n_tokens: int | None
    """Number of statistic tokens."""
    l0: float | None
    """Mean number of firing latents per token."""
    explained_variance: float | None
    """``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the statistic tokens (without the massive-activation
    tokens unless the run counts them, ``settings.include_massive``)."""
    explained_variance_with_massive: float | None
    """The same over every token position 0 and special tokens leave, massive-activation tokens included (None in
    runs written before it was recorded)."""
    explained_variance_without_massive: float | None
    """The same without the massive-activation tokens (norm >= 10x the batch median)."""
    n_massive_tokens: int | None
    """Massive-activation tokens among those position 0 and special tokens leave."""
    mse: float | None
    """``sum ||x - x_hat||^2 / (n_tokens * d_in)``."""
    cosine_sim: float | None
    """Mean cosine(x, x_hat)."""
    ce_loss_clean: float | None
    """Mean next-token loss on the CE sample, clean."""
    ce_loss_with_sae: float | None
    """The same with ``x_hat`` spliced in at statistic positions."""
    ce_loss_zero_ablation: float | None
    """The same with the activation zeroed there."""
    ce_loss_recovered: float | None
    """``(ce_zero_ablation - ce_with_sae) / (ce_zero_ablation - ce_clean)``."""
    kl_div: float | None
    """Mean KL(clean next-token distribution || with SAE)."""
    n_predictions: int | None
    """Predictions in the CE sample."""
    ce_loss_increase: float | None
    """Nats: ``ce_loss_with_sae - ce_loss_clean`` (None in runs written before it was recorded)."""
    ce_loss_increase_ci95: float | None
    """Half-width of its 95% interval: ``1.96 * std / sqrt(n_predictions)`` of the per-prediction increases (the
    interval is ``ce_loss_increase ± ce_loss_increase_ci95``)."""
    kl_div_with_ablation: float | None
    """Mean KL(clean next-token distribution || activation zeroed at statistic positions)."""
    kl_score: float | None
    """``1 - kl_div / kl_div_with_ablation``."""
    n_dead: int | None
    """Latents that never fire."""
    dead_fraction: float | None
    """Fraction of latents that never fire."""
    dense_fraction: float | None
    """Fraction of latents with density > 0.1."""


class DarkMatterSummary(NamedTuple):
    """How much of the SAE error a linear map from x predicts (``manifest.dark_matter``): what
    ``RunStore.dark_matter`` returns. Two fits (docs/run-format.md): ours (ridge with intercept, every tenth context
    held out, R^2 pooled over dimensions, ``||e||``) and the paper's (``paper_*``: no bias, a random token split,
    R^2 averaged per dimension, ``||e||^2``); the ``paper_*`` fields are None in runs written before them."""

    heldout_error_r2: float | None
    """Fraction of the held-out error variance the linear map predicts."""
    heldout_norm_r2: float | None
    """R^2 of the linear probe for ``||e||`` on held-out tokens."""
    train_error_r2: float | None
    """``heldout_error_r2`` on the fitting tokens."""
    train_norm_r2: float | None
    """``heldout_norm_r2`` on the fitting tokens."""
    err_norm_corr: float | None
    """Pearson correlation of ``||e_lin||`` and ``||e||`` on the ``tokens.parquet`` rows."""
    n_train_tokens: int | None
    """Tokens the map was fitted on."""
    n_heldout_tokens: int | None
    """Tokens it was scored on."""
    ridge: float | None
    """The ridge used."""
    n_token_rows: int | None
    """Rows in ``tokens.parquet``."""
    paper_heldout_error_r2_mean_dim: float | None
    """``e ~ x @ W`` without bias: ``1 - SSE_i / SST_i`` on the held-out tokens of the random token split, averaged
    over the error's dimensions ``i``."""
    paper_heldout_norm_sq_r2: float | None
    """R^2 of ``||e||^2 ~ x @ w`` without bias on those tokens."""
    paper_train_error_r2_mean_dim: float | None
    """``paper_heldout_error_r2_mean_dim`` on the fitting tokens."""
    paper_train_norm_sq_r2: float | None
    """``paper_heldout_norm_sq_r2`` on the fitting tokens."""
    paper_n_train_tokens: int | None
    """Tokens of the random split the paper-style maps were fitted on."""
    paper_n_heldout_tokens: int | None
    """Tokens they were scored on."""
    paper_heldout_fraction: float | None
    """Share of tokens the random split holds out (0.5)."""
    paper_split_seed: int | None
    """Seed of the split's hash (``darkmatter.token_split``, keyed on context and position)."""
    paper_positions: list[int] | None = None
    """``[first, last]``: the positions (inclusive) the paper-style fit used; None: every counted position (and in
    runs written before it)."""
