"""Data parallelism under torchrun (2 processes, gloo on CPU): every rank holds the same parameters after
each switch, and the ranks trained on different data."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import TEXT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"doc{i}.txt").write_text(TEXT[i * 300:] + TEXT[: i * 300])
    return corpus


def _torchrun(args: list[str], out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:  # the workers' own lines first (the launcher's fill the tail)
        own = [line for line in proc.stderr.splitlines() if "distributed/elastic" not in line]
        saved = sorted(p.name for p in out.iterdir())
        pytest.fail(f"torchrun exited {proc.returncode}; files written: {saved}\n"
                    + "\n".join(own[:80]) + "\n...\n" + proc.stderr[-1500:])
    return proc


def test_two_ranks_agree_after_every_switch(tmp_path):
    corpus = _corpus(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    _torchrun([str(Path(__file__).with_name("ddp_worker.py")), str(corpus), str(out)], out)
    snaps = sorted(out.glob("rank0_*.pt"))
    assert len(snaps) == 3  # after the switch to sparse, after the switch back, at the end
    phases = []
    for snap in snaps:
        a = torch.load(snap, weights_only=False)
        b = torch.load(str(snap).replace("rank0_", "rank1_"), weights_only=False)
        phases.append(a["phase"])
        assert a["params"].keys() == b["params"].keys()
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), (snap.name, name)
        assert a["loss"] != b["loss"]  # each rank saw its own batch
    assert phases == ["sparse", "dense", "dense"]
    assert any("ssdfx_router" in n for n in torch.load(snaps[0], weights_only=False)["params"])


def test_train_cli_under_torchrun(tmp_path):
    """The README's `torchrun --nproc_per_node=2 -m ssdfx train`: both processes exit cleanly,
    rank 0 alone writes the run, and its final dense model is the trained model (the final
    validation loss it logged is the saved model's, recomputed here)."""
    from transformers import GPT2LMHeadModel

    from ssdfx.data import TokenData, load_corpus, make_tokenizer

    corpus = _corpus(tmp_path)
    out = tmp_path / "run"
    args = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--ctx", "32", "--batch-size", "4",
            "--num-experts", "4", "--top-k", "2", "--steps", "12", "--warmup", "2", "--mode", "ssd-fixed",
            "--fixed-start", "4", "--sparse-steps", "4", "--final-dense-steps", "2", "--check-every", "0",
            "--eval-every", "100", "--eval-batches", "2", "--threads", "1", "--no-progress", "--no-plots",
            "--corpus", str(corpus), "--out-dir", str(out)]
    proc = _torchrun(["-m", "ssdfx", "train", *args], out)
    assert "2 process(es)" in proc.stderr
    assert proc.stdout.count("finished 12 steps") == 1  # rank 0 reports, rank 1 stays quiet
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "step"] == list(range(12))
    assert [r["to"] for r in rows if r["kind"] == "switch"] == ["sparse", "dense"]
    final = next(r for r in rows if r["kind"] == "final")

    cfg = json.loads((out / "config.json").read_text())
    texts = load_corpus(str(corpus))
    data = TokenData(texts, make_tokenizer(cfg["tokenizer"], texts, 0, cfg["bpe_vocab"]))
    model = GPT2LMHeadModel.from_pretrained(out / "final_dense").eval()
    with torch.no_grad():
        losses = [model(input_ids=b[:, :-1], labels=b[:, :-1]).loss.item()
                  for b in data.val_batches(cfg["batch_size"], cfg["ctx"], cfg["eval_batches"])]
    assert sum(losses) / len(losses) == pytest.approx(final["val_loss_dense"], rel=1e-5)
