"""Resuming a forward from the residual stream: equal to the full forward for every family."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine.model.loading import from_module
from engine.model.tail import can_resume, resume_logits
from engine.model.tiny import tiny_config, tiny_model, tiny_tokenizer

WINDOW = 6
POS = 20
"""Sequences longer than the sliding window, so sliding layers see fewer keys than full ones."""

_COMMON = dict(
    vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0,
)
_MIXED = ["sliding_attention", "full_attention"]


def _config(family: str, window: int):
    if family == "qwen2":
        config = tiny_config("qwen2")
        config.use_sliding_window, config.sliding_window, config.layer_types = True, window, list(_MIXED)
        return config
    if family == "gemma2":
        config = tiny_config("gemma2")
        assert config.layer_types == _MIXED
        config.sliding_window = window
        return config
    if family == "mistral":  # no layer_types: the window applies to every layer
        return AutoConfig.for_model("mistral", sliding_window=window, **_COMMON)
    if family == "gemma3":  # one rotary base per layer type
        return AutoConfig.for_model(
            "gemma3_text", sliding_window=window, head_dim=16, layer_types=list(_MIXED), **_COMMON
        )
    raise KeyError(family)


def _model(family: str, window: int = WINDOW):
    if family in ("llama", "gemma", "gpt2", "gpt_neox"):
        return tiny_model(family)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family, window), dtype=torch.float32)
    return from_module(model, tiny_tokenizer(), name=f"tiny-{family}")


FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3", "gpt2", "gpt_neox"]
HOOKS = [f"blocks.{layer}.{kind}" for layer in (0, 1) for kind in ("hook_resid_pre", "hook_resid_post")]


def _ids(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 300, (batch, POS), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return _model(request.param)


@pytest.mark.parametrize("hook", HOOKS)
def test_resume_equals_full_forward(lm, hook):
    ids = _ids()
    assert not torch.equal(ids[0], ids[1])
    assert can_resume(lm, hook)
    resumed = resume_logits(lm, hook, lm.capture(ids, hook)[hook])
    full = lm.logits(ids)
    assert resumed.shape == full.shape == (2, POS, 384)
    torch.testing.assert_close(resumed, full, atol=1e-4, rtol=0)
    # each row alone gives the same logits: rows do not leak into each other
    torch.testing.assert_close(resume_logits(lm, hook, lm.capture(ids[1:], hook)[hook]), full[1:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("hook", HOOKS)
def test_resumed_intervention_equals_hooked_forward(lm, hook):
    ids = _ids(seed=1)
    mask = torch.zeros(2, POS, 1, dtype=torch.bool)
    mask[0, 3:], mask[1, ::2] = True, True
    # a shift along a fixed direction as well as a scale: the final norm would undo a scale alone
    direction = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(2))

    def edit(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x * 0.5 + direction, x)

    with lm.hooks.intervene(hook, edit):
        hooked = lm.logits(ids)
    resumed = resume_logits(lm, hook, edit(lm.capture(ids, hook)[hook]))
    torch.testing.assert_close(resumed, hooked, atol=1e-4, rtol=0)
    assert (hooked - lm.logits(ids)).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma2", "gemma3"])
def test_sliding_window_matters(family):
    # without this, the windowed families above would pass even if resuming ignored the window
    ids = _ids()
    narrow, wide = _model(family).logits(ids), _model(family, window=256).logits(ids)
    torch.testing.assert_close(narrow[:, :WINDOW], wide[:, :WINDOW], atol=1e-5, rtol=0)
    assert (narrow[:, WINDOW:] - wide[:, WINDOW:]).abs().max() > 1e-2


def test_padding_mask_matches_full_forward():
    lm = _model("qwen2")
    ids = _ids()
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :4] = 0  # left padding on the second row
    hook = "blocks.0.hook_resid_post"
    x = lm.capture(ids, hook, attention_mask=attention_mask)[hook]
    full = lm.logits(ids, attention_mask=attention_mask)
    torch.testing.assert_close(resume_logits(lm, hook, x, attention_mask=attention_mask), full, atol=1e-4, rtol=0)
    assert (resume_logits(lm, hook, x)[1, 4:] - full[1, 4:]).abs().max() > 1e-3


def test_unsupported_hooks_and_shapes():
    lm = tiny_model("gpt2")
    assert not can_resume(lm, "blocks.0.hook_mlp_out")
    assert not can_resume(lm, "blocks.0.attn.hook_z")
    assert not can_resume(lm, "blocks.2.hook_resid_pre")  # past the last layer of this 2-layer model
    with pytest.raises(ValueError, match="cannot resume"):
        resume_logits(lm, "blocks.0.hook_attn_out", torch.zeros(1, 3, lm.d_model))
    with pytest.raises(ValueError, match="resid must be"):
        resume_logits(lm, "blocks.0.hook_resid_post", torch.zeros(3, lm.d_model))


def test_shared_model_is_unchanged():
    lm = _model("gemma2")
    before = {name: t.clone() for name, t in lm.model.state_dict().items()}
    modules = dict(lm.model.named_modules())
    config = lm.config.to_dict()
    hook = "blocks.1.hook_resid_pre"
    resume_logits(lm, hook, lm.capture(_ids(), hook)[hook])
    assert dict(lm.model.named_modules()) == modules and lm.config.to_dict() == config
    for name, t in lm.model.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_no_deprecated_transformers_api_in_resume_or_steering():
    """The lock's transformers and the newest both: no FutureWarning or DeprecationWarning from saescope's calls
    (transformers 5.25 renamed ``past_key_values`` to ``cache`` in the mask builders and the models' forward)."""
    import warnings

    from engine.live.steering import generate

    lm = _model("gemma2")  # both mask builders: sliding and full layers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resume_logits(lm, "blocks.0.hook_resid_post", lm.capture(_ids(), "blocks.0.hook_resid_post")["blocks.0.hook_resid_post"])
        tokens = list(generate(lm, [5, 6, 7], max_new_tokens=4, temperature=0.0, stop_at_eos=False))
    assert len(tokens) == 4
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
