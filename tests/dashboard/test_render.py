"""Token HTML: every token escaped, tints proportional to the value, the exact value on hover."""

import re

import pytest

from dashboard import render
from dashboard.params import SteerSettings, format_latents, parse_latents


def test_tokens_are_escaped_and_whitespace_is_visible():
    out = render.tokens_html(["<script>", "alert('x')", "</div>", " &amp;", "\n", ""], [1, 0, 2, 0, 0, 0])
    assert "<script>" not in out
    assert "&lt;script&gt;" in out and "&lt;/div&gt;" in out and "&amp;amp;" in out and "alert(&#x27;x&#x27;)" in out
    assert "⏎</span><br>" in out and "∅" in out
    assert out.count("<span") == 6 and out.endswith("</div>") and out.count("</div>") == 1


def test_titles_are_escaped_attributes():
    out = render.tokens_html(["a"], [1.0], titles=['x" onmouseover="alert(1)'])
    assert 'title="x&quot; onmouseover=&quot;alert(1)"' in out
    default = render.tokens_html(['"q"'], [0.5])
    assert "title=\"&#x27;&quot;q&quot;&#x27;: 0.5\"" in default


def test_tint_is_proportional_and_capped():
    out = render.tokens_html(list("abcd"), [0, 1, 2, 4], scale=2)
    alphas = [float(a) for a in re.findall(r"rgba\(255, 122, 0, ([0-9.]+)\)", out)]
    assert alphas == pytest.approx([0.425, 0.85, 0.85])  # zero untinted, half, full, capped
    signed = render.tokens_html(["x", "y"], [0.5, -1.0], signed=True)
    assert "rgba(220, 38, 38, 0.425)" in signed and "rgba(37, 99, 235, 0.850)" in signed
    with pytest.raises(ValueError):
        render.tokens_html(["a", "b"], [1.0])


def test_max_token_is_marked_and_none_values_are_blank():
    out = render.tokens_html(["a", "b", "c"], [None, 3.0, 1.0], mark=1)
    spans = out.split("<span")[1:]
    assert "background-color" not in spans[0] and "underline" in spans[1] and "underline" not in spans[2]


def test_chips_and_continuation_escape_text():
    chips = render.chips([("<b>", 0.5), ("\n", -0.25)], color="pos")
    assert "&lt;b&gt;" in chips and "⏎" in chips and "+0.50" in chips and "-0.25" in chips
    assert render.chips([]).count("none") == 1
    gen = render.continuation_html("<i>prompt</i>", "</div><script>x</script>", note="▌")
    assert "&lt;i&gt;prompt&lt;/i&gt;" in gen and "&lt;/div&gt;&lt;script&gt;" in gen and "<script" not in gen


def test_fmt():
    assert render.fmt(None) == "–" and render.fmt(float("nan")) == "–"
    assert render.fmt(0.2734) == "0.273" and render.fmt(8.0) == "8.00" and render.fmt(0.0000123) == "1.23e-05"
    assert render.fmt(1234.5) == "1,234.50"


def test_steering_settings_round_trip_through_the_url():
    s = SteerSettings(latents={12: 4.0, 77: -2.5}, mode="clamp", unit="raw", prompt="a & b <c>", chat=True,
                      max_new=17, temperature=0.3, seed=9)
    assert SteerSettings.from_query(s.to_query()) == s
    assert s.to_query()["latents"] == "12:4,77:-2.5"
    assert parse_latents("3, 5:1.5,") == {3: 4.0, 5: 1.5} and format_latents({}) == ""
    assert parse_latents("1:500") == {1: 20.0}  # clipped to the slider's range


@pytest.mark.parametrize(
    "query, message",
    [({"latents": "a:b"}, "12:4.0"), ({"latents": "-3:1"}, "non-negative"), ({"mode": "boost"}, "mode"),
     ({"seed": "x"}, "seed"), ({"max_new": "100000"}, "between"), ({"unit": "px"}, "unit")],
)
def test_bad_steering_links_are_refused_with_a_reason(query, message):
    with pytest.raises(ValueError, match=message):
        SteerSettings.from_query(query)


def test_markdown_escaping_keeps_labels_literal():
    assert render.md("a*b_c `x` [l](u)") == "a\\*b\\_c \\`x\\` \\[l\\]\\(u\\)"
    assert render.md("\n") == "⏎" and render.md("") == ""


def test_compact_numbers_fit_a_metric_card():
    assert [render.compact(v) for v in (0, 999, 1000, 123_456, 999_999, 999_999.7, 1_234_567, 98_765_432_100)] == [
        "0", "999", "1,000", "123,456", "999,999", "1M", "1.23M", "98.8B"]
    assert render.compact(0.2734) == "0.273" and render.compact(-2500.4) == "-2,500" and render.compact(None) == "–"
    assert max(len(render.compact(10.0**e * m)) for e in range(-8, 16) for m in (1, 4.5678, 9.99999)) <= 8


def test_code_spans_hold_any_text_and_markdown_stays_literal():
    assert render.code("a`b") == "`` a`b ``" and render.code("``x`") == "``` ``x` ```"
    assert render.code(":material/home:") == ":\u2060material/home:".join(["` ", " `"])  # no icon even in code
    assert render.md("[x](javascript:alert(1)) $m$ :smile:") == (
        "\\[x\\]\\(javascript\\:\u2060alert\\(1\\)\\) \\$m\\$ \\:\u2060smile\\:\u2060")
    assert render.md("ends with:").endswith(":\u2060")  # the next streamed piece cannot complete an icon code
