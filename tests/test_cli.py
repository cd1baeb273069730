"""The `ssdfx` command line: flops and inspect on HF model types and factories, JSON output,
exit codes, and error messages without tracebacks."""

import json
import os
import subprocess
import sys

import pytest

from ssdfx.cli import main

HERE = os.path.dirname(__file__)
FACTORY = os.path.join(HERE, "models.py")
SMALL_GPT2 = ["gpt2", "--n-layer", "1", "--d-model", "32", "--n-head", "4", "--vocab-size", "97",
              "--seq-len", "12", "--batch", "2"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_flops_hf_type_with_overrides_json(capsys):
    code, out, err = run(capsys, "flops", *SMALL_GPT2, "--device", "cpu", "-E", "4", "-k", "1",
                         "--check", "--json")
    assert code == 0, err
    data = json.loads(out)
    (site,) = [r for r in data["rows"] if r["site"] not in ("(non-FFN)", "total")]
    assert (site["d_model"], site["d_ff"], site["tokens"], site["experts"]) == (32, 128, 24, 4)
    # FlopCounterMode ran on the same model: within 2%
    assert abs(data["check"]["relative_difference"]) < 0.02
    assert data["total"] == data["totals"]["moefy"] == data["rows"][-1]["flops_moefy"]


def test_flops_generic_config_flags_and_set(capsys):
    code, out, err = run(capsys, "flops", "gpt2", "--n-layer", "1", "--n-embd", "64",
                         "--set", "n_head=4", "--n-inner=128", "--seq-len", "8", "--dense", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["stages"] == ["dense"]
    site = data["rows"][0]
    assert (site["d_model"], site["d_ff"]) == (64, 128)
    assert site["flops_dense"] == 8 * 2 * 64 * 128 * 2  # hand formula, T = 8 tokens


def test_flops_factory_text_and_csv(capsys, tmp_path):
    csv_path = tmp_path / "f.csv"
    code, out, err = run(capsys, "flops", f"{FACTORY}:llama", "--n-layer", "1", "--csv", str(csv_path))
    assert code == 0, err
    assert "model.layers.0.mlp" in out and "moefy FLOPs" in out and "ratio" in out
    assert csv_path.read_text().splitlines()[0].startswith("site,name,kind")


def test_inspect_factory_json(capsys):
    code, out, err = run(capsys, "inspect", f"{FACTORY}:block", "-E", "4", "-k", "1", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["sites"][0]["state"] == "sparse" and data["site"] == "mlp"
    (g,) = data["graphs"]
    assert "self.c_fc(" in g["before"] and "self.ssdfx_experts(" in g["after"]
    ops = {r["op"]: r["delta"] for r in data["node_diff"]}
    assert ops["RoutedExperts"] == 1 and ops["Linear"] == -2


def test_inspect_text_dense_and_draw(capsys, tmp_path):
    code, out, err = run(capsys, "inspect", *SMALL_GPT2, "--dense", "--draw", str(tmp_path),
                         "--format", "dot")
    assert code == 0, err
    assert "dense" in out and "(dense: not converted)" in out and "nodes per op" in out
    assert os.listdir(tmp_path) == ["transformer.h.0.mlp.before.dot"]


@pytest.mark.parametrize("argv,code,message", [
    (["flops", "gtp2"], 1, "did you mean gpt2"),
    (["flops", "gpt2", "--n-layr", "2"], 1, "did you mean n_layer"),
    (["flops", *SMALL_GPT2, "-E", "4", "-k", "5"], 2, "-k/--top-k 5 exceeds -E/--num-experts 4"),
    (["flops", *SMALL_GPT2, "-E", "5"], 1, "not divisible by num_experts=5"),
    (["flops", "gpt2", "--set", "n_layer"], 2, "--set expects KEY=VALUE"),
    (["flops", "gpt2", "--check"], 2, "--device cpu"),
    (["flops", *SMALL_GPT2, "--partition", "kmeans"], 2, "use --device cpu"),
    (["flops", f"{FACTORY}:nope"], 1, "no callable 'nope'"),
    (["inspect", *SMALL_GPT2, "--site", "7"], 1, "out of range"),
    # transformers' own validator raised a type outside the CLI's error handling (a traceback)
    (["flops", "gpt2", "--n-layer", "1", "--set", "n_embd=abc"], 1, "GPT2Config rejected the settings"),
    (["flops", "/nonexistent/dir"], 1, "/nonexistent/dir: no such directory"),
    (["flops", "gpt2", "--n-layer", "1", "--set", "n_positions=16", "--seq-len", "32"], 1,
     "pass --seq-len 16 or less"),
])
def test_user_errors_exit_nonzero_with_a_message(capsys, argv, code, message):
    got, out, err = run(capsys, *argv)
    assert got == code
    assert message in err and "Traceback" not in err
    assert err.startswith(f"ssdfx {argv[0]}: error: ")


def test_usage_errors_from_argparse(capsys):
    with pytest.raises(SystemExit) as e:
        main(["flops", "gpt2", "--top-k", "two"])
    assert e.value.code == 2
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_help_explains_each_option(capsys):
    for cmd, options in {"flops": ["--num-experts", "--top-k", "--json", "--csv", "--check",
                                   "--device", "--set", "--n-layer", "MODULE:FUNCTION"],
                         "inspect": ["--site", "--draw", "--format", "--dense", "--json"]}.items():
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        for opt in options:
            assert opt in out, (cmd, opt)


def test_demo_still_runs(capsys):
    code, out, err = run(capsys, "demo", "--n-layer", "1", "--n-embd", "32", "--num-experts", "4")
    assert code == 0
    assert "the conversion is exact" in out and "after ssdfx.revert" in out


def test_module_entry_point_and_exit_status():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    ok = subprocess.run([sys.executable, "-m", "ssdfx", "flops", f"{FACTORY}:sequential_mlp",
                         "--json"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["totals"]["dense"] == 2 * 5 * 16 * 64 * 2
    bad = subprocess.run([sys.executable, "-m", "ssdfx", "flops", "not_a_model"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_modelspec_docstring_example_runs():
    import doctest

    from ssdfx import modelspec

    assert doctest.testmod(modelspec).failed == 0


def test_default_seq_len_fits_a_model_with_fewer_positions(capsys):
    # --seq-len defaults to 128, or to the model's positions if fewer (it used to fail at 64)
    code, out, err = run(capsys, "flops", "gpt2", "--n-layer", "1", "--n-embd", "32", "--n-head", "4",
                         "--set", "n_positions=64", "--dense", "--json")
    assert code == 0, err
    assert json.loads(out)["rows"][0]["tokens"] == 64


def test_plot_of_a_damaged_log_says_where(capsys, tmp_path):
    good = json.dumps({"kind": "step", "step": 1, "loss": 2.0, "time": 0.1})
    (tmp_path / "log.jsonl").write_text(f"{good}\nnot json\n{good}\n")
    code, out, err = run(capsys, "plot", str(tmp_path))
    assert code == 1 and "log.jsonl, line 2 is not JSON" in err and "Traceback" not in err
    # a last line cut short (a run killed mid-write) is skipped, not an error
    from ssdfx.plot import read_log

    (tmp_path / "log.jsonl").write_text(f"{good}\n{good}\n{good[:10]}")
    assert len(read_log(tmp_path)) == 2


def test_traceback_before_or_after_the_subcommand(capsys):
    """`--traceback` was accepted before the subcommand only; after it, `train` said
    "unrecognized arguments" and flops took it for a config key. Either place now shows the
    trace; without it the error stays one line."""
    for argv in (["--traceback", "flops", "gtp2"], ["flops", "gtp2", "--traceback"]):
        with pytest.raises(Exception, match="did you mean gpt2"):
            main(argv)
    code, out, err = run(capsys, "flops", "gtp2")
    assert code == 1 and "did you mean gpt2" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:  # a subcommand's unknown option: its own usage line
        main(["plot", "runs/x", "--bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ssdfx plot") and "ssdfx plot: error: unrecognized arguments: --bogus" in err


def test_train_help_shows_each_default_once(capsys, monkeypatch):
    """`train --help` printed "(default 4 * n_embd) (default: None)": the help text's own default
    and ArgumentDefaultsHelpFormatter's."""
    import re

    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    options = re.split(r"\n(?=  -)", out.split("options:")[1])
    assert len(options) > 40
    for text in options:
        assert text.count("default") <= 1, text
    flat = " ".join(out.split())
    for shown in ("FFN width (default: 4 * n_embd)", "optimizer steps (default: 1000)",
                  "(default: Shakespeare)", "threads (default: all cores)", "show a progress bar (default: on)"):
        assert shown in flat, shown


FAILING_FACTORIES = """
import torch
def boom(**kw):
    raise RuntimeError("factory failed on purpose")
def zero(**kw):
    return 1 / 0
def attr(**kw):
    return torch.nn.Linear(2, 2).nope
"""


@pytest.mark.parametrize("source, func, error", [
    (FAILING_FACTORIES, "boom", "RuntimeError: factory failed on purpose"),
    (FAILING_FACTORIES, "zero", "ZeroDivisionError: division by zero"),
    (FAILING_FACTORIES, "attr", "AttributeError: 'Linear' object has no attribute 'nope'"),
    ("def f(:\n", "f", "SyntaxError"),
])
def test_a_failing_factory_is_one_line_naming_it(capsys, tmp_path, source, func, error):
    """A factory module that failed to import, or a factory call that raised anything but the
    few types the CLI caught, gave a traceback."""
    path = tmp_path / f"fac_{func}.py"
    path.write_text(source)
    spec = f"{path}:{func}"
    code, out, err = run(capsys, "flops", spec)
    assert code == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"ssdfx flops: error: factory {spec}: ") and error in err, err
    from ssdfx.modelspec import FactoryError

    with pytest.raises(FactoryError) as e:  # --traceback shows the original exception too
        main(["flops", spec, "--traceback"])
    assert error.split(":")[0] == type(e.value.__cause__).__name__


def test_inspect_draw_reports_a_failing_dot(capsys, tmp_path, monkeypatch):
    """A `dot` that fails (graphviz without the png plugin) raised CalledProcessError and its
    message was lost; now it is one line with dot's own words, and the .dot files stay."""
    fake = tmp_path / "bin" / "dot"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'Format: \"png\" not recognized. Use one of: dot svg' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    code, out, err = run(capsys, "inspect", *SMALL_GPT2, "--dense", "--draw", str(tmp_path / "g"),
                         "--format", "png")
    assert code == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert 'Format: "png" not recognized' in err and "--format dot" in err
    assert os.listdir(tmp_path / "g") == ["transformer.h.0.mlp.before.dot"]


@pytest.mark.parametrize("log, message", [
    ("", "holds no training steps yet"),
    ('{"kind": "step"}\n', "record 1 (step) lacks step, time, loss"),
    ('{"step": 1}\n', "record 1 (no kind) has no kind"),
])
def test_plot_refuses_an_empty_or_malformed_log(capsys, tmp_path, log, message):
    (tmp_path / "log.jsonl").write_text(log)
    code, out, err = run(capsys, "plot", str(tmp_path))
    assert code == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "plots").exists()


def test_convert_and_bench_help_offer_only_what_works(capsys):
    for cmd in ("convert", "bench"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "{cpu,meta}" not in out and "--device {cpu}" in out, cmd
    assert "no labels are passed" in out  # bench --backward says what it times
