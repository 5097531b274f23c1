"""Command line: parses arguments, calls the API, prints a summary. No logic of its own."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import signal
import sys
import threading
import time
import traceback

from tabulate import tabulate

from . import api, report, terminal
from .checkdata import CHECK_SAMPLES, CheckData, parse_input_shape
from .config import load_config, options_of
from .data import Preprocess, parse_floats, prepare_inputs
from .errors import Interrupted, OnnxMergeError, UsageError, VerificationError
from .files import check_targets, remove_live_staging, write_bytes_atomic
from .io import load_arrays, load_calibration, load_model, model_files, write_text_atomic
from .math import BN_RULES, CRITERIA, SCALE_RULES
from .options import AUTO, METHODS, SENSITIVITIES, CompressOptions
from .runtime import graph_inputs, parse_providers, set_runtime_logging
from .verify import WARN_BELOW, Tolerance, verify_models

log = logging.getLogger("onnx_merge")

EPILOG = """\
examples:
  onnx-merge inspect model.onnx
  onnx-merge compress model.onnx -o small.onnx --ratio 0.5
  onnx-merge compress model.onnx -o small.onnx --target-macs 0.5
  onnx-merge sensitivity model.onnx --plot costs.png
  onnx-merge compress model.onnx -o small.onnx --layer-ratio 'layer3.*=0.7' --exclude 'conv1'
  onnx-merge compress model.onnx -o small.onnx --ratio 0.3 --min-cosine 0.99 --input-shape x=1x3x224x224
  onnx-merge compress model.onnx -o small.onnx --config earlier_report.json
  onnx-merge verify model.onnx small.onnx --inputs samples.npz --atol 1e-3

exit codes: 0 ok, 1 verification failed, 2 usage error, 3 unreadable or invalid model or data
"""
MAX_MESSAGE = 500  # characters of an error line (a model's text in an exception can be megabytes)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2
        self.print_usage(sys.stderr)
        print(f"onnx-merge: error: {message}", file=sys.stderr)
        sys.exit(2)



SENSITIVITY_HELP = ("how a budget rates a layer: output, the change in the model's outputs when that layer alone is "
                    "planned, measured on the first 64 --calibration samples (synthetic images by default); consumer, the "
                    "plan's predicted error relative to the consumer's output (no model run; misjudges layers that "
                    "add into a residual stream); combined, the geometric mean of the two; auto (default): output, "
                    "but combined with --calibration none where every layer has BatchNormalization statistics (the "
                    "plan's model of real activations)")

def _glob_ratio(text: str) -> tuple[str, float]:
    glob, sep, value = text.rpartition("=")
    try:
        if not sep or not glob:
            raise ValueError
        return glob, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GLOB=RATIO, got {text!r}") from None


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _add_data_args(p: argparse.ArgumentParser, input_key_default=None) -> None:
    """One vocabulary for turning stored arrays into model inputs (data.Preprocess)."""
    g = p.add_argument_group("data preprocessing (for --inputs, --calibration, --data)")
    g.add_argument("--input-key", default=input_key_default, metavar="KEY",
                   help="the array holding a one-input model's inputs (default: arrays named after the inputs, "
                   "or the only array)" if input_key_default is None else f"array holding the inputs "
                   f"(default {input_key_default})")
    g.add_argument("--scale", type=_finite, metavar="S",
                   help="divide inputs by S first (e.g. 255 for uint8 pixels; uint8 data without it is "
                   "fed as it is, with a warning)")
    g.add_argument("--mean", metavar="M[,M..]", help="per-channel mean to subtract after scaling, comma-separated")
    g.add_argument("--std", metavar="S[,S..]", help="per-channel std to divide by after the mean, comma-separated")
    g.add_argument("--layout", choices=("nchw", "nhwc"), default="nchw",
                   help="layout of the stored images (models take NCHW; default nchw)")


def _add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check-n", type=int, default=CHECK_SAMPLES, metavar="N",
                   help=f"without --inputs (or --calibration): check on N random samples (default {CHECK_SAMPLES}); "
                   "integer inputs that index an embedding are drawn over its rows")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224",
                   help="dims of an input with dynamic dims, batch first (repeatable): random check data is "
                   "made at this size and MACs are counted at it; a dynamic dim not given is "
                   "checked at 32, with a warning")


def _add_gate_args(p: argparse.ArgumentParser, verify: bool) -> None:
    g = p.add_argument_group("gates" if not verify else "tolerances")
    g.add_argument("--atol", type=_finite, metavar="A",
                   help="absolute tolerance per value" + (" (default 1e-4 unless only --min-cosine or "
                   "--max-top1-disagreement is given)" if verify else ""))
    g.add_argument("--rtol", type=_finite, metavar="R",
                   help="relative tolerance per value" + (" (default 1e-3, as --atol)" if verify else
                   " (with --atol: default 1e-3)"))
    g.add_argument("--min-cosine", type=_finite, metavar="C",
                   help="fail unless every output's cosine similarity to the original's is at least C (in [-1, 1])")
    g.add_argument("--max-top1-disagreement", type=_finite, metavar="P",
                   help="fail when more than this fraction (in [0, 1]) of top-1 predictions differ")


def _round_to(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _name_list(allowed):
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}, comma-separated; got {text!r}")
        return list(dict.fromkeys(names))
    return parse


def _add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", metavar="FILE.npz",
                   help="inputs to compare on, keyed by graph input name (default: --check-n random samples)")
    p.add_argument("--providers", default="cpu", metavar="cpu,cuda",
                   help="execution providers to check on (default: cpu); cuda needs onnxruntime-gpu")
    p.add_argument("--report", metavar="REPORT.json", help="write the report as JSON (schema: "
                   "onnx_merge/report.schema.json)")
    _add_check_args(p)


def _version_line() -> str:
    tool = report.versions()
    return f"onnx-merge {tool['version']} (onnx {tool['onnx']}, onnxruntime {tool['onnxruntime'] or 'not installed'})"


def _logging_flags(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--debug", action="store_true", default=default, help="log every decision and show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log matches and skipped candidates")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnx-merge", description="Shrink ONNX models by pruning channels and merging what they "
                     "carried into the next layer (neuron merging, Kim et al. 2020).", epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _logging_flags(parser, default=False)
    parser.add_argument("--version", action="version", version=_version_line())
    # the same flags after the command; SUPPRESS: a command not naming them keeps what came before
    common = argparse.ArgumentParser(add_help=False)
    _logging_flags(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", parents=[common], help="prune and merge channels, save, verify",
                       description="Find Conv/Gemm -> (BN) -> ReLU -> Conv/Gemm chains, remove channels of the first "
                       "layer and fold what they carried into the second. Verifies the result against the original "
                       "in onnxruntime, then saves it atomically. Without gates, a result whose "
                       f"top-1 agreement or cosine falls below {WARN_BELOW} ends with a WARNING (exit 0); with "
                       "gates, one that fails them exits 1 and is not written.")
    c.add_argument("model", metavar="IN.onnx")
    c.add_argument("--config", metavar="FILE.json|FILE.toml",
                   help="options from a file: a flat table of long flag names (ratio = 0.5, keep-bn = true) or "
                   "a report, whose 'options' section repeats its run; flags given here win")
    c.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="where to write (never the input)")
    amount = c.add_mutually_exclusive_group()
    amount.add_argument("--ratio", type=float, default=0.5,
                        help="fraction of channels to remove per layer (default 0.5)")
    amount.add_argument("--target-macs", type=float, metavar="F",
                        help="keep this fraction of the MACs (as the summary counts them), each layer's ratio "
                        "allocated where removing channels costs least (onnx-merge sensitivity shows the costs): "
                        "chains and coupled groups (depthwise blocks, SE gates, fan-outs; residual streams with "
                        "--coupled prune); --layer-ratio and --exclude still pin the layers they match")
    amount.add_argument("--target-params", type=float, metavar="F",
                        help="keep this fraction of the parameters, allocated like --target-macs")
    c.add_argument("--sensitivity", choices=SENSITIVITIES, default="auto", help=SENSITIVITY_HELP)
    c.add_argument("--heads", type=float, default=0.0, metavar="R",
                   help="fraction of attention heads to remove per attention layer (default 0: none); a head is "
                   "its Q, K, V columns and its output-projection rows, the least important by ||W_V W_O|| go. "
                   "--ratio still means channels and neurons; see 'inspect' for the heads found")
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
    c.add_argument("--bench", action="store_true",
                   help="after writing, time the original and the result (taking turns, onnxruntime's optimizations "
                   "on, p50/p90) and warn when the result is not faster, or its latency ratio is more than 15 %% "
                   "above its MAC ratio")
    c.add_argument("--bench-batch", default="1", metavar="B[,B...]",
                   help="with --bench: batch sizes (default 1)")
    c.add_argument("--bench-threads", default="", metavar="T[,T...]",
                   help="with --bench: intra-op thread counts (default onnxruntime's choice)")
    c.add_argument("--bench-runs", type=int, default=50, metavar="N", help="with --bench: timed runs (default 50)")
    c.add_argument("--round-to", type=_round_to, default=None, metavar="K|auto",
                   help="keep channel counts multiples of K (1: exactly the ratio's). Default auto: round "
                   "conv layers up toward the channel block of the kernels the result runs on (16 on CPUs "
                   "with AVX-512, 8 with AVX2 or on CUDA) where that adds at most an eighth of the layer's "
                   "channels; counts off the block fall off onnxruntime's fast kernels")
    c.add_argument("--max-group-error", type=float, default=0.1, metavar="E",
                   help="prune a coupled group (depthwise block, SE gate) only as far as its predicted relative "
                   "output error stays under E (default 0.1; the report and the layer table show what was asked "
                   "where less was removed); 1 applies the asked ratio as it is")
    c.add_argument("--calibration", metavar="FILE.npz|synthetic|none",
                   help="unlabelled inputs keyed by graph input name (or --input-key), preprocessed by "
                   "--scale/--mean/--std/--layout: each consumer is refitted by least squares to reproduce "
                   "the original layer's output. synthetic: 256 made-up inputs, no data needed: dead-leaves "
                   "images (discs of power-law sizes and correlated colours, as photographs have) where the "
                   "model takes images, 1/f noise otherwise, unit variance per channel as a model trained on "
                   "normalised inputs takes them. none: the data-free plan. Default: synthetic with "
                   "--target-macs / --target-params on a model that takes images (whose layer costs are "
                   "measured on them anyway), none otherwise. Synthetic images help most where no "
                   "BatchNormalization statistics model the activations (a BN-folded export)")
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
    c.add_argument("--skip-fold", action="store_true",
                   help="leave constant subgraphs unfolded (weights computed by nodes are then not compressed)")
    c.add_argument("--fold-max-elements", type=int, default=2**28, metavar="N",
                   help="largest constant that folding may compute, in elements (default 2^28); a model "
                   "computing a bigger one is refused, naming the node")
    c.add_argument("--fold-max-mb", type=float, default=1024.0, metavar="MB",
                   help="largest constant that folding may compute, in MiB (default 1024)")
    c.add_argument("--no-verify", action="store_true", help="skip running both models in onnxruntime")
    c.add_argument("--keep-failed", action="store_true",
                   help="write the result even when it fails a gate (the exit code is still 1)")
    c.add_argument("--check-holdout", type=int, metavar="N",
                   help="with --calibration and no --inputs: check on the last N calibration samples, held out "
                   "of the fit (default: an eighth, at most 256; 0: check on the samples the fit used)")
    _add_verify_args(c)
    _add_gate_args(c, verify=False)
    _add_data_args(c)
    c.set_defaults(command_parser=c)

    v = sub.add_parser("verify", parents=[common], help="compare a candidate model's outputs with the original's",
                       description="Run both models in onnxruntime (graph optimizations off) on the same inputs. "
                       "Exit 0 when every output is within tolerance, 1 when not (a NaN or Inf where the original "
                       "is finite always fails).")
    v.add_argument("original", metavar="ORIGINAL.onnx")
    v.add_argument("candidate", metavar="CANDIDATE.onnx")
    _add_gate_args(v, verify=True)
    _add_verify_args(v)
    _add_data_args(v)
    v.set_defaults(command_parser=v)

    e = sub.add_parser("eval", parents=[common], help="top-1 (and top-5) accuracy on a labelled array file",
                       description="Accuracy of MODEL on labelled data: an .npz file (arrays --input-key and "
                       "--label-key) or IDX files as idx:DIR (MNIST/FashionMNIST test split).")
    e.add_argument("model", metavar="MODEL.onnx")
    e.add_argument("--data", required=True, metavar="FILE.npz|idx:DIR")
    e.add_argument("--label-key", default="y", help="array holding the labels (default y)")
    e.add_argument("--limit", type=int, help="evaluate only the first N samples")
    e.add_argument("--batch", type=int, default=256)
    e.add_argument("--providers", default="cpu", metavar="cpu|cuda", help="execution provider (first one is used)")
    e.add_argument("--report", metavar="R.json", help="write the accuracy as a JSON report")
    _add_data_args(e, input_key_default="x")
    e.set_defaults(command_parser=e)

    b = sub.add_parser("bench", parents=[common], help="onnxruntime latency of one or more models, side by side",
                       description="Latency of each model in onnxruntime, the models taking turns (--block runs "
                       "each) so that drift hits all alike: p50/p90/p99, throughput, session creation time, peak memory of a "
                       "session (a fresh process per model), parameters, MACs of the batch, and p50 and MAC "
                       "ratios to the first model, for every batch x threads configuration. Each p50 ratio comes "
                       "with a 95 % interval (a bootstrap over the turns; from five turns, --runs >= 5 x --block): "
                       "how far this run's noise leaves it uncertain.",
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
    b.add_argument("--runs", type=int, default=50, metavar="N",
                   help="timed runs of each model per configuration (default 50)")
    b.add_argument("--warmup", type=int, default=5, metavar="N",
                   help="untimed runs of each model before the timed ones (default 5)")
    b.add_argument("--block", type=int, default=10, metavar="N",
                   help="timed runs of one model in a row, after one untimed run that refills the caches it left "
                   "(default 10: a model served on its own); 1 alternates run by run (a model served beside others, "
                   "its weights evicted between runs)")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (one process per model)")
    b.add_argument("--profile", action="store_true",
                   help="also profile --runs runs of each model apart and print its kernel time per onnxruntime op "
                   "type beside the first model's: which ops did not shrink with the MACs")
    b.add_argument("--plot", metavar="P.png", help="write box plots of the latency distributions")
    b.add_argument("--report", metavar="R.json", help="write the figures as a JSON report")
    b.set_defaults(command_parser=b)

    sens = sub.add_parser("sensitivity", parents=[common], help="each layer's cost curve: what removing channels "
                       "costs, where a --target-macs / --target-params budget goes",
                       description="For every chain, what removing 0 .. N-1 of its channels costs: by default the "
                       "change in the model's outputs with that chain alone planned as compress plans it (a coupled "
                       "group, such as a depthwise block or an SE gate: its channels masked where its consumers read "
                       "them), relative "
                       "to how much the outputs vary between samples, measured on the first 64 --calibration "
                       "samples (by default 256 synthetic dead-leaves images where the model takes images, 1/f noise "
                       "otherwise; see compress --calibration); with --sensitivity consumer, "
                       "the error the plan predicts in the consumer's output relative to that output (with "
                       "--calibration scaled by the consumer's share of the residual stream it is added to). "
                       "A budget removes channels where this cost per MAC (or parameter) saved is least.")
    sens.add_argument("model", metavar="MODEL.onnx")
    sens.add_argument("--calibration", metavar="FILE.npz|synthetic|none",
                      help="inputs as for compress --calibration (default: synthetic where the model takes images)")
    sens.add_argument("--method", choices=METHODS, default="regress", help="the plan whose error is predicted")
    sens.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="leave matching layers out")
    sens.add_argument("--sensitivity", choices=SENSITIVITIES, default="auto", help=SENSITIVITY_HELP)
    sens.add_argument("--report", metavar="R.json", help="write every curve as JSON")
    sens.add_argument("--plot", metavar="S.png", help="draw the curves (matplotlib)")
    sens.set_defaults(command_parser=sens)

    s = sub.add_parser("sweep", parents=[common], help="compress, verify, score (and time) a grid of configurations",
                       description="Every MODEL x METHOD x RATIO (or budget) is one job: compress, compare with the original\n"
                       "on the eval data, score on it (and time it with --bench). Each model's original is scored\n"
                       "too, for the accuracy drop. Results go to DIR as sweep.json, sweep.csv, sweep.md and\n"
                       "sweep.png (accuracy against MACs, and latency, with the Pareto frontier marked).\n"
                       "Finished jobs are cached in DIR/jobs by a hash of their configuration and of the files\n"
                       "they read: a rerun only runs what is missing or failed. A failing job is reported in its\n"
                       "row; the others go on.",
                       epilog="example:\n  onnx-merge sweep resnet56.onnx --ratios 0.2,0.3,0.4,0.5 --methods merge,regress \\\n"
                       "      --data cifar10_test.npz --input-key x_exact --scale 255 --layout nhwc \\\n"
                       "      --mean 0.4914,0.4822,0.4465 --std 0.2023,0.1994,0.2010 --out sweep/ \\\n"
                       "      --pick 'accuracy_drop<=1.0' --minimize macs",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("models", nargs="+", metavar="MODEL.onnx")
    amounts = s.add_mutually_exclusive_group(required=True)
    amounts.add_argument("--ratios", type=_float_list, metavar="R,R,...",
                         help="fractions of channels to remove per layer, comma-separated")
    amounts.add_argument("--target-macs", type=_float_list, metavar="F,F,...",
                         help="fractions of the MACs to keep, comma-separated, each allocated as compress "
                         "--target-macs does")
    amounts.add_argument("--target-params", type=_float_list, metavar="F,F,...",
                         help="fractions of the parameters to keep, comma-separated (see compress --target-params)")
    s.add_argument("--methods", default="regress", type=_name_list(METHODS), metavar="M,M,...",
                   help=f"compression methods, comma-separated, of {', '.join(METHODS)} (default regress)")
    s.add_argument("--calibration", metavar="CAL.npz|synthetic|none",
                   help="calibration inputs for every compress job (see compress --calibration)")
    s.add_argument("--data", required=True, metavar="FILE.npz|idx:DIR", help="labelled data to score on (see eval)")
    s.add_argument("--label-key", default="y", help="array holding the labels (default y)")
    s.add_argument("--limit", type=int, help="score only the first N samples")
    s.add_argument("--bench", action="store_true",
                   help="also time each model against its original (p50 latency, the two taking turns); figures "
                   "taken while other jobs run share the machine with them: --workers 1 for clean ones")
    s.add_argument("--bench-runs", type=int, default=50, metavar="N", help="timed runs per model (default 50)")
    s.add_argument("--bench-batch", type=int, default=1, metavar="B", help="batch of the timed runs (default 1)")
    s.add_argument("--out", required=True, metavar="DIR", help="folder for the results and the cache")
    s.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local (default): a process pool on this machine; ray: Ray tasks, on a local cluster "
                   "started for the sweep or the one at --ray-address (pip install 'onnx-merge[ray]'; every node "
                   "needs onnx-merge and the files at the same paths)")
    s.add_argument("--workers", type=int, metavar="N",
                   help="jobs at once (default: one per CPU core; with --ray-address: as the cluster allows)")
    s.add_argument("--threads", type=int, metavar="T",
                   help="threads (cores) per job (default 1: --workers N jobs at once use N cores; with --workers 1, "
                   "--threads 2 gives the one job two)")
    s.add_argument("--ray-address", metavar="ADDRESS", help="with --engine ray: an existing cluster (e.g. auto)")
    s.add_argument("--pick", metavar="RULE", help="choose a configuration meeting RULE, e.g. 'accuracy_drop<=1.0' "
                   "(points of top-1), and write it to DIR/picked.onnx; any figure of the rows (accuracy, "
                   "accuracy_drop, macs_kept, params_kept, cosine, latency_ratio, ...), several comma-separated; "
                   "exit 1 when none meets it")
    s.add_argument("--minimize", choices=("macs", "params", "latency"), default="macs",
                   help="with --pick: the figure to make least (default macs; latency needs --bench)")
    _add_data_args(s, input_key_default="x")
    s.set_defaults(command_parser=s)

    i = sub.add_parser("inspect", parents=[common], help="show the chains found, channels per layer, what is skipped and why")
    i.add_argument("model", metavar="MODEL.onnx")
    i.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    i.set_defaults(command_parser=i)
    return parser


_STDOUT = None  # the real stdout while a command runs; sys.stdout is then a _LogLines


def _echo(text: str = "") -> None:
    """Our own output (libraries' prints go to the log)."""
    print(text, file=_STDOUT or sys.stdout)


class _LogLines(io.TextIOBase):
    """Lines that libraries print to stdout, sent to the log instead (-v shows them)."""

    def __init__(self):
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                logging.getLogger("onnx_merge.thirdparty").info("%s", line.rstrip())
        return len(text)


def _write_report(path, data: dict, protect=()) -> None:
    write_text_atomic(path, report.to_json(data), protect=protect)


def _preprocess(args) -> Preprocess:
    return Preprocess(args.scale, parse_floats(args.mean), parse_floats(args.std), args.layout).validate()


def _check(args) -> CheckData:
    return CheckData(samples=args.check_n, input_shapes=[parse_input_shape(t) for t in args.input_shape])


def _tolerance(args) -> Tolerance:
    return Tolerance(atol=args.atol, rtol=args.rtol, min_cosine=args.min_cosine,
                     max_top1_disagreement=args.max_top1_disagreement).validate()


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + f"... ({len(text):,} characters)"


def cmd_compress(args) -> int:
    started = time.perf_counter()
    check_targets([args.output, args.report], model_files(args.model))  # before any data is read (parses the model)
    tolerance = _tolerance(args)
    gated = any(v is not None for v in (args.atol, args.rtol, args.min_cosine, args.max_top1_disagreement))
    if gated and args.no_verify:
        raise UsageError("gates (--atol, --rtol, --min-cosine, --max-top1-disagreement) need verification; "
                         "drop --no-verify")
    options = CompressOptions(ratio=args.ratio, heads=args.heads, target_macs=args.target_macs,
                              target_params=args.target_params, sensitivity=args.sensitivity, method=args.method, criterion=args.criterion,
                              threshold=args.threshold, lam=args.lam, scale_rule=args.scale_rule,
                              bn_rule=args.bn_rule, layer_ratios=args.layer_ratio, exclude=args.exclude,
                              round_to=args.round_to, max_group_error=args.max_group_error, fold_bn=not args.keep_bn, bias_from_bn=args.bias_from_bn,
                              independent_layers=args.independent_layers,
                              coupled=args.coupled, refine_iterations=args.refine_iterations,
                              calibration_mixup=args.calibration_mixup, skip_fold=args.skip_fold,
                              fold_max_elements=args.fold_max_elements, fold_max_mb=args.fold_max_mb,
                              calibration=load_calibration(args.calibration)).validate()
    bench = (_int_list(args.bench_batch, "--bench-batch"),
             _int_list(args.bench_threads, "--bench-threads", allow_empty=True) or (None,))
    if args.bench_runs < 1:
        raise UsageError("--bench-runs must be at least 1")
    if args.check_holdout is not None and args.check_holdout < 0:
        raise UsageError(f"--check-holdout must be 0 or more, got {args.check_holdout}")
    try:
        result = api.compress_file(args.model, args.output, options, verify=not args.no_verify, inputs=args.inputs,
                                   providers=args.providers, tolerance=tolerance if gated else None,
                                   keep_failed=args.keep_failed, check=_check(args), preprocess=_preprocess(args),
                                   input_key=args.input_key, check_holdout=args.check_holdout,
                                   also_writes=[args.report] if args.report else [])
    except VerificationError as exc:  # not written; the summary and the report still say why
        if exc.report is None:
            raise
        result = exc.report
    result["elapsed_s"] = time.perf_counter() - started  # the parse above included
    if args.bench and result["written"]:
        result["latency"] = _bench_result(args, *bench)
    data = report.compress_report(result, options_of(args.command_parser, args))
    _echo(terminal.compress_text(data, verbose=args.verbose))
    ver = data["verification"]
    _echo(f"\nwrote {args.output}" if result["written"] else f"\nnothing written to {args.output}")
    if args.report:
        _write_report(args.report, data, model_files(args.model) + model_files(args.output))
    if ver is not None and not ver["ok"]:
        kept = "kept at -o (--keep-failed)" if result["written"] else "nothing written (--keep-failed keeps it)"
        more = f" (and {len(ver['failures']) - 1} more)" if len(ver["failures"]) > 1 else ""
        print(_bounded(f"onnx-merge: verification failed: {ver['failures'][0]}{more}; {kept}"), file=sys.stderr)
        return 1
    if ver is not None and ver["warnings"]:
        print(f"onnx-merge: WARNING: {'; '.join(ver['warnings'])} on {terminal.data_phrase(ver['data'])}; "
              "set --min-cosine or --max-top1-disagreement to fail such a result", file=sys.stderr)
    if args.calibration is None and any("without statistics" in (layer.get("note") or "")
                                        for layer in result.get("layers", [])):
        print("onnx-merge: note: some layers have no BatchNormalization statistics to model their activations, so "
              "they were merged data-free; --calibration synthetic refits them on made-up images instead (BN-folded "
              "akamaster ResNet-56, --ratio 0.5: 75.8 % instead of 41.6 % top-1), and calibration data does best",
              file=sys.stderr)
    for warning in result.get("latency", {}).get("warnings", []):
        print(f"onnx-merge: WARNING: {warning} (counts off the kernels' channel blocks are slow: see --round-to; "
              "small layers at batch 1 cost their fixed overhead whatever their MACs; "
              f"`onnx-merge bench {args.model} {args.output} --profile` shows the time per op type)", file=sys.stderr)
    return 0


def _bench_result(args, batches: tuple, threads: tuple) -> dict:
    """--bench: the original against the result as written, p50/p90 per configuration, and warnings."""
    from .bench import bench_models, latency_warnings

    providers = parse_providers(args.providers)
    rows = bench_models([args.model, args.output], provider=providers[0], batches=batches, threads=threads,
                        runs=args.bench_runs, memory=False)
    kept = ("model", "provider", "batch", "threads", "p50_ms", "p90_ms", "p50_ratio", "p50_ratio_interval", "macs_ratio")
    return {"rows": [{k: r[k] for k in kept} for r in rows], "warnings": latency_warnings(rows)}


def cmd_sensitivity(args) -> int:
    from .allocation import plot_curves, sensitivity

    started = time.perf_counter()
    protect = model_files(args.model)
    check_targets([args.report, args.plot], protect)
    options = CompressOptions(method=args.method, exclude=args.exclude, sensitivity=args.sensitivity,
                              calibration=load_calibration(args.calibration)).validate()
    loaded = load_model(args.model)
    result = sensitivity(loaded.model, options, progress=api._progress)
    fractions = (0.25, 0.5, 0.75)
    rows = [[g["layer"], g["channels"], f"{g['macs_per_channel']:,.0f}", f"{g['params_per_channel']:,.0f}",
             "-" if g["stream_share"] is None else f"{g['stream_share']:.3f}"]
            + [f"{g['curve'][int(f * g['channels'])]:.4f}" for f in fractions] for g in result["groups"]]
    _echo(tabulate(rows, headers=["layer", "channels", "MACs/channel", "params/channel", "stream share"]
                   + [f"error at {int(100 * f)} %" for f in fractions]))
    measured = next((g["measured_on"] for g in result["groups"] if g["measured_on"]), None)
    if measured and measured.endswith("predicted"):
        _echo("error: the geometric mean of the change in the model's outputs with that layer alone planned, "
              "measured on made-up inputs (no data given), and the consumer's output error the plan predicts from the "
              "BatchNormalization statistics (--sensitivity combined)")
    elif measured:
        _echo("error: the change in the model's outputs with that layer alone planned, relative to how much they "
              "vary between samples, measured on " + {"data": "the calibration samples",
                                                     "synthetic": "synthetic images (no data given)"}.get(
                  result["calibration_source"], "made-up inputs (no data given)"))
    else:
        _echo("error: the consumer's output error the plan predicts, relative to that output's energy"
              + (" (times its share of the residual stream, on the calibration data)" if result["calibrated"] else ""))
    if args.report:
        _write_report(args.report, report.new_report(
            "sensitivity", options=options_of(args.command_parser, args),
            models=[report.describe_model(loaded.model, loaded.path, file_bytes=report.file_bytes(loaded.path))],
            summary={k: result[k] for k in ("macs", "params", "calibrated")}, details={"groups": result["groups"]},
            elapsed_s=time.perf_counter() - started), protect)
    if args.plot:
        write_bytes_atomic(args.plot, plot_curves(result), protect=protect)
        _echo(f"wrote {args.plot}")
    return 0


def cmd_verify(args) -> int:
    protect = model_files(args.original) + model_files(args.candidate)
    check_targets([args.report], protect)
    providers = parse_providers(args.providers)
    tol = _tolerance(args)
    models = [load_model(path) for path in (args.original, args.candidate)]  # a clear exit 3 before onnxruntime
    feeds = None
    if args.inputs:
        feeds = prepare_inputs(load_arrays(args.inputs), graph_inputs(models[0].model), _preprocess(args),
                               args.input_key, str(args.inputs))
    started = time.perf_counter()
    result = verify_models(args.original, args.candidate, inputs=feeds, providers=providers, tolerance=tol,
                           check=_check(args), input_source=str(args.inputs))
    ver = result.as_dict()
    _echo(terminal.verification_table(ver))
    _echo(f"verification {terminal.verdict(ver)}")
    if args.report:
        _write_report(args.report, report.new_report(
            "verify", options=options_of(args.command_parser, args),
            models=[report.describe_model(m.model, m.path, role, file_bytes=report.file_bytes(m.path))
                    for m, role in zip(models, ("original", "candidate"))],
            summary={"ok": result.ok, "checked_on": ver["data"]}, verification=ver,
            elapsed_s=time.perf_counter() - started), protect)
    return 0 if result.ok else 1


def cmd_inspect(args) -> int:
    loaded = load_model(args.model)
    info = api.inspect_model(loaded.model)
    if args.json:
        model = report.describe_model(loaded.model, loaded.path, "model", file_bytes=report.file_bytes(loaded.path),
                                      params=info["params"], macs=info["macs"])
        _echo(report.to_json(report.new_report(
            "inspect", options=options_of(args.command_parser, args), models=[model],
            summary={"chains": len(info["chains"]), "skipped": len(info["skipped"]), "groups": len(info["groups"]),
                     "params": info["params"], "macs": info["macs"]},
            details={k: info[k] for k in ("chains", "skipped", "groups", "attention", "attention_skipped")})))
        return 0
    _echo(terminal.header(report.describe_model(loaded.model, loaded.path)))
    _echo()
    rows = [[c["layer"], c["op"], c["channels"], c["bn"] or "-", " > ".join(c["path"]) or "-", c["consumer"],
             c["block"], "yes" if c["mergeable"] else f"no: {c['why_not_merge']}"] for c in info["chains"]]
    _echo(tabulate(rows, headers=["layer", "op", "channels", "bn", "path", "consumer", "block", "mergeable"],
                   maxcolwidths=[terminal.WRAP, None, None, None, terminal.WRAP, terminal.WRAP, None, terminal.WRAP]))
    skipped = terminal.skipped(info["skipped"], args.verbose)
    if skipped:
        _echo()
        _echo(skipped)
    if info["groups"]:
        _echo("\nchannel groups (a residual one is pruned only with --coupled prune):")
        rows = [[g["kind"], " + ".join(g["producers"]), ", ".join(g["consumers"]) or "-", ", ".join(g["depthwise"]) or "-",
                 g["channels"], g["params_per_channel"],
                 g["left_whole"] or ("prunable" if g["free"] else "with --coupled prune")] for g in info["groups"]]
        _echo(tabulate(rows, headers=["kind", "producers", "consumers", "depthwise", "channels", "params/channel",
                                      "status"], maxcolwidths=[10, 40, 40, 20, None, None, 50]))
    if info["attention"]:
        _echo("\nattention layers (heads removed with --heads R):")
        rows = [[a["layer"], a["heads"], a["head_dim"], " / ".join(dict.fromkeys((a["q"], a["k"], a["v"]))), a["out"]]
                for a in info["attention"]]
        _echo(tabulate(rows, headers=["attention", "heads", "head dim", "Q / K / V", "output projection"]))
    for s in info["attention_skipped"]:
        _echo(f"heads left whole in {s['node']}: {s['reason']}")
    if info["layer_norms"]:
        _echo(f"{info['layer_norms']} LayerNormalization nodes mix the channels of the residual stream: "
              "it and their channels stay whole")
    macs = f"{info['macs']:,}" if info["macs"] else "unknown"
    _echo(f"\n{len(info['chains'])} chains; parameters {info['params']:,}; MACs (batch 1) {macs}")
    return 0


def cmd_eval(args) -> int:
    from .data import load_data
    from .evaluate import evaluate

    check_targets([args.report], model_files(args.model))
    provider = parse_providers(args.providers)[0]
    if args.batch < 1 or (args.limit is not None and args.limit < 1):
        raise UsageError("--batch and --limit must be at least 1")
    loaded = load_model(args.model)
    data = load_data(args.data)
    for key in (args.input_key, args.label_key):
        if key not in data:
            raise UsageError(f"{args.data}: no array {key!r} (found {', '.join(data)})")
    x, y = data[args.input_key], data[args.label_key]
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    started = time.perf_counter()
    result = evaluate(args.model, x, y[:len(x)], _preprocess(args), batch=args.batch, provider=provider,
                      source=f"{args.data} [{args.input_key}]")
    line = f"{args.model}: top-1 {100 * result['top1']:.2f} %"
    if "top5" in result:
        line += f", top-5 {100 * result['top5']:.2f} %"
    _echo(f"{line} on {result['samples']} samples of {args.data} [{args.input_key}]")
    if args.report:
        _write_report(args.report, report.new_report(
            "eval", options=options_of(args.command_parser, args),
            models=[report.describe_model(loaded.model, loaded.path, file_bytes=report.file_bytes(loaded.path))],
            summary={**result, "data": str(args.data)}, elapsed_s=time.perf_counter() - started),
            model_files(args.model))
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
    from .bench import bench_models, op_table, plot_latencies

    batches = _int_list(args.batch, "--batch")
    threads = _int_list(args.threads, "--threads", allow_empty=True) or (None,)
    if args.runs < 1 or args.warmup < 0 or args.block < 1:
        raise UsageError("--runs and --block must be at least 1 and --warmup at least 0")
    protect = [p for m in args.models for p in model_files(m)]
    check_targets([args.report, args.plot], protect)
    for path in args.models:
        load_model(path)
    results = []
    for provider in parse_providers(args.providers):
        results += bench_models(args.models, provider=provider, batches=batches, threads=threads, level=args.level,
                                runs=args.runs, warmup=args.warmup, block=args.block, memory=not args.no_memory,
                                profile=args.profile)

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    rows = [[r["model"], r["provider"], r["batch"], r["threads"] or "default", f"{r['p50_ms']:.3f}",
             f"{r['p90_ms']:.3f}", f"{r['throughput_per_s']:.1f}", f"{r['session_create_s']:.2f}",
             fmt(r["peak_memory_mib"], ".0f"), f"{r['params']:,}", fmt(r["macs"], ","), terminal.ratio_text(r, 3, "", ""),
             fmt(r["macs_ratio"], ".3f")] for r in results]
    _echo(tabulate(rows, headers=["model", "provider", "batch", "threads", "p50 ms", "p90 ms", "items/s", "create s",
                                  "peak MiB", "params", "MACs (batch)", "p50 vs first (95 %)", "MACs vs first"]))
    if args.profile:
        for i in range(0, len(results), len(args.models)):
            config = results[i:i + len(args.models)]
            c = config[0]
            headers, table = op_table(config)
            _echo(f"\nkernel time per op type ({c['provider']}, batch {c['batch']}, threads {c['threads'] or 'default'}; "
                  f"profiled, so a little slower than the runs above)")
            _echo(tabulate(table, headers=headers))
    if args.plot:
        write_bytes_atomic(args.plot, plot_latencies(results), protect=protect)
        _echo(f"wrote {args.plot}")
    if args.report:
        _write_report(args.report, report.new_report(
            "bench", options=options_of(args.command_parser, args),
            models=[{"role": "model", "path": r["model"], "params": r["params"]} for r in results[:len(args.models)]],
            summary={"configurations": len(results) // len(args.models),
                     "p50_ratio": {r["model"]: r["p50_ratio"] for r in results[:len(args.models)]}},
            details={"results": results}), protect)
    return 0


def cmd_sweep(args) -> int:
    from .sweep import BenchSpec, EvalSpec, run_sweep
    from .sweep_output import summary_table

    if args.bench and (args.bench_runs < 1 or args.bench_batch < 1):
        raise UsageError("--bench-runs and --bench-batch must be at least 1")
    if args.minimize == "latency" and not args.bench:
        raise UsageError("--minimize latency needs --bench")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    evaluation = EvalSpec(args.data, args.input_key, args.label_key, args.limit, args.scale, parse_floats(args.mean),
                          parse_floats(args.std), args.layout)
    amount, values = next((k, v) for k, v in (("ratio", args.ratios), ("target_macs", args.target_macs),
                                              ("target_params", args.target_params)) if v is not None)
    result = run_sweep(args.models, args.methods, [{amount: v} for v in values], evaluation, args.out,
                       calibration=args.calibration, bench=BenchSpec(args.bench_batch, args.bench_runs) if args.bench
                       else None, engine=args.engine, workers=args.workers, threads=args.threads,
                       ray_address=args.ray_address, pick_rule=(args.pick, args.minimize) if args.pick else None,
                       options=options_of(args.command_parser, args))
    headers, table = summary_table(result.rows)
    _echo(tabulate(table, headers=headers))
    failed = sum(r["status"] != "ok" for r in result.rows)
    _echo(f"{len(result.rows)} jobs, {result.ran} run, {len(result.rows) - result.ran} from the cache, "
          f"{failed} failed; {result.seconds:.1f} s")
    _echo("wrote " + ", ".join(str(p) for p in result.files.values()))
    if result.pick:
        _echo(f"picked {result.pick['why']}" + (f"; wrote {result.pick['output']}" if result.pick.get("output")
                                                 else ""))
        return 0 if result.pick["row"] is not None else 1
    return 0


COMMANDS = {"bench": cmd_bench, "compress": cmd_compress, "verify": cmd_verify, "inspect": cmd_inspect, "eval": cmd_eval,
            "sweep": cmd_sweep, "sensitivity": cmd_sensitivity}


_SIGNALLED: list[int] = []  # the signals _raise_interrupted has raised, in case an extension swallows one


def _raise_interrupted(signum, frame):
    _SIGNALLED.append(signum)
    raise Interrupted(signum)


def _interrupt_within(exc: BaseException) -> KeyboardInterrupt | None:
    """The interrupt an exception was raised over: a Ctrl-C inside an extension module's lazy
    import comes back as ImportError("initialization failed"), the interrupt swallowed."""
    return Interrupted(_SIGNALLED[-1]) if _SIGNALLED else None


def _run(parser: argparse.ArgumentParser, args, argv) -> int:
    global _STDOUT
    _STDOUT = sys.stdout
    try:
        if getattr(args, "config", None):
            args.command_parser.set_defaults(**load_config(args.config, args.command_parser))
            args = parser.parse_args(argv)
        with contextlib.redirect_stdout(_LogLines()):  # only our own lines reach stdout (libraries': the log)
            return COMMANDS[args.command](args)
    except OnnxMergeError as exc:
        if args.debug:
            traceback.print_exc()
        print(_bounded(f"onnx-merge: error: {exc}"), file=sys.stderr)
        return exc.exit_code
    except MemoryError:
        print("onnx-merge: error: out of memory (the model or data is too large for this machine)", file=sys.stderr)
        return 3
    except Exception as exc:  # a bug or a model we did not foresee: still one line unless --debug
        interrupt = _interrupt_within(exc)
        if interrupt is not None:
            raise interrupt from None
        if args.debug:
            traceback.print_exc()
        print(_bounded(f"onnx-merge: internal error: {type(exc).__name__}: {exc}") + " (rerun with --debug)",
              file=sys.stderr)
        return 3
    finally:
        _STDOUT = None


def main(argv: list[str] | None = None) -> int:
    """Exit codes as EPILOG says; SIGINT exits 130 and SIGTERM 143 at any time, no traceback, and
    the temporary files of a save in progress are removed (they unwind as an exception)."""
    main_thread = threading.current_thread() is threading.main_thread()  # signals are set there only
    _SIGNALLED.clear()
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    logging.captureWarnings(True)
    try:
        if main_thread:  # launch.py holds them while the modules load
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        parser = build_parser()
        args = parser.parse_args(argv)
        level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
        logging.basicConfig(level=level, format="%(levelname)s %(message)s", stream=sys.stderr)
        # third-party warnings (onnx, numpy, Python's) are log lines, shown with -v only
        logging.getLogger("py.warnings").setLevel(logging.WARNING if args.verbose or args.debug else logging.CRITICAL)
        set_runtime_logging("debug" if args.debug else "verbose" if args.verbose else "quiet")
        return _run(parser, args, argv)
    except KeyboardInterrupt as exc:
        remove_live_staging()
        print("onnx-merge: interrupted", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    finally:
        logging.captureWarnings(False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
