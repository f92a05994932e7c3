"""ONNX graphs of Marquee's three networks, built with onnx's helpers from the f32
weights that `marquee models export` writes under burn's parameter names.

The graphs follow src/nn/ operation for operation:
- image tower: EfficientNet-Lite0 (TF-SAME pads, BatchNorm eps 1e-3, ReLU6), up to
  the head's feature map, returned as row-major cell tokens [N, cells, 1280];
- text tower: the first `layers` MiniLM layers (post-LN, erf GELU, eps 1e-12);
- fusion: the early-fusion transformer (pre-LN, burn's norm_2 before attention and
  norm_1 before the feed-forward), sigmoid scores [N, 18].

BatchNorm is folded into the conv weights here, as any exporter would; ORT would
fold it itself otherwise.
"""

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 20  # Gelu is an operator from opset 20.

# (repeats, kernel, stride, expand, in, out): src/nn/efficientnet.rs's STAGES.
STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


class Graph:
    def __init__(self, weights):
        self.w = weights
        self.nodes = []
        self.inits = []
        self.n = 0

    def name(self, hint):
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, array, hint="c"):
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, kind, inputs, hint=None, **attrs):
        out = self.name(hint or kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    def linear(self, x, prefix):
        # burn's Linear stores its weight [in, out]: x @ W + b.
        y = self.op("MatMul", [x, self.const(self.w[prefix + ".weight"])])
        if prefix + ".bias" in self.w:
            y = self.op("Add", [y, self.const(self.w[prefix + ".bias"])])
        return y

    def layer_norm(self, x, prefix, eps):
        return self.op(
            "LayerNormalization",
            [x, self.const(self.w[prefix + ".gamma"]), self.const(self.w[prefix + ".beta"])],
            axis=-1,
            epsilon=eps,
        )

    def model(self, inputs, outputs, name):
        g = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
        m.ir_version = 10
        onnx.checker.check_model(m)
        return m


def same_pads(size, k, s):
    """TF SAME: the output is ceil(size / s); the smaller half of the pad goes first."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2, out


def efficientnet(weights, height, width):
    g = Graph(weights)
    h, w = height, width

    def conv_bn(x, conv, bn, k, stride, groups, relu, h, w):
        wt = weights[conv + ".weight"]
        scale = weights[bn + ".gamma"] / np.sqrt(weights[bn + ".running_var"] + 1e-3)
        bias = weights[bn + ".beta"] - weights[bn + ".running_mean"] * scale
        wt = wt * scale[:, None, None, None]
        t, b_, oh = same_pads(h, k, stride)
        l, r, ow = same_pads(w, k, stride)
        y = g.op(
            "Conv",
            [x, g.const(wt.astype(np.float32), "w"), g.const(bias.astype(np.float32), "b")],
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[t, l, b_, r],
            group=groups,
        )
        if relu:
            y = g.op("Clip", [y, g.const(np.float32(0.0)), g.const(np.float32(6.0))])
        return y, oh, ow

    x, h, w = conv_bn("image", "conv_stem", "bn0", 3, 2, 1, True, h, w)
    i = 0
    for repeats, k, stride, expand, cin, cout in STAGES:
        for r in range(repeats):
            cin_r, s = (cin, stride) if r == 0 else (cout, 1)
            p = f"blocks.{i}"
            inp = x
            if expand != 1:
                x, h, w = conv_bn(x, p + ".expand_conv", p + ".bn0", 1, 1, 1, True, h, w)
            x, h, w = conv_bn(x, p + ".depthwise_conv", p + ".bn1", k, s, cin_r * expand, True, h, w)
            x, h, w = conv_bn(x, p + ".project_conv", p + ".bn2", 1, 1, 1, False, h, w)
            if s == 1 and cin_r == cout:
                x = g.op("Add", [x, inp])
            i += 1
    x, h, w = conv_bn(x, "conv_head", "bn1", 1, 1, 1, True, h, w)
    x = g.op("Reshape", [x, g.const(np.array([0, 1280, h * w], np.int64))])
    x = g.op("Transpose", [x], perm=[0, 2, 1])
    g.nodes[-1].output[0] = "tokens"
    return g.model(
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, height, width])],
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", h * w, 1280])],
        "image_tower",
    ), h * w


def attention(g, x, prefix, heads, width, names, mask_bias=None):
    q, k, v, o = names
    dh = width // heads
    split = g.const(np.array([0, 0, heads, dh], np.int64))

    def heads_of(t, perm):
        return g.op("Transpose", [g.op("Reshape", [t, split])], perm=perm)

    qh = heads_of(g.linear(x, f"{prefix}.{q}"), [0, 2, 1, 3])
    kh = heads_of(g.linear(x, f"{prefix}.{k}"), [0, 2, 3, 1])
    vh = heads_of(g.linear(x, f"{prefix}.{v}"), [0, 2, 1, 3])
    s = g.op("Div", [g.op("MatMul", [qh, kh]), g.const(np.float32(math.sqrt(dh)))])
    if mask_bias is not None:
        s = g.op("Add", [s, mask_bias])
    ctx = g.op("MatMul", [g.op("Softmax", [s], axis=-1), vh])
    ctx = g.op("Transpose", [ctx], perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", [ctx, g.const(np.array([0, 0, width], np.int64))])
    return g.linear(ctx, f"{prefix}.{o}")


def minilm(weights, layers, heads=12, width=384):
    g = Graph(weights)
    word = g.op("Gather", [g.const(weights["embeddings.word.weight"]), "ids"], axis=0)
    length = g.op("Shape", ["ids"], start=1, end=2)
    one = g.const(np.array([0], np.int64))
    pos = g.op("Slice", [g.const(weights["embeddings.position.weight"]), one, length, one])
    typ = g.const(weights["embeddings.token_type.weight"][0])
    x = g.op("Add", [g.op("Add", [word, pos]), typ])
    x = g.layer_norm(x, "embeddings.norm", 1e-12)
    for i in range(layers):
        p = f"layers.{i}"
        a = attention(g, x, p, heads, width, ("query", "key", "value", "attn_out"))
        x = g.layer_norm(g.op("Add", [x, a]), p + ".attn_norm", 1e-12)
        f = g.linear(g.op("Gelu", [g.linear(x, p + ".ffn_in")]), p + ".ffn_out")
        x = g.layer_norm(g.op("Add", [x, f]), p + ".ffn_norm", 1e-12)
    g.nodes[-1].output[0] = "hidden"
    return g.model(
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "L"])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", "L", width])],
        "text_tower",
    )


def fusion(weights, cells, layers, heads, d_model):
    g = Graph(weights)
    modality = weights["modality.weight"]
    batch = g.op("Gather", [g.op("Shape", ["image"]), g.const(np.array([0], np.int64))], axis=0)
    summary_shape = g.op("Concat", [batch, g.const(np.array([1, d_model], np.int64))], axis=0)
    summary = g.op("Expand", [g.const(modality[0][None, None, :]), summary_shape])
    img = g.linear("image", "image_proj")
    img = g.op("Add", [img, g.const(weights["image_pos"] + modality[1][None, :])])
    txt = g.op("Add", [g.linear("text", "text_proj"), g.const(modality[2])])
    x = g.op("Concat", [summary, img, txt], axis=1)
    x = g.layer_norm(x, "in_norm", 1e-5)
    for i in range(layers):
        p = f"encoder.layers.{i}"
        a = attention(g, g.layer_norm(x, p + ".norm_2", 1e-5), p + ".mha", heads, d_model,
                      ("query", "key", "value", "output"))
        x = g.op("Add", [x, a])
        hmid = g.op("Gelu", [g.linear(g.layer_norm(x, p + ".norm_1", 1e-5), p + ".pwff.linear_inner")])
        x = g.op("Add", [x, g.linear(hmid, p + ".pwff.linear_outer")])
    classes = weights["out.weight"].shape[1]
    first = g.op("Slice", [x, g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64)),
                           g.const(np.array([1], np.int64))])
    logits = g.linear(g.layer_norm(first, "out_norm", 1e-5), "out")
    logits = g.op("Reshape", [logits, g.const(np.array([0, classes], np.int64))])
    g.op("Sigmoid", [logits])
    g.nodes[-1].output[0] = "scores"
    return g.model(
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", cells, 1280]),
            helper.make_tensor_value_info("text", TensorProto.FLOAT, ["N", "L", 384]),
        ],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", classes])],
        "fusion",
    )


def members(fusions):
    """The fusion members as one graph: their sigmoid scores averaged, as Marquee
    averages them. Inputs `image` and `text`, output `scores`."""
    links = {f"m{i}/{x}": x for i in range(len(fusions)) for x in ("image", "text")}
    return _wire({f"m{i}/": f for i, f in enumerate(fusions)}, links,
                 [("image", TensorProto.FLOAT, ["N", "C", 1280]), ("text", TensorProto.FLOAT, ["N", "L", 384])],
                 [f"m{i}/scores" for i in range(len(fusions))], "fusion_members")


def pipeline(image, text, fusions):
    """The whole poster-to-scores path as one graph (ORT's docs: one session, so one
    thread pool and the optimiser across the networks). Inputs `image` and `ids`,
    output `scores`."""
    parts = {"img/": image, "txt/": text}
    parts.update({f"m{i}/": f for i, f in enumerate(fusions)})
    h, w = (d.dim_value for d in image.graph.input[0].type.tensor_type.shape.dim[2:])
    links = {"img/image": "image", "txt/ids": "ids"}
    for i in range(len(fusions)):
        links[f"m{i}/image"] = "img/tokens"
        links[f"m{i}/text"] = "txt/hidden"
    return _wire(parts, links,
                 [("image", TensorProto.FLOAT, ["N", 3, h, w]), ("ids", TensorProto.INT64, ["N", "L"])],
                 [f"m{i}/scores" for i in range(len(fusions))], "pipeline")


def _wire(parts, links, inputs, scores, name):
    """Prefixed copies of `parts`' graphs in one graph; each input of a part named in
    `links` reads the edge it maps to, and `scores` are averaged into `scores`."""
    nodes, inits = [], []
    for prefix, model in parts.items():
        m = onnx.compose.add_prefix(model, prefix)
        # Each part after the parts it reads, so the nodes stay in topological order.
        nodes += [helper.make_node("Identity", [links[i.name]], [i.name]) for i in m.graph.input if i.name in links]
        nodes += m.graph.node
        inits += m.graph.initializer
    total = scores[0]
    for k, s in enumerate(scores[1:]):
        nodes.append(helper.make_node("Add", [total, s], [f"sum_{k}"]))
        total = f"sum_{k}"
    count = numpy_helper.from_array(np.array(len(scores), np.float32), "members")
    nodes.append(helper.make_node("Div", [total, "members"], ["scores"]))
    classes = parts[next(p for p in parts if p.startswith("m"))].graph.output[0].type.tensor_type.shape.dim[1]
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                          [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", classes.dim_value])],
                          inits + [count])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m
