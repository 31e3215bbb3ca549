import numpy as np
import pytest
import torch

from engine.circuits.patching import metric, patch_heads, patch_scan, performance, resolve_wrong, run_with_cache
from engine.circuits.tasks import Task, TaskPair
from engine.model.tiny import tiny_model


def pair(ids, cf_ids, answer, wrong):
    return TaskPair("p", "c", "a", "w", tuple(ids), tuple(cf_ids), (answer,), (wrong,))


def make_task(seed=0, n=4, length=6, diff=(1, 3)):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        ids = torch.randint(1, 300, (length + i % 2,), generator=g).tolist()  # two lengths: two groups
        cf = list(ids)
        for d in diff:
            cf[d] = (cf[d] + 7) % 300 + 1
        pairs.append(pair(ids, cf, int(torch.randint(1, 300, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g))))
    return Task("t", tuple(pairs))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    return tiny_model(request.param, n_layers=3)


def z_names(lm):
    return [f"blocks.{layer}.attn.hook_z" for layer in range(lm.n_layers)]


def test_patching_a_head_with_itself_changes_nothing(lm):
    ids = torch.tensor([make_task().pairs[0].prompt_ids])
    logits, cache = run_with_cache(lm, ids, z_names(lm))
    sources = {layer: cache[f"blocks.{layer}.attn.hook_z"] for layer in range(lm.n_layers)}
    for heads in ([(1, 2)], [(layer, h) for layer in range(lm.n_layers) for h in range(lm.n_heads)]):
        torch.testing.assert_close(patch_heads(lm, ids, heads, sources), logits, rtol=0, atol=0)


def test_patching_every_head_gives_the_counterfactual_where_the_tokens_agree(lm):
    # attention is the only path between positions, and MLPs and norms act on one position: with every head's
    # output taken from the counterfactual, a position whose own token is the same in both prompts has the
    # counterfactual's residual stream at every layer, hence its logits; where the tokens differ they do not.
    p = make_task(diff=(1, 3)).pairs[0]
    ids, cf = torch.tensor([p.prompt_ids]), torch.tensor([p.counterfactual_ids])
    cf_logits, cf_cache = run_with_cache(lm, cf, z_names(lm))
    sources = {layer: cf_cache[f"blocks.{layer}.attn.hook_z"] for layer in range(lm.n_layers)}
    everything = [(layer, h) for layer in range(lm.n_layers) for h in range(lm.n_heads)]
    patched = patch_heads(lm, ids, everything, sources)
    same = [i for i in range(ids.shape[1]) if i not in (1, 3)]
    torch.testing.assert_close(patched[0, same], cf_logits[0, same], rtol=1e-4, atol=1e-4)
    for i in (1, 3):
        assert not torch.allclose(patched[0, i], cf_logits[0, i], atol=1e-3)
    # leaving one head of the last layer clean breaks the match at the last position
    partial = patch_heads(lm, ids, everything[:-1], sources)
    assert not torch.allclose(partial[0, -1], cf_logits[0, -1], atol=1e-4)


def test_performance_by_hand(lm):
    task = make_task(n=4)
    perf = performance(lm, task)
    clean, cf, top = [], [], []
    for p in task.pairs:
        last = lm.logits(torch.tensor([p.prompt_ids]))[0, -1]
        clean.append(float(last[p.answer_ids[0]] - last[p.wrong_ids[0]]))
        top.append(int(last.argmax()) == p.answer_ids[0])
        last = lm.logits(torch.tensor([p.counterfactual_ids]))[0, -1]
        cf.append(float(last[p.answer_ids[0]] - last[p.wrong_ids[0]]))
    assert perf.accuracy == np.mean(np.array(clean) > 0)
    assert perf.top1 == np.mean(top)
    assert perf.logit_diff == pytest.approx(np.mean(clean), abs=1e-5)
    assert perf.logit_diff_counterfactual == pytest.approx(np.mean(cf), abs=1e-5)


def test_metric_of_answer_sets_is_log_odds():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    p = TaskPair("p", "c", "a", "w", (0,), (0,), (2, 3), (0, 1))
    odds = (np.exp(2) + np.exp(3)) / (np.exp(0) + np.exp(1))
    assert metric(logits, [p])[0] == pytest.approx(np.log(odds))


def test_resolve_wrong_takes_the_strongest_other_token(lm):
    p = make_task().pairs[0]
    last = lm.logits(torch.tensor([p.prompt_ids]))[0, -1]
    answer = int(last.argmax())  # the answer is the top token: the wrong one is the runner-up
    task = resolve_wrong(lm, Task("t", (TaskPair("p", "c", "a", "", p.prompt_ids, p.counterfactual_ids, (answer,), ()),) * 2))
    assert task.pairs[0].wrong_ids == (int(last.topk(2).indices[1]),)


def test_patch_scan_matches_full_forward_patching(lm):
    task = make_task(n=4)
    result = patch_scan(lm, task)
    assert result.patch.shape == (lm.n_layers, lm.n_heads)
    clean = np.zeros(4)
    cf = np.zeros(4)
    patched = {}
    for i, p in enumerate(task.pairs):
        ids, cf_ids = torch.tensor([p.prompt_ids]), torch.tensor([p.counterfactual_ids])
        lg, cache = run_with_cache(lm, ids, z_names(lm))
        cfl, cf_cache = run_with_cache(lm, cf_ids, z_names(lm))
        clean[i], cf[i] = metric(lg[:, -1], [p])[0], metric(cfl[:, -1], [p])[0]
        for layer, head in [(0, 1), (2, 3)]:
            out = patch_heads(lm, ids, [(layer, head)], {layer: cf_cache[f"blocks.{layer}.attn.hook_z"]})
            patched.setdefault((layer, head), []).append(metric(out[:, -1], [p])[0])
    for (layer, head), values in patched.items():
        expected = (clean.mean() - np.mean(values)) / (clean.mean() - cf.mean())
        assert result.patch[layer, head] == pytest.approx(expected, abs=1e-4)
    assert result.logit_diff_clean == pytest.approx(clean.mean(), abs=1e-5)
    # mean-ablation: the head's z replaced by its mean over the clean and counterfactual prompts of the same length
    layer, head = 1, 2
    ablated = []
    for p in task.pairs:
        group = [q for q in task.pairs if len(q.prompt_ids) == len(p.prompt_ids)]
        ids = torch.tensor([q.prompt_ids for q in group] + [q.counterfactual_ids for q in group])
        mean = run_with_cache(lm, ids, z_names(lm))[1][f"blocks.{layer}.attn.hook_z"].mean(0, keepdim=True)
        out = patch_heads(lm, torch.tensor([p.prompt_ids]), [(layer, head)], {layer: mean})
        ablated.append(metric(out[:, -1], [p])[0])
    expected = (clean.mean() - np.mean(ablated)) / (clean.mean() - cf.mean())
    assert result.mean_ablation[layer, head] == pytest.approx(expected, abs=1e-4)
