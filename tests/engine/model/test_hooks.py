"""Hook points on every family: capture, early stop, replacement, steering, thread isolation."""

import threading

import pytest
import torch

from engine import add_vector, check_sae_fits, clamp_latents, splice_sae, steering_vector
from engine.model.families import supported_model_types
from engine.model.hooks import StopForward
from engine.model.tiny import tiny_model
from tests.engine.saes_util import random_sae

FAMILIES = ["gpt2", "llama", "qwen2", "gpt_neox", "gemma", "gemma2"]


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return tiny_model(request.param)


def _ids(lm, n=2, length=12, seed=0):
    return torch.randint(1, lm.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))


def test_hook_points_listed(lm):
    names = lm.hook_points()
    assert len(names) == 6 * lm.n_layers
    expected = {"blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.1.attn.hook_z", "blocks.0.hook_mlp_out",
                "blocks.0.hook_attn_out"}
    assert expected <= set(names)


def test_capture_equals_hidden_states(lm):
    ids = _ids(lm)
    hidden = lm.model(ids, output_hidden_states=True).hidden_states
    for layer in range(lm.n_layers - 1):  # the last hidden state has the final norm applied
        acts = lm.capture(ids, [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post"])
        torch.testing.assert_close(acts[f"blocks.{layer}.hook_resid_pre"], hidden[layer])
        torch.testing.assert_close(acts[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1])


def test_residual_decomposes_into_attn_and_mlp(lm):
    ids = _ids(lm)
    names = ["blocks.1.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    a = lm.capture(ids, names, stop_early=False)
    torch.testing.assert_close(a[names[0]] + a[names[1]] + a[names[2]], a[names[3]], atol=1e-5, rtol=1e-4)


def test_mlp_input_is_what_the_mlp_reads(lm):
    """``ln2.hook_normalized`` is the MLP's input: the MLP module run on it alone gives the MLP's output (Gemma 2
    normalises that output once more before ``hook_mlp_out``), and it is the pre-MLP norm of the residual stream."""
    from engine.model.families import decoder_layers

    ids = _ids(lm)
    names = ["blocks.1.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
    a = lm.capture(ids, names, stop_early=False)
    family = lm.family
    block = decoder_layers(lm.model, family)[1]
    mlp = getattr(block, family.mlp)
    out = mlp(a[names[2]])
    if family.mlp_out:
        out = getattr(block, family.mlp_out)(out)
    torch.testing.assert_close(out, a[names[3]], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a[names[2]], a[names[0]] + a[names[1]])  # normalised, not the stream itself


def test_hook_z_is_per_head(lm):
    acts = lm.capture(_ids(lm), "blocks.0.attn.hook_z")["blocks.0.attn.hook_z"]
    assert acts.shape == (2, 12, lm.n_heads, lm.d_head)
    assert lm.hook_width("blocks.0.attn.hook_z") == lm.n_heads * lm.d_head


def test_capture_stops_early(lm):
    calls = []
    last = lm.hooks.points[f"blocks.{lm.n_layers - 1}.hook_resid_post"].module
    handle = last.register_forward_hook(lambda *a: calls.append(1))
    try:
        lm.capture(_ids(lm), "blocks.0.hook_resid_post")
        assert calls == []
        lm.capture(_ids(lm), "blocks.0.hook_resid_post", stop_early=False)
        assert calls == [1]
    finally:
        handle.remove()


def test_unknown_hook_lists_valid_names(lm):
    with pytest.raises(ValueError, match=r"unknown hook point 'blocks\.9\.hook_resid_post'.*blocks\.0\.hook_resid_pre"):
        lm.capture(_ids(lm), "blocks.9.hook_resid_post")
    with pytest.raises(ValueError, match="unknown hook point 'transformer.h.0'"):
        lm.hooks.check("transformer.h.0")


def test_splice_with_error_equals_clean(lm):
    ids = _ids(lm)
    sae = random_sae("topk", d_in=lm.d_model, hook="blocks.0.hook_resid_post")
    clean = lm.logits(ids)
    with splice_sae(lm, sae, add_error=True):
        spliced = lm.logits(ids)
    torch.testing.assert_close(spliced, clean, atol=1e-4, rtol=1e-4)
    with splice_sae(lm, sae):
        recon = lm.logits(ids)
    assert not torch.allclose(recon, clean, atol=1e-3)
    torch.testing.assert_close(lm.logits(ids), clean)  # nothing left behind


def test_splice_mask_keeps_masked_positions_clean(lm):
    ids = _ids(lm, n=1)
    sae = random_sae("standard", d_in=lm.d_model, hook="blocks.0.hook_resid_post")
    mask = torch.zeros(1, 12, dtype=torch.bool)
    with splice_sae(lm, sae, mask=mask):
        torch.testing.assert_close(lm.logits(ids), lm.model(ids).logits)


def test_intervention_removed_after_exception(lm):
    ids = _ids(lm)
    clean = lm.logits(ids)
    with pytest.raises(RuntimeError, match="boom"):
        with lm.hooks.intervene("blocks.0.hook_resid_post", lambda x: x * 0):
            raise RuntimeError("boom")
    torch.testing.assert_close(lm.logits(ids), clean)


def test_stop_forward_is_not_leaked(lm):
    def stop(x):
        raise StopForward

    with pytest.raises(StopForward):
        with lm.hooks.intervene("blocks.0.hook_resid_pre", stop):
            lm.logits(_ids(lm))
    assert lm.logits(_ids(lm)).shape[-1] == lm.config.vocab_size


def test_steering_adds_decoder_rows(lm):
    sae = random_sae("standard", d_in=lm.d_model, hook="blocks.0.hook_resid_post")
    ids = _ids(lm)
    vec = steering_vector(sae, {3: 2.0, 7: -1.0})
    torch.testing.assert_close(vec, 2 * sae.W_dec[3] - sae.W_dec[7])
    base = lm.capture(ids, "blocks.0.hook_resid_post")["blocks.0.hook_resid_post"]
    with add_vector(lm, "blocks.0.hook_resid_post", vec):
        steered = lm.capture(ids, "blocks.0.hook_resid_post")["blocks.0.hook_resid_post"]
    torch.testing.assert_close(steered - base, vec.expand_as(base), atol=1e-5, rtol=1e-5)


def test_clamp_sets_latent(lm):
    sae = random_sae("standard", d_in=lm.d_model, hook="blocks.0.hook_resid_post", apply_b_dec_to_input=False)
    ids = _ids(lm)
    with clamp_latents(lm, sae, {5: 3.0}):
        x = lm.capture(ids, "blocks.0.hook_resid_post")["blocks.0.hook_resid_post"]
    base = lm.capture(ids, "blocks.0.hook_resid_post")["blocks.0.hook_resid_post"]
    expected = base + (3.0 - sae.encode(base)[..., 5:6]) * sae.W_dec[5]
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)


def test_sae_width_mismatch(lm):
    sae = random_sae("standard", d_in=lm.d_model * 2, hook="blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match=rf"SAE d_in={lm.d_model * 2} does not match the model's width {lm.d_model}"):
        check_sae_fits(lm, sae)
    sae = random_sae("standard", d_in=lm.d_model, hook="blocks.7.hook_resid_post")
    with pytest.raises(ValueError, match="unknown hook point"):
        check_sae_fits(lm, sae)


def test_unsupported_family_names_supported():
    from engine.model.families import family_for

    with pytest.raises(ValueError, match=r"unsupported model family 'mamba'.*gpt2.*llama"):
        family_for("mamba")
    assert "gemma2" in supported_model_types()


def test_threads_share_a_model_without_leaking(tiny_llama):
    """Eight threads steering differently on one model each get exactly their solo result."""
    lm = tiny_llama
    sae = random_sae("standard", d_in=lm.d_model, hook="blocks.0.hook_resid_post")
    ids = _ids(lm, n=1, length=16)
    hook = "blocks.0.hook_resid_post"

    def run(i: int) -> torch.Tensor:
        with add_vector(lm, hook, steering_vector(sae, {i: 5.0 * (i + 1)})):
            return lm.logits(ids)

    solo = [run(i) for i in range(8)]
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(8)}
    barrier = threading.Barrier(8)

    def worker(i):
        barrier.wait()
        for _ in range(5):
            results[i].append(run(i))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert len(results[i]) == 5
        for r in results[i]:
            torch.testing.assert_close(r, solo[i])
    assert not torch.allclose(solo[0], solo[1])


def _hooked_modules(lm) -> int:
    """Hooks on the model's modules (transformers adds its own after an ``output_hidden_states`` forward)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())


def test_dispatchers_only_while_intervening(lm):
    """Plain forwards run on hook-free modules; a scope installs its point's dispatcher, the last one out removes it."""
    base = _hooked_modules(lm)
    assert lm.hooks.installed() == []
    pre, post = "blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"
    with lm.hooks.intervene(pre, lambda x: None):
        assert lm.hooks.installed() == [pre] and _hooked_modules(lm) == base + 1
        with lm.hooks.intervene(pre, lambda x: None), lm.hooks.intervene(post, lambda x: None):
            assert sorted(lm.hooks.installed()) == sorted([pre, post]) and _hooked_modules(lm) == base + 2
        assert lm.hooks.installed() == [pre]
    with pytest.raises(RuntimeError, match="boom"):
        with lm.hooks.intervene(post, lambda x: None):
            raise RuntimeError("boom")
    assert _hooked_modules(lm) == base and lm.hooks.installed() == []


def test_install_and_removal_race_with_other_threads_forwards(tiny_llama):
    """Threads entering and leaving per-forward scopes (pre and post hooks) next to plain forwards never disturb them."""
    import sys

    lm = tiny_llama
    base = _hooked_modules(lm)
    ids = _ids(lm, n=1, length=10)
    points = ["blocks.1.attn.hook_z", "blocks.0.hook_resid_post"]  # a pre-hook and a post-hook point

    def run(i: int) -> torch.Tensor:
        if i % 2:  # odd workers: plain forwards while others install and remove dispatchers
            return lm.logits(ids)
        # two workers per point, so its dispatcher is shared, handed over and re-installed
        with lm.hooks.intervene(points[(i // 2) % 2], lambda x: x * (0.5 + 0.25 * i)):
            return lm.logits(ids)

    solo = [run(i) for i in range(8)]
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(8)}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(i):
        barrier.wait()
        try:
            for _ in range(40):
                results[i].append(run(i))
        except BaseException as err:
            errors.append(err)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible to hit the install/remove windows
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    for i in range(8):
        assert len(results[i]) == 40
        for r in results[i]:
            torch.testing.assert_close(r, solo[i], rtol=0, atol=0)
    assert _hooked_modules(lm) == base


def test_removed_manager_refuses_new_scopes():
    lm = tiny_model("llama")
    with lm.hooks.intervene("blocks.0.hook_resid_post", lambda x: x * 0):
        lm.hooks.remove()
        assert _hooked_modules(lm) == 0  # a fresh model: no transformers hooks either
    with pytest.raises(RuntimeError, match="removed"):
        with lm.hooks.intervene("blocks.0.hook_resid_post", lambda x: x * 0):
            pass


def test_pre_hook_met_without_kwargs_is_a_no_op_for_other_threads(tiny_llama):
    """torch registers a pre-hook before marking it with_kwargs; a forward in between calls it with (module, args)."""
    lm = tiny_llama
    point = lm.hooks.check("blocks.0.hook_resid_pre")
    x = torch.zeros(1, 3, lm.d_model)
    seen = []
    with lm.hooks.intervene(point.name, lambda act: act + 1):
        (dispatcher,) = [h for h in point.module._forward_pre_hooks.values() if h.__name__ == "pre_hook"]
        other = threading.Thread(target=lambda: seen.append(dispatcher(point.module, (x,))))
        other.start()
        other.join()
    assert seen == [None]


class SignallingLock:
    """A lock that sets ``contended`` when a thread finds it held and has to wait for it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.contended = threading.Event()

    def __enter__(self):
        if not self._lock.acquire(blocking=False):
            self.contended.set()
            self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()


def test_handover_never_leaves_two_dispatchers(tiny_llama, monkeypatch):
    """A scope entering a point while the last one there is still taking its dispatcher off waits: one call per forward.

    The leaving thread is held in the middle of removing its dispatcher until the entering scope has found the
    manager's lock taken and waits for it; a manager that removed dispatchers outside its lock would let the entering
    scope install a second dispatcher and run its forward through both (two calls), and would never be waited for."""
    lm = tiny_llama
    name = "blocks.0.hook_resid_post"
    lock = SignallingLock()
    monkeypatch.setattr(lm.hooks, "_lock", lock)
    real_remove = torch.utils.hooks.RemovableHandle.remove
    removing = threading.Event()

    def held_remove(handle):
        if threading.current_thread().name == "leaver":
            removing.set()
            lock.contended.wait(10)  # the leaving thread stays mid-removal until the entering scope waits on it
        real_remove(handle)

    monkeypatch.setattr(torch.utils.hooks.RemovableHandle, "remove", held_remove)

    def leave():
        with lm.hooks.intervene(name, lambda x: None):
            pass

    leaver = threading.Thread(target=leave, name="leaver")
    leaver.start()
    assert removing.wait(10), "the leaving scope never removed its dispatcher"
    calls = []
    with lm.hooks.intervene(name, lambda x: calls.append(1)):
        lm.logits(_ids(lm, n=1, length=4))
    leaver.join()
    assert lock.contended.is_set(), "the entering scope did not wait for the removal in progress"
    assert calls == [1]
    assert lm.hooks.installed() == []


def test_other_hooks_on_the_module_see_the_intervened_activation(tiny_llama):
    """transformers' output_hidden_states recorders (installed on first use) run after our dispatcher."""
    lm = tiny_llama
    ids = _ids(lm, n=1, length=6)
    vec = torch.full((lm.d_model,), 3.0)
    clean = lm.model(ids, output_hidden_states=True).hidden_states[1]  # installs the recorders first
    with add_vector(lm, "blocks.0.hook_resid_post", vec):
        steered = lm.model(ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(steered - clean, vec.expand_as(clean))
