"""save_converted / load_converted, and the `ssdfx convert` and `ssdfx bench` commands.

The reference is the converted model in memory: what is loaded back must compute exactly what
was saved (and revert to the same dense model)."""

import copy
import json

import pytest
import torch

import models
import ssdfx
from ssdfx.cli import main
from ssdfx.flopcount import counter_flops
from ssdfx.modelspec import ModelSpec, build


def _gpt2(activation="relu"):
    model, kwargs, _ = models.gpt2(activation=activation)
    return model.eval(), {"input_ids": kwargs["input_ids"]}


def _logits(model, kwargs):
    with torch.no_grad():
        return models.output_of(model, kwargs)


def test_round_trip_of_a_converted_hf_model(tmp_path):
    model, kwargs = _gpt2()
    dense = _logits(model, kwargs)
    ssdfx.convert(model, 4, 2, partition="kmeans")
    want = _logits(model, kwargs)
    ssdfx.save_converted(model, tmp_path / "moe")
    assert sorted(p.name for p in (tmp_path / "moe").iterdir()) == [
        "config.json", "model.safetensors", "ssdfx.json"]
    loaded = ssdfx.load_converted(tmp_path / "moe")  # built from config.json, no model given
    assert type(loaded) is type(model) and ssdfx.conversion(loaded).top_k == 2
    torch.testing.assert_close(_logits(loaded, kwargs), want, rtol=0, atol=0)
    ssdfx.revert(loaded)  # the saved neuron permutation is undone too
    torch.testing.assert_close(_logits(loaded, kwargs), dense, rtol=1e-6, atol=1e-6)


def test_round_trip_keeps_dynamic_k_and_mlp_routers(tmp_path, monkeypatch):
    import safetensors.torch

    model, kwargs = _gpt2()
    stats = ssdfx.observe(model, [kwargs])
    ssdfx.convert(model, 4, 3, partition="coactivation", router="mlp", dynamic_k=0.8,
                  stats=stats)
    want = _logits(model, kwargs)
    saved = ssdfx.save_converted(model, tmp_path / "moe")
    # the weights are read once (by load_model); the splits and router shapes alone beforehand
    reads = []
    real = safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **kw: reads.append(a) or real(*a, **kw))
    loaded = ssdfx.load_converted(saved)
    assert len(reads) == 1
    assert ssdfx.conversion(loaded).dynamic_k == 0.8
    torch.testing.assert_close(_logits(loaded, kwargs), want, rtol=0, atol=0)


@pytest.mark.parametrize("make, options", [
    (models.gpt2, dict(num_experts=4, top_k=2)),
    (models.llama, dict(num_experts=4, top_k=2)),
    (models.bert, dict(num_experts=4, top_k=4, dynamic_k=0.8)),
])
def test_whole_converted_model_pickles_and_retraces(make, options, tmp_path):
    # torch.save(model) pickles the rewritten GraphModules, and torch.load traces their code
    # again: the selection functions and the op must stay single nodes (ssdfx.fx_leaf)
    model, kwargs, _ = make()
    model.eval()
    if "dynamic_k" in options:
        options["stats"] = ssdfx.observe(model, [kwargs])
    ssdfx.convert(model, **options)
    want = _logits(model, kwargs)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(_logits(loaded, kwargs), want, rtol=0, atol=0)
    ssdfx.revert(loaded)
    ssdfx.revert(model)
    torch.testing.assert_close(_logits(loaded, kwargs), _logits(model, kwargs), rtol=0, atol=0)


def test_symbolic_trace_of_a_converted_ffn_keeps_the_op_as_one_node():
    import torch.fx

    model, kwargs = _gpt2()
    ssdfx.convert(model, 4, 2)
    mlp = model.transformer.h[0].mlp
    x = torch.randn(2, 5, model.config.n_embd)
    traced = torch.fx.symbolic_trace(mlp)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert ssdfx.routing.select_top_k in targets and ssdfx.ops.moe_ffn in targets
    with torch.no_grad():
        torch.testing.assert_close(traced(x), mlp(x), rtol=0, atol=0)


def test_relufied_and_bf16_models_load_as_saved(tmp_path):
    # relufy swaps modules and leaves the HF config (GELU) alone; the rebuilt model must be
    # relufied again. A bf16 model must come back in bf16, not in the config's default dtype
    model, kwargs = _gpt2(activation="gelu_new")
    ssdfx.relufy(model)
    model.to(torch.bfloat16)
    ssdfx.convert(model, 4, 2)
    want = _logits(model, kwargs)
    ssdfx.save_converted(model, tmp_path / "moe")
    loaded = ssdfx.load_converted(tmp_path / "moe")
    assert {s.activation for s in ssdfx.converted_sites(loaded)} == {"relu"}
    assert loaded.transformer.wte.weight.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(loaded, kwargs), want, rtol=0, atol=0)
    # an activation that relufy cannot explain is refused, naming the site
    meta = tmp_path / "moe" / "ssdfx.json"
    saved = json.loads(meta.read_text())
    saved["activations"] = {k: "silu" for k in saved["activations"]}
    meta.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="saved silu, the model has gelu_tanh"):
        ssdfx.load_converted(tmp_path / "moe")


def test_non_hf_models_are_rebuilt_from_a_dense_instance(tmp_path):
    model, kwargs, _ = models.block()
    model.eval()
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in fresh.parameters():  # the loaded weights must replace these
            p.add_(1.0)
    ssdfx.convert(model, 4, 2, partition="random")
    want = _logits(model, kwargs)
    ssdfx.save_converted(model, tmp_path / "moe")
    with pytest.raises(ValueError, match="config.json"):
        ssdfx.load_converted(tmp_path / "moe")
    loaded = ssdfx.load_converted(tmp_path / "moe", model=fresh)
    torch.testing.assert_close(_logits(loaded, kwargs), want, rtol=0, atol=0)
    other, _, _ = models.root_mlp()
    with pytest.raises(ValueError, match="do not match the saved ones"):
        ssdfx.load_converted(tmp_path / "moe", model=other)


def test_an_interrupted_save_keeps_the_previous_one(tmp_path, monkeypatch):
    from ssdfx import saving

    model, kwargs = _gpt2()
    ssdfx.convert(model, 4, 2)
    want = _logits(model, kwargs)
    ssdfx.save_converted(model, tmp_path / "moe")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # killed while writing the weights of a second save
    monkeypatch.setattr("safetensors.torch.save_model", dies)
    with pytest.raises(KeyboardInterrupt):
        saving.save_converted(model, tmp_path / "moe", overwrite=True)
    loaded = ssdfx.load_converted(tmp_path / "moe")
    torch.testing.assert_close(_logits(loaded, kwargs), want, rtol=0, atol=0)


def test_bad_input_is_refused_before_writing(tmp_path):
    model, _ = _gpt2()
    with pytest.raises(ssdfx.NotConvertedError, match="convert"):
        ssdfx.save_converted(model, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()
    with pytest.raises(FileNotFoundError, match="ssdfx.json"):
        ssdfx.load_converted(tmp_path)


def test_cli_convert_of_a_saved_directory_then_load(tmp_path, capsys):
    # MODEL may be a save_pretrained directory (e.g. a run's final_dense/), loaded with weights
    model, kwargs = _gpt2()
    model.save_pretrained(tmp_path / "dense")
    built = build(ModelSpec(str(tmp_path / "dense"), seq_len=8))
    torch.testing.assert_close(_logits(built.model, kwargs), _logits(model, kwargs))
    code = main(["convert", str(tmp_path / "dense"), "-E", "4", "-k", "2", "--seq-len", "16",
                 "--batch", "2", "--router", "mlp", "--out", str(tmp_path / "moe")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "converted 2 FFN site(s) to 4 experts, top-2" in out
    loaded = ssdfx.load_converted(tmp_path / "moe")
    ssdfx.revert(loaded)
    torch.testing.assert_close(_logits(loaded, kwargs), _logits(model, kwargs),
                               rtol=1e-6, atol=1e-6)
    code = main(["convert", str(tmp_path / "dense"), "--n-layer", "3", "--out", str(tmp_path / "x")])
    assert code == 1 and "config settings do not apply" in capsys.readouterr().err


def test_cli_refuses_a_converted_directory_and_never_overwrites_a_dense_save(tmp_path, capsys):
    model, kwargs = _gpt2()
    model.save_pretrained(tmp_path / "dense")
    before = (tmp_path / "dense" / "model.safetensors").read_bytes()
    # --out pointing at the source (or any dense save) used to replace its weights
    code = main(["convert", str(tmp_path / "dense"), "-E", "4", "-k", "2", "--seq-len", "8",
                 "--out", str(tmp_path / "dense")])
    assert code == 1 and "that ssdfx did not write" in capsys.readouterr().err
    assert (tmp_path / "dense" / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "dense" / "ssdfx.json").exists()
    # a converted directory as MODEL: pointed to load_converted, not "names no transformers class"
    assert main(["convert", str(tmp_path / "dense"), "-E", "4", "-k", "2", "--seq-len", "8",
                 "--out", str(tmp_path / "moe")]) == 0
    capsys.readouterr()
    for cmd in (["inspect"], ["bench", "--repeats", "1"], ["convert", "--out", str(tmp_path / "x")]):
        code = main([cmd[0], str(tmp_path / "moe"), *cmd[1:]])
        err = capsys.readouterr().err
        assert code == 1 and "ssdfx.load_converted" in err and "Traceback" not in err, (cmd, err)
    # saving over an earlier converted save needs overwrite=True
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ssdfx.save_converted(ssdfx.load_converted(tmp_path / "moe"), tmp_path / "moe")
    ssdfx.save_converted(ssdfx.load_converted(tmp_path / "moe"), tmp_path / "moe", overwrite=True)


def test_cli_bench_reports_flops_of_each_pass(capsys):
    argv = ["gpt2", "--n-layer", "1", "--d-model", "32", "--n-head", "4", "--vocab-size", "97",
            "--seq-len", "16"]
    code = main(["bench", *argv, "--pass", "4:2", "--pass", "4:1", "--repeats", "2", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [(r["E"], r["k"]) for r in rows] == [(None, None), (4, 2), (4, 1)]
    built = build(ModelSpec("gpt2", aliases=dict(n_layer=1, d_model=32, n_head=4, vocab_size=97),
                            seq_len=16))
    kwargs = built.kwargs
    assert rows[0]["flops"] == ssdfx.flops(built.model, **kwargs).total
    # and torch's own count agrees (the independent reference; tolerances as in test_flops)
    assert rows[0]["flops"] == pytest.approx(counter_flops(built.model, **kwargs), rel=0.01)
    ssdfx.convert(built.model, 4, 2)
    assert rows[1]["flops"] == ssdfx.flops(built.model, **kwargs).total
    assert rows[1]["flops"] == pytest.approx(counter_flops(built.model, **kwargs), rel=0.02)
    assert rows[2]["flops"] < rows[1]["flops"] < rows[0]["flops"]
    assert all(r["ms"] > 0 and r["time_ratio"] > 0 for r in rows)
    code = main(["bench", *argv, "--pass", "4:2", "--repeats", "1", "--backward", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["timed"] == "forward+backward"
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error
        main(["bench", *argv, "--pass", "4"])
    assert exit_.value.code == 2 and "expected E:K" in capsys.readouterr().err


def _tree(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_save_goes_only_into_an_empty_directory_or_over_an_earlier_save(tmp_path):
    """An unrelated config.json was replaced; a sharded dense save got a permuted
    model.safetensors that from_pretrained then loaded instead of its shards; an earlier save
    was replaced without notice, and a plain module saved over an HF one left its config.json."""
    from transformers import GPT2LMHeadModel

    model, kwargs = _gpt2()
    dense = _logits(model, kwargs)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"mine": 1}')
    model.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    ssdfx.convert(model, 4, 2, router="centroid")
    want = _logits(model, kwargs)
    for name, message in (("other", "ssdfx did not write"), ("shards", "save_pretrained")):
        before = _tree(tmp_path / name)
        for overwrite in (False, True):
            with pytest.raises(FileExistsError, match=message):
                ssdfx.save_converted(model, tmp_path / name, overwrite=overwrite)
            assert _tree(tmp_path / name) == before
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "shards")  # still the dense weights
    torch.testing.assert_close(_logits(reloaded.eval(), kwargs), dense, rtol=0, atol=0)

    moe = tmp_path / "moe"
    ssdfx.save_converted(model, moe)
    (moe / "notes.txt").write_text("kept")
    before = _tree(moe)
    with pytest.raises(FileExistsError, match="holds a converted model saved by ssdfx"):
        ssdfx.save_converted(model, moe)
    assert _tree(moe) == before
    # the save records its router kind: the loaded model's summary says centroid, not custom
    assert "centroid router" in str(ssdfx.conversion(ssdfx.load_converted(moe)))
    # model.safetensors follows the umask like the other files (safetensors creates it 0600)
    assert (moe / "model.safetensors").stat().st_mode == (moe / "ssdfx.json").stat().st_mode

    # a plain module over the HF save: the HF config.json goes, other files stay
    block, bkw, _ = models.block()
    ssdfx.convert(block.eval(), 4, 2)
    ssdfx.save_converted(block, moe, overwrite=True)
    assert sorted(p.name for p in moe.iterdir()) == ["model.safetensors", "notes.txt", "ssdfx.json"]
    fresh, _, _ = models.block()
    loaded = ssdfx.load_converted(moe, model=fresh)
    torch.testing.assert_close(_logits(loaded, bkw), _logits(block, bkw), rtol=0, atol=0)
    # and back: the HF model's own save loads as saved
    ssdfx.save_converted(model, moe, overwrite=True)
    torch.testing.assert_close(_logits(ssdfx.load_converted(moe), kwargs), want, rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="is a file"):
        ssdfx.save_converted(model, moe / "notes.txt", overwrite=True)


def test_cli_convert_out_and_overwrite(tmp_path, capsys):
    argv = ["convert", "gpt2", "--n-layer", "1", "--d-model", "32", "--n-head", "4",
            "--vocab-size", "97", "--seq-len", "8", "-E", "4", "-k", "2", "--router", "mlp"]
    (tmp_path / "afile").write_text("x")
    assert main([*argv, "--out", str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "moe")]) == 0
    capsys.readouterr()
    before = _tree(tmp_path / "moe")
    assert main([*argv, "--seed", "1", "--out", str(tmp_path / "moe")]) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(tmp_path / "moe") in err and len(err.splitlines()) == 1
    assert _tree(tmp_path / "moe") == before
    assert main([*argv, "--seed", "1", "--out", str(tmp_path / "moe"), "--overwrite"]) == 0
    capsys.readouterr()
    assert _tree(tmp_path / "moe")["model.safetensors"] != before["model.safetensors"]
    assert "mlp router" in str(ssdfx.conversion(ssdfx.load_converted(tmp_path / "moe")))


@pytest.mark.parametrize("argv", [
    ["convert", "--dynamic-k", "1.5"], ["convert", "--dynamic-k", "0"], ["convert", "-E", "0"],
    ["convert", "-k", "0"], ["convert", "-k", "9"], ["convert", "--device", "meta"],
    ["bench", "--repeats", "0"], ["bench", "--repeats", "-3"], ["bench", "--pass", "8:9"],
    ["bench", "--pass", "0:0"], ["bench", "--device", "meta"],
])
def test_cli_convert_and_bench_usage_errors_exit_2_before_building(tmp_path, capsys, monkeypatch,
                                                                   argv):
    import ssdfx.modelspec

    def never(spec):
        raise AssertionError("the model was built before the usage error was found")
    monkeypatch.setattr(ssdfx.modelspec, "build", never)
    full = [argv[0], "gpt2", *argv[1:]] + (["--out", str(tmp_path / "o")] if argv[0] == "convert" else [])
    try:
        code = main(full)
    except SystemExit as e:  # argparse's own usage error
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and f"ssdfx {argv[0]}: error: " in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
