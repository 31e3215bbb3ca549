# pyright: reportMissingImports=false
"""saescope against SAEDashboard 0.8.0 on the same weights and the same tokens, one after the other on one machine.

    .venv/bin/python scripts/peer_saedashboard.py --setup-peer-venv .peer-venv      # once: SAEDashboard's own venv
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/peer_saedashboard.py --peer-venv .peer-venv \\
        --tokens 16384,65536,262144 --json test-artifacts/peer_saedashboard.json

What both tools read (built once per invocation in ``--work-dir``, a temporary folder by default):

- a GPT-2-small-shaped random model from a config (12 layers, d_model 768, 12 heads, vocabulary 50,257,
  n_positions 1024; tied embeddings drawn with std 0.14, so ``W_U`` has std 0.14), saved with ``save_pretrained``
  and loaded from that folder by both tools, so both compute with bit-identical weights;
- a TopK SAE at ``blocks.6.hook_resid_pre`` (6,144 latents, k 32; unit-norm random decoder rows, tied encoder,
  ``b_enc`` 0.05, ``b_dec`` the mean residual at the hook over the first 16,384 tokens) in SAELens v6 format, read by
  sae-lens on one side and by ``engine.saes.load_sae`` on the other;
- token ids in a Parquet ``input_ids`` column, one 128-token context a row, read unchanged by both: the docstrings of
  the local Python standard library (``sysconfig.get_paths()["stdlib"]`` walked in sorted order, ``site-packages``
  skipped, each file parsed with ``ast``, module/class/function docstrings in ``ast.walk`` order, exact repeats
  dropped), each docstring's UTF-8 bytes mapped to GPT-2's single-byte token ids (GPT-2's vocabulary starts with
  its 256 byte tokens, so these are the ids GPT-2's tokenizer gives with no merges applied), docstrings separated
  by ``<|endoftext|>`` (50256). No GPT-2 tokenizer is at hand offline, so the model folder carries a byte-level
  tokenizer with those 256 byte tokens, 50,000 placeholder tokens and ``<|endoftext|>``: it encodes text to the same
  ids and decodes every id of the vocabulary.

SAEDashboard's side runs in its own virtualenv (it needs transformer-lens 3.x; saescope does not depend on
TransformerLens), as a child process running this file with ``--peer-child``: its Neuronpedia runner's loop
(``NeuronpediaRunner.run`` after the tokens are made: per batch of ``--peer-features-per-batch`` latents a
``SaeVisRunner`` run, whose model activations are cached on disk after the first batch, then
``NeuronpediaConverter.convert_to_np_json`` and the batch's JSON file), with saescope's example counts (20 top
examples, 10 quantile groups of 5) and the same forward batch. The model is built as a ``HookedSAETransformer``
from the saved folder without weight processing (no LayerNorm folding or centring), so the residual stream at the
hook is the one the SAE's ``b_dec`` was computed on. The bare forward is TransformerLens's ``run_with_hooks`` up to
the hook on the same tokens in the same batches. saescope's side, in a child process of this environment, is
``engine.precompute.pipeline.precompute`` (no snapshots unless ``--snapshots``) against its bare forward
(``engine.tools.bench.forward_seconds``). Each bare forward is timed before and after its tool's job; the mean is
used. Both children check they read the same thing: the hook activations and SAE codes of the first context are
compared across the tools and reported.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTEXT_LEN = 128
HOOK = "blocks.6.hook_resid_pre"
LAYER = 6
D_SAE, K = 6144, 32
B_ENC = 0.05
W_U_STD = 0.14
B_DEC_TOKENS = 16_384
GPT2_SHAPE = {"d_model": 768, "n_layers": 12, "n_heads": 12, "vocab_size": 50_257, "n_positions": 1024}
EOT = 50_256
PEER_PINS = ["sae-lens==6.54.*", "transformer-lens==3.9.*"]
PEER_EXTRAS = ["dataclasses-json==0.6.*", "eindex-callum==0.1.*", "matplotlib==3.*"]
"""sae-dashboard 0.8.0 is installed with --no-deps (its metadata pins transformer-lens<3 and transformers<4.57, which
no longer go together with sae-lens 6.54): these are the runtime imports its metadata lists that sae-lens does not
bring."""
PEER_PACKAGES = ("torch", "sae-dashboard", "sae-lens", "transformer-lens", "transformers", "numpy")


# --- the tokens -------------------------------------------------------------------------------------------------
def gpt2_byte_order() -> list[int]:
    """GPT-2's byte tokens: byte ``order[i]`` is token id ``i`` (printable bytes first, then the rest ascending)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return printable + [b for b in range(256) if b not in printable]


def byte_alphabet() -> list[str]:
    """The byte-level stand-in character of each byte value (GPT-2's ``bytes_to_unicode``), indexed by byte."""
    order = gpt2_byte_order()
    chars = [""] * 256
    for i, b in enumerate(order):
        chars[b] = chr(b) if i < 188 else chr(256 + i - 188)
    return chars


def byte_ids() -> list[int]:
    """Token id of each byte value."""
    ids = [0] * 256
    for i, b in enumerate(gpt2_byte_order()):
        ids[b] = i
    return ids


def stdlib_docstrings(stdlib: str | Path | None = None):
    """Docstrings of the standard library's ``.py`` files, in a fixed order, exact repeats dropped (a generator)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = ast.parse(Path(folder, name).read_bytes())
            except (SyntaxError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    doc = ast.get_docstring(node)
                    if doc and doc not in seen:
                        seen.add(doc)
                        yield doc


def docstring_tokens(n_tokens: int, stdlib: str | Path | None = None) -> tuple[list[int], int]:
    """The first ``n_tokens`` ids of the docstrings' byte tokens, each docstring followed by ``<|endoftext|>``, and
    how many docstrings they drew on. A ValueError when the library has fewer."""
    ids_of = byte_ids()
    out: list[int] = []
    used = 0
    for doc in stdlib_docstrings(stdlib):
        out.extend(ids_of[b] for b in doc.encode("utf-8"))
        out.append(EOT)
        used += 1
        if len(out) >= n_tokens:
            return out[:n_tokens], used
    raise ValueError(f"the standard library's docstrings hold {len(out):,} byte tokens, fewer than {n_tokens:,}")


def byte_tokenizer():
    """A byte-level tokenizer of GPT-2's 50,257 ids: the 256 byte tokens at GPT-2's ids, placeholders, ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = byte_alphabet()
    vocab = {alphabet[b]: i for i, b in enumerate(gpt2_byte_order())}
    for j in range(EOT - 256):  # two-character placeholders, unreachable by encoding (no merges)
        vocab[alphabet[j // 256] + alphabet[j % 256]] = 256 + j
    vocab["<|endoftext|>"] = EOT
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def write_tokens(path: Path, ids: list[int]) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = np.asarray(ids, dtype=np.int64).reshape(-1, CONTEXT_LEN)
    pq.write_table(pa.table({"input_ids": pa.array(list(rows))}), path)
    return path


# --- the model and the SAE --------------------------------------------------------------------------------------
def build_inputs(work: Path, token_counts: list[int], seed: int = 0) -> dict:
    """Write the model folder, the SAE folder and one token file per count under ``work``; returns what was built."""
    import numpy as np
    import torch

    from engine.data.corpus import iter_contexts
    from engine.model.loading import load_model
    from engine.model.tiny import tiny_model
    from engine.saes import SAEConfig, build_sae

    tick = time.perf_counter()
    ids, n_docs = docstring_tokens(max(token_counts))
    token_files = {n: write_tokens(work / f"tokens_{n}.parquet", ids[:n]) for n in token_counts}
    shape = GPT2_SHAPE
    lm = tiny_model("gpt2", seed=seed, d_model=shape["d_model"], n_layers=shape["n_layers"], n_heads=shape["n_heads"],
                    vocab_size=shape["vocab_size"], n_positions=shape["n_positions"])
    hf = lm.hf_model
    wte = hf.get_input_embeddings()
    assert isinstance(wte, torch.nn.Embedding)
    with torch.no_grad():  # tied: W_U = wte.T
        wte.weight.copy_(torch.randn(wte.weight.shape, generator=torch.Generator().manual_seed(seed)) * W_U_STD)
    model_dir = work / "model"
    hf.config.n_ctx = GPT2_SHAPE["n_positions"]  # as GPT-2's own config.json has it (TransformerLens reads it)
    hf.save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    del lm, hf

    lm = load_model(model_dir, device="cpu", dtype="float32")
    small = token_files[min(token_counts)] if min(token_counts) >= B_DEC_TOKENS else token_files[max(token_counts)]
    contexts = list(iter_contexts(lm.tokenizer, small, CONTEXT_LEN))[: B_DEC_TOKENS // CONTEXT_LEN]
    total = torch.zeros(lm.d_model, dtype=torch.float64)
    with torch.inference_mode():
        for i in range(0, len(contexts), 32):
            acts = lm.capture(torch.tensor(contexts[i : i + 32]), HOOK)[HOOK]
            total += acts.double().sum(dim=(0, 1))
    b_dec = (total / (len(contexts) * CONTEXT_LEN)).float()
    W_dec = torch.randn(D_SAE, lm.d_model, generator=torch.Generator().manual_seed(seed + 1))
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    cfg = SAEConfig(architecture="topk", d_in=lm.d_model, d_sae=D_SAE, k=K, hook_name=HOOK, model_name="gpt2-shaped-random")
    state = {"W_dec": W_dec, "W_enc": W_dec.T.contiguous(), "b_enc": torch.full((D_SAE,), B_ENC), "b_dec": b_dec}
    sae_dir = build_sae(cfg, state).save(work / "sae")
    digest = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()
    return {"model_dir": str(model_dir), "sae_dir": str(sae_dir), "token_files": {str(n): str(p) for n, p in token_files.items()},
            "docstrings": n_docs, "tokens_sha256": digest, "python_stdlib": sysconfig.get_paths()["stdlib"],
            "python": platform.python_version(), "b_dec_tokens": len(contexts) * CONTEXT_LEN,
            "build_seconds": time.perf_counter() - tick}


# --- SAEDashboard's side (runs in the peer venv) ----------------------------------------------------------------
def peer_child(spec: dict) -> dict:
    """SAEDashboard's Neuronpedia-runner loop over the tokens, and TransformerLens's bare forward to the hook."""
    import types
    from importlib.metadata import version

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from sae_dashboard.components_config import (
        ActsHistogramConfig,
        Column,
        FeatureTablesConfig,
        LogitsHistogramConfig,
        LogitsTableConfig,
        SequencesConfig,
    )
    from sae_dashboard.layout import SaeVisLayoutConfig
    from sae_dashboard.neuronpedia.neuronpedia_converter import NeuronpediaConverter
    from sae_dashboard.neuronpedia.neuronpedia_runner import NeuronpediaRunner
    from sae_dashboard.neuronpedia.neuronpedia_runner_config import NeuronpediaRunnerConfig
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import SAE, HookedSAETransformer
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    model_dir, out = spec["model_dir"], Path(spec["out_dir"])
    batch, per_batch = spec["batch_size"], spec["features_per_batch"]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = get_pretrained_model_config(model_dir, device="cpu", dtype=torch.float32, fold_ln=False)
    model = HookedSAETransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    model.eval()
    del hf
    sae = SAE.load_from_disk(spec["sae_dir"], device="cpu", dtype="float32")
    # SAEDashboard folds the decoder norms into the encoder (NeuronpediaRunner, then every SaeVisRunner.run), which
    # sae-lens 6.54 refuses for a TopK SAE unless it rescales its codes by those norms: with unit-norm rows the
    # rescaling is the identity, so switching it on leaves the SAE's function as saved
    sae.cfg.rescale_acts_by_decoder_norm = True
    sae.fold_W_dec_norm()
    rows = pq.read_table(spec["tokens_file"]).column("input_ids").to_pylist()
    tokens = torch.tensor(rows, dtype=torch.long)
    load_seconds = time.perf_counter() - started

    def bare_forward() -> float:
        store: dict = {}

        def keep(act, hook):
            store["act"] = act

        tick = time.perf_counter()
        with torch.inference_mode():
            for chunk in tokens.split(batch):
                model.run_with_hooks(chunk, stop_at_layer=LAYER + 1, fwd_hooks=[(HOOK, keep)])
        return time.perf_counter() - tick

    with torch.inference_mode():  # what the first context reads, for the cross-check
        first = model.run_with_cache(tokens[:1], stop_at_layer=LAYER + 1, names_filter=HOOK)[1][HOOK][0]
        np.save(out / "peer_first_acts.npy", first.float().numpy())
        np.save(out / "peer_first_codes.npy", sae.encode(first).float().numpy())
    with torch.inference_mode():
        model.run_with_hooks(tokens[:batch], stop_at_layer=LAYER + 1, fwd_hooks=[(HOOK, lambda a, hook: None)])  # warm-up
    before = bare_forward()

    np_cfg = NeuronpediaRunnerConfig(
        sae_set="peer", sae_path=spec["sae_dir"], outputs_dir=str(out / "np"), from_local_sae=True,
        huggingface_dataset_path=spec["tokens_file"], n_prompts_total=len(tokens), n_tokens_in_prompt=tokens.shape[1],
        n_prompts_in_forward_pass=batch, n_features_at_a_time=per_batch, n_quantiles=spec["n_quantiles"],
        top_acts_group_size=spec["top_acts"], quantile_group_size=spec["quantile_group_size"], model_dtype="float32",
        sae_dtype="float32", model_id="gpt2-shaped-random", layer=LAYER, sae_device="cpu", model_device="cpu",
        activation_store_device="cpu", model_n_devices=1)
    (out / "np").mkdir(parents=True, exist_ok=True)
    cache_dir = out / "cached_activations"
    vis_seconds = write_seconds = 0.0
    tick = time.perf_counter()
    vocab_dict = NeuronpediaRunner.get_vocab_dict(types.SimpleNamespace(model=model))  # type: ignore[arg-type]
    features = list(range(sae.cfg.d_sae))
    batches = [features[i : i + per_batch] for i in range(0, len(features), per_batch)]
    with torch.no_grad():
        for n, feats in enumerate(batches):  # NeuronpediaRunner.run's loop body, batch by batch
            layout = SaeVisLayoutConfig(columns=[Column(
                SequencesConfig(stack_mode="stack-all", buffer=None, compute_buffer=True,  # type: ignore[arg-type]
                                n_quantiles=np_cfg.n_quantiles, top_acts_group_size=np_cfg.top_acts_group_size,
                                quantile_group_size=np_cfg.quantile_group_size),
                ActsHistogramConfig(), LogitsHistogramConfig(), LogitsTableConfig(), FeatureTablesConfig(n_rows=3))])
            vis_cfg = SaeVisConfig(
                hook_point=HOOK, features=feats, minibatch_size_features=per_batch, minibatch_size_tokens=batch,
                quantile_feature_batch_size=np_cfg.quantile_feature_batch_size, verbose=False, device="cpu",
                feature_centric_layout=layout, perform_ablation_experiments=False, dtype="float32", cache_dir=cache_dir,
                ignore_tokens={tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id},
                ignore_positions=[], use_dfa=False)
            t0 = time.perf_counter()
            data = SaeVisRunner(vis_cfg).run(encoder=sae, model=model, tokens=tokens)
            t1 = time.perf_counter()
            text = NeuronpediaConverter.convert_to_np_json(model, data, np_cfg, vocab_dict)
            (out / "np" / f"batch-{n}.json").write_text(text)
            write_seconds += time.perf_counter() - t1
            vis_seconds += t1 - t0
            del data
    job = time.perf_counter() - tick
    after = bare_forward()
    return {"tool": "SAEDashboard", "tokens": int(tokens.numel()), "job_seconds": job,
            "vis_seconds": vis_seconds, "convert_write_seconds": write_seconds, "feature_batches": len(batches),
            "features_per_batch": per_batch, "forward_seconds": (before + after) / 2,
            "forward_seconds_before_after": [before, after], "load_seconds": load_seconds,
            "output_mb": sum(p.stat().st_size for p in (out / "np").iterdir()) / 2**20,
            "torch_threads": torch.get_num_threads(), "dtype": "float32",
            "versions": {p: version(p) for p in PEER_PACKAGES}, "python": platform.python_version()}


# --- saescope's side --------------------------------------------------------------------------------------------
def saescope_child(spec: dict) -> dict:
    """``precompute`` on the tokens, and saescope's bare forward to the hook on the same contexts."""
    import numpy as np
    import torch

    from engine.data.corpus import iter_contexts
    from engine.model.loading import load_model
    from engine.precompute.pipeline import precompute
    from engine.saes import load_sae
    from engine.tools.bench import forward_seconds

    started = time.perf_counter()
    out, batch = Path(spec["out_dir"]), spec["batch_size"]
    lm = load_model(spec["model_dir"], device="cpu", dtype=spec["dtype"])
    sae = load_sae(spec["sae_dir"], device=lm.device)
    contexts = list(iter_contexts(lm.tokenizer, spec["tokens_file"], CONTEXT_LEN))
    load_seconds = time.perf_counter() - started
    with torch.inference_mode():
        first = lm.capture(torch.tensor(contexts[:1]), HOOK)[HOOK][0]
        np.save(out / "saescope_first_acts.npy", first.float().numpy())
        np.save(out / "saescope_first_codes.npy", sae.encode(first.to(sae.dtype)).float().numpy())
    forward_seconds(lm, HOOK, contexts[:batch], batch)  # warm-up
    before = forward_seconds(lm, HOOK, contexts, batch)
    tick = time.perf_counter()
    manifest = precompute(lm, sae, spec["tokens_file"], out / "run", tokens=len(contexts) * CONTEXT_LEN,
                          context_len=CONTEXT_LEN, batch_size=batch, progress=False,
                          snapshot_tokens=None if spec["snapshots"] else 0)
    job = time.perf_counter() - tick
    after = forward_seconds(lm, HOOK, contexts, batch)
    return {"tool": "saescope", "tokens": len(contexts) * CONTEXT_LEN, "job_seconds": job,
            "forward_seconds": (before + after) / 2, "forward_seconds_before_after": [before, after],
            "load_seconds": load_seconds, "timings": manifest["timings"], "torch_threads": torch.get_num_threads(),
            "dtype": str(lm.dtype).removeprefix("torch."),
            "dtype_choice": lm.dtype_choice.to_dict() if lm.dtype_choice else None}


# --- the comparison ---------------------------------------------------------------------------------------------
def _child(python: str, mode: str, spec: dict, timeout: float | None) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if mode == "--saescope-child":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    else:
        env.pop("PYTHONPATH", None)  # the peer venv must not see this checkout's packages
    tick = time.perf_counter()
    result = subprocess.run([python, str(Path(__file__).resolve()), mode, json.dumps(spec)], capture_output=True,
                            text=True, env=env, timeout=timeout, cwd=spec["out_dir"])
    wall = time.perf_counter() - tick
    if result.returncode != 0:
        raise RuntimeError(f"{mode} ({spec['tokens_file']}) failed:\n{result.stderr[-4000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["process_wall_seconds"] = wall
    return out


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def cross_check(folder: Path) -> dict:
    """Max |difference| of the first context's hook activations and SAE codes between the tools, and whether the
    codes pick the same latents."""
    import numpy as np

    acts = [np.load(folder / f"{t}_first_acts.npy") for t in ("peer", "saescope")]
    codes = [np.load(folder / f"{t}_first_codes.npy") for t in ("peer", "saescope")]
    same = float(np.mean([set(np.flatnonzero(a)) == set(np.flatnonzero(b)) for a, b in zip(*codes, strict=True)]))
    return {"acts_max_abs_diff": float(np.abs(acts[0] - acts[1]).max()), "acts_max_abs": float(np.abs(acts[1]).max()),
            "codes_max_abs_diff": float(np.abs(codes[0] - codes[1]).max()),
            "tokens_with_same_active_latents": same}


def compare(args) -> dict:
    import torch

    peer_python = str(Path(args.peer_venv).resolve() / "bin" / "python")  # absolute: the children run in the work folder
    if not Path(peer_python).is_file():
        raise FileNotFoundError(f"no {peer_python}: make the peer venv first (--setup-peer-venv {args.peer_venv})")
    counts = sorted({int(n) for n in args.tokens.split(",")})
    if any(n < CONTEXT_LEN or n % CONTEXT_LEN for n in counts):
        raise ValueError(f"--tokens must be positive multiples of {CONTEXT_LEN}, got {args.tokens!r}")
    work_dir: str | None = args.work_dir
    work_ctx = tempfile.TemporaryDirectory(prefix="saescope-peer-") if work_dir is None else None
    work = Path(work_ctx.name if work_ctx is not None else str(work_dir))
    work.mkdir(parents=True, exist_ok=True)
    try:
        inputs = build_inputs(work, counts)
        print(f"built the model, SAE and {max(counts):,} tokens ({inputs['docstrings']:,} docstrings) in "
              f"{inputs['build_seconds']:.1f} s under {work}", file=sys.stderr, flush=True)
        rows = []
        for n in counts:
            common = {"model_dir": inputs["model_dir"], "sae_dir": inputs["sae_dir"],
                      "tokens_file": inputs["token_files"][str(n)], "batch_size": args.batch_size}
            folder = work / f"run_{n}"
            folder.mkdir(exist_ok=True)
            peer = _child(peer_python, "--peer-child",
                          {**common, "out_dir": str(folder), "features_per_batch": args.peer_features_per_batch,
                           "n_quantiles": 10, "top_acts": 20, "quantile_group_size": 5}, args.timeout)
            print(f"{n:,} tokens: SAEDashboard {peer['job_seconds']:.1f} s", file=sys.stderr, flush=True)
            ours = _child(sys.executable, "--saescope-child",
                          {**common, "out_dir": str(folder), "dtype": args.dtype, "snapshots": args.snapshots}, args.timeout)
            print(f"{n:,} tokens: saescope {ours['job_seconds']:.1f} s", file=sys.stderr, flush=True)
            rows.append({"tokens": n, "SAEDashboard": peer, "saescope": ours, "same_inputs": cross_check(folder),
                         "SAEDashboard_over_forward": peer["job_seconds"] / peer["forward_seconds"],
                         "saescope_over_forward": ours["job_seconds"] / ours["forward_seconds"],
                         "SAEDashboard_over_saescope": peer["job_seconds"] / ours["job_seconds"],
                         "process_wall_ratio": peer["process_wall_seconds"] / ours["process_wall_seconds"]})
    finally:
        if work_ctx is not None:
            work_ctx.cleanup()
    return {"what": "SAEDashboard 0.8.0 (Neuronpedia-runner loop) vs saescope precompute, same weights and tokens",
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads(), "python": platform.python_version()},
            "settings": {"context_len": CONTEXT_LEN, "batch_size": args.batch_size, "hook": HOOK, "d_sae": D_SAE, "k": K,
                         "b_enc": B_ENC, "W_U_std": W_U_STD, "model": GPT2_SHAPE, "saescope_dtype": args.dtype,
                         "peer_dtype": "float32", "peer_features_per_batch": args.peer_features_per_batch,
                         "top_examples": 20, "quantile_groups": 10, "per_quantile_group": 5,
                         "saescope_snapshots": args.snapshots},
            "peer_versions": rows[0]["SAEDashboard"]["versions"],
            "inputs": {k: v for k, v in inputs.items() if k not in ("model_dir", "sae_dir", "token_files")},
            "runs": rows}


def table(result: dict) -> str:
    lines = ["| tokens | SAEDashboard s | its forward s | SAEDashboard / forward | saescope s | its forward s | "
             "saescope / forward | SAEDashboard / saescope |", "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        p, s = r["SAEDashboard"], r["saescope"]
        lines.append(f"| {r['tokens']:,} | {p['job_seconds']:.1f} | {p['forward_seconds']:.2f} "
                     f"| {r['SAEDashboard_over_forward']:.1f}x | {s['job_seconds']:.1f} | {s['forward_seconds']:.2f} "
                     f"| {r['saescope_over_forward']:.2f}x | **{r['SAEDashboard_over_saescope']:.1f}x** |")
    for r in result["runs"]:
        c = r["same_inputs"]
        lines.append(f"\n{r['tokens']:,} tokens, first context read by both: hook activations differ by at most "
                     f"{c['acts_max_abs_diff']:.2g} (largest {c['acts_max_abs']:.3g}), codes by {c['codes_max_abs_diff']:.2g}; "
                     f"same active latents on {c['tokens_with_same_active_latents']:.0%} of its tokens")
    m = result["machine"]
    lines.append(f"\n{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); saescope "
                 f"{result['runs'][0]['saescope']['dtype']}, SAEDashboard float32")
    return "\n".join(lines)


def setup_peer_venv(folder: str, find_links: str | None) -> dict:
    """Create SAEDashboard's virtualenv: this torch's release, sae-lens 6.54, transformer-lens 3.9, sae-dashboard 0.8.0."""
    import torch

    venv = Path(folder)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install"]
    links = ["--find-links", find_links] if find_links else []
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}", *links], check=True)
    subprocess.run([*pip, *PEER_PINS, *links], check=True)
    subprocess.run([*pip, "--no-deps", "sae-dashboard==0.8.0"], check=True)
    subprocess.run([*pip, *PEER_EXTRAS, *links], check=True)
    code = ("import json; from importlib.metadata import version; import sae_dashboard.sae_vis_runner, "
            f"sae_dashboard.neuronpedia.neuronpedia_runner; print(json.dumps({{p: version(p) for p in {PEER_PACKAGES!r}}}))")
    versions = json.loads(subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, capture_output=True,
                                         text=True).stdout)
    print(json.dumps(versions))
    return versions


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup-peer-venv", metavar="DIR", help="create SAEDashboard's virtualenv in DIR and exit")
    p.add_argument("--find-links", default="/opt/wheels" if Path("/opt/wheels").is_dir() else None,
                   help="a folder of wheels for pip (torch's CPU wheel; default /opt/wheels when present)")
    p.add_argument("--peer-venv", default=str(ROOT / ".peer-venv"), help="SAEDashboard's virtualenv (default .peer-venv)")
    p.add_argument("--tokens", default="16384", help="comma-separated token counts (default 16384)")
    p.add_argument("--batch-size", type=int, default=32, help="contexts per forward, both tools (default 32)")
    p.add_argument("--peer-features-per-batch", type=int, default=128,
                   help="latents per SaeVisRunner run (NeuronpediaRunnerConfig's default 128)")
    p.add_argument("--dtype", default="float32", help="saescope's dtype (default float32, SAEDashboard's; or auto)")
    p.add_argument("--snapshots", action="store_true", help="let saescope publish its snapshots (default: off)")
    p.add_argument("--work-dir", help="keep the model, SAE, tokens and outputs here (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed to each child")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--peer-child", help=argparse.SUPPRESS)
    p.add_argument("--saescope-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peer_child or args.saescope_child:
        spec = json.loads(args.peer_child or args.saescope_child)
        print(json.dumps(peer_child(spec) if args.peer_child else saescope_child(spec)))
        return
    if args.setup_peer_venv:
        setup_peer_venv(args.setup_peer_venv, args.find_links)
        return
    result = compare(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    main()
