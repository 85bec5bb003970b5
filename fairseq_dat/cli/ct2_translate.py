"""Translate stdin with an ``export_ctranslate2`` directory, each sentence at its predicted depth
(Elbayad et al., ICLR 2020, §3.1), like ``fairseq-interactive``::

    python -m fairseq_dat.cli.ct2_translate OUT_DIR [--exit-threshold T | --fixed-exit k] [--beam 5]
        [--batch-size 64] [--buffer-size 1024] [--bpe] [--remove-bpe] [--print-exits] < input.txt

Input: one sentence per line, BPE'd as the model's training data (or tokenized text with ``--bpe``,
which applies the exported BPE codes as ``fairseq-interactive --bpe subword_nmt`` does). Output: one
``H-<line>\\t<score>\\t<translation>`` line per input line, in input order (score: CTranslate2's
hypothesis score), with ``--print-exits`` an ``E-<line>`` line giving the exit of
each output token (EOS included: the sentence's depth), and last the summary
``Adaptive exits (N=…): AE=… tokens=… exits=[…] sentences=[…]`` (AE: mean exit over output tokens,
EOS included, as ``fairseq-generate`` prints it; sentences: how many were translated at each depth).
Without ``--exit-threshold`` or ``--fixed-exit`` the estimator's most likely depth is used (argmax q).
"""
import argparse
import os
import sys

from . import run_main
from ..ctranslate2 import AdaptiveTranslator, Translation
from ..errors import ConfigError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="directory written by python -m fairseq_dat.cli.export_ctranslate2")
    parser.add_argument("--exit-threshold", default=None,
                        help="τ in [0, 1]: each sentence's depth is the first n with q(1)+…+q(n) ≥ τ "
                             "(as fairseq-generate --exit-threshold with a sequence estimator)")
    parser.add_argument("--fixed-exit", type=int, default=None, help="translate every sentence at exit k")
    parser.add_argument("--beam", type=int, default=5, help="beam size (default 5)")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per engine batch (default 64)")
    parser.add_argument("--buffer-size", type=int, default=1024,
                        help="input lines read before translating them (routing groups within a buffer)")
    parser.add_argument("--max-len-a", type=float, default=0.0,
                        help="generate at most max_len_a * S + max_len_b tokens, S the batch's longest source "
                             "(fairseq-generate's rule; default 0)")
    parser.add_argument("--max-len-b", type=int, default=200, help="see --max-len-a (default 200)")
    parser.add_argument("--threads", type=int, default=2, help="CTranslate2 threads (default 2)")
    parser.add_argument("--device", default="cpu", help="CTranslate2 device: cpu (default) or cuda")
    parser.add_argument("--compute-type", default="default",
                        help="CTranslate2 compute type of the exit models (default: as exported)")
    parser.add_argument("--bpe", action="store_true", help="apply the exported BPE codes to each input line")
    parser.add_argument("--remove-bpe", action="store_true", help="join '@@ ' BPE pieces in the output")
    parser.add_argument("--print-exits", action="store_true", help="an E-<line> line with each token's exit")
    return parser.parse_args(argv)


def check_args(args):
    for flag, value in (("--beam", args.beam), ("--batch-size", args.batch_size), ("--buffer-size", args.buffer_size),
                        ("--max-len-b", args.max_len_b), ("--threads", args.threads)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if args.max_len_a < 0:
        raise ConfigError(f"--max-len-a must be at least 0, got {args.max_len_a}")


def bpe_encoder(translator: AdaptiveTranslator):
    """fairseq-interactive's ``--bpe subword_nmt`` with the exported codes."""
    from fairseq.data.encoders.subword_nmt_bpe import SubwordNMTBPE, SubwordNMTBPEConfig

    codes = translator.manifest.get("bpe_codes")
    if not codes:
        raise ConfigError(f"--bpe: {translator.model_dir} holds no BPE codes (export with --bpe-codes FILE)")
    return SubwordNMTBPE(SubwordNMTBPEConfig(bpe_codes=os.path.join(translator.model_dir, codes)))


def chunks(stream, size: int):
    buffer = []
    for line in stream:
        buffer.append(line.rstrip("\n"))
        if len(buffer) == size:
            yield buffer
            buffer = []
    if buffer:
        yield buffer


def output_line(index: int, result: Translation, remove_bpe: bool) -> str:
    text = " ".join(result.tokens)
    if remove_bpe:
        text = (text + " ").replace("@@ ", "").rstrip()
    return f"H-{index}\t{result.score:.4f}\t{text}"


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    translator = AdaptiveTranslator(args.model_dir, device=args.device, threads=args.threads,
                                    compute_type=args.compute_type)
    encode = bpe_encoder(translator).encode if args.bpe else (lambda line: line)
    n = translator.num_exits
    token_hist, sentence_hist, index = [0] * n, [0] * n, 0
    for lines in chunks(sys.stdin, args.buffer_size):
        results = translator.translate([encode(line) for line in lines], beam=args.beam,
                                       exit_threshold=args.exit_threshold, fixed_exit=args.fixed_exit,
                                       batch_size=args.batch_size, max_len_a=args.max_len_a,
                                       max_len_b=args.max_len_b)
        for result in results:
            print(output_line(index, result, args.remove_bpe))
            if args.print_exits:
                print(f"E-{index}\t" + " ".join([str(result.depth)] * (len(result.tokens) + 1)))
            token_hist[result.depth - 1] += len(result.tokens) + 1
            sentence_hist[result.depth - 1] += 1
            index += 1
        sys.stdout.flush()
    tokens = sum(token_hist)
    ae = sum((k + 1) * c for k, c in enumerate(token_hist)) / tokens if tokens else float("nan")
    print(f"Adaptive exits (N={n}): AE={ae:.4f} tokens={tokens} exits=[{','.join(map(str, token_hist))}] "
          f"sentences=[{','.join(map(str, sentence_hist))}]", flush=True)


if __name__ == "__main__":
    run_main(main)
