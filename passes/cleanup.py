"""Drop what nothing reads any more: initializers left behind by folding, nodes left behind
by a rewrite."""

from __future__ import annotations

import onnx

from onnx_merge.graph import GraphIndex, remove_at, subgraph_inputs


def remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Drop nodes none of whose outputs is read. One sweep from the last node back: nodes are in
    topological order, so a whole dead chain goes at once."""
    needed = {o.name for o in model.graph.output}
    dead = []
    for i in reversed(range(len(model.graph.node))):
        node = model.graph.node[i]
        if any(o in needed for o in node.output if o):
            needed.update(n for n in node.input if n)
            needed |= subgraph_inputs(node)
        else:
            dead.append(i)
    remove_at(model.graph.node, dead)
    return len(dead)


class RemoveUnused:
    name = "remove-unused"

    def run(self, model: onnx.ModelProto, ctx) -> bool:
        index = GraphIndex(model)
        unused = {t.name for t in model.graph.initializer if not index.readers.get(t.name)}
        if not unused:
            return False
        remove_at(model.graph.initializer, [i for i, t in enumerate(model.graph.initializer) if t.name in unused])
        remove_at(model.graph.input, [i for i, v in enumerate(model.graph.input) if v.name in unused])
        return True
