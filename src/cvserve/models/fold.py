"""Fold normalization into an ONNX graph: the model takes uint8 pixels and does
``(x * rescale - mean) / std`` itself, so 4x less data travels into the runtime and, on an
accelerator, the device does the arithmetic.
"""

from __future__ import annotations

import numpy as np

from cvserve.images.spec import PreprocessSpec

_SUFFIX = "__cvserve_normalized"


def fold_normalize(model, spec: PreprocessSpec):
    """Return a copy of ``model`` (an ``onnx.ModelProto``) whose image input is uint8.

    The input keeps its name and shape; a Cast -> Mul -> Add prologue computes exactly what
    cvserve's float preprocessing computes (float32 ``x * scale + shift``, per channel).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"expected one image input, found {len(inputs)}")
    inp = inputs[0]
    if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError("the model's input is not float32: is it folded already?")
    name = inp.name
    inner = name + _SUFFIX
    for node in graph.node:
        for k, x in enumerate(node.input):
            if x == name:
                node.input[k] = inner
    for out in graph.output:
        if out.name == name:
            raise ValueError("the image input is also a graph output; cannot fold")

    std = np.asarray(spec.std, np.float64)
    shape = [1, 3, 1, 1] if spec.layout == "NCHW" else [1, 1, 1, 3]
    scale = (spec.rescale / std).astype(np.float32).reshape(shape)
    shift = (-np.asarray(spec.mean, np.float64) / std).astype(np.float32).reshape(shape)
    graph.initializer.extend(
        [
            numpy_helper.from_array(scale, name + "__cvserve_scale"),
            numpy_helper.from_array(shift, name + "__cvserve_shift"),
        ]
    )
    prologue = [
        helper.make_node("Cast", [name], [name + "__cvserve_f32"], to=TensorProto.FLOAT),
        helper.make_node(
            "Mul", [name + "__cvserve_f32", name + "__cvserve_scale"], [name + "__cvserve_scaled"]
        ),  # fmt: skip
        helper.make_node("Add", [name + "__cvserve_scaled", name + "__cvserve_shift"], [inner]),
    ]
    nodes = prologue + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    inp.type.tensor_type.elem_type = TensorProto.UINT8
    onnx.checker.check_model(model)
    return model
