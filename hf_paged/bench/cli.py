"""Command line of the benchmark: arguments, model loading, the progress bar, one-line errors (exit code 2)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import shlex
import sys
from pathlib import Path

import hf_paged

from .quality import QUALITY_IMPLS, QualitySettings
from .runner import IMPLEMENTATIONS
from .scenarios import DEFAULT_SCENARIOS, HOST_LAYERS, SCENARIOS

__all__ = ["BenchError", "main", "parse_args"]

PROG = "hf-paged-bench"
DTYPES = ("float32", "bfloat16", "float16")
IMPL_CHOICES = IMPLEMENTATIONS
#: What the generate() scenarios run unless --impls says otherwise (sdpa is always run: it is the reference).
DEFAULT_IMPLS = ("hf_paged", "sdpa", "generate_batch")


class BenchError(Exception):
    """A user-facing error: printed as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line (no usage block)."""

    def error(self, message: str):
        raise BenchError(message)


def _int_list(text: str) -> tuple[int, ...]:
    """``"512,2048"`` -> ``(512, 2048)``; every item a positive int. ``""`` or ``"none"`` -> ``()``."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        values = tuple(int(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _byte_size(text: str) -> str:
    """A byte count as hf_paged's ``max_memory`` takes it: ``"268435456"``, ``"256MiB"``, ``"2GB"``."""
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*([kmg]i?b|b)?\s*", text, re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"expected a byte size such as 256MiB or 2GB, got {text!r}")
    return text


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; raises `BenchError` on bad input."""
    parser = _Parser(
        prog=PROG,
        description="Benchmark hf_paged's paged KV cache against sdpa + DynamicCache (and Transformers' "
        "continuous batching) on generate() scenarios.",
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="a local Transformers checkpoint (a folder with config.json); "
        "default: the embedded SmolLM2-135M-Instruct (GGUF, offline)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--block-size", type=_positive, help="tokens per hf_paged block (default: hf_paged's, 16)")
    parser.add_argument("--num-blocks", type=_positive, help="fixed hf_paged pool size in blocks (default: grows)")
    parser.add_argument(
        "--max-memory", type=_byte_size, help='fixed hf_paged pool size in bytes, e.g. "256MiB" (default: grows)'
    )
    parser.add_argument(
        "--scenarios",
        type=_name_list,
        default=DEFAULT_SCENARIOS,
        help=f"comma-separated, from {','.join(SCENARIOS)} (default: all but host and quality). host runs its own "
        "30-layer tiny Llama (batch 1 and 8) in a process of its own: time, host syncs, copies and Triton launches "
        "per decode step for sdpa and hf_paged's PyTorch and Triton paths (launches stubbed); it uses "
        "--prompt-lengths, --new-tokens, --repeats, --warmup (at least 1), --threads, --seed and --host-layers, and "
        "on its own loads no model and runs no sweep. quality (minutes: about 2 per implementation for SmolLM2-135M "
        "on 1 thread) compares quantized KV caches with unquantized hf_paged on the loaded model: "
        "teacher-forced perplexity over --quality-tokens tokens of CPython's pydoc_data.topics (segments of "
        "--quality-segment tokens fed --quality-chunk at a time through the cache), top-1 agreement, and greedy "
        "continuations (--new-tokens at most, to EOS) of the chat requests; it runs "
        f"{','.join(QUALITY_IMPLS)} unless --impls names others",
    )
    parser.add_argument(
        "--prompt-lengths", type=_int_list, default=(512, 2048), help="prompt tokens P (default 512,2048)"
    )
    parser.add_argument("--new-tokens", type=_positive, default=64, help="new tokens G per sequence (default 64)")
    parser.add_argument("--repeats", type=_positive, default=3, help="timed runs per implementation (default 3)")
    parser.add_argument("--warmup", type=_non_negative, default=1,
                        help="untimed runs per implementation and case (default 1)")
    parser.add_argument(
        "--sweep-k",
        type=_int_list,
        default=(1, 2, 4, 8),
        help='k values for the KV-memory sweep over beams and samples ("none" to skip; default 1,2,4,8)',
    )
    parser.add_argument("--prefix-calls", type=_positive, default=4, help="calls sharing the prefix (default 4)")
    parser.add_argument(
        "--impls",
        type=_name_list,
        help=f"implementations, from {','.join(IMPL_CHOICES)} (default {','.join(DEFAULT_IMPLS)}; sdpa is always "
        "run: it is the reference). hf_paged-int8 / hf_paged-fp8: hf_paged with 8-bit KV storage "
        '(generate(cache_config={"kv_dtype": ...})); quanto-int2/4/8: sdpa with Transformers\' QuantizedCache on '
        'the optimum-quanto backend (generate(cache_implementation="quantized", cache_config={"backend": "quanto", '
        '"nbits": n}), other options at their defaults: pip install optimum-quanto)',
    )
    parser.add_argument(
        "--threads", type=_positive,
        help="torch CPU threads (default on CPU: the idle cores by load average, or OMP_NUM_THREADS if set)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="a small, fast run: no warm-up, no k sweep, no generate_batch (same as --warmup 0 --sweep-k none "
        "--impls hf_paged,sdpa)",
    )
    parser.add_argument("--host-layers", type=_positive, default=HOST_LAYERS,
                        help=f"layers of the host scenario's model (default {HOST_LAYERS})")
    quality = QualitySettings()
    parser.add_argument("--quality-tokens", type=_positive, default=quality.tokens,
                        help=f"corpus tokens the quality scenario scores (default {quality.tokens})")
    parser.add_argument("--quality-segment", type=_positive, default=quality.segment,
                        help=f"tokens per segment (one cache each) in the quality scenario (default {quality.segment})")
    parser.add_argument("--quality-chunk", type=_positive, default=quality.chunk,
                        help=f"tokens per forward call within a segment in the quality scenario (default "
                        f"{quality.chunk})")
    parser.add_argument("--seed", type=int, default=0, help="seed set before every generate() call")
    parser.add_argument("--out", type=Path, help="write results.json, results.md and PNG plots here")
    args = parser.parse_args(argv)
    named = args.impls or ()
    args.impls = args.impls or DEFAULT_IMPLS
    if args.quick:
        args.warmup, args.sweep_k, args.impls = 0, (), ("hf_paged", "sdpa")

    args.scenarios = tuple(dict.fromkeys(args.scenarios))
    args.prompt_lengths = tuple(dict.fromkeys(args.prompt_lengths))
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown or not args.scenarios:
        parser.error(
            f"unknown scenario {', '.join(map(repr, unknown)) or '(none given)'}; choose from {', '.join(SCENARIOS)}"
        )
    unknown = [name for name in args.impls if name not in IMPL_CHOICES]
    if unknown:
        parser.error(f"unknown implementation {', '.join(map(repr, unknown))}; choose from {', '.join(IMPL_CHOICES)}")
    args.impls = tuple(i for i in IMPL_CHOICES if i in args.impls or i == "sdpa")
    args.quality_impls = tuple(i for i in named if i in QUALITY_IMPLS) or QUALITY_IMPLS
    if args.quality_chunk > args.quality_segment or args.quality_segment < 2:
        parser.error(f"--quality-chunk {args.quality_chunk} must be at most --quality-segment "
                     f"{args.quality_segment}, itself at least 2")
    if not args.prompt_lengths:
        parser.error("--prompt-lengths needs at least one length")
    if args.num_blocks is not None and args.max_memory is not None:
        parser.error("pass either --num-blocks or --max-memory, not both")
    _check_device(parser, args.device)
    if "host" in args.scenarios and args.device != "cpu":
        parser.error(f"the host scenario runs on the CPU (its Triton path on the launch-stub device), not on "
                     f"--device {args.device}; run it without --device")
    if args.model is not None and not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: not a Transformers checkpoint (no config.json there)")
    return args


def _check_device(parser: argparse.ArgumentParser, name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        parser.error(f"--device {name}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: CUDA is not available on this machine")


def _load(args: argparse.Namespace):
    """Load the model with sdpa attention (switched per run) and its tokenizer; returns (model, tokenizer, name)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.model is None:
        from hf_paged.models import SMOLLM2_GGUF, load_smollm2

        try:
            model, tokenizer = load_smollm2("sdpa", dtype=dtype)
        except FileNotFoundError as error:
            raise BenchError(str(error)) from None
        name = f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF}, embedded)"
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa", dtype=dtype).eval()
        except (OSError, ValueError) as error:
            raise BenchError(f"--model {args.model}: {str(error).strip().splitlines()[0]}") from None
        name = str(args.model)
    return model.to(device), tokenizer, name


def _meta(args: argparse.Namespace, model_name: str | None, loaded: tuple[str, ...], rss_note: str,
          host: bool, quality: bool = False) -> dict:
    """The run's settings and versions; `loaded`: the generate() scenarios that ran on the loaded model (none: no
    sweep ran); `host`: whether the `host` scenario ran; `quality`: whether the `quality` scenario ran (on the
    loaded model too)."""
    import torch
    import transformers

    from .report import notes
    from .runner import LIBRARY_BLOCK_SIZE
    from .scenarios import HOST_BATCHES, HOST_MODEL

    meta = {
        "model": model_name if loaded or quality else "none loaded (the host scenario has its own)",
        "dtype": args.dtype,
        "device": args.device,
        "block_size": args.block_size or LIBRARY_BLOCK_SIZE,
        "num_blocks": args.num_blocks,
        "max_memory": args.max_memory,
        "scenarios": list(args.scenarios),
        "prompt_lengths": list(args.prompt_lengths),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "sweep_k": list(args.sweep_k) if loaded else [],
        "impls": list(args.impls),
        "seed": args.seed,
        "hf_paged": getattr(hf_paged, "__version__", "?"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rss_note": rss_note,
        "notes": notes(rss_note) if loaded else [],
        "command": shlex.join(["python", "-m", "hf_paged.bench", *args.argv]),
    }
    if quality:
        import platform

        meta["python"] = platform.python_version()
        meta["quality_impls"] = list(args.quality_impls)
    if host:
        try:
            import triton

            meta["triton"] = triton.__version__
        except ImportError:
            meta["triton"] = None
        meta["host_model"] = {**HOST_MODEL, "num_hidden_layers": args.host_layers, "dtype": "float32",
                              "batches": list(HOST_BATCHES)}
    return meta


def _load_for_scenarios(args: argparse.Namespace):
    """The loaded model for the scenarios that run on it: ``(model, tokenizer, model name, pad token id)``."""
    from transformers.utils import logging as hf_logging

    print(f"{PROG}: loading the model ...", file=sys.stderr)
    model, tokenizer, model_name = _load(args)
    hf_logging.set_verbosity_error()
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model, tokenizer, model_name, pad_token_id if pad_token_id is not None else 0


def _run_loaded(args: argparse.Namespace, names: tuple[str, ...], model, tokenizer, pad_token_id: int):
    """The generate() scenarios `names` on the loaded model (and the k sweep): ``(rows, sweep, rss_note)``."""
    from tqdm.auto import tqdm

    from .prompts import chat_requests, chat_wrap, token_stream
    from .runner import Runner
    from .suite import Settings, Suite

    scenarios = tuple(
        dataclasses.replace(SCENARIOS[name], calls=args.prefix_calls)
        if SCENARIOS[name].prefix_cache
        else SCENARIOS[name]
        for name in names
    )
    settings = Settings(
        scenarios, args.prompt_lengths, args.new_tokens, args.repeats, args.warmup, args.sweep_k, args.impls
    )
    runner = Runner(
        model,
        pad_token_id,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        max_memory=args.max_memory,
        seed=args.seed,
    )
    stream = token_stream(tokenizer, max(args.prompt_lengths))
    suite = Suite(runner, stream, settings, None, chat=chat_wrap(tokenizer), requests=chat_requests(tokenizer))
    # Created with its total: a bar without one first prints a stray "0run [00:00, ?run/s]" line.
    with tqdm(total=suite.planned_runs(), desc=PROG, unit="run", file=sys.stderr, dynamic_ncols=True) as bar:
        suite.progress = bar
        rows, sweep = suite.run()
    return rows, sweep, runner.rss_note


def _run_quality(args: argparse.Namespace, model, tokenizer, pad_token_id: int):
    """The `quality` scenario on the loaded model (`hf_paged.bench.quality`)."""
    from tqdm.auto import tqdm

    from .prompts import chat_requests
    from .quality import planned_steps, quality_impls, run_quality

    settings = QualitySettings(args.quality_tokens, args.quality_segment, args.quality_chunk, args.new_tokens)
    total = planned_steps(quality_impls(model, args.quality_impls), settings)
    with tqdm(total=total, desc=f"{PROG} quality", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        try:
            return run_quality(model, tokenizer, chat_requests(tokenizer), pad_token_id, settings,
                               args.quality_impls, bar)
        except (RuntimeError, ValueError) as error:
            if str(error).startswith("hf_paged bench:"):
                raise BenchError(str(error).removeprefix("hf_paged bench: ")) from None
            raise


def _run_host(args: argparse.Namespace) -> list:
    """The `host` scenario, in a process of its own (`hf_paged.bench.host`)."""
    import torch

    from .host import HostSettings, run_host

    settings = HostSettings(args.prompt_lengths, args.new_tokens, args.repeats, args.warmup, args.host_layers,
                            torch.get_num_threads(), args.seed)
    print(f"{PROG}: the host scenario ({args.host_layers} layers) in a process of its own ...", file=sys.stderr)
    try:
        return run_host(settings)
    except RuntimeError as error:
        raise BenchError(str(error)) from None


def _run(args: argparse.Namespace) -> int:
    from .report import render_table, write_outputs

    if args.device == "cpu" or args.threads is not None:
        import torch

        from .threads import choose_threads

        threads, why = choose_threads(args.threads)
        torch.set_num_threads(threads)
        print(f"{PROG}: {threads} CPU thread(s) ({why})", file=sys.stderr)
    if args.out is not None:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise BenchError(f"--out {args.out}: {error.strerror or error}") from None
    loaded = tuple(name for name in args.scenarios if SCENARIOS[name].model != "host" and not SCENARIOS[name].quality)
    rows, sweep, rss_note, model_name, quality = [], [], "", None, None
    if loaded or "quality" in args.scenarios:
        model, tokenizer, model_name, pad_token_id = _load_for_scenarios(args)
        if loaded:
            rows, sweep, rss_note = _run_loaded(args, loaded, model, tokenizer, pad_token_id)
        if "quality" in args.scenarios:
            quality = _run_quality(args, model, tokenizer, pad_token_id)
    host = _run_host(args) if "host" in args.scenarios else []
    print(render_table(rows, sweep, rss_note, host, quality))
    if args.out is not None:
        meta = _meta(args, model_name, loaded, rss_note, bool(host), quality is not None)
        for path in write_outputs(args.out, meta, rows, sweep, host, quality):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m hf_paged.bench`` and ``hf-paged-bench``; returns the exit code."""
    try:
        args = parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        return _run(args)
    except (BenchError, hf_paged.OutOfBlocksError, ValueError) as error:
        if isinstance(error, ValueError) and not str(error).startswith("hf_paged:"):
            raise  # a bug, not bad input: hf_paged's own messages (e.g. max_memory too small) start with "hf_paged:"
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
