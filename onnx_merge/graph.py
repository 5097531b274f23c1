"""A read-mostly index over an ONNX graph: who produces and who reads each tensor, and
initializers as NumPy arrays. Passes use it to match; rewrites go through ``set_array``."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from .math.batchnorm import BatchNorm

GRAPH_OUTPUT = "<graph output>"


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Every tensor name read inside the subgraphs of ``node`` (If/Loop/Scan bodies)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            for inner in g.node:
                names.update(i for i in inner.input if i)
                names |= subgraph_inputs(inner)
    return names


def remove_at(items, positions) -> None:
    """Delete entries of a repeated proto field by position, in place: no copies of what stays
    (initializers can be hundreds of MB)."""
    for i in sorted(set(positions), reverse=True):
        del items[i]


def attr(node: onnx.NodeProto, name: str, default=None):
    """An attribute's value (a string attribute as str, not bytes), or ``default``."""
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


class GraphIndex:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.readers: dict[str, list] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for name in dict.fromkeys([i for i in node.input if i] + sorted(subgraph_inputs(node))):
                self.readers[name].append(node)
        for out in self.graph.output:
            self.readers[out.name].append(GRAPH_OUTPUT)
        self.graph_inputs = {i.name: i for i in self.graph.input}
        self._arrays: dict[str, np.ndarray] = {}

    def is_weight(self, name: str) -> bool:
        return name in self.initializers

    def shape(self, name: str) -> tuple[int, ...]:
        """A weight's dims, from its declaration: reading its values would copy them."""
        if name in self._arrays:
            return self._arrays[name].shape
        return tuple(self.initializers[name].dims)

    def size(self, name: str) -> int:
        return int(np.prod(self.shape(name), dtype=np.int64))

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.initializers[name])
        return self._arrays[name]

    def batchnorm(self, node: onnx.NodeProto) -> BatchNorm:
        """A BatchNormalization node's parameters (initializers) in float64."""
        return BatchNorm(*(self.array(n).astype(np.float64) for n in node.input[1:5]),
                         eps=float(attr(node, "epsilon", 1e-5)))

    def set_array(self, name: str, value: np.ndarray) -> None:
        """Replace an initializer's contents (dtype kept), and every declaration of its shape."""
        old = self.initializers[name]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(old.data_type)
        # Kept C-contiguous: a later reader reshapes it (a strided copy each time otherwise),
        # and tobytes() below is then a plain memory copy.
        value = np.ascontiguousarray(value, dtype=dtype)
        self._arrays.pop(name, None)  # the old values go before the new bytes are made: a wide layer's peak
        if old.data_type in (onnx.TensorProto.STRING,):
            old.CopyFrom(numpy_helper.from_array(value, name))
        else:  # write the bytes once instead of building a tensor and copying it
            for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                old.ClearField(f)
            del old.dims[:]
            old.dims.extend(value.shape)
            old.raw_data = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
        self._arrays[name] = value
        # Exporters may declare an initializer's shape as a graph input (old IR) or in
        # value_info (the torch dynamo exporter does): both must follow the new shape.
        declared = [self.graph_inputs[name]] if name in self.graph_inputs else []
        declared += [v for v in self.graph.value_info if v.name == name]
        for info in declared:
            shape = info.type.tensor_type.shape
            shape.ClearField("dim")
            for d in value.shape:
                shape.dim.add().dim_value = d

    def add_initializer(self, name: str, value: np.ndarray) -> None:
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = self.graph.initializer[-1]
        self._arrays[name] = value

    def attach_bias(self, node: onnx.NodeProto, value: np.ndarray) -> str:
        """Give a Conv or Gemm that has no bias (input 2) the initializer ``value``; its name."""
        name = self.unique_name(node.input[1] + "_bias")
        self.add_initializer(name, value)
        if len(node.input) == 2:
            node.input.append(name)
        else:
            node.input[2] = name
        self.readers[name].append(node)
        return name

    def unique_name(self, base: str) -> str:
        taken = set(self.initializers) | set(self.producer) | set(self.graph_inputs)
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        return name

    def sole_reader(self, name: str):
        readers = self.readers.get(name, [])
        return readers[0] if len(readers) == 1 else None

    def shared_with(self, name: str, node: onnx.NodeProto) -> list[str]:
        """Names of the other readers of ``name`` besides ``node``."""
        return [r if isinstance(r, str) else (r.name or r.op_type) for r in self.readers.get(name, []) if r is not node]
