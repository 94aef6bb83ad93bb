"""`seqpar generate | serve | check | bench | plan`: flag names follow vLLM where one exists."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from seqpar.entrypoints.tool_parsers import PARSERS


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="HF directory (config.json + *.safetensors), a .gguf file, or an alias "
                        "(smollm2, the default)")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1, help="TP ranks")
    p.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1, help="pipeline stages")
    p.add_argument("--sp", "--sequence-parallel", dest="sp", choices=["off", "on", "auto"],
                   default="auto", help="sequence parallelism: off, on every step, or auto "
                                        "(on steps above a threshold measured at start-up)")
    p.add_argument("--sp-min-tokens", type=int, default=None,
                   help="with --sp auto: use this token threshold instead of measuring one")
    p.add_argument("--overlap", action="store_true", help="collective matmul on SP steps")
    p.add_argument("--compile", action="store_true", help="torch.compile + the SP graph pass")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE models: whole experts per TP rank, all-to-all on SP steps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations dtype (auto: the checkpoint's; on a CPU without "
                        "native bf16, 16-bit checkpoints run in float32)")
    from seqpar.config import QUANT_MODES

    p.add_argument("--quantization", "-q", default="auto", choices=QUANT_MODES,
                   help="weights: auto (a quantized GGUF keeps its types where the kernels are "
                        "fast: CPU, bfloat16; else none), gguf (keep them regardless), int8 "
                        "(per output channel) / int4 (groups of 32) quantized at load, none "
                        "(dense in --dtype)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output per sequence (default: the model's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per paged-KV block")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV cache bytes per rank (default: a share of free memory on CPU, "
                        "--gpu-memory-utilization on CUDA)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="CUDA: share of the device for weights, activations and KV cache")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of cached prompt prefixes")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per step; longer prompts are chunked (default: max model len)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, vLLM\'s keys: \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_min": 2, '
                        '"prompt_lookup_max": 5}\' or \'{"model": DRAFT_DIR, '
                        '"num_speculative_tokens": 4}\'')


def _llm_kwargs(args) -> dict:
    return dict(model=args.model, tensor_parallel_size=args.tensor_parallel_size,
                pipeline_parallel_size=args.pipeline_parallel_size, sequence_parallel=args.sp,
                sp_min_tokens=args.sp_min_tokens, overlap=args.overlap, compile=args.compile,
                dtype=args.dtype, max_model_len=args.max_model_len, device=args.device,
                block_size=args.block_size, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                gpu_memory_utilization=args.gpu_memory_utilization,
                enable_prefix_caching=args.enable_prefix_caching, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                enable_expert_parallel=args.enable_expert_parallel,
                quantization=args.quantization, speculative_config=args.speculative_config)


def cmd_generate(args) -> int:
    from seqpar import LLM, SamplingParams

    prompts = args.prompt or ["What is the capital of France?"]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    with LLM(**_llm_kwargs(args), seed=args.seed or 0, shm=args.shm) as llm:
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        else:
            outs = llm.generate(prompts, params)
        for prompt, out in zip(prompts, outs):
            if len(prompts) > 1:
                print(f"--- {prompt}")
            print(out.text.strip() if args.chat else prompt + out.text)
        if args.stats:
            print(json.dumps({"comm": llm.comm_stats(), "cache": llm.cache_stats(),
                              "weights": llm.weight_stats()}, indent=2))
    return 0


def cmd_serve(args) -> int:
    from seqpar.entrypoints.api_server import serve

    args.model = args.model_tag or args.model
    return serve(args, _llm_kwargs(args))


def cmd_check(args) -> int:
    from seqpar.config import SpeculativeConfig
    from seqpar.report import support_report

    kwargs = _llm_kwargs(args)
    try:
        SpeculativeConfig.parse(kwargs.pop("speculative_config"))  # the plan does not depend on it
        print(support_report(**kwargs))
    except (ValueError, FileNotFoundError) as e:
        print(f"seqpar check: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_bench(args) -> int:
    # The benchmark is a package of its own (seqpar_bench) that drives the engine through its public
    # API; imported here, on use, so the runtime never imports it.
    try:
        from seqpar_bench import main as bench_main
    except ImportError as e:
        print(f"seqpar bench: the benchmark package is not installed ({e}); `make install` or "
              "`pip install -e .` installs it", file=sys.stderr)
        return 2
    return bench_main(args.bench_args)


def cmd_plan(args) -> int:
    try:
        from seqpar_bench.costplan import main as plan_main
    except ImportError as e:
        print(f"seqpar plan: the benchmark package is not installed ({e})", file=sys.stderr)
        return 2
    return plan_main(args.plan_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqpar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from prompts")
    gen.add_argument("prompt", nargs="*", help="prompts (default: a question about France)")
    _add_model_args(gen)
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--stats", action="store_true",
                     help="print comm_stats(), cache_stats() and weight_stats() as JSON")
    gen.add_argument("--no-shm", dest="shm", action="store_false",
                     help="TP collectives through gloo even when the ranks share a host")
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (see README: Serving)")
    serve.add_argument("model_tag", nargs="?", metavar="MODEL",
                       help="the model, as --model (which it replaces)")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1/* (401 otherwise)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients send and /v1/models lists (default: MODEL)")
    serve.add_argument("--max-waiting", type=int, default=256,
                       help="most requests waiting for a batch slot; beyond it requests get 429")
    serve.add_argument("--seed", type=int, default=0, help="engine seed (requests may set their own)")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='let the model decide to call tools (tool_choice "auto"); needs '
                            "--tool-call-parser")
    serve.add_argument("--tool-call-parser", choices=PARSERS, default=None,
                       help="how the model writes tool calls: hermes (Qwen2, Qwen3, Hermes) or "
                            "llama3_json (Llama 3.x)")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check", help="validate a model x tp x pp and print the parallel plan")
    _add_model_args(check)
    check.set_defaults(func=cmd_check)

    bench = sub.add_parser("bench", help="benchmark suite (see `seqpar bench --help`)",
                           add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

    plan = sub.add_parser("plan", help="cost model: per-layer time, SP threshold, overlap gain "
                                       "(see `seqpar plan --help`)", add_help=False)
    plan.add_argument("plan_args", nargs=argparse.REMAINDER)
    plan.set_defaults(func=cmd_plan)
    return parser


def _setup_logging() -> None:
    """The CLI is an application: seqpar's log lines go to stderr, as they are."""
    log = logging.getLogger("seqpar")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def main(argv=None) -> int:
    _setup_logging()
    parser = build_parser()
    # bench and plan parse their own flags (argparse's REMAINDER stops short of leading options).
    args, extra = parser.parse_known_args(argv)
    if args.command in ("bench", "plan"):
        setattr(args, f"{args.command}_args", extra + getattr(args, f"{args.command}_args"))
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"seqpar {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
