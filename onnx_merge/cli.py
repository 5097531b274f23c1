"""Command line: parses arguments, calls the API, prints a summary. No logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback

from tabulate import tabulate

from . import api
from .errors import OnnxMergeError, UsageError
from .io import load_arrays, load_model, write_text_atomic
from .math import BN_RULES, CRITERIA, SCALE_RULES
from .options import AUTO, METHODS, CompressOptions
from .runtime import parse_providers
from .verify import Tolerance, verify_models

log = logging.getLogger("onnx_merge")

EPILOG = """\
examples:
  onnx-merge inspect model.onnx
  onnx-merge compress model.onnx -o small.onnx --ratio 0.5
  onnx-merge compress model.onnx -o small.onnx --layer-ratio 'layer3.*=0.7' --exclude 'conv1'
  onnx-merge verify model.onnx small.onnx --inputs samples.npz --atol 1e-3

exit codes: 0 ok, 1 verification failed, 2 usage error, 3 unreadable or invalid model or data
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2
        self.print_usage(sys.stderr)
        print(f"onnx-merge: error: {message}", file=sys.stderr)
        sys.exit(2)


def _glob_ratio(text: str) -> tuple[str, float]:
    glob, sep, value = text.rpartition("=")
    try:
        if not sep or not glob:
            raise ValueError
        return glob, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GLOB=RATIO, got {text!r}") from None


def _add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", metavar="FILE.npz",
                   help="inputs to compare on, keyed by graph input name (default: random inputs)")
    p.add_argument("--providers", default="cpu", metavar="cpu,cuda",
                   help="execution providers to check on (default: cpu); cuda needs onnxruntime-gpu")
    p.add_argument("--report", metavar="REPORT.json", help="write the full report as JSON")


def _logging_flags(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--debug", action="store_true", default=default, help="log every decision and show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log matches and skipped candidates")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnx-merge", description="Shrink ONNX models by pruning channels and merging what they "
                     "carried into the next layer (neuron merging, Kim et al. 2020).", epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _logging_flags(parser, default=False)
    # the same flags after the command; SUPPRESS: a command not naming them keeps what came before
    common = argparse.ArgumentParser(add_help=False)
    _logging_flags(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", parents=[common], help="prune and merge channels, save, verify",
                       description="Find Conv/Gemm -> (BN) -> ReLU -> Conv/Gemm chains, remove channels of the first "
                       "layer and fold what they carried into the second. Saves atomically, then verifies the result "
                       "against the original in onnxruntime.")
    c.add_argument("model", metavar="IN.onnx")
    c.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="where to write (never the input)")
    c.add_argument("--ratio", type=float, default=0.5, help="fraction of channels to remove per layer (default 0.5)")
    c.add_argument("--method", choices=METHODS, default="regress",
                   help="regress (default): express removed channels by all kept ones, fitted on activations "
                   "modelled from BatchNormalization statistics, or for a Gemm/MatMul layer without them from a "
                   "white-input model (cosine merge for a Conv without them); "
                   "merge: the paper's neuron merging, one partner per removed channel; prune: drop them")
    c.add_argument("--criterion", choices=CRITERIA + (AUTO,), default=AUTO,
                   help="which channels to keep. merge-cost: the set whose merge leaves the least residual "
                   "(keeps one of each group of near-copies). auto (default): l2-path for a Conv with no "
                   "BatchNormalization before its activation (BN folded at export, as a rule), merge-cost for "
                   "a Gemm/MatMul layer that merges, l1-norm elsewhere")
    c.add_argument("--threshold", type=float, default=0.1, metavar="T",
                   help="minimum cosine similarity for a merge; below it the channel is only pruned (default 0.1)")
    c.add_argument("--lambda", dest="lam", type=float, default=0.85, metavar="L",
                   help="with --bn-rule lambda: weight of direction vs bias residual in partner choice (default 0.85)")
    c.add_argument("--scale-rule", choices=SCALE_RULES + (AUTO,), default=AUTO,
                   help="merge scale: projection (least squares), exact (norm ratio, METHOD.md), kernel (Gaussian "
                   "input model), paper (the authors' released BN formula); auto (default): exact where --criterion "
                   "auto picks l2-path, projection elsewhere")
    c.add_argument("--bn-rule", choices=BN_RULES, default="fold",
                   help="with BatchNormalization in the graph: plan on the folded weights (fold, default) "
                   "or use the paper's lambda score (lambda)")
    c.add_argument("--bias-from-bn", action="store_true",
                   help="with BatchNormalization in the graph: add the expected ReLU output that removed channels "
                   "carried (beyond their merge partner) to the consumer's bias (METHOD.md 7)")
    c.add_argument("--independent-layers", action="store_true",
                   help="plan every layer's merge from the original weights, as the paper does (reproduces its "
                   "figures exactly); by default a layer's partners and scales are computed on its weights as "
                   "already compensated by the layer before it")
    c.add_argument("--coupled", choices=("skip", "prune"), default="skip",
                   help="residual streams (channels several layers add into): leave them whole (skip, default; as "
                   "in the paper) or prune them consistently in every member (prune). Groups without one (depthwise "
                   "blocks, SE gates, Concat/Split ranges) are pruned in either mode")
    c.add_argument("--keep-bn", action="store_true", help="keep BatchNormalization nodes (default: fold them)")
    c.add_argument("--layer-ratio", type=_glob_ratio, action="append", default=[], metavar="GLOB=R",
                   help="ratio for layers whose node, weight or output name matches GLOB (repeatable)")
    c.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="leave matching layers alone")
    c.add_argument("--round-to", type=int, default=1, metavar="K", help="keep channel counts multiples of K")
    c.add_argument("--calibration", metavar="FILE.npz",
                   help="unlabelled inputs keyed by graph input name, preprocessed as the model expects: "
                   "each consumer is refitted by least squares to reproduce the original layer's output")
    c.add_argument("--calibration-mixup", type=int, default=3, metavar="K",
                   help="with --calibration: add K mixed samples per calibration sample, each a random convex "
                   "combination of two of them, with the original model's outputs as targets. They go to "
                   "consumers whose samples give under 10 rows per weight column (fully connected layers), "
                   "whose fits and refinement would otherwise overfit a few hundred samples (default 3; 0: "
                   "the samples alone). Only floating-point inputs are mixed")
    c.add_argument("--refine-iterations", type=int, default=100, metavar="N",
                   help="with --calibration: after the least-squares refit, a fully connected chain "
                   "(Gemm/MatMul -> ReLU -> Gemm/MatMul) is refined as a block, both layers together, by N "
                   "L-BFGS iterations kept near the fitted weights; it is used only where it lowers the "
                   "error on a held-out quarter of the calibration rows (default 100; 0: off)")
    c.add_argument("--no-verify", action="store_true", help="skip running both models in onnxruntime")
    _add_verify_args(c)

    v = sub.add_parser("verify", parents=[common], help="compare a candidate model's outputs with the original's",
                       description="Run both models in onnxruntime (graph optimizations off) on the same inputs. "
                       "Exit 0 when every output is within tolerance, 1 when not.")
    v.add_argument("original", metavar="ORIGINAL.onnx")
    v.add_argument("candidate", metavar="CANDIDATE.onnx")
    v.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default 1e-4)")
    v.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance (default 1e-3)")
    v.add_argument("--min-cosine", type=float, metavar="C",
                   help="for models meant to move: pass when every output's cosine similarity is at least C")
    v.add_argument("--max-top1-disagreement", type=float, metavar="P",
                   help="for models meant to move: pass when at most this fraction of top-1 predictions differ")
    _add_verify_args(v)

    e = sub.add_parser("eval", parents=[common], help="top-1 (and top-5) accuracy on a labelled array file",
                       description="Accuracy of MODEL on labelled data: an .npz file (arrays --input-key and "
                       "--label-key) or IDX files as idx:DIR (MNIST/FashionMNIST test split).")
    e.add_argument("model", metavar="MODEL.onnx")
    e.add_argument("--data", required=True, metavar="FILE.npz|idx:DIR")
    e.add_argument("--input-key", default="x", help="array holding the inputs (default x)")
    e.add_argument("--label-key", default="y", help="array holding the labels (default y)")
    e.add_argument("--limit", type=int, help="evaluate only the first N samples")
    e.add_argument("--scale", type=float, default=1.0, help="divide inputs by this first (e.g. 255)")
    e.add_argument("--mean", help="per-channel mean to subtract after scaling, comma-separated")
    e.add_argument("--std", help="per-channel std to divide by after the mean, comma-separated")
    e.add_argument("--layout", choices=("nchw", "nhwc"), default="nchw", help="layout of the data (models take NCHW)")
    e.add_argument("--batch", type=int, default=256)
    e.add_argument("--providers", default="cpu", metavar="cpu|cuda", help="execution provider (first one is used)")

    b = sub.add_parser("bench", parents=[common], help="onnxruntime latency of one or more models, side by side",
                       description="Latency of each model in onnxruntime, models interleaved run by run so that "
                       "drift hits all alike: p50/p90/p99, throughput, session creation time, peak memory of a "
                       "session (a fresh process per model), parameters, MACs of the batch, and p50 and MAC "
                       "ratios to the first model, for every batch x threads configuration.",
                       epilog="example: onnx-merge bench original.onnx small.onnx --batch 1,8 --threads 1,2 "
                       "--plot latency.png")
    b.add_argument("models", nargs="+", metavar="MODEL.onnx")
    b.add_argument("--providers", default="cpu", metavar="cpu,cuda", help="execution providers (default cpu)")
    b.add_argument("--batch", default="1", metavar="B[,B...]", help="batch sizes, e.g. 1,8 (default 1; fixed "
                   "batch dimensions stay as exported)")
    b.add_argument("--threads", default="", metavar="T[,T...]", help="intra-op thread counts, e.g. 1,2 "
                   "(default: onnxruntime's choice)")
    b.add_argument("--level", choices=("disable", "basic", "extended", "all"), default="all",
                   help="onnxruntime graph optimization level (default all, as deployed)")
    b.add_argument("--runs", type=int, default=50)
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (one process per model)")
    b.add_argument("--plot", metavar="P.png", help="write box plots of the latency distributions")
    b.add_argument("--report", metavar="R.json", help="write the figures as JSON")

    i = sub.add_parser("inspect", parents=[common], help="show the chains found, channels per layer, what is skipped and why")
    i.add_argument("model", metavar="MODEL.onnx")
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def _print_verification(ver: dict) -> None:
    rows = [[prov, name, f"{f.get('max_abs', float('nan')):.3g}", f"{f.get('max_rel', float('nan')):.3g}",
             f"{f.get('cosine', float('nan')):.6f}", f"{f['top1_agreement']:.4f}" if "top1_agreement" in f else "-"]
            for prov, outs in ver["providers"].items() for name, f in outs.items()]
    print(tabulate(rows, headers=["provider", "output", "max abs", "max rel", "cosine", "top-1 agree"]))
    for failure in ver["failures"]:
        print(f"FAIL {failure}")


def cmd_compress(args) -> int:
    options = CompressOptions(ratio=args.ratio, method=args.method, criterion=args.criterion,
                              threshold=args.threshold, lam=args.lam, scale_rule=args.scale_rule,
                              bn_rule=args.bn_rule, layer_ratios=args.layer_ratio, exclude=args.exclude,
                              round_to=args.round_to, fold_bn=not args.keep_bn, bias_from_bn=args.bias_from_bn,
                              independent_layers=args.independent_layers,
                              coupled=args.coupled, refine_iterations=args.refine_iterations,
                              calibration_mixup=args.calibration_mixup,
                              calibration=load_arrays(args.calibration) if args.calibration else None).validate()
    report = api.compress_file(args.model, args.output, options, verify=not args.no_verify, inputs=args.inputs,
                               providers=args.providers)
    rows = [[r["layer"], r["op"], r["consumer"], f"{r['channels']} -> {r['kept']}", r["merged"], r["pruned"],
             r["method"]] for r in report.get("layers", [])]
    print(tabulate(rows, headers=["layer", "op", "consumer", "channels", "merged", "pruned", "method"]))
    for s in report.get("skipped", []):
        print(f"skipped {s['node']}: {s['reason']}")
    pb, pa = report["params_before"], report["params_after"]
    print(f"parameters: {pb:,} -> {pa:,} ({100 * (pa - pb) / max(pb, 1):+.1f} %)")
    if report["macs_before"] and report["macs_after"]:
        mb, ma = report["macs_before"], report["macs_after"]
        print(f"MACs (batch 1): {mb:,} -> {ma:,} ({100 * (ma - mb) / max(mb, 1):+.1f} %)")
    print(f"wrote {args.output}")
    if "verification" in report:
        _print_verification(report["verification"])
    if args.report:
        write_text_atomic(args.report, json.dumps(report, indent=2, default=str))
    return 0


def cmd_verify(args) -> int:
    providers = parse_providers(args.providers)
    for path in (args.original, args.candidate):
        load_model(path)  # a clear exit 3 for a bad file before onnxruntime sees it
    tol = Tolerance(atol=args.atol, rtol=args.rtol, min_cosine=args.min_cosine,
                    max_top1_disagreement=args.max_top1_disagreement)
    arrays = load_arrays(args.inputs) if args.inputs else None
    result = verify_models(args.original, args.candidate, inputs=arrays, providers=providers, tolerance=tol,
                           input_source=str(args.inputs))
    _print_verification(result.as_dict())
    if args.report:
        write_text_atomic(args.report, json.dumps(result.as_dict(), indent=2))
    print("verification passed" if result.ok else "verification FAILED")
    return 0 if result.ok else 1


def cmd_inspect(args) -> int:
    info = api.inspect_model(load_model(args.model).model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [[c["layer"], c["op"], c["channels"], c["bn"] or "-", " > ".join(c["path"]) or "-", c["consumer"],
             c["block"], "yes" if c["mergeable"] else f"no: {c['why_not_merge']}"] for c in info["chains"]]
    print(tabulate(rows, headers=["layer", "op", "channels", "bn", "path", "consumer", "block", "mergeable"]))
    for s in info["skipped"]:
        print(f"skipped {s['node']}: {s['reason']}")
    if info["groups"]:
        print("\nchannel groups (a residual one is pruned only with --coupled prune):")
        rows = [[g["kind"], " + ".join(g["producers"]), ", ".join(g["consumers"]) or "-", ", ".join(g["depthwise"]) or "-",
                 g["channels"], g["params_per_channel"],
                 g["left_whole"] or ("prunable" if g["free"] else "with --coupled prune")] for g in info["groups"]]
        print(tabulate(rows, headers=["kind", "producers", "consumers", "depthwise", "channels", "params/channel",
                                      "status"], maxcolwidths=[10, 40, 40, 20, None, None, 50]))
    macs = f"{info['macs']:,}" if info["macs"] else "unknown"
    print(f"{len(info['chains'])} chains; parameters {info['params']:,}; MACs (batch 1) {macs}")
    return 0


def cmd_eval(args) -> int:
    from .data import Preprocess, load_data, parse_floats
    from .evaluate import evaluate

    provider = parse_providers(args.providers)[0]
    load_model(args.model)
    data = load_data(args.data)
    for key in (args.input_key, args.label_key):
        if key not in data:
            raise UsageError(f"{args.data}: no array {key!r} (found {', '.join(data)})")
    x, y = data[args.input_key], data[args.label_key]
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    pre = Preprocess(args.scale, parse_floats(args.mean), parse_floats(args.std), args.layout)
    result = evaluate(args.model, x, y[:len(x)], pre, batch=args.batch, provider=provider)
    line = f"{args.model}: top-1 {100 * result['top1']:.2f} %"
    if "top5" in result:
        line += f", top-5 {100 * result['top5']:.2f} %"
    print(f"{line} on {result['samples']} samples of {args.data} [{args.input_key}]")
    return 0


def _int_list(text: str, flag: str, allow_empty: bool = False) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated whole numbers, got {text!r}") from None
    if not values and not allow_empty or any(v < 1 for v in values):
        raise UsageError(f"{flag} values must be at least 1, got {text!r}")
    return values


def cmd_bench(args) -> int:
    from .bench import bench_models, plot_latencies

    batches = _int_list(args.batch, "--batch")
    threads = _int_list(args.threads, "--threads", allow_empty=True) or (None,)
    if args.runs < 1 or args.warmup < 0:
        raise UsageError("--runs must be at least 1 and --warmup at least 0")
    for path in args.models:
        load_model(path)
    results = []
    for provider in parse_providers(args.providers):
        results += bench_models(args.models, provider=provider, batches=batches, threads=threads, level=args.level,
                                runs=args.runs, warmup=args.warmup, memory=not args.no_memory)

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    rows = [[r["model"], r["provider"], r["batch"], r["threads"] or "default", f"{r['p50_ms']:.3f}",
             f"{r['p90_ms']:.3f}", f"{r['throughput_per_s']:.1f}", f"{r['session_create_s']:.2f}",
             fmt(r["peak_memory_mib"], ".0f"), f"{r['params']:,}", fmt(r["macs"], ","), f"{r['p50_ratio']:.3f}",
             fmt(r["macs_ratio"], ".3f")] for r in results]
    print(tabulate(rows, headers=["model", "provider", "batch", "threads", "p50 ms", "p90 ms", "items/s", "create s",
                                  "peak MiB", "params", "MACs (batch)", "p50 vs first", "MACs vs first"]))
    if args.plot:
        plot_latencies(results, args.plot)
        print(f"wrote {args.plot}")
    if args.report:
        write_text_atomic(args.report, json.dumps(results, indent=2))
    return 0


COMMANDS = {"bench": cmd_bench, "compress": cmd_compress, "verify": cmd_verify, "inspect": cmd_inspect, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except OnnxMergeError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"onnx-merge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnx-merge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or a model we did not foresee: still one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"onnx-merge: internal error: {type(exc).__name__}: {exc} (rerun with --debug)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
