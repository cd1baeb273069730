"""Data parallelism under torchrun (2 processes, gloo on CPU): every rank holds the same parameters after
each switch, and the ranks trained on different data."""

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


def test_two_ranks_agree_after_every_switch(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"doc{i}.txt").write_text(TEXT[i * 300:] + TEXT[: i * 300])
    out = tmp_path / "run"
    out.mkdir()
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(worker), str(corpus), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:  # the workers' own lines first (the launcher's fill the tail)
        own = [line for line in proc.stderr.splitlines() if "distributed/elastic" not in line]
        saved = sorted(p.name for p in out.glob("*.pt"))
        pytest.fail(f"torchrun exited {proc.returncode}; snapshots written: {saved}\n"
                    + "\n".join(own[:80]) + "\n...\n" + proc.stderr[-1500:])
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
