"""Small hostile or unusual models for the safety tests, built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(7)


def _w(*shape):
    return (RNG.standard_normal(shape) / np.sqrt(max(1, np.prod(shape[1:])))).astype(np.float32)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def folding_bomb(rows: int = 5000, cols: int = 100000) -> onnx.ModelProto:
    """A Gemm whose bias is ReduceMean(ConstantOfShape([rows, cols])): a few KB of file, gigabytes
    of constant once computed."""
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"], name="bomb",
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
        helper.make_node("ReduceMean", ["big"], ["bias"], name="mean", axes=[0], keepdims=0),
        helper.make_node("Slice", ["bias", "start", "stop"], ["b1"], name="slice"),
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1),
    ]
    inits = [_init("shape", np.array([rows, cols], np.int64)), _init("start", np.array([0], np.int64)),
             _init("stop", np.array([8], np.int64)), _init("w1", _w(8, 4)), _init("w2", _w(3, 8))]
    graph = helper.make_graph(nodes, "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _branch(name: str, scale: float) -> onnx.GraphProto:
    """A branch body like silero-vad's: Constant weights, Conv and MatMul, reading the outer ``r``."""
    nodes = [
        helper.make_node("Constant", [], [f"{name}_w"], value=numpy_helper.from_array(_w(4, 4, 1, 1), f"{name}_wv")),
        helper.make_node("Conv", ["r", f"{name}_w"], [f"{name}_c"], kernel_shape=[1, 1]),
        helper.make_node("Constant", [], [f"{name}_s"], value=numpy_helper.from_array(np.float32(scale), "s")),
        helper.make_node("Mul", [f"{name}_c", f"{name}_s"], [f"{name}_m"]),
        helper.make_node("Flatten", [f"{name}_m"], [f"{name}_f"]),
        helper.make_node("Constant", [], [f"{name}_k"], value=numpy_helper.from_array(_w(64, 5), f"{name}_kv")),
        helper.make_node("MatMul", [f"{name}_f", f"{name}_k"], [f"{name}_out"]),
    ]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT,
                                                                              [1, 5])])


def if_model() -> onnx.ModelProto:
    """Conv -> Relu in the main graph, then an If on a condition computed from the data, with
    Conv/MatMul and Constant nodes in both branches, and a computed weight outside them. The
    bodies read ``r`` from the outer scope; the If's own input does not depend on it (a sort
    that sees only explicit inputs moves the If before ``r``'s producer)."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], name="mean", keepdims=0),
        helper.make_node("Greater", ["m", "zero"], ["cond"], name="gt"),
        helper.make_node("Constant", [], ["w1c"], name="w1const", value=numpy_helper.from_array(_w(4, 3, 3, 3), "w1v")),
        helper.make_node("Identity", ["w1c"], ["w1"], name="w1id"),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu1"),
        helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=_branch("then", 2.0),
                         else_branch=_branch("else", -1.0)),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", kernel_shape=[1, 1]),
    ]
    inits = [_init("b1", _w(4)), _init("zero", np.float32(0.0)), _init("w2", _w(2, 4, 1, 1))]
    graph = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 5]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def unknown_domain_op(base: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(base)
    model.graph.node[-1].domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model
