"""Attention heads of an ``attn.hook_z`` latent: which heads make it fire (shares) and from which source tokens (DFA).

The feature page draws the precomputed head shares and each top example's stored DFA; the prompt lens draws a DFA
computed live. Both tint source tokens by their contribution to the latent's pre-activation at the destination
(red adds, blue subtracts; the destination is underlined) and name the heads on hover.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import streamlit as st

from dashboard import cache, charts, render
from dashboard.render import fmt
from engine.run.manifest import sections
from engine.run.rows import Example, ExampleDFA, FeatureRow

if TYPE_CHECKING:
    from engine.analysis.dfa import DFA

EXAMPLES_SHOWN = 6
HEADS_ON_HOVER = 4


def attention_layer(hook: str) -> int | None:
    """The layer of an ``blocks.L.attn.hook_z`` hook name, None for any other hook."""
    parts = hook.split(".")
    if len(parts) == 4 and parts[0] == "blocks" and parts[1].isdigit() and parts[2:] == ["attn", "hook_z"]:
        return int(parts[1])
    return None


def head_names(layer: int, n_heads: int) -> list[str]:
    return [f"L{layer}.H{h}" for h in range(n_heads)]


def dfa_html(
    tokens: Sequence[str], by_source: dict[int, list[tuple[str, float]]], destination: int, *, offset: int = 0,
    note: str = "",
) -> str:
    """Tokens tinted by their summed contribution (``by_source``: context position -> (head name, value) pairs,
    largest first), the heads named on hover; ``tokens[i]`` is context position ``offset + i``."""
    values, titles = [], []
    for i, token in enumerate(tokens):
        position = offset + i
        parts = by_source.get(position, [])
        values.append(sum(v for _, v in parts))
        lines = [f"{name}: {value:+.3f}" for name, value in parts[:HEADS_ON_HOVER]]
        if len(parts) > HEADS_ON_HOVER:
            lines.append(f"… {len(parts) - HEADS_ON_HOVER} more heads")
        where = " · destination" if position == destination else ""
        titles.append("\n".join([f"{token!r} · position {position}{where}", *lines]))
    head = f'<div style="font-size: 0.8rem; color: #555; margin: 0.2rem 0;">{render.escape(note)}</div>' if note else ""
    body = render.tokens_html(tokens, values, signed=True, titles=titles, mark=destination - offset, breaks=False)
    return head + body


def stored_by_source(row: ExampleDFA, names: list[str]) -> dict[int, list[tuple[str, float]]]:
    """A stored DFA's kept contributions grouped by source position (each list largest magnitude first)."""
    out: dict[int, list[tuple[str, float]]] = defaultdict(list)
    for head, source, value in zip(row.dfa_heads, row.dfa_sources, row.dfa_values, strict=True):
        out[source].append((names[head] if 0 <= head < len(names) else f"H{head}", value))
    return out


def live_by_source(result: DFA, names: list[str]) -> dict[int, list[tuple[str, float]]]:
    """A live DFA's contributions grouped by source position (every head, largest magnitude first)."""
    contributions = result.contributions  # [n_heads, position + 1]
    out = {}
    for source in range(contributions.shape[1]):
        column = contributions[:, source].tolist()
        out[source] = sorted(((names[h], v) for h, v in enumerate(column)), key=lambda p: -abs(p[1]))
    return out


def _top_heads(terms: Sequence[float], names: list[str], n: int = 3) -> str:
    total = sum(terms)
    order = sorted(range(len(terms)), key=lambda h: -abs(terms[h]))[:n]
    return ", ".join(f"{names[h]} {terms[h] / total:.0%}" if total else names[h] for h in order)


def stored_note(row: ExampleDFA, names: list[str]) -> str:
    shown = sum(row.dfa_values)
    return (f"pre-activation {fmt(row.pre())} = {len(row.dfa_values)} largest (head, source) terms {fmt(shown)} "
            f"+ the rest {fmt(row.dfa_rest)} + bias {fmt(row.dfa_bias)} · heads: {_top_heads(row.head_terms, names)}")


def live_note(result: DFA, names: list[str]) -> str:
    return (f"latent #{result.latent} at position {result.position}: activation {fmt(result.activation)}, pre-activation "
            f"{fmt(result.pre)} = sources {fmt(result.pre - result.bias)} + bias {fmt(result.bias)} · heads: "
            f"{_top_heads(result.by_head().tolist(), names)}")


def example_dfa_html(example: Example, row: ExampleDFA, names: list[str]) -> str:
    return dfa_html(example.tokens, stored_by_source(row, names), row.max_pos, offset=example.start,
                    note=stored_note(row, names))


def show(run: str, row: FeatureRow) -> None:
    """The feature page's head panel (a one-line note for SAEs not on ``attn.hook_z`` and runs without it)."""
    man = cache.manifest(run)
    hook = str(sections(man).sae.hook or "")
    layer = attention_layer(hook)
    if layer is None:
        st.caption(f"Head attribution applies to attention-output SAEs (`attn.hook_z`); this SAE reads {render.code(hook)}.")
        return
    if row.head_weight_shares is None:
        st.caption("This run was precomputed without head attribution: run `saescope precompute` again to see which "
                   "heads and source tokens make its latents fire.")
        return
    names = head_names(layer, len(row.head_weight_shares))
    st.subheader("Attention heads")
    st.caption(f"Which of layer {layer}'s heads this latent reads. **Decoder norm**: each head's block norm of the "
               "decoder row over the sum of the blocks' norms (Kissane et al.'s weight share). **Decoder norm²**: its "
               "share of the row's squared norm (spreads less onto minor heads). **Top examples**: each head's share of "
               "the pre-activation (minus bias) at the top examples' max tokens, summed over them (negative: the head "
               "works against the latent).")
    st.plotly_chart(charts.head_shares(names, row.head_norm_shares, row.head_weight_shares, row.head_data_shares),
                    key="head_shares")
    attributed = {a.rank: a for a in cache.attribution(run, row.feature_id)}
    top = [e for e in row.examples if e.kind == "top" and e.rank in attributed]
    if not top:
        info = man.get("head_attribution") or {}
        st.caption(f"No source-token attribution here: {render.md(info.get('reason') or 'this latent has no top examples')}.")
        return
    st.markdown("**Source tokens** (direct feature attribution at each top example's max token, underlined)")
    st.caption("Each source token is tinted by what it contributes through the heads' attention, red adding and blue "
               "subtracting; hover for the heads.")
    st.html("".join(example_dfa_html(e, attributed[e.rank], names) for e in top[:EXAMPLES_SHOWN]))
    if len(top) > EXAMPLES_SHOWN:
        with st.expander(f"{len(top) - EXAMPLES_SHOWN} more top examples"):
            st.html("".join(example_dfa_html(e, attributed[e.rank], names) for e in top[EXAMPLES_SHOWN:]))
