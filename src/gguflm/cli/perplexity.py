"""`gguflm perplexity`: llama-perplexity's measurement (see gguflm.verify.perplexity)."""

from __future__ import annotations

import json
import sys

from gguflm.cli import options
from gguflm.models import resolve

HELP = "perplexity of a text as llama-perplexity computes it; KL divergence against a base model"
DESCRIPTION = """\
Perplexity of a text, computed as llama.cpp's llama-perplexity does: the whole text is
tokenized once (BOS when the model adds one), cut into chunks of CTX tokens (BOS replaces
each chunk's first token when the model adds BOS), and only the second half of each chunk
is scored. Prints the running PPL after each chunk and the final estimate with its
standard error; --json adds one JSON line at the end.

KL-divergence mode, to compare a quantization with its base model:
  gguflm perplexity -m model-f16.gguf -f text.txt --save-logits base.bin
  gguflm perplexity -m model-q4_k_m.gguf --kl-base base.bin
The second run reads the tokens from the file (the same text and context by construction;
-f, if given, must tokenize to them) and reports mean/median/max KL(base || model), the
share of positions whose top token agrees and both perplexities. The file keeps 16-bit
log-probabilities per scored position, in llama-perplexity's layout.

--compare float64 and --compare llama.cpp score the same chunks with the float64
reference and with llama.cpp (llama-cpp-python) and print their figures too. llama.cpp
runs in a child process: if it crashes or hangs, one line says so (and how to avoid it),
gguflm's own figures are still printed, and the exit status is 1.

examples:
  gguflm perplexity -f wiki.test.raw -c 512 --chunks 20
  gguflm perplexity -m model.gguf -f text.txt -c 128 --json | tail -1
"""


def add_arguments(p) -> None:
    options.add_model(p)
    p.add_argument("-f", "--file", metavar="FILE", help="UTF-8 text to score (optional with --kl-base)")
    options.add_ctx_size(p, 512, "tokens per chunk (default: %(default)s)")  # --ctx: an abbreviation of it
    p.add_argument("--chunks", type=int, default=-1, help="chunks to score, -1 for all (default: %(default)s)")
    p.add_argument("-b", "--batch", type=int, help="tokens per forward pass: below CTX a chunk is fed in pieces, "
                   "a multiple of CTX scores several chunks at once (default: CTX)")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument("--save-logits", metavar="FILE", help="store this (base) model's log-probabilities")
    p.add_argument("--kl-base", metavar="FILE", help="KL divergence against a file from --save-logits")
    p.add_argument("--compare", action="append", choices=["float64", "llama.cpp"], default=[],
                   help="also score the chunks with this reference (repeatable)")
    options.add_threads(p)
    options.add_device(p)


def run(args) -> int:
    import gguflm
    from gguflm.cli import UserError
    from gguflm.verify import perplexity as pp

    if args.save_logits and args.kl_base:
        raise UserError("--save-logits and --kl-base cannot be combined")
    if not args.file and not args.kl_base:
        raise UserError("give the text to score with -f FILE (or a base run with --kl-base)")
    threads = options.check_threads(args)
    dev = options.device(args, "perplexity")
    if "llama.cpp" in args.compare:
        from gguflm.verify import llamacpp

        if not llamacpp.available():
            raise UserError(f"--compare llama.cpp needs llama-cpp-python: {llamacpp.INSTALL_HINT}")
    path = resolve(args.model)
    f = gguflm.GGUFFile(path)
    tok = gguflm.Tokenizer.from_gguf(f)
    bos = tok.bos_id if tok.add_bos else None
    if tok.add_bos and bos is None:
        raise UserError("the model adds BOS but defines no BOS token")
    try:
        text_tokens = None
        if args.file:
            text = options.read_text_file(args.file, "-f")
            text_tokens = tok.encode(text, add_special=True, parse_special=False)
        base = None
        if args.kl_base:
            base = pp.read_logits_file(args.kl_base, n_vocab=_n_vocab(f))
            chunks = base.chunks
            if args.chunks >= 0:
                chunks = chunks[:max(1, args.chunks)]
            stored = [t for c in chunks for t in c]
            if text_tokens is not None and text_tokens[:len(stored)] != stored:
                raise UserError(f"{args.file} does not tokenize to the tokens stored in {args.kl_base} "
                                "(a different text or tokenizer)")
            n_ctx = base.n_ctx
        else:
            n_ctx = args.ctx_size
            if n_ctx < 2:
                raise UserError(f"-c {n_ctx}: expected at least 2")
            chunks = pp.chunks_of(text_tokens, n_ctx, args.chunks)
    except pp.PerplexityError as e:
        raise UserError(str(e)) from e
    batch = args.batch or n_ctx
    if batch < 1 or (batch > n_ctx and batch % n_ctx):
        raise UserError(f"--batch must be below the context {n_ctx} or a multiple of it")
    per_batch = max(1, batch // n_ctx)

    options.check_context(f, n_ctx, dev, n_slots=per_batch)
    model = gguflm.load(f, device=dev, n_ctx=n_ctx, threads=threads)
    n_vocab = model.config.n_vocab
    writer = pp.LogitsWriter(args.save_logits, n_ctx, n_vocab, chunks) if args.save_logits else None
    kl = pp.KLStats() if base is not None else None
    print(f"perplexity: {len(chunks)} chunks of {n_ctx} tokens, {len(chunks) * (n_ctx - 1 - n_ctx // 2)} scored"
          + (f", text {len(text_tokens)} tokens" if text_tokens is not None else ""), file=sys.stderr)

    from tqdm import tqdm

    bar = tqdm(total=len(chunks), desc="perplexity", unit="chunk", file=sys.stderr)
    running: list[str] = []

    def on_chunk(i: int, logits, stats) -> None:
        if writer is not None:
            writer.add(logits)
        if kl is not None:
            kl.add(logits, base.rows[i], chunks[i])
        running.append(f"[{i + 1}]{stats.ppl:.4f}")
        bar.set_postfix_str(f"PPL {stats.ppl:.4f}")
        bar.update(1)

    try:
        result = pp.evaluate(pp.engine_chunk_logits(model.model, min(batch, n_ctx)), chunks, bos, per_batch, on_chunk)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    print(",".join(running))
    print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_stderr:.5f}")
    summary = result.to_dict() | {"model": str(path), "device": dev}
    if text_tokens is not None:
        summary["text_tokens"] = len(text_tokens)
    if writer is not None:
        print(f"saved log-probabilities of {result.tokens} positions to {args.save_logits}", file=sys.stderr)
        summary["saved_logits"] = str(args.save_logits)
    if kl is not None:
        s = kl.summary()
        summary["kl"] = s
        print(f"Mean PPL(Q)     : {s['ppl']:.6f}\nMean PPL(base)  : {s['ppl_base']:.6f}\n"
              f"PPL(Q)-PPL(base): {s['delta_ppl']:+.6f}  (ln ratio {s['ln_ppl_ratio']:+.6f})\n"
              f"Mean    KLD: {s['kl_mean']:.6f} +/- {s['kl_mean_stderr']:.6f}\n"
              f"Median  KLD: {s['kl_median']:.6f}\n99.0%   KLD: {s['kl_p99']:.6f}\nMaximum KLD: {s['kl_max']:.6f}\n"
              f"Same top   : {100 * s['top1_agreement']:.3f} %  ({s['rows']} positions)")
    rc = 0
    for name in args.compare:
        if name == "float64":
            other = pp.evaluate(pp.reference_chunk_logits(f, _cached_weights(f)), chunks, bos)
        else:
            from gguflm.verify.llamacpp import OracleFailed

            try:
                with pp.llama_cpp_chunk_logits(path, n_ctx, args.threads) as fn:
                    other = pp.evaluate(fn, chunks, bos)
            except OracleFailed as e:
                print(f"gguflm perplexity: error: {e.what}; no llama.cpp figure."
                      + (f" To avoid it: {e.hint}" if e.hint else ""), file=sys.stderr)
                summary.setdefault("compare", {})[name] = {"error": e.what}
                rc = 1
                continue
        rel = other.ppl / result.ppl - 1
        print(f"{name:9s}: PPL = {other.ppl:.4f} +/- {other.ppl_stderr:.5f}  ({rel:+.3%} vs gguflm)")
        summary.setdefault("compare", {})[name] = other.to_dict()
    if args.json:
        print(json.dumps(summary))
    return rc


def _n_vocab(f) -> int:
    from gguflm.model.config import ModelConfig

    return ModelConfig.from_gguf(f).n_vocab


def _cached_weights(f):
    """Every tensor dequantized once (by libggml when installed) for the float64 reference."""
    import functools

    from gguflm.verify import ggml_oracle
    from gguflm.verify.components import weight_loader

    return functools.cache(weight_loader(f, ggml_oracle.available()))
