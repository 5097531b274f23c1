"""The Python API: everything the CLI does, callable from code."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np
import onnx
from tqdm.auto import tqdm

from .attention import find_attention
from .checkdata import CheckData, resolve_input_shapes
from .data import Preprocess, prepare_inputs
from .groups import describe_group, find_chains, find_groups
from .graph import GraphIndex
from .errors import ModelError, UsageError, VerificationError
from .files import check_targets
from .io import check_inferable, check_layer_weights, load_arrays, load_model, model_files, save_model
from .manager import Context, PassManager
from .options import DATA_FREE, SYNTHETIC, SYNTHETIC_SAMPLES, CompressOptions
from .report import describe_model, file_bytes
from .runtime import FLOAT_TYPES, dry_run, graph_inputs, make_session, parse_providers
from .shapes import skeleton
from .stats import count_macs, count_parameters
from .verify import Tolerance, verify_models

log = logging.getLogger("onnx_merge")
MAX_HOLDOUT = 256  # calibration samples held out to check the result on


class _Unpublished(Exception):
    """Raised in save_model's check: the staged result failed verification and is dropped."""


def _progress(iterable, **kw):
    return tqdm(iterable, leave=False, disable=None, **kw)


def canonicalize() -> PassManager:
    """Name nodes, turn computed weights into initializers and batch-keeping reshapes into
    Flatten: what every later step expects."""
    from .passes import (FlattenBatchReshape, FoldChannelAffine, FoldConstantWeights, GemmToMatMul, NameNodes,
                         UnshareWeights)

    return PassManager([NameNodes(), FoldConstantWeights(), UnshareWeights(), FoldChannelAffine(),
                        FlattenBatchReshape(), GemmToMatMul()])


def build_pipeline(options: CompressOptions) -> PassManager:
    from .passes import (CalibrateConsumers, FoldBatchNorm, MergeChannels, PruneCoupled, PruneHeads, RemoveUnused,
                         ReshareCopies)

    # BN is folded after merging so that the plan can use its statistics (METHOD.md 3b, 7).
    # groups that are no free chain (depthwise blocks, gates, Concat ranges) after the chains;
    # PruneCoupled leaves residual streams whole unless options.coupled is "prune"
    steps = [PruneHeads()] if options.heads else []
    steps.append(MergeChannels())
    if options.calibration is not None:
        steps.append(CalibrateConsumers())
    steps.append(PruneCoupled())
    if options.fold_bn:
        steps.append(FoldBatchNorm())
    steps += [RemoveUnused(), ReshareCopies()]
    return PassManager(steps)


def synthetic_calibration(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None,
                          samples: int = SYNTHETIC_SAMPLES) -> dict[str, np.ndarray]:
    """--calibration synthetic: ``samples`` made-up inputs per float input, as the model takes them
    after its preprocessing (zero mean, unit variance per channel): dead-leaves images where the
    input is an image batch, 1/f noise otherwise (math.synthetic). Where no BatchNormalization
    statistics model a layer's activations, the refit on these beats the data-free plan by far
    (BN-folded akamaster ResNet-56, --target-macs 0.5: 79.4 % top-1 instead of 52.4)."""
    from .math.synthetic import synthetic_inputs

    specs = graph_inputs(model)
    shapes = input_shapes or resolve_input_shapes(specs, [])[0]
    rng = np.random.default_rng(0)
    out = {}
    for spec in specs:
        if spec.type not in FLOAT_TYPES:
            raise UsageError(f"--calibration synthetic: input {spec.name!r} is {spec.type}, not an image or "
                             "feature tensor made-up data can stand for: give calibration data")
        out[spec.name] = synthetic_inputs((samples, *shapes[spec.name][1:]), rng)
    return out


def images_in(model: onnx.ModelProto) -> bool:
    """Whether every input of ``model`` is a float image batch (N, C, H, W) of fixed C, H, W: what
    a data-free budget refits on synthetic images for (resolve_calibration)."""
    from .math.synthetic import image_like

    specs = graph_inputs(model)
    return bool(specs) and all(
        spec.type in FLOAT_TYPES and len(spec.shape) == 4
        and all(isinstance(d, int) and d > 0 for d in spec.shape[1:]) and image_like((1, *spec.shape[1:]))
        for spec in specs)


def resolve_calibration(model: onnx.ModelProto, options: CompressOptions, budget: bool,
                        input_shapes: dict[str, list[int]] | None = None) -> tuple[dict | None, str]:
    """What the plan refits on, and its name for the report: the given arrays ("data"); none
    ("none": the data-free plan); or synthetic images ("synthetic"), asked for, or by default
    where a budget (``budget``) is planned for a model that takes images. A budget measures
    every layer's cost on synthetic inputs already; refitting on them too keeps what BN-folded
    layers carried, where the data-free plan, with no statistics of their activations, loses it
    (BN-folded akamaster ResNet-20 at --target-macs 0.5: 61.2 % top-1 instead of 34.6)."""
    chosen = options.calibration
    if isinstance(chosen, dict):
        return chosen, "data"
    if chosen == SYNTHETIC or (chosen is None and budget and images_in(model)):
        return synthetic_calibration(model, input_shapes), SYNTHETIC
    return None, DATA_FREE


def compress(model: onnx.ModelProto | str | os.PathLike, options: CompressOptions | None = None, *,
             inplace: bool = False, input_shapes: dict[str, list[int]] | None = None,
             **kwargs) -> tuple[onnx.ModelProto, dict]:
    """Compress ``model`` (a ModelProto or a path); returns the new model and a report.

    Options as CompressOptions fields. ``input_shapes``: dims (batch 1) for dynamic inputs,
    used for counting MACs.
    """
    options = (options or CompressOptions(**kwargs)).validate()
    if not isinstance(model, onnx.ModelProto):
        model, inplace = load_model(model).model, True
    calibration, source = resolve_calibration(model, options, options.target is not None, input_shapes)
    options = dataclasses.replace(options, calibration=calibration)
    if not inplace:
        model = copy.deepcopy(model)
    report = {"options": {k: v for k, v in vars(options).items() if k not in ("calibration", "allocated")}}
    report["options"]["calibrated"] = options.calibration is not None
    report["options"]["calibration_source"] = source
    if options.round_to is None:  # what auto resolved to on this machine, for the summary and the report
        report["alignment"] = {"conv_block": options.channel_block("Conv"), "providers": list(options.providers)}
    ctx = Context(options=options, report=report, progress=_progress)
    canonicalize().run(model, ctx)
    # counted after canonicalizing: weights computed by constant subgraphs count too, copies of shared ones do not
    report["params_before"] = count_parameters(model) - report.get("unshared_params", 0)
    report["macs_before"] = _macs(model, input_shapes)
    if options.target is not None:  # a global budget: per-layer ratios where they cost least
        from .allocation import allocate_budget

        ctx.options = options = allocate_budget(model, options, report, _progress, source)
    build_pipeline(options).run(model, ctx)
    report["params_after"], report["macs_after"] = count_parameters(model), _macs(model, input_shapes)
    return model, report


def _macs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None) -> int | None:
    if not input_shapes:
        return count_macs(model)
    shaped = skeleton(model)
    for value in shaped.graph.input:
        dims = input_shapes.get(value.name)
        if dims and len(dims) == len(value.type.tensor_type.shape.dim):
            for d, n in zip(value.type.tensor_type.shape.dim, dims):
                d.Clear()
                d.dim_value = n
    return count_macs(shaped)


def inspect_model(model: onnx.ModelProto) -> dict:
    """Chains that can be compressed, and why every other layer cannot."""
    model = copy.deepcopy(model)
    ctx = Context(options=None)
    canonicalize().run(model, ctx)
    index = GraphIndex(model)
    chains, skips = find_chains(index)
    return {
        "chains": [{"layer": c.name, "op": c.producer.node.op_type, "channels": c.channels,
                    "bn": c.bn.name if c.bn is not None else None, "path": [n.op_type for n in c.path],
                    "consumer": c.consumer.name, "block": c.block, "interleaved": c.interleaved, "mergeable": c.mergeable,
                    "why_not_merge": c.why_not_merge} for c in chains],
        "skipped": [{"node": s.node, "reason": s.reason} for s in skips],
        "groups": [d for d in (describe_group(index, g) for g in find_groups(index)) if d["consumers"]],
        **_attention_summary(index),
        "params": count_parameters(model) - ctx.report.get("unshared_params", 0),
        "macs": count_macs(model),
    }


def _attention_summary(index: GraphIndex) -> dict:
    found, declined = find_attention(index)
    return {"attention": [{"layer": a.name, "heads": len(a.heads), "head_dim": a.head_dim, "q": a.q.name, "k": a.k.name,
                           "v": a.v.name, "out": a.out.name} for a in found],
            "attention_skipped": [{"node": n, "reason": r} for n, r in declined],
            "layer_norms": sum(n.op_type == "LayerNormalization" for n in index.graph.node)}
def _split_check(options: CompressOptions, holdout: int | None) -> tuple[dict | None, str]:
    """Hold out the last samples of the calibration data to check the result on.

    ``holdout`` None: an eighth, at most MAX_HOLDOUT, when there are 16 samples or more; 0 (or
    too few samples) checks on the samples the fit used, and says so.
    """
    calib = options.calibration
    total = len(next(iter(calib.values())))
    n = min(MAX_HOLDOUT, total // 8) if holdout is None else holdout
    if n <= 0 or n >= total:
        return calib, f"--calibration ({total} samples, also used for the fit)"
    options.calibration = {k: v[:total - n] for k, v in calib.items()}
    return {k: v[total - n:] for k, v in calib.items()}, f"--calibration (last {n} of {total} samples, held out)"


def compress_file(src: str | os.PathLike, dst: str | os.PathLike, options: CompressOptions, *, verify: bool = True,
                  inputs: str | os.PathLike | dict | None = None, providers=None, tolerance: Tolerance | None = None,
                  keep_failed: bool = False, check: CheckData | None = None, preprocess: Preprocess | None = None,
                  input_key: str | None = None, check_holdout: int | None = None, also_writes=()) -> dict:
    """Validate, compress, prove, then publish; report what changed and how far the outputs moved.

    Every output path (``dst`` and ``also_writes``, e.g. the report) is checked and the original
    loaded in onnxruntime before any work. The result is verified from the staged file before it
    appears at ``dst``, on ``inputs`` (a .npz path or arrays), else on a held-out part of the
    calibration data, else on random ``check`` data. ``tolerance`` None: figures only (warnings
    below verify.WARN_BELOW). A result that fails (its gates, or NaN, missing outputs) is not
    written, and VerificationError (with the report) is raised; with ``keep_failed`` it is
    written and returned, report["verification"]["ok"] False (the CLI exits 1 either way).
    ``preprocess``/``input_key`` turn stored arrays (inputs, calibration) into model inputs.
    """
    started = time.perf_counter()
    options = dataclasses.replace(options)  # the caller's options (and calibration arrays) stay as given
    src, dst = Path(src), Path(dst)
    check_targets([dst, *also_writes], model_files(src))
    providers = parse_providers(providers)
    options.providers = tuple(providers)  # round_to auto aligns channel counts for the kernels it will run on
    if tolerance is not None:
        tolerance.validate()
    loaded = load_model(src)
    check_inferable(loaded.model, src)  # what the output must pass, the input must already
    check_layer_weights(loaded)
    if not options.skip_fold:  # a constant bomb is refused before onnxruntime computes it
        from .passes.fold_constants import check_constant_sizes

        check_constant_sizes(loaded.model, options)
    dry_run(make_session(src, providers[0], once=True))  # the original must run (or we say why) before any work
    specs = graph_inputs(loaded.model)  # data is checked before the work, not after it
    source = str(inputs) if isinstance(inputs, (str, os.PathLike)) else "--inputs"
    arrays = load_arrays(inputs) if isinstance(inputs, (str, os.PathLike)) else inputs
    if arrays is not None:
        arrays = prepare_inputs(arrays, specs, preprocess, input_key, source)
    if isinstance(options.calibration, dict):
        options.calibration = prepare_inputs(options.calibration, specs, preprocess, input_key, "--calibration")
        if arrays is None and verify:
            arrays, source = _split_check(options, check_holdout)
    check = check or CheckData()
    input_shapes, _ = resolve_input_shapes(specs, check.input_shapes)  # noise calibration takes these (compress)
    before = describe_model(loaded.model, src, "input", file_bytes=file_bytes(src))
    model, report = compress(loaded.model, options, inplace=True, input_shapes=input_shapes)
    report["input"], report["output"] = str(src), str(dst)
    report["input_shapes"] = input_shapes

    def prove(staged: Path) -> None:
        try:
            if not verify:
                make_session(staged, providers[0], once=True)  # unverified, but a model onnxruntime loads
                return
            result = verify_models(src, staged, inputs=arrays, providers=providers, tolerance=tolerance,
                                   check=check, input_source=source)
        except ModelError as exc:  # named after the output, not the staging folder it was checked in
            raise ModelError(str(exc).replace(str(staged), f"{dst} (not written)")) from None
        report["verification"] = result.as_dict()
        if not result.ok and not keep_failed:
            raise _Unpublished

    try:
        save_model(model, dst, external=loaded.external, source=src, protect=also_writes, check=prove)
        report["written"] = True
    except _Unpublished:
        report["written"] = False
    after = describe_model(model, dst, "output", file_bytes=file_bytes(dst) if report["written"] else None)
    before.update(params=report["params_before"], macs=report["macs_before"])
    after.update(params=report["params_after"], macs=report["macs_after"])
    report["models"] = [before, after]
    report["elapsed_s"] = time.perf_counter() - started
    if not report["written"]:
        first = report["verification"]["failures"][0]
        raise VerificationError(f"{dst}: not written, verification failed: {first}", report)
    return report
