"""HTML for tokens tinted by a value: the one place text from a corpus, a prompt or a model becomes markup.

Every token goes through ``html.escape`` (a ``<script>`` or ``</div>`` in the text shows as text); the tint is
an inline style and the exact value sits in a ``title`` attribute, so it shows on hover.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence

# Whitespace a reader cannot see otherwise.
VISIBLE = {"\n": "⏎", "\r": "␍", "\t": "⇥"}

COLORS = {
    "act": (255, 122, 0),  # latent activations: orange
    "error": (124, 58, 237),  # reconstruction error: violet
    "pos": (220, 38, 38),  # signed values above zero (loss goes up): red
    "neg": (37, 99, 235),  # below zero: blue
}

_BOX = (
    "font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.86rem; "
    "line-height: 1.85; white-space: pre-wrap; word-break: break-word; padding: 0.35rem 0.5rem; "
    "border: 1px solid rgba(49, 51, 63, 0.15); border-radius: 0.4rem; margin-bottom: 0.35rem; background: #fff;"
)


def escape(text: object) -> str:
    """``html.escape`` with quotes, for text and attribute values alike."""
    return html.escape(str(text), quote=True)


_MARKDOWN_SPECIAL = set("\\`*_{}[]()#+-.!|<>~$:")
# Streamlit turns ``:material/name:``, ``:streamlit:`` and emoji codes (``:smile:``) into pictures whether their colons
# are escaped or not (``:material/`` even inside code spans): a zero-width word joiner after the colon breaks the
# pattern and shows nothing. A colon at the end counts too: streamed pieces are escaped one by one.
_ICON = re.compile(r":(?=[\w+-]|$)")
_CODE_ICON = re.compile(r":(?=material/)")
_JOINER = "\u2060"


def md(text: object) -> str:
    """Any text (a label, a run name, a URL parameter, an error) made literal for Streamlit markdown: ``*``, ``_``,
    backticks, links, HTML, ``$math$`` and icon codes show as the characters they are. Everything user- or
    file-controlled that reaches ``st.markdown``, ``st.caption``, alerts, titles or widget labels goes through this
    or ``code``."""
    text = str(text)
    if not text:
        return ""
    return _ICON.sub(":" + _JOINER, "".join("\\" + ch if ch in _MARKDOWN_SPECIAL else ch for ch in visible(text)))


def code(text: object) -> str:
    """Text as an inline code span that shows it exactly (a path, a hook name, a command), whatever backticks it
    holds: the fence is one backtick longer than the longest run inside."""
    text = _CODE_ICON.sub(":" + _JOINER, visible(str(text)))
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"  # CommonMark strips one space each side: a leading or trailing ` stays content


def visible(token: str) -> str:
    """The token with newlines, tabs and carriage returns shown as symbols (empty tokens as ∅)."""
    if token == "":
        return "∅"
    return "".join(VISIBLE.get(ch, ch) for ch in token)


def fmt(value: float | None, digits: int = 3) -> str:
    """A compact number: ``None``/NaN as an en dash, tiny or huge values in scientific notation."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    value = float(value)
    if value != 0 and (abs(value) < 10 ** -(digits - 1) or abs(value) >= 1e6):
        return f"{value:.{max(digits - 1, 1)}e}"
    return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:,.{digits - 1}f}"


def compact(value: float | None) -> str:
    """A number short enough for a metric card at a laptop width (seven characters or so): ``fmt``'s three
    significant digits below 1,000, whole numbers with separators below a million, then 1.23M, 4.56B, 7.89T."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) < 1000:
        return str(value) if isinstance(value, int) else fmt(value)
    value = round(value)
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}" if abs(value) < 1000 * scale else fmt(value)
    return f"{value:,}"


def tint(value: float, scale: float, color: str = "act") -> str:
    """``background`` style for ``value`` on a 0..``scale`` ramp of ``color`` (empty when it is zero)."""
    if not value or not scale or math.isnan(value):
        return ""
    alpha = min(abs(float(value)) / float(scale), 1.0) * 0.85
    r, g, b = COLORS[color]
    return f"background-color: rgba({r}, {g}, {b}, {alpha:.3f});"


def token_span(
    token: str, value: float, scale: float, *, color: str = "act", title: str | None = None, mark: bool = False,
) -> str:
    """One escaped token tinted by ``value``; ``title`` (default: the token and value) shows on hover."""
    if title is None:
        title = f"{token!r}: {fmt(value)}"
    style = tint(value, scale, color) + ("font-weight: 700; text-decoration: underline;" if mark else "")
    style += "border-radius: 3px; padding: 0 1px;"
    return f'<span style="{style}" title="{escape(title)}">{escape(visible(token))}</span>'


def tokens_html(
    tokens: Sequence[str],
    values: Sequence[float | None],
    *,
    scale: float | None = None,
    color: str = "act",
    signed: bool = False,
    titles: Sequence[str] | None = None,
    mark: int | None = None,
    breaks: bool = True,
) -> str:
    """A box of tokens, each tinted by its value (``signed``: red above zero, blue below; None: untinted).

    ``scale`` defaults to the largest absolute value; ``mark`` underlines one position (e.g. the max);
    ``breaks`` also breaks the line after a newline token (its ⏎ stays visible).
    """
    if len(values) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(values)} values")
    finite = [abs(float(v)) for v in values if v is not None and not math.isnan(float(v))]
    if scale is None:
        scale = max(finite, default=0.0)
    parts = []
    for i, (token, value) in enumerate(zip(tokens, values, strict=True)):
        number = 0.0 if value is None else float(value)
        hue = ("pos" if number > 0 else "neg") if signed else color
        title = titles[i] if titles is not None else None
        parts.append(token_span(token, number, scale, color=hue, title=title, mark=(i == mark)))
        if breaks and "\n" in token:
            parts.append("<br>")
    return f'<div class="saescope-tokens" style="{_BOX}">{"".join(parts)}</div>'


def chips(items: Sequence[tuple[str, float]], *, color: str = "act", scale: float | None = None) -> str:
    """Tokens as tinted chips with their value after them (for logit effects)."""
    if not items:
        return '<div style="color: #888;">none</div>'
    scale = scale or max((abs(v) for _, v in items), default=1.0)
    parts = []
    for token, value in items:
        style = tint(0.15 + 0.45 * abs(value) / scale, 1.0, color)
        style += "border-radius: 4px; padding: 1px 5px; margin: 2px; display: inline-block;"
        parts.append(
            f'<span style="{style}" title="{escape(f"{token!r}: {value:+.3f}")}">'
            f'<code style="background: none;">{escape(visible(token))}</code> '
            f'<small style="color: #555;">{value:+.2f}</small></span>'
        )
    return f'<div style="line-height: 2;">{"".join(parts)}</div>'


def continuation_html(prompt: str, continuation: str, *, note: str = "") -> str:
    """Prompt text (grey) followed by the generated continuation; both escaped, newlines kept."""
    cursor = f' <small style="color: #888;">{escape(note)}</small>' if note else ""
    return (
        f'<div class="saescope-generation" style="{_BOX} min-height: 6rem;">'
        f'<span style="color: #8a8f98;">{escape(prompt)}</span>'
        f"<span>{escape(continuation)}</span>{cursor}</div>"
    )
