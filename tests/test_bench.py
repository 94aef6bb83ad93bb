"""The benchmark suite and the cost model. Not timed: the smoke test runs the quick bench on a tiny
model and checks what it reports, not how fast anything is."""
import json
import math
import sys

import pytest
import torch

from seqpar_bench import analytic, costmodel, costplan, markdown, results
from seqpar_bench.record import Record
from seqpar_bench.suite import MODES, Settings, run
from seqpar.config import ModelConfig

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    out = tmp_path_factory.mktemp("bench") / "tiny-llama"
    model.save_pretrained(out)
    return out


def test_quick_bench_records(tiny_llama, tmp_path):
    # tp=1 (seqpar next to HF) and tp=2 (every SP mode next to DTensor), 1 thread per rank;
    # 16 and 33 tokens (33 pads under SP); the pipeline modes at 16 tokens and batch 4.
    modes = [m for m in MODES if m.default]
    s = Settings(models=[str(tiny_llama)], tps=[1, 2], modes=modes, tokens=[16, 33],
                 batches=[1, 4], prompt_len=8, new_tokens=3, runs=2, warmup=1, memory_runs=1,
                 threads=2, hardware="cpu-2core-gloo", pp_tokens=[16], pp_batches=[4],
                 cores=4, log=lambda *a: None)  # cores: decode tp=2 x pp=2 too
    result = run(s)
    recs = result["records"]
    # --json writes the records' dicts; --replot / --merge read them back as the same records
    assert [Record.from_dict(json.loads(json.dumps(r.to_dict()))) for r in recs] == recs
    pipeline = {1: {"pp=2"}, 2: {"pp=2", "pp=2+sp"}}
    by_tp = {1: {"sp=off", "hf"}, 2: {m.name for m in modes} - {"hf"} - pipeline[2]}
    assert {(r.scenario, r.tp, r.mode, r.tokens) for r in recs} == \
        {("prefill", tp, m, t) for tp, ms in by_tp.items() for m in ms for t in (16, 33)} | \
        {("decode", tp, m, b) for tp, ms in by_tp.items() for m in ms for b in (1, 4)} | \
        {(sc, tp, m, 16 if sc == "prefill" else 4) for tp, ms in pipeline.items() for m in ms
         for sc in ("prefill", "decode")}
    for r in recs:
        assert len(r.times_s) == 2 and r.min_s <= r.median_s <= r.max_s
        assert r.ratio_vs_sp_off is not None  # every group has sp=off
        if r.scenario == "prefill":  # (decode times of a tiny model are mostly noise)
            assert r.tokens_per_s > 0 and r.ratio_vs_sp_off > 0
            if r.pp == 1:
                assert len(r.peak_bytes) == r.tp and min(r.peak_bytes) > 0
        if r.mode.startswith("sp=") or r.mode == "overlap":
            if r.tp == 1:
                assert r.comm_bytes == r.comm_min_bytes == 0
                continue
            # Every seqpar step moves exactly the analytic minimum, TP or SP, padded or not.
            assert r.comm_bytes == r.comm_min_bytes > 0, r
            if r.scenario == "prefill":
                assert r.peak_bytes_predicted["total"] > 0 and r.predicted_s > 0
    steps = {(r.mode, r.scenario, r.tokens): r.sp_step
             for r in recs if r.tp == 2 and r.sp_step is not None}
    assert steps[("sp=on", "prefill", 33)] and not steps[("sp=off", "prefill", 33)]
    assert steps[("sp=on", "decode", 1)]  # one token padded to 2 rows
    at = {(r.scenario, r.tp, r.mode, r.tokens): r for r in recs}
    # Overlap: the SP step's collectives timed alone; the same bytes as the step moves.
    for t in (16, 33):
        sp_on, overlap = at["prefill", 2, "sp=on", t], at["prefill", 2, "overlap", t]
        assert sp_on.comm_alone_bytes == sp_on.comm_bytes
        assert len(sp_on.comm_alone_times_s) == 2 and sp_on.comm_alone_s > 0
        assert sp_on.comm_alone_cpu_s > 0
        for key in ("hidden_fraction", "compute_alone_s", "comm_alone_s"):
            assert math.isfinite(getattr(overlap, key)), key
    # Pipeline: the boundary carries exactly the analytic bytes, with SP 1/tp of those without.
    for r in recs:
        if r.pp > 1:
            assert r.boundary_bytes == r.boundary_min_bytes > 0, r
            assert r.p2p["send"]["bytes"] == r.p2p["recv"]["bytes"]
            # Computed for every pipeline record; only prefill times are direct enough to be
            # sure of a sign (a decode time is a difference of two medians of a tiny model).
            assert r.ratio_vs_pp1 is not None and (r.scenario == "decode" or r.ratio_vs_pp1 > 0)
    for scenario, n in (("prefill", 16), ("decode", 4)):
        tp_step, sp_step = at[scenario, 2, "pp=2", n], at[scenario, 2, "pp=2+sp", n]
        assert sp_step.sp_step and not tp_step.sp_step
        assert sp_step.boundary_bytes * 2 == tp_step.boundary_bytes
    assert at["prefill", 1, "pp=2", 16].boundary_bytes == analytic.boundary_bytes(
        ModelConfig.from_hf(dict(TINY, model_type="llama")), 16, 1, 2, sp=False)
    targets = {t[0]: t[1] for t in results.targets(recs)}
    assert any("analytic minimum" in n for n in targets)
    assert targets["pipeline boundary bytes per step = analytic (SP: 1/tp of TP)"] == "met"
    assert targets["overlap hides >= 50% of the communication at >= 2048 tokens, tp=2"] == \
        "not measured"
    assert "sp=on" in results.table(recs)
    assert "hidden" in results.overlap_table(recs) and "pp=2+sp" in results.pipeline_table(recs)
    markdown.write({**result, "command": "seqpar bench (test)", "settings": {
        "runs": 2, "warmup": 1, "prompt_len": 8, "new_tokens": 3, "hardware": "cpu-2core-gloo"}},
        tmp_path / "b.md", plots_dir=tmp_path)
    page = (tmp_path / "b.md").read_text()
    assert "## Targets" in page and "## Overlap" in page and "## Pipeline parallelism" in page


def test_comm_minimum_by_hand():
    cfg = ModelConfig.from_hf(dict(TINY, model_type="llama"))
    h, layers, b = 64, 2, 4
    tp_step = analytic.comm_minimum(cfg, [10], 2, sp=False)
    assert tp_step == {"all_reduce": 5 * 10 * h * b, "gather": 512 * b}
    sp_step = analytic.comm_minimum(cfg, [11], 2, sp=True)  # 11 tokens pad to 12
    assert sp_step["reduce_scatter"] == 5 * 12 * h * b
    assert sp_step["all_gather"] == (4 * 12 + 2 * 1) * h * b
    assert analytic.sample_rows_per_rank([1, 1, 1, 1], 2) == 2
    # The stage boundary: each TP rank's full [T, H] hidden + residual, or their [T_pad / N, H]
    # shards.
    assert analytic.boundary_bytes(cfg, 11, 2, 2, sp=False) == 2 * 2 * 11 * h * b
    assert analytic.boundary_bytes(cfg, 12, 2, 3, sp=True) == 2 * 2 * 12 * h * b
    # ring wire bytes: TP and SP steps send the same (padding aside)
    even = analytic.comm_minimum(cfg, [12], 2, sp=True)
    wire_sp = analytic.wire_bytes_per_rank({"reduce_scatter": even["reduce_scatter"],
                                            "all_gather": 4 * 12 * h * b}, 2)
    wire_tp = analytic.wire_bytes_per_rank({"all_reduce": 4 * 12 * h * b}, 2)
    assert wire_sp == wire_tp + 12 * h * b // 2  # the embedding's reduction has no all-gather


def test_peak_activation_shrinks_only_the_stream():
    cfg = ModelConfig.from_hf(dict(TINY, model_type="llama"))
    off = analytic.peak_activation(cfg, 64, 2, sp=False)
    on = analytic.peak_activation(cfg, 64, 2, sp=True)
    assert on["mlp"] == off["mlp"]
    assert on["stream"] * 2 == off["stream"]
    assert on["total"] < off["total"]


def test_cost_model():
    cfg = ModelConfig.from_hf(dict(TINY, model_type="llama"))
    hw = costmodel.Hardware("test", matmul_flops=1e12, attention_flops=1e12, mem_bw=1e11,
                            link_bw=1e10, link_latency=1e-5, op_overhead=0.0)
    tp = costmodel.layer_cost(cfg, hw, 1024, 2, "tp")
    sp = costmodel.layer_cost(cfg, hw, 1024, 2, "sp")
    # Ring model: RS + AG move what an all-reduce moves, at one more latency each.
    assert sp.comm - tp.comm == pytest.approx(2 * hw.link_latency)
    payload = 1024 * 64 * hw.dtype_bytes  # [T, H]; a 2-rank all-reduce sends 2 (N-1) / N of it
    assert tp.comm == pytest.approx(2 * (1e-5 + payload / 1e10))
    assert sp.tokenwise < tp.tokenwise and sp.matmul == tp.matmul
    # Large T: the matmul is compute-bound, 2 T x (this rank's weights) FLOPs.
    weights = 64 * (2 + 2 * 1) * 16 + 2 * 16 * 64 + 3 * 64 * 128 // 2
    assert tp.matmul == pytest.approx(2 * 1024 * weights / 1e12)
    gain = costmodel.overlap_gain(cfg, hw, 1024, 2)
    assert 1.0 <= gain <= 2.0
    # No latency: SP wins from the first size N divides (1 token pads to 2 rows of work);
    # huge latency: never.
    free = costmodel.Hardware(**{**hw.__dict__, "link_latency": 0.0})
    slow = costmodel.Hardware(**{**hw.__dict__, "link_latency": 1.0})
    assert costmodel.sp_threshold(cfg, free, 2) == 2
    assert costmodel.sp_threshold(cfg, slow, 2) is None


def test_plan_cli(capsys):
    assert costplan.main(["--model", "llama-3-70b", "-tp", "8", "--hardware", "h100-sxm-nvlink",
                      "--tokens", "128", "8192"]) == 0
    out = capsys.readouterr().out
    assert "SP token threshold" in out and "overlap gain" in out
    with pytest.raises(ValueError, match="unknown hardware"):
        costmodel.load_profile("no-such-node")


def test_engine_bench_records(tiny_llama, tmp_path):
    # `seqpar bench engine` on the tiny model, one round of everything at tiny sizes.
    from seqpar_bench import engine
    from transformers import AutoModelForCausalLM
    block = 2 * 2 * 2 * 16 * 16 * 2  # K+V x 2 layers x 2 KV heads x 16 tokens x head_dim 16 x bf16
    s = engine.EngineSettings(model=str(tiny_llama), threads=1, batches=[1, 2], prompt_len=8,
                              new_tokens=4, rounds=1, warmup=0, prefix_len=32, tail_len=8,
                              prefill_tokens=[48], bandwidth_bytes=2 ** 22,
                              kv_cache_memory_bytes=20 * block + block - 1, peers=["hf"],
                              tp2_model="", log=lambda *a: None)
    result = engine.run(s)
    json.dumps(result)
    t = {(x["what"], x["engine"], x["size"]): x for x in result["timings"]}
    assert set(t) == {("bandwidth", "torch", 2 ** 22), ("decode", "seqpar", 1), ("decode", "hf", 1),
                      ("decode", "seqpar", 2), ("decode", "hf", 2),
                      ("ttft_uncached", "seqpar", 40), ("ttft_cached", "seqpar", 40),
                      ("prefill", "seqpar", 48), ("matmul", "torch", 48)}
    for x in result["timings"]:
        # the machine probes (torch) take at least 5 rounds: they cost milliseconds
        assert len(x["times_s"]) == (5 if x["engine"] == "torch" else 1)
        assert x["min_s"] <= x["median_s"]
        if x["what"] != "decode":  # (a decode time is a difference of two tiny-model times)
            assert x["median_s"] > 0 and x["rate"] > 0
    # The pool: budget // block bytes, exactly (the last block - 1 bytes do not make a block).
    assert result["kv"]["num_blocks"] == 20 and result["kv"]["pool_bytes"] == 20 * block
    # Every cached request found its whole 32-token prefix (2 full blocks) in the cache.
    assert result["ttft_hits"] == {"prefix_hits": 32, "requests": 1}
    # Weight bytes in bf16 against HF's own parameter count (the tied embedding once).
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert result["model"]["weight_bytes"] == 2 * sum(p.numel() for p in hf.parameters())
    # Matmul FLOPs of a 48-token prefill, by hand: per token and layer q,k,v,o 2 x 64 x (64 + 32
    # + 32 + 64), MLP 2 x 3 x 64 x 128; causal attention 2 x 2 x 4 heads x 16 x 48 x 49 / 2 per
    # layer; the LM head of one row 2 x 64 x 512.
    assert t["prefill", "seqpar", 48]["work"] == \
        2 * (48 * (2 * 64 * 192 + 2 * 3 * 64 * 128) + 4 * 4 * 16 * 48 * 49 // 2) + 2 * 64 * 512
    status = {name: st for name, st, _ in result["targets"]}
    assert status["KV memory per rank = formula"] == "met"
    assert set(status.values()) <= {"met", "missed", "not run"}
    assert "batch-1 decode step <= 2.0x the roofline" in status
    # Peers left out are reported, with every target that needs them, never dropped.
    assert result["peers"]["vllm"]["status"] == result["peers"]["llama.cpp"]["status"] == "not run"
    assert [n for n, st in status.items() if st == "not run"] == [
        "batch-1 decode >= llama.cpp tok/s (F16 GGUF)",
        "prefill 48 tokens >= 2x faster than llama.cpp (F16)", "tp=1 batch-1 decode >= 1.2x vLLM",
        "tp=1 prefill 48 tokens >= 1.2x vLLM", "tp=1 decode batch 2 >= 1.2x vLLM"]
    # The section replaces its earlier self and leaves the rest of the page alone.
    page = tmp_path / "b.md"
    page.write_text("# Benchmarks\n\nhand-written\n")
    for _ in range(2):
        engine.write_section({**result, "command": "seqpar bench engine (test)"}, page)
    text = page.read_text()
    assert text.count("## Engine core") == 1 and "hand-written" in text
    assert "vllm: not run" in text


def test_f16_gguf_for_llamacpp(tmp_path):
    # llama.cpp's copy of a quantized GGUF: the same values in F16 (vectors F32), the same metadata.
    import gguf
    import numpy as np
    from seqpar_bench.peers import write_f16_gguf
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    norm = rng.standard_normal(64).astype(np.float32)
    writer = gguf.GGUFWriter(tmp_path / "q.gguf", "llama")
    writer.add_block_count(1)
    writer.add_token_list(["<s>", "a", "b"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    q8 = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(w, q8), raw_dtype=q8)
    writer.add_tensor("blk.0.attn_norm.weight", norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    src = gguf.GGUFReader(tmp_path / "q.gguf")
    out = gguf.GGUFReader(write_f16_gguf(tmp_path / "q.gguf", tmp_path / "f16.gguf"))
    assert out.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert out.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "a", "b"]
    assert out.fields["llama.block_count"].contents() == 1
    got = {t.name: t for t in out.tensors}
    assert got["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert got["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    want = gguf.quants.dequantize(src.tensors[0].data, q8)  # what seqpar's converter reads
    assert np.array_equal(got["blk.0.attn_q.weight"].data, want.astype(np.float16))
    assert np.array_equal(got["blk.0.attn_norm.weight"].data, norm)


def test_record_json_round_trip():
    """--json writes what applies; --replot reads back the same record, and rejects a field it
    does not know (a file from another version), naming it."""
    rec = Record(scenario="prefill", model="m", model_desc="d", mode="sp=on", tp=2, pp=1, tokens=16,
                 threads=2, runs=2, times_s=[0.1, 0.2], median_s=0.15, min_s=0.1, max_s=0.2,
                 tokens_per_s=106.7, sp_step=True, comm={"all_gather": {"calls": 5, "bytes": 80}},
                 peak_bytes=[10, 12], overlap_step=False, compile_in_runs_s=0.0)
    data = json.loads(json.dumps(rec.to_dict()))
    assert "ratio_vs_pp1" not in data and data["overlap_step"] is False  # None left out, not 0
    assert Record.from_dict(data) == rec
    with pytest.raises(ValueError, match=r"unknown fields \['speedup'\]"):
        Record.from_dict({**data, "speedup": 2.0})


def test_bench_imports_only_public_seqpar():
    # The benchmark lives beside the engine: it imports seqpar only through PUBLIC_MODULES (never
    # seqpar.cli: `seqpar bench` dispatches to it), and the engine never imports it.
    import ast
    from pathlib import Path

    import seqpar
    import seqpar_bench

    def seqpar_imports(path):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                yield from (a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                yield node.module

    bench = Path(seqpar_bench.__file__).parent
    bad = {(p.name, m) for p in bench.glob("*.py") for m in seqpar_imports(p)
           if m.split(".")[0] == "seqpar" and m not in seqpar_bench.PUBLIC_MODULES}
    assert not bad, bad
    engine = Path(seqpar.__file__).parent
    back = {(str(p.relative_to(engine)), m) for p in engine.rglob("*.py")
            for m in seqpar_imports(p) if m.split(".")[0] == "seqpar_bench"}
    assert back == {("cli.py", "seqpar_bench"), ("cli.py", "seqpar_bench.costplan")}, back


def test_serve_args_map_onto_engine_args():
    # `seqpar bench serve --offline` builds the same engine as `seqpar serve ARGS` from
    # EngineArgs' own fields; a flag that is not one is an error, not dropped.
    from seqpar_bench.serve import engine_options
    got = engine_options("smollm2", "on", ["-tp", "2", "--dtype", "bfloat16", "--overlap",
                                           "--no-enable-prefix-caching", "--port", "0",
                                           "--max-model-len", "512", "-q", "int8"])
    assert got == dict(model="smollm2", sequence_parallel="on", tensor_parallel_size=2,
                       dtype="bfloat16", overlap=True, enable_prefix_caching=False,
                       max_model_len=512, quantization="int8")
    with pytest.raises(ValueError, match="--bogus"):
        engine_options("smollm2", "off", ["--bogus", "1"])


def test_missing_peer_is_reported_with_how_to_install(tmp_path):
    from seqpar_bench import peers
    python, status = peers.find_python("vllm", str(tmp_path / "no-python"))
    assert python is None and status["status"] == "not installed"
    assert "vllm_cpu_venv.sh" in status["reason"]
    # A peer that fails to start says why (the driver's traceback), and leaves no process behind.
    # (llama_cpp missing here, or present and the file missing)
    with pytest.raises(peers.PeerError, match=r"llama_cpp|nothing\.gguf"):
        peers.llamacpp_host(sys.executable, tmp_path / "nothing.gguf", "F16", 1, 64, tmp_path)
    assert peers.vllm_bind(2, 2) == "0|1" and peers.vllm_bind(4, 2) == "0-1|2-3"
    assert peers.vllm_bind(2, 1) == "0-1"


def test_peer_targets_pair_rounds_and_name_missing_peers():
    from dataclasses import asdict

    from seqpar_bench.engine import Timing, faster
    mine = Timing("decode", "seqpar", 1, 10, "tokens", [1.0, 2.0, 1.0])
    theirs = Timing("decode", "vllm tp=1", 1, 10, "tokens", [2.0, 2.0, 3.0])
    result = {"timings": [asdict(mine), asdict(theirs)],
              "peers": {"vllm": {"status": "measured"},
                        "llama.cpp": {"status": "not installed",
                                      "reason": "no llama_cpp; to install: pip ..."}}}
    name, status, numbers = faster(result, "x", "decode", 1, "seqpar", "vllm tp=1", 1.2, "tp1",
                                   "vllm")
    assert status == "met" and numbers.startswith("2.00x")  # rounds paired: 2/1, 2/2, 3/1
    assert faster(result, "x", "decode", 1, "seqpar", "vllm tp=1", 2.5, "tp1")[1] == "missed"
    assert faster(result, "y", "decode", 1, "seqpar", "llama.cpp F16", 1.0, "tp1",
                  "llama.cpp") == ("y", "not installed", "no llama_cpp")


def test_gpu_check_without_cuda_passes_saying_so(capsys):
    from seqpar_bench.gpu_check import main
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: `make gpu-check` runs the real checks")
    assert main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
