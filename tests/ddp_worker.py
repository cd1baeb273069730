"""Run by test_ddp.py under torchrun: two ranks train, switch to sparse and back, and each
saves its parameters after every switch so the test can compare them across ranks."""

import sys

import torch
import torch.distributed as dist

from ssdfx.train import TrainConfig, Trainer


def main(corpus: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = TrainConfig(n_layer=2, n_embd=32, n_head=2, ctx=32, batch_size=4, num_experts=4, top_k=2,
                      steps=12, warmup=2, mode="ssd-fixed", fixed_start=4, sparse_steps=4, final_dense_steps=2,
                      check_every=0, eval_every=100, eval_batches=1, checkpoint_every=100, corpus=corpus,
                      out_dir=out, progress=False, save_final=False, threads=1)
    tr = Trainer(cfg)
    saved = 0
    while tr.step < cfg.steps:
        phase = tr.phase
        tr._maybe_switch()
        loss = tr._train_step()
        tr.step += 1
        if tr.phase != phase or tr.step == cfg.steps:  # one step after each switch, and at the end
            state = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
            torch.save({"phase": tr.phase, "step": tr.step, "loss": loss, "params": state},
                       f"{out}/rank{rank}_{saved}.pt")
            saved += 1
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
