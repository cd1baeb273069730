"""Inspection: site table, before/after listing, node counts per op, DOT/SVG drawings."""

import os
import re
import subprocess

import pytest
import torch.fx as fx

import models
import ssdfx
from ssdfx import debug


def test_site_table_follows_the_conversion():
    model, kwargs, expected = models.gpt2()
    dense = debug.site_table(model)
    assert [r.name for r in dense.rows] == [w for w, _, _ in expected]
    assert all(r.state == "dense" and r.experts is None for r in dense.rows)
    assert dense.rows[0].activation == models.EXPECTED_ACTIVATION["gpt2"]
    ssdfx.convert(model, num_experts=4, top_k=2, sites=[expected[0][0]])
    rows = debug.site_table(model).rows
    assert [(r.name, r.state, r.experts, r.top_k) for r in rows] == [
        (expected[0][0], "sparse", 4, 2), (expected[1][0], "dense", None, None)]
    text = str(debug.site_table(model))
    assert "sparse" in text and "transformer.h.1.mlp" in text
    assert debug.site_table(model).to_dicts()[0]["d_ff"] == 128


def test_listing_shows_the_trace_before_and_the_rewrite_after():
    model, kwargs, _ = models.gpt2()
    assert "(dense: not converted)" in debug.listing(model, 0)
    ssdfx.convert(model, num_experts=4, top_k=2)
    text = debug.listing(model, "transformer.h.1.mlp")
    before, after = text.split("after ---")
    assert "torch.addmm" in before and "ssdfx_experts" not in before
    assert "ssdfx: moefy rewrote 1 site(s)" in after  # the provenance comment
    assert "self.ssdfx_experts(" in after and "torch.addmm" not in after


def _by_hand(gm: fx.GraphModule):
    """Node counts written the long way, as the reference for op_counts."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            key = type(gm.get_submodule(n.target)).__name__
        elif n.op == "call_method":
            key = "." + n.target
        elif n.op == "call_function":
            key = n.target.__name__
        else:
            key = n.op
        out[key] = out.get(key, 0) + 1
    return out


def test_node_diff_of_the_nanogpt_mlp():
    model, kwargs, _ = models.block()
    ssdfx.convert(model, num_experts=4, top_k=1, example_kwargs=kwargs)
    diff = {r["op"]: (r["before"], r["after"]) for r in debug.node_diff(model, "mlp").to_dicts()}
    # before: x -> c_fc -> gelu -> c_proj -> dropout; after: router, top-k, the routed op on the
    # weights (Linear layout: no transposes), then c_proj's bias and the dropout
    assert diff == {"placeholder": (1, 1), "Linear": (2, 0), "GELU": (1, 0), "Dropout": (1, 1),
                    "output": (1, 1), "CentroidRouter": (0, 1), "select_top_k": (0, 1),
                    "getitem": (0, 2), "get_attr": (0, 4), "RoutedExperts": (0, 1), "add": (0, 1)}
    (g,) = debug.site_graphs(model, "mlp")
    assert dict(debug.op_counts(g.after)) == _by_hand(g.after)
    assert "total" in str(debug.node_diff(model, "mlp"))


def test_chain_sites_have_one_graph_per_child():
    model, kwargs, _ = models.bert(n_layer=1)
    ssdfx.convert(model, num_experts=2, top_k=1)
    graphs = debug.site_graphs(model, 0)
    assert [g.path for g in graphs] == ["bert.encoder.layer.0.intermediate", "bert.encoder.layer.0.output"]
    assert all(isinstance(g.after, fx.GraphModule) for g in graphs)
    assert _by_hand(graphs[0].before) == {"placeholder": 1, "Linear": 1, "gelu": 1, "output": 1}


def test_resolve_site():
    model, kwargs, expected = models.llama()
    by_index = debug.resolve_site(model, 1)
    assert debug.resolve_site(model, by_index.path) == by_index
    assert debug.resolve_site(model, expected[1][0]) == by_index
    with pytest.raises(IndexError, match="2 FFN site"):
        debug.resolve_site(model, 5)
    with pytest.raises(KeyError, match="model.layers.0.mlp"):
        debug.resolve_site(model, "nope")


def _dot_nodes_and_edges(text):
    nodes = re.findall(r'^  "([^"]+)" \[', text, re.M)
    edges = re.findall(r'^  "([^"]+)" -> "([^"]+)";', text, re.M)
    return nodes, edges


def test_to_dot_has_every_node_and_edge():
    model, kwargs, _ = models.llama(n_layer=1)
    ssdfx.convert(model, num_experts=4, top_k=2)
    gm = model.model.layers[0].mlp
    text = debug.to_dot(gm, "after")
    nodes, edges = _dot_nodes_and_edges(text)
    assert nodes == [n.name for n in gm.graph.nodes]
    assert sorted(edges) == sorted((i.name, n.name) for n in gm.graph.nodes for i in n.all_input_nodes)
    assert text.startswith('digraph "after" {') and text.rstrip().endswith("}")
    assert 'tooltip="moefy: experts of model.layers.0.mlp.gate_proj.weight"' in text


def test_draw_without_graphviz_writes_dot_and_says_how_to_render(tmp_path, monkeypatch):
    model, kwargs, _ = models.gpt2(n_layer=1)
    ssdfx.convert(model, num_experts=2, top_k=1)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert not debug.graphviz_available()
    written = debug.draw_site(model, 0, str(tmp_path / "auto"))
    assert sorted(os.path.basename(p) for p in written) == [
        "transformer.h.0.mlp.after.dot", "transformer.h.0.mlp.before.dot"]
    with pytest.raises(debug.GraphvizNotFoundError, match="apt-get install graphviz"):
        debug.draw_site(model, 0, str(tmp_path / "svg"), fmt="svg")
    assert len(os.listdir(tmp_path / "svg")) == 2  # the .dot files are there anyway


@pytest.mark.skipif(not debug.graphviz_available(), reason="graphviz's dot is not installed")
def test_draw_renders_svg_with_graphviz(tmp_path):
    model, kwargs, _ = models.gpt2(n_layer=1)
    ssdfx.convert(model, num_experts=2, top_k=1)
    written = debug.draw_site(model, 0, str(tmp_path), fmt="svg")
    svgs = [p for p in written if p.endswith(".svg")]
    assert len(svgs) == 2
    for p in svgs:
        with open(p) as f:
            assert "<svg" in f.read()
    # the .dot text is valid for graphviz itself too
    subprocess.run(["dot", "-Tplain", written[0]], check=True, capture_output=True)
