"""The Python API: everything the CLI does, callable from code."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import onnx
from tqdm.auto import tqdm

from .groups import describe_group, find_chains, find_groups
from .graph import GraphIndex
from .io import load_arrays, load_model, save_model
from .manager import Context, PassManager
from .options import CompressOptions
from .runtime import graph_inputs, match_inputs, parse_providers
from .stats import count_macs, count_parameters
from .verify import Tolerance, verify_models

log = logging.getLogger("onnx_merge")


def _progress(iterable, **kw):
    return tqdm(iterable, leave=False, disable=None, **kw)


def canonicalize() -> PassManager:
    """Name nodes, turn computed weights into initializers and batch-keeping reshapes into
    Flatten: what every later step expects."""
    from .passes import FlattenBatchReshape, FoldChannelAffine, FoldConstantWeights, NameNodes

    return PassManager([NameNodes(), FoldConstantWeights(), FoldChannelAffine(), FlattenBatchReshape()])


def build_pipeline(options: CompressOptions) -> PassManager:
    from .passes import CalibrateConsumers, FoldBatchNorm, MergeChannels, PruneCoupled, RemoveUnused

    # BN is folded after merging so that the plan can use its statistics (METHOD.md 3b, 7).
    # groups that are no free chain (depthwise blocks, gates, Concat ranges) after the chains;
    # PruneCoupled leaves residual streams whole unless options.coupled is "prune"
    steps = [MergeChannels()]
    if options.calibration is not None:
        steps.append(CalibrateConsumers())
    steps.append(PruneCoupled())
    if options.fold_bn:
        steps.append(FoldBatchNorm())
    steps.append(RemoveUnused())
    return PassManager(steps)


def compress(model: onnx.ModelProto, options: CompressOptions | None = None, *, inplace: bool = False,
             **kwargs) -> tuple[onnx.ModelProto, dict]:
    """Compress ``model``; returns the new model and a report. Options as CompressOptions fields."""
    options = (options or CompressOptions(**kwargs)).validate()
    if not inplace:
        model = copy.deepcopy(model)
    report = {"options": {k: v for k, v in vars(options).items() if k != "calibration"}}
    report["options"]["calibrated"] = options.calibration is not None
    ctx = Context(options=options, report=report, progress=_progress)
    canonicalize().run(model, ctx)
    # counted after canonicalizing: weights computed by constant subgraphs count too
    report["params_before"], report["macs_before"] = count_parameters(model), count_macs(model)
    build_pipeline(options).run(model, ctx)
    report["params_after"], report["macs_after"] = count_parameters(model), count_macs(model)
    return model, report


def inspect_model(model: onnx.ModelProto) -> dict:
    """Chains that can be compressed, and why every other layer cannot."""
    model = copy.deepcopy(model)
    canonicalize().run(model, Context(options=None))
    index = GraphIndex(model)
    chains, skips = find_chains(index)
    return {
        "chains": [{"layer": c.name, "op": c.producer.node.op_type, "channels": c.channels,
                    "bn": c.bn.name if c.bn is not None else None, "path": [n.op_type for n in c.path],
                    "consumer": c.consumer.name, "block": c.block, "interleaved": c.interleaved, "mergeable": c.mergeable,
                    "why_not_merge": c.why_not_merge} for c in chains],
        "skipped": [{"node": s.node, "reason": s.reason} for s in skips],
        "groups": [d for d in (describe_group(index, g) for g in find_groups(index)) if d["consumers"]],
        "params": count_parameters(model),
        "macs": count_macs(model),
    }


def compress_file(src: str | os.PathLike, dst: str | os.PathLike, options: CompressOptions, *, verify: bool = True,
                  inputs: str | os.PathLike | None = None, providers=None, tolerance: Tolerance | None = None) -> dict:
    """Load, compress, save atomically, and report how far the outputs moved (``tolerance``
    None: figures only; the CLI's ``verify`` is the gate)."""
    src, dst = Path(src), Path(dst)
    providers = parse_providers(providers)
    arrays = load_arrays(inputs) if inputs else None
    loaded = load_model(src)
    specs = graph_inputs(loaded.model)  # data is checked before the work, not after it
    if arrays is not None:
        match_inputs(specs, arrays, str(inputs))
    if options.calibration is not None:
        match_inputs(specs, options.calibration, "--calibration")
    model, report = compress(loaded.model, options, inplace=True)
    save_model(model, dst, external=loaded.external, source=src)
    report["input"], report["output"] = str(src), str(dst)
    if verify:
        result = verify_models(src, dst, inputs=arrays, providers=providers, tolerance=tolerance,
                               input_source=str(inputs))
        report["verification"] = result.as_dict()
    return report
