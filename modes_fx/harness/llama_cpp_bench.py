"""``python -m modes_fx.harness.llama_cpp_bench [--out DIR]``: the speed benchmark's model side by
side with llama.cpp on this CPU (decode tokens/s at batch 1).

Needs the opt-in extra ``llama`` (``pip install modes-fx[llama]``: llama-cpp-python, built from
its sdist, which vendors llama.cpp, and ``gguf``). Harness only: no product module imports it.

1. **Conversion.** The benchmark model (:func:`modes_fx.harness.speed_bench.build_model` of
   ``FULL``: the text model of a random-weight Qwen3-VL-MoE) is written as a llama.cpp
   ``qwen3moe`` GGUF in f32 with ``gguf.GGUFWriter`` (hyperparameters, llama.cpp's qwen3moe tensor
   names, the fused ``gate_up_proj`` split into ``ffn_gate_exps`` / ``ffn_up_exps``, and a
   128-token SentencePiece-type vocabulary standing for the tiny test vocabulary: the benchmark
   feeds token ids, never text). For these text-only prompts, Qwen3-VL's interleaved M-RoPE
   has equal (t, h, w) positions, i.e. it is plain (NeoX) RoPE: :func:`verify` checks it
   (HF Qwen3-VL-MoE logits vs a ``Qwen3MoeForCausalLM`` with the same weights) and checks the
   conversion (llama.cpp f32 logits and greedy tokens vs the HF model's on the benchmark prompt).
2. **Quantization** by llama.cpp's own quantizer (``llama_model_quantize``) to Q4_0 and Q4_K_M.
3. **Timing.** The benchmark prompt (1088 token ids) is prefilled once per llama.cpp variant and
   its state saved; every timed round restores it and decodes ``decode_tokens`` greedy tokens
   one at a time (argmax over the ordinary text ids, as :class:`speed_bench.Runner`), timing the
   whole loop. llama.cpp variants: each GGUF dense (8 of 64 experts per token) and with its static
   expert reduction ``qwen3moe.expert_used_count=1`` (a load-time ``kv_overrides``: top-1, 87.5%
   fewer routed pairs). These rounds run inside the modes-fx timing rounds
   (``speed_bench.run_fp32`` / ``run_w4a16`` with ``each_round``), so load from other jobs falls
   on both alike; every llama.cpp row is the median over the rounds of both phases.

The table: decode tokens/s, ms/token, the ratio to llama.cpp f32 dense and to modes-fx (fp32)
dense, the weight bytes a step reads and the measured time's fraction of their bandwidth bound;
then each engine's ms/token split into a fixed and a per-routed-pair part. Writes
``llama_cpp.json`` into ``--out``. Both engines use OpenMP; the process runs with
``OMP_WAIT_POLICY=PASSIVE`` (``--omp-wait-policy``; spinning threads were pathological on a
shared, loaded CPU, see docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from modes_fx.harness import speed_bench as sb
from modes_fx.harness import testing

QUANTS = {"q4_0": 2, "q4_k_m": 15}  # llama_ftype values (LLAMA_FTYPE_MOSTLY_Q4_0, _Q4_K_M)
TOP1 = {"qwen3moe.expert_used_count": 1}


# ---------------------------------------------------------------------------------------------
# Conversion


def write_gguf(model: torch.nn.Module, path: Path) -> Path:
    """Write the text model of ``model`` (a Qwen3-VL-MoE from ``speed_bench.build_model``) as an
    f32 llama.cpp ``qwen3moe`` GGUF at ``path``."""
    import gguf

    cfg = model.config.get_text_config()
    lm = model.model.language_model
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_name("modes-fx speed benchmark model (random Qwen3-VL-MoE text model)")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    # the tiny vocabulary: ids only (no text is ever tokenized), SentencePiece type so llama.cpp
    # loads it; 0 unk, 1 bos, 2 eos, 3..119 text, 120.. the multimodal specials
    special = {testing.PAD_ID: "<unk>", testing.BOS_ID: "<s>", testing.EOS_ID: "</s>"}
    tokens, types = [], []
    for i in range(testing.VOCAB):
        if i in special:
            tokens.append(special[i])
            types.append(gguf.TokenType.UNKNOWN if i == testing.PAD_ID else gguf.TokenType.CONTROL)
        elif testing.TEXT_ID_LOW <= i < testing.TEXT_ID_HIGH:
            tokens.append(f"t{i}")
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"<special{i}>")
            types.append(gguf.TokenType.CONTROL)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(testing.BOS_ID)
    w.add_eos_token_id(testing.EOS_ID)
    w.add_unk_token_id(testing.PAD_ID)
    w.add_add_bos_token(False)

    def put(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, np.ascontiguousarray(t.detach().float().numpy()))

    put("token_embd.weight", lm.embed_tokens.weight)
    put("output_norm.weight", lm.norm.weight)
    put("output.weight", model.lm_head.weight)
    inter = cfg.moe_intermediate_size
    for i, layer in enumerate(lm.layers):
        a, mlp = layer.self_attn, layer.mlp
        put(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        put(f"blk.{i}.attn_q.weight", a.q_proj.weight)
        put(f"blk.{i}.attn_k.weight", a.k_proj.weight)
        put(f"blk.{i}.attn_v.weight", a.v_proj.weight)
        put(f"blk.{i}.attn_output.weight", a.o_proj.weight)
        put(f"blk.{i}.attn_q_norm.weight", a.q_norm.weight)
        put(f"blk.{i}.attn_k_norm.weight", a.k_norm.weight)
        put(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        put(f"blk.{i}.ffn_gate_inp.weight", mlp.gate.weight)
        gate_up = mlp.experts.gate_up_proj  # [E, 2I, H]: gate rows first, then up (transformers)
        put(f"blk.{i}.ffn_gate_exps.weight", gate_up[:, :inter])
        put(f"blk.{i}.ffn_up_exps.weight", gate_up[:, inter:])
        put(f"blk.{i}.ffn_down_exps.weight", mlp.experts.down_proj)  # [E, H, I]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quantize(src: Path, dst: Path, ftype: int, threads: int) -> Path:
    """llama.cpp's quantizer (``llama_model_quantize``) from ``src`` to ``dst``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {dst} (ftype {ftype}) failed")
    return dst


def step_bytes(path: Path) -> dict[str, float]:
    """What one llama.cpp decode step of one token reads from the GGUF's weights (bytes, as
    ``speed_bench.decode_bytes``): ``fixed``, every tensor but the routed experts and the token
    embedding (one row per token, not counted), and ``per_expert``, one expert's gate, up and down."""
    import gguf

    fixed = experts = 0
    n_layers = n_experts = 0
    for t in gguf.GGUFReader(str(path)).tensors:
        if "_exps." in t.name:
            experts += int(t.n_bytes)
            n_experts = max(n_experts, int(t.shape[-1]))
            n_layers = max(n_layers, int(t.name.split(".")[1]) + 1)
        elif t.name != "token_embd.weight":
            fixed += int(t.n_bytes)
    return {"fixed": float(fixed), "per_expert": experts / (n_layers * n_experts)}


def tensor_types(path: Path) -> dict[str, int]:
    """GGUF tensor type name -> number of tensors of that type."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------
# llama.cpp runs


def _next_token(logits: np.ndarray) -> int:
    """Greedy over the ordinary text ids, as ``speed_bench.Runner``."""
    return int(np.argmax(logits[testing.TEXT_ID_LOW:testing.TEXT_ID_HIGH])) + testing.TEXT_ID_LOW


class LlamaVariant:
    """One llama.cpp model + context, its prompt prefilled once (state saved), timed decodes."""

    def __init__(self, name: str, path: Path, cfg: sb.BenchConfig, threads: int, overrides: dict | None = None):
        from llama_cpp import Llama

        self.name, self.path, self.cfg, self.overrides = name, path, cfg, overrides or {}
        n_ctx = -(-(cfg.image_tokens + cfg.text_tokens + cfg.decode_tokens) // 256) * 256
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         flash_attn=True, kv_overrides=overrides or None, verbose=False)
        self.prompt = sb.prompt_ids(cfg)[0].tolist()
        start = time.perf_counter()
        self.llm.eval(self.prompt)
        self.prefill_ms = (time.perf_counter() - start) * 1e3
        self.prompt_logits = self.logits().copy()
        self.state = self.llm.save_state()
        self.samples: list[float] = []
        self.eval_samples: list[float] = []  # llama.cpp's own decode time (llama_perf_context t_eval_ms)

    def logits(self) -> np.ndarray:
        """The last evaluated position's logits (float32 [vocab])."""
        ptr = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),))

    def decode(self) -> tuple[list[int], float]:
        """Restore the prefilled state and greedily decode ``decode_tokens`` tokens one at a time
        (``decode_tokens`` single-token evaluations, as the benchmark's decode); (tokens, ms)."""
        import llama_cpp

        self.llm.load_state(self.state)
        token = _next_token(self.prompt_logits)
        tokens = []
        llama_cpp.llama_perf_context_reset(self.llm._ctx.ctx)
        start = time.perf_counter()
        for _ in range(self.cfg.decode_tokens):
            tokens.append(token)
            self.llm.eval([token])
            token = _next_token(self.logits())
        ms = (time.perf_counter() - start) * 1e3
        self.last_eval_ms = llama_cpp.llama_perf_context(self.llm._ctx.ctx).t_eval_ms  # inside llama_decode
        return tokens, ms

    def timed(self) -> None:
        self.samples.append(self.decode()[1])
        self.eval_samples.append(self.last_eval_ms)


# ---------------------------------------------------------------------------------------------
# Verification


def hf_reference(model: torch.nn.Module, cfg: sb.BenchConfig, steps: int) -> tuple[np.ndarray, list[int]]:
    """The HF model's (eager) last-position prompt logits and ``steps`` greedy tokens (KV cache)."""
    ids = sb.prompt_ids(cfg)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        logits = out.logits[0, -1].float().numpy().copy()
        past, token = out.past_key_values, _next_token(logits)
        tokens = []
        for _ in range(steps):
            tokens.append(token)
            out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            token = _next_token(out.logits[0, -1].float().numpy())
    return logits, tokens


def rope_check(model: torch.nn.Module, cfg: sb.BenchConfig, reference: np.ndarray) -> float:
    """Relative error of a ``Qwen3MoeForCausalLM`` carrying the same weights (standard RoPE)
    against the Qwen3-VL-MoE's (interleaved M-RoPE) last-position prompt logits ``reference``."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tc = model.config.get_text_config()
    qcfg = Qwen3MoeConfig(
        vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
        num_hidden_layers=tc.num_hidden_layers, num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=tc.num_key_value_heads, head_dim=tc.head_dim, num_experts=tc.num_experts,
        num_experts_per_tok=tc.num_experts_per_tok, moe_intermediate_size=tc.moe_intermediate_size,
        norm_topk_prob=True, rms_norm_eps=tc.rms_norm_eps, max_position_embeddings=tc.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": tc.rope_parameters["rope_theta"]},
        tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[],
    )
    with torch.device("meta"):
        q = Qwen3MoeForCausalLM(qcfg)
    state = {k.replace("model.language_model.", "model."): v for k, v in model.state_dict().items() if ".visual." not in f".{k}"}
    missing, unexpected = q.load_state_dict(state, strict=False, assign=True)
    if missing or [k for k in unexpected if k.startswith(("model.", "lm_head"))]:
        raise RuntimeError(f"Qwen3MoeForCausalLM weights: missing {missing}, unexpected {unexpected}")
    q.model.rotary_emb = type(q.model.rotary_emb)(config=qcfg)  # its inv_freq buffer, off the meta device
    q.eval()
    with torch.no_grad():
        got = q(input_ids=sb.prompt_ids(cfg), logits_to_keep=1).logits[0, -1].numpy()
    return float(np.linalg.norm(got - reference) / np.linalg.norm(reference))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------
# The benchmark


def machine_facts() -> dict:
    import llama_cpp

    facts = {"python": platform.python_version(), "torch": torch.__version__, "nproc": os.cpu_count()}
    try:
        from importlib.metadata import version

        for pkg in ("transformers", "llama_cpp_python", "gguf", "torchao"):
            facts[pkg] = version(pkg)
    except Exception:  # noqa: BLE001 - facts are best effort
        pass
    facts["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        facts["cpu"] = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "")
    except OSError:
        pass
    return facts


def run(cfg: sb.BenchConfig, out_dir: Path, threads: int, echo=print, keep_gguf: bool = False) -> dict:
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    result: dict = {"config": asdict(cfg), "threads": threads, "facts": machine_facts(), "load_before": load_before,
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    echo(f"config: {asdict(cfg)}; {threads} threads; load average {load_before}")

    # Conversion and quantization
    model = sb.build_model(cfg)
    paths = {"f32": out_dir / "model-f32.gguf"}
    t0 = time.perf_counter()
    write_gguf(model, paths["f32"])
    echo(f"wrote {paths['f32']} in {time.perf_counter() - t0:.1f} s")
    for name, ftype in QUANTS.items():
        t0 = time.perf_counter()
        paths[name] = quantize(paths["f32"], out_dir / f"model-{name}.gguf", ftype, threads)
        echo(f"quantized {name} in {time.perf_counter() - t0:.1f} s: {tensor_types(paths[name])}")
    result["gguf"] = {k: {"path": str(p), "mib": p.stat().st_size / 2**20, "tensor_types": tensor_types(p), "step_bytes": step_bytes(p)}
                      for k, p in paths.items()}

    # llama.cpp variants (each prefills the prompt once)
    llamas = []
    for name, path in paths.items():
        for suffix, overrides in (("dense", None), ("top-1", TOP1)):
            v = LlamaVariant(f"llama.cpp {name} {suffix}", path, cfg, threads, overrides)
            echo(f"  {v.name}: prefill {v.prefill_ms:.0f} ms (untimed warm-up decode next)")
            v.decode()  # warm-up
            llamas.append(v)

    # Verification: HF (eager) vs llama.cpp f32, and M-RoPE == RoPE for this prompt
    steps = 16
    ref_logits, ref_tokens = hf_reference(model, cfg, steps)
    verify = {"rope_qwen3moe_vs_qwen3vlmoe_rel_error": rope_check(model, cfg, ref_logits), "greedy_steps": steps}
    for v in llamas:
        tokens, _ = v.decode()
        verify[v.name] = {
            "prompt_logits_rel_error": _rel(v.prompt_logits, ref_logits),
            "prompt_logits_max_abs_error": float(np.abs(v.prompt_logits - ref_logits).max()),
            "greedy_tokens_equal_prefix": next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), min(len(tokens), steps)),
        }
        echo(f"  verify {v.name}: {verify[v.name]}")
    echo(f"  verify M-RoPE: Qwen3MoeForCausalLM vs Qwen3-VL-MoE logits rel error {verify['rope_qwen3moe_vs_qwen3vlmoe_rel_error']:.2e}")
    result["verify"] = verify
    del model
    gc.collect()

    def each_round():
        for v in llamas:
            v.timed()

    torch.set_num_threads(threads)
    bandwidth = sb.stream_bandwidth(cfg.bandwidth_mib)
    result["bandwidth_gbs"] = bandwidth
    fp32 = sb.run_fp32(cfg, echo, bandwidth, targets=(sb.W4A16_SKIP,), eager=False, each_round=each_round)
    gc.collect()
    w4 = sb.run_w4a16(cfg, echo, bandwidth, each_round=each_round)
    result["modes_fx"] = {"fp32": fp32, "w4a16": w4}

    rows = []
    for v in llamas:
        b = result["gguf"][v.path.stem.removeprefix("model-")]["step_bytes"]
        kept_pairs = cfg.num_layers * (1 if v.overrides else cfg.top_k)
        rows.append({"variant": v.name, "decode_ms": statistics.median(v.samples), "samples_ms": v.samples,
                     "llama_eval_ms": statistics.median(v.eval_samples),
                     "prefill_ms_once": v.prefill_ms, "mb_per_token": (b["fixed"] + kept_pairs * b["per_expert"]) / 1e6})
    for r in fp32["variants"] + w4["variants"]:
        name = r["name"] if r["name"].startswith("w4a16") else f"fp32 {r['name']}"
        rows.append({"variant": f"modes-fx {name}", "decode_ms": r["decode_ms"], "decode_skip": r["decode_skip"],
                     "prefill_ms": r["prefill_ms"], "mb_per_token": r["decode_mb_per_token"]})
    base_llama = rows[0]["decode_ms"]
    base_modes = next(r["decode_ms"] for r in rows if r["variant"] == "modes-fx fp32 dense")
    for r in rows:
        r["tokens_per_s"] = cfg.decode_tokens / r["decode_ms"] * 1e3
        r["ms_per_token"] = r["decode_ms"] / cfg.decode_tokens
        r["vs_llama_f32_dense"] = base_llama / r["decode_ms"]
        r["vs_modes_fp32_dense"] = base_modes / r["decode_ms"]
        r["of_bandwidth"] = r["mb_per_token"] / 1e3 / bandwidth / (r["ms_per_token"] / 1e3)  # bound / measured
    result["rows"] = rows
    result["split"] = split(rows, cfg)
    result["load_after"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - start
    (out_dir / "llama_cpp.json").write_text(json.dumps(result, indent=2))
    echo(format_table(result))
    if not keep_gguf:
        for p in paths.values():
            p.unlink()
    echo(f"wrote {out_dir / 'llama_cpp.json'}")
    return result


PAIRS = (  # (engine, dense row, reduced row, kept fraction of the reduced row or None: its decode skip)
    ("llama.cpp f32", "llama.cpp f32 dense", "llama.cpp f32 top-1", 1 / 8),
    ("modes-fx fp32", "modes-fx fp32 dense", "modes-fx fp32 modes skip=88%", None),
    ("llama.cpp q4_0", "llama.cpp q4_0 dense", "llama.cpp q4_0 top-1", 1 / 8),
    ("llama.cpp q4_k_m", "llama.cpp q4_k_m dense", "llama.cpp q4_k_m top-1", 1 / 8),
    ("modes-fx w4a16", "modes-fx w4a16 dense", "modes-fx w4a16 skip=88%", None),
)


def split(rows: list[dict], cfg: sb.BenchConfig) -> dict:
    """Each engine's decode ms/token split, from its dense and reduced rows, into a fixed part and a
    per-routed-pair part: ``ms/token = fixed + pairs * per_pair`` with ``pairs`` the routed
    (token, expert) pairs a token runs over all layers (``L * k`` dense, ``L * k * kept``
    reduced). Two measured points, two unknowns."""
    by = {r["variant"]: r for r in rows}
    out = {}
    for engine, dense, reduced, kept in PAIRS:
        if dense not in by or reduced not in by:
            continue
        kept = kept if kept is not None else 1.0 - by[reduced]["decode_skip"]
        p_dense, p_red = cfg.num_layers * cfg.top_k, cfg.num_layers * cfg.top_k * kept
        per_pair = (by[dense]["ms_per_token"] - by[reduced]["ms_per_token"]) / (p_dense - p_red)
        out[engine] = {"fixed_ms": by[dense]["ms_per_token"] - p_dense * per_pair, "per_pair_ms": per_pair,
                       "pairs_dense": p_dense, "pairs_reduced": p_red}
    return out


def format_table(result: dict) -> str:
    f = result["facts"]
    lines = [
        f"decode at batch 1: {result['config']['decode_tokens']} tokens after a "
        f"{result['config']['image_tokens'] + result['config']['text_tokens']}-token prompt, {result['threads']} threads; "
        f"llama-cpp-python {f.get('llama_cpp_python')} (llama.cpp vendored), gguf {f.get('gguf')}, torch {f['torch']}, "
        f"transformers {f.get('transformers')}; CPU {f.get('cpu')}, {f['nproc']} CPUs; "
        f"load average before {result['load_before'][0]:.2f}, after {result['load_after'][0]:.2f}",
        "",
        f"MB/tok: weight bytes one decode step reads; of bw: the time those take at the measured {result['bandwidth_gbs']:.1f} GB/s over the measured time",
        "",
        "| variant | decode skip | tokens/s | ms/token | vs llama.cpp f32 dense | vs modes-fx fp32 dense | MB/tok | of bw |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        skip = r.get("decode_skip")
        skip = "0.875 (top-1)" if "top-1" in r["variant"] else ("-" if skip is None or skip != skip else f"{skip:.3f}")
        lines.append(f"| {r['variant']} | {skip} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.1f} | "
                     f"{r['vs_llama_f32_dense']:.2f} | {r['vs_modes_fp32_dense']:.2f} | {r['mb_per_token']:.1f} | {r['of_bandwidth']:.0%} |")
    lines += ["", "| engine | fixed ms/token | ms per routed pair | pairs/token dense -> reduced |", "|---|---|---|---|"]
    for engine, s in result.get("split", {}).items():
        lines.append(f"| {engine} | {s['fixed_ms']:.2f} | {s['per_pair_ms']:.3f} | {s['pairs_dense']} -> {s['pairs_reduced']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m modes_fx.harness.llama_cpp_bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="directory for llama_cpp.json (and the GGUFs while running)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of both (default: all CPUs)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per phase (default 3)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 8)")
    p.add_argument("--keep-gguf", action="store_true", help="keep the GGUF files in --out")
    p.add_argument("--quick", action="store_true", help="the tiny config of `modes bench speed --quick` (a smoke run)")
    p.add_argument("--omp-wait-policy", default="passive", choices=("passive", "active", "inherit"),
                   help="OMP_WAIT_POLICY of the process (both engines use OpenMP; default passive, see docs/benchmarks.md)")
    args = p.parse_args(argv)
    wanted = None if args.omp_wait_policy == "inherit" else args.omp_wait_policy.upper()
    if wanted and os.environ.get("OMP_WAIT_POLICY", "").upper() != wanted:
        # OpenMP reads it once, at start-up: re-run this command with it set
        os.environ["OMP_WAIT_POLICY"] = wanted
        os.execv(sys.executable, [sys.executable, "-m", "modes_fx.harness.llama_cpp_bench", *(sys.argv[1:] if argv is None else argv)])
    overrides = {k: v for k, v in (("reps", args.reps), ("num_layers", args.layers)) if v is not None}
    # batch 1 only: the side by side is llama.cpp's batch-1 decode
    cfg = sb.BenchConfig(**{**asdict(sb.QUICK if args.quick else sb.FULL), **overrides, "batches": (1,)})
    run(cfg, args.out, args.threads, keep_gguf=args.keep_gguf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
