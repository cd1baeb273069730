"""The SSD training driver: dense -> (stable?) -> sparse -> dense -> ... -> dense.

Switching applies the passes: dense->sparse is `ssdfx.convert` with the stability monitor's
fresh (warm-started k-means) splits; sparse->dense is `ssdfx.revert`. Parameters are never
replaced, Adam's moments are permuted with their neurons at every switch (never reset), the
router's parameters join the optimizer for the sparse phase only, and the LR schedule is global.

Modes: "dense"; "ssd" (sparse when the activation pattern is stable, `sparse_steps` at a time);
"ssd-fixed" (sparse phases on a fixed schedule); "sparse" (sparse for good after the first
stability-triggered switch: the ablation). Every run but "sparse" ends with a dense phase.

Outputs in `out_dir`: config.json (the settings), log.jsonl (every step, eval, stability check,
switch, and a final record once the final models are saved), checkpoint.pt (atomic; every
`checkpoint_every` steps, at every switch, and at the end, marked finished), final_dense/
(save_pretrained), final_moe/ (the converted model), both with the BPE tokenizer when the run
trained one (AutoTokenizer.from_pretrained), plots/ (ssdfx plot). A new run starts only in a
missing or empty directory, or replaces a previous run's files (overwrite); a resumed run takes
its settings from config.json (`resume_config`) and replays from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import ssdfx
from ssdfx.api import permutation_buffers
from ssdfx.capture import ROOT_SLOT
from ssdfx.checkpoint import (CheckpointError, check_new_run_dir, finished_record, load_checkpoint,
                              remove_stale_temps, run_settings, save_atomic, start_run_dir, write_text_atomic)
from ssdfx.data import TokenData, load_corpus, make_tokenizer
from ssdfx.dataparallel import average_gradients, broadcast_state
from ssdfx.hf import MODEL_TYPES, build_model, mlm_batch
from ssdfx.saving import shell_routers
from ssdfx.stats import observe
from ssdfx.stability import StabilityMonitor

__all__ = ["TrainConfig", "Trainer", "train", "resume_config", "resume_options", "RESUME_CHANGEABLE", "MODES",
           "ACTIVATIONS", "PARTITIONS", "ROUTERS", "TOKENIZERS", "load_moe"]

MODES = ("dense", "ssd", "ssd-fixed", "sparse")
# HF activation names whose FFNs ssdfx can convert, in both model types (the rest of HF's
# ACT2FN, e.g. tanh or leaky_relu, build a model whose FFNs convert refuses at the first switch)
ACTIVATIONS = ("relu", "relu2", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "silu",
               "swish")
PARTITIONS = ("kmeans", "coactivation", "random")
ROUTERS = ("centroid", "mlp")
TOKENIZERS = ("bytes", "bpe")
# settings a resumed run may change: where the run lives, how many threads it uses, whether it
# shows progress and saves its final models. Every other setting shapes what it computes.
RESUME_CHANGEABLE = ("out_dir", "threads", "progress", "save_final")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _invalid(name: str, rule: str, value) -> ValueError:
    return ValueError(f"{name} ({_flag(name)}) must be {rule}, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. The defaults are the README's main job (a few minutes)."""

    model: str = "gpt2"
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    ctx: int = 128
    d_ff: int | None = None  # default 4 * n_embd
    activation: str = "relu"
    mode: str = "ssd"
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    num_experts: int = 16
    top_k: int = 4
    partition: str = "kmeans"
    router: str = "centroid"
    dynamic_k: float | None = None
    check_every: int = 40  # stability checks in dense phases (0: never)
    stability_tol: float = 0.03
    patience: int = 2
    probe_batches: int = 2
    sparse_steps: int = 150
    final_dense_steps: int = 40
    fixed_start: int = 150  # ssd-fixed: first switch
    fixed_dense_steps: int = 40  # ssd-fixed: dense steps between sparse phases
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100
    out_dir: str = "runs/ssd"
    corpus: str | None = None
    tokenizer: str = "bytes"
    bpe_vocab: int = 4096
    threads: int | None = None
    backend: str = "auto"
    progress: bool = True
    save_final: bool = True

    def __post_init__(self):
        # every setting, and everything the switches will need, checked now: before the run
        # directory is touched, not hours in at the first switch
        self._check_types()
        self._check_values()
        self._check_schedule()

    def _check_types(self) -> None:
        kinds = {"int": (int, "an integer"), "float": ((int, float), "a number"), "str": (str, "a string"),
                 "bool": (bool, "True or False")}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # the annotations are strings (from __future__ import annotations): "int", "int | None", ...
            kind, _, optional = f.type.partition(" | ")
            if value is None and optional:
                continue
            types, what = kinds[kind]
            if not isinstance(value, types) or (isinstance(value, bool) and kind != "bool"):
                raise TypeError(f"{f.name} ({_flag(f.name)}) must be {what}"
                                f"{' or None' if optional else ''}, got {value!r}")

    def _check_values(self) -> None:
        from ssdfx.ops.dispatch import BACKENDS
        from ssdfx.passes.moefy import validate_dynamic_k

        for name, allowed in (("model", MODEL_TYPES), ("mode", MODES), ("activation", ACTIVATIONS),
                              ("partition", PARTITIONS), ("router", ROUTERS), ("backend", BACKENDS),
                              ("tokenizer", TOKENIZERS)):
            if getattr(self, name) not in allowed:
                raise _invalid(name, f"one of {tuple(allowed)}", getattr(self, name))
        for name in ("n_layer", "n_embd", "n_head", "ctx", "steps", "batch_size", "num_experts", "top_k",
                     "patience", "probe_batches", "sparse_steps", "fixed_dense_steps", "eval_every",
                     "eval_batches", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise _invalid(name, ">= 1", getattr(self, name))
        for name in ("warmup", "seed", "check_every", "final_dense_steps", "fixed_start"):
            if getattr(self, name) < 0:
                raise _invalid(name, ">= 0", getattr(self, name))
        if self.d_ff is not None and self.d_ff < 1:
            raise _invalid("d_ff", ">= 1 (omit it for 4 * n_embd)", self.d_ff)
        if self.threads is not None and self.threads < 1:
            raise _invalid("threads", ">= 1 (omit it for all cores)", self.threads)
        if self.bpe_vocab < 256:
            raise _invalid("bpe_vocab", ">= 256 (a byte-level BPE starts from the 256 bytes)", self.bpe_vocab)
        for name in ("lr", "weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise _invalid(name, "a finite number >= 0", getattr(self, name))
        if not 0 <= self.min_lr_ratio <= 1:
            raise _invalid("min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        if not 0 < self.stability_tol < 1:
            raise _invalid("stability_tol", "in (0, 1)", self.stability_tol)
        validate_dynamic_k(self.dynamic_k)
        if not self.out_dir:
            raise _invalid("out_dir", "a directory path", self.out_dir)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                             "(--n-embd, --n-head)")
        if self.ffn_dim % self.num_experts:
            raise ValueError(f"d_ff={self.ffn_dim} is not divisible by num_experts={self.num_experts} "
                             "(--d-ff, --num-experts)")
        if self.top_k > self.num_experts:
            raise _invalid("top_k", f"<= num_experts={self.num_experts}", self.top_k)

    def _check_schedule(self) -> None:
        """Refuse a switching mode whose schedule leaves no room for a sparse phase (such a run
        used to train dense from start to end, and say nothing)."""
        if self.mode in ("ssd", "sparse") and self.check_every < 1:
            raise ValueError(f"mode {self.mode!r} switches on stability checks: check_every (--check-every) "
                             f"must be >= 1, got {self.check_every}")
        shortest = max(1, self.sparse_steps // 4)  # a last sparse phase may be cut down to this
        if self.mode == "ssd-fixed":
            first, why, fix = self.fixed_start, f"starts at fixed_start={self.fixed_start}", "--fixed-start"
        elif self.mode in ("ssd", "sparse"):
            # the first check has no previous split to compare with, so `patience` stable checks
            # in a row end at check patience + 1 at the earliest
            first = self.check_every * (self.patience + 1)
            why = (f"can start at step {first} at the earliest (check_every={self.check_every} x "
                   f"(patience={self.patience} + 1): the first stability check only records a split)")
            fix = "--check-every, --patience"
        else:
            return
        if self.mode == "sparse":  # sparse for good: one sparse step before the end is room enough
            if first >= self.steps:
                raise ValueError(f"mode 'sparse' would never go sparse: its sparse phase {why}, so steps "
                                 f"(--steps) must be >= {first + 1}, got {self.steps}; raise --steps or "
                                 f"lower {fix.replace(', ', ' or ')}")
            return
        if first + shortest > self.steps - self.final_dense_steps:
            raise ValueError(
                f"mode {self.mode!r} would never go sparse: its first sparse phase {why} and needs "
                f"{shortest} step(s) (a quarter of sparse_steps={self.sparse_steps}) before the "
                f"final_dense_steps={self.final_dense_steps} dense steps, so steps must be >= "
                f"{first + shortest + self.final_dense_steps}, got {self.steps}; raise --steps or lower "
                f"{fix}, --sparse-steps or --final-dense-steps")

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or 4 * self.n_embd

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "d_ff": self.ffn_dim}


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, cosine decay to min_lr_ratio * lr; one global schedule across phases."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, log=print):
        """A new run needs an out_dir that is missing or empty, or holds a run and `overwrite`
        (which replaces that run's files, and only those); `resume` continues the run there from
        its checkpoint, with the same settings but for RESUME_CHANGEABLE."""
        self.cfg, self.log = cfg, log
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.out = Path(cfg.out_dir)
        if self.rank == 0:  # rank 0 is the one that writes; the directory is checked before any work
            if resume:
                _check_resumable(self.out)
            else:
                check_new_run_dir(self.out, overwrite)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        corpus = load_corpus(cfg.corpus)
        if corpus.note and self.rank == 0:
            log(corpus.note)
        specials = 2 if cfg.model == "bert" else 0  # [MASK], [PAD]
        self.tokenizer = make_tokenizer(cfg.tokenizer, corpus, specials, cfg.bpe_vocab)
        self.data = TokenData(corpus, self.tokenizer)
        self.data.require(cfg.ctx)  # before the run directory is written
        self.corpus_desc = corpus.describe()
        self.vocab = self.tokenizer.vocab_size
        self.model = build_model(cfg.model, vocab_size=self.vocab, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                                 n_head=cfg.n_head, ctx=cfg.ctx, d_ff=cfg.ffn_dim,
                                 activation=cfg.activation, seed=cfg.seed)
        self.opt = self._optimizer()
        self.sites = ssdfx.find_ffns(self.model)
        self.monitor = StabilityMonitor(cfg.num_experts, cfg.top_k, cfg.stability_tol, cfg.patience)
        self.step, self.phase, self.phase_start, self.elapsed, self.tokens = 0, "dense", 0, 0.0, 0
        self.last_report = None
        self.last_stats = None
        self.last_eval = None
        self.log_lines = 0
        self.val = self.data.val_batches(cfg.batch_size, cfg.ctx, cfg.eval_batches)
        self.probe = [self._inputs(self.data.batch("val", cfg.batch_size, cfg.ctx, seed=cfg.seed + 1, step=i))
                      for i in range(cfg.probe_batches)]
        self.finished = False
        if resume:
            self._resume()
        elif self.rank == 0:
            start_run_dir(self.out, cfg.as_dict())
        self._sync_ranks()

    # -- setup ---------------------------------------------------------------------------------

    def _optimizer(self) -> torch.optim.Optimizer:
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.cfg.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=self.cfg.lr)

    def _sync_ranks(self) -> None:
        """Every rank continues from rank 0's parameters and buffers (at the start, after a
        resume and after every rewrite), as DistributedDataParallel's constructor would."""
        if self.world > 1:
            broadcast_state(self.model)

    def _inputs(self, tokens: torch.Tensor, step: int = 0) -> dict:
        if self.cfg.model == "gpt2":
            return {"input_ids": tokens[:, :-1], "labels": tokens[:, :-1]}
        inputs, labels = mlm_batch(tokens[:, :-1], self.vocab - 2, self.vocab - 2, seed=self.cfg.seed,
                                   step=step, rank=self.rank)
        return {"input_ids": inputs, "labels": labels}

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.cfg
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.mode}", unit="step", dynamic_ncols=True)
        while self.step < cfg.steps:
            self._maybe_switch()
            t0 = time.perf_counter()
            loss = self._train_step()
            dt = time.perf_counter() - t0
            self.elapsed += dt
            ntok = cfg.batch_size * cfg.ctx * self.world
            self.tokens += ntok
            self._write({"kind": "step", "step": self.step, "phase": self.phase, "loss": loss,
                         "lr": _lr_at(cfg, self.step), "time": self.elapsed, "tokens": self.tokens,
                         "tok_s": ntok / dt})
            self.step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(phase=self.phase, loss=f"{loss:.3f}", tok_s=f"{ntok / dt:,.0f}")
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                self._evaluate()
            if cfg.check_every and self.phase == "dense" and self.step % cfg.check_every == 0 and self.step < cfg.steps:
                self._check()
            if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        return self._finish()

    def _train_step(self) -> float:
        cfg = self.cfg
        tokens = self.data.batch("train", cfg.batch_size, cfg.ctx, seed=cfg.seed, step=self.step, rank=self.rank)
        lr = _lr_at(cfg, self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.model.train()
        loss = self.model(**self._inputs(tokens, self.step)).loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            average_gradients(self.model, self.world)
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        return loss.item()

    @torch.no_grad()
    def _evaluate(self) -> float:
        self.model.eval()
        losses = [self.model(**self._inputs(b, i)).loss.item() for i, b in enumerate(self.val)]
        val = sum(losses) / len(losses)
        self._write({"kind": "eval", "step": self.step, "phase": self.phase, "val_loss": val, "time": self.elapsed})
        self.last_eval = (self.step, self.phase, val)
        return val

    def _check(self) -> None:
        """Stability check on the probe batches (rank 0 decides; every rank follows)."""
        t0 = time.perf_counter()
        report = None
        if self.rank == 0:
            self.model.eval()
            self.last_stats = observe(self.model, self.probe, sites=self.sites)
            report = self.monitor.check(self.model, self.last_stats, step=self.step)
        if self.world > 1:
            box = [report]
            dist.broadcast_object_list(box, src=0)
            report = box[0]
        self.last_report = report
        spent = time.perf_counter() - t0
        if self.cfg.mode != "dense":  # part of the method's cost; a dense run checks only to log
            self.elapsed += spent
        self._write({"kind": "stability", "time": self.elapsed, "check_time": spent, **report.as_dict()})

    def _sparse_end(self) -> int:
        """Sparse phases end by this step: the run finishes with final_dense_steps dense steps."""
        return self.cfg.steps - self.cfg.final_dense_steps

    def _want_sparse(self) -> bool:
        cfg, step = self.cfg, self.step
        # the last phase may be cut short to fit before the final dense steps, down to a quarter
        room = step + max(1, cfg.sparse_steps // 4) <= self._sparse_end()
        if cfg.mode == "dense":
            return False
        if cfg.mode == "ssd-fixed":
            due = step == cfg.fixed_start or (step > cfg.fixed_start and step - self.phase_start >= cfg.fixed_dense_steps)
            return due and room and step < cfg.steps
        ready = self.last_report is not None and self.last_report.stable and self.last_report.step == step
        return ready and (room or cfg.mode == "sparse") and step < cfg.steps

    def _maybe_switch(self) -> None:
        cfg = self.cfg
        if self.phase == "dense" and self._want_sparse():
            self.to_sparse()
        elif self.phase == "sparse" and cfg.mode != "sparse" and (
                self.step - self.phase_start >= cfg.sparse_steps or self.step >= self._sparse_end()):
            self.to_dense()

    # -- switching -----------------------------------------------------------------------------

    def _convert(self, partitions: dict | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Convert the model with the run's settings (partition, router, dynamic_k and the
        activation statistics they need): every switch to sparse and final_moe/ come through here."""
        cfg = self.cfg
        # a stability check at this very step already split (warm-started k-means) and observed
        current = self.last_report is not None and self.last_report.step == self.step
        stats = None
        split_needs_stats = cfg.partition == "coactivation" and partitions is None
        if cfg.router == "mlp" or cfg.dynamic_k is not None or split_needs_stats:
            stats = self.last_stats if current else None
            if stats is None:  # no check this step (ssd-fixed, the final model), or not rank 0
                self.model.eval()
                stats = observe(self.model, self.probe, sites=self.sites)
        if partitions is None and cfg.partition == "kmeans" and current:
            partitions = dict(self.last_report.partitions)
        elif partitions is None:
            from ssdfx.split import partition

            partitions = {s.name: partition(cfg.partition, s, self.model, cfg.num_experts, stats=stats)
                          for s in self.sites}
        if self.world > 1:
            box = [partitions]
            dist.broadcast_object_list(box, src=0)
            partitions = box[0]
        ssdfx.convert(self.model, cfg.num_experts, cfg.top_k, sites=self.sites, partition=partitions,
                      router=cfg.router, dynamic_k=cfg.dynamic_k, stats=stats, optimizer=optimizer,
                      backend=cfg.backend)

    def to_sparse(self, partitions: dict | None = None) -> None:
        t0 = time.perf_counter()
        self._convert(partitions, optimizer=self.opt)
        routers = [p for n, p in self.model.named_parameters() if ".ssdfx_router" in n]
        self.opt.add_param_group({"params": routers, "weight_decay": 0.0, "ssdfx_router": True})
        self.phase, self.phase_start = "sparse", self.step
        self.monitor.reset()
        self._sync_ranks()
        self.elapsed += time.perf_counter() - t0
        self._write({"kind": "switch", "step": self.step, "to": "sparse", "time": self.elapsed})
        self.save_checkpoint()

    def to_dense(self, checkpoint: bool = True) -> None:
        t0 = time.perf_counter()
        group = next(g for g in self.opt.param_groups if g.get("ssdfx_router"))
        for p in group["params"]:
            self.opt.state.pop(p, None)
        self.opt.param_groups.remove(group)
        ssdfx.revert(self.model, optimizer=self.opt)
        self.phase, self.phase_start = "dense", self.step
        self.last_report = None  # the pattern must prove itself stable again
        self._sync_ranks()
        self.elapsed += time.perf_counter() - t0
        self._write({"kind": "switch", "step": self.step, "to": "dense", "time": self.elapsed})
        if checkpoint:
            self.save_checkpoint()

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        perm_paths = permutation_buffers(self.model)  # {} when dense
        save_atomic({
            "config": self.cfg.as_dict(),
            "step": self.step, "phase": self.phase, "phase_start": self.phase_start,
            "elapsed": self.elapsed, "tokens": self.tokens,
            "partitions": {site: self.model.get_buffer(key).clone()
                           for site, key in perm_paths.items()} or None,
            "perm_buffers": perm_paths or None,
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "monitor": self.monitor.state_dict(), "last_report": self.last_report,
            "log_lines": self.log_lines, "finished": self.finished,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }, self.out / "checkpoint.pt")

    def _resume(self) -> None:
        cfg = self.cfg
        expect = {k: v for k, v in cfg.as_dict().items() if k not in RESUME_CHANGEABLE}
        ckpt = load_checkpoint(self.out / "checkpoint.pt", expect)
        if ckpt.get("finished"):  # its log lost the final record; the checkpoint still knows
            raise CheckpointError(f"the run in {self.out} finished at step {ckpt['step']}; there is "
                                  "nothing to resume (--overwrite starts it over)")
        if ckpt["phase"] == "sparse":
            paths = ckpt.get("perm_buffers") or {s.name: _legacy_perm_path(s) for s in self.sites}
            ssdfx.convert(self.model, cfg.num_experts, cfg.top_k, sites=self.sites,
                          partition=ckpt["partitions"], router=shell_routers(ckpt["model"], paths),
                          dynamic_k=cfg.dynamic_k, backend=cfg.backend)
            routers = [p for n, p in self.model.named_parameters() if ".ssdfx_router" in n]
            self.opt.add_param_group({"params": routers, "weight_decay": 0.0, "ssdfx_router": True})
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.monitor.load_state_dict(ckpt["monitor"])
        self.step, self.phase, self.phase_start = ckpt["step"], ckpt["phase"], ckpt["phase_start"]
        self.elapsed, self.tokens, self.last_report = ckpt["elapsed"], ckpt["tokens"], ckpt["last_report"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        self.log_lines = ckpt["log_lines"]
        if self.rank == 0:  # drop log lines written after the checkpoint: they will be redone
            remove_stale_temps(self.out)
            path = self.out / "log.jsonl"
            keep = path.read_text().splitlines()[: self.log_lines] if path.exists() else []
            write_text_atomic("".join(l + "\n" for l in keep), path)
        self.log(f"resumed from {self.out / 'checkpoint.pt'} at step {self.step} ({self.phase})")

    # -- output --------------------------------------------------------------------------------

    def _write(self, record: dict) -> None:
        self.log_lines += 1
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _finish(self) -> dict:
        cfg = self.cfg
        result = {"steps": self.step, "time": self.elapsed, "out_dir": str(self.out)}
        done = self.last_eval[:2] == (self.step, self.phase) if self.last_eval else False
        result["val_loss_" + self.phase] = self.last_eval[2] if done else self._evaluate()
        if self.phase == "sparse":
            moe_dir = self.out / "final_moe"
            if self.rank == 0 and cfg.save_final:
                _save_moe(self.model, moe_dir, cfg, self.tokenizer)
            # no checkpoint here: a dense one at step == steps made a resume after a crash in the
            # saves below convert the model afresh for final_moe/, dropping the trained router and
            # split. Without it a resume replays from the last checkpoint, bit for bit, to here.
            self.to_dense(checkpoint=False)
            result["val_loss_dense"] = self._evaluate()
        elif cfg.mode != "dense":
            # the dense-trained model, converted for sparse inference as a switch would convert it
            # (a fresh split: no stability check runs at the last step); nothing trains after this,
            # so the optimizer's state is left alone
            self._convert()
            result["val_loss_moe"] = self._evaluate_quiet()
            if self.rank == 0 and cfg.save_final:
                _save_moe(self.model, self.out / "final_moe", cfg, self.tokenizer)
            ssdfx.revert(self.model)
        if self.rank == 0 and cfg.save_final:
            with _hf_progress(cfg.progress):  # its "Writing model shards" bar
                self.model.save_pretrained(self.out / "final_dense")
            _save_tokenizer(self.tokenizer, self.out / "final_dense")
            (self.out / "final_dense" / "ssdfx_train.json").write_text(json.dumps(cfg.as_dict(), indent=1))
        self._write({"kind": "final", **result})
        # the end state, marked finished once every output is written: --resume then has
        # nothing left to do, and checkpoint.pt is the trained state, not a stale mid-run one
        self.finished = True
        self.save_checkpoint()
        return result

    @torch.no_grad()
    def _evaluate_quiet(self) -> float:
        self.model.eval()
        return sum(self.model(**self._inputs(b, i)).loss.item() for i, b in enumerate(self.val)) / len(self.val)


@contextlib.contextmanager
def _hf_progress(enabled: bool):
    """transformers' progress bars on or off for the block, as they were afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _legacy_perm_path(site) -> str:
    # checkpoints and final_moe/ directories written before the keys were recorded: one site
    # per module scope, which holds for the GPT-2 and BERT models the driver builds
    scope = site.scope
    holder = (scope.path or ROOT_SLOT) if scope.kind == "module" else scope.children[0]
    return f"{holder}.ssdfx_perm"


def _save_tokenizer(tokenizer, path: Path) -> None:
    # a trained BPE goes with the model, or its outputs cannot be decoded; the byte tokenizer is
    # UTF-8 itself and has no HF form
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(path)


def _save_moe(model: nn.Module, path: Path, cfg: TrainConfig, tokenizer=None) -> None:
    from ssdfx.saving import META, WEIGHTS, save_converted

    if (path / WEIGHTS).exists() and not (path / META).exists() and (path / "moe.json").exists():
        # this driver's own older format (before ssdfx.json), which save_converted refuses to
        # replace as files it did not write; the directory is the run's own, so it goes whole
        shutil.rmtree(path)
    save_converted(model, path, overwrite=True)  # model.safetensors, ssdfx.json, config.json
    _save_tokenizer(tokenizer, path)
    conv = ssdfx.conversion(model)
    # the training configuration and the sites, for the record (load_converted needs neither)
    (path / "moe.json").write_text(json.dumps({
        "config": cfg.as_dict(), "num_experts": conv.num_experts, "top_k": conv.top_k,
        "sites": [s.as_dict() for s in conv.sites]}, indent=1))


def _vocab_from_state(state: Mapping) -> int:
    # the embedding or its tied output layer, whichever name safetensors kept for the shared
    # tensor
    for suffix in ("wte.weight", "word_embeddings.weight", "lm_head.weight", "decoder.weight"):
        for key in state:
            if key.endswith(suffix):
                return state[key].shape[0]
    raise ValueError("cannot tell the vocabulary size: the saved state has no embedding or "
                     "output-layer weight (expected a key ending in wte.weight or lm_head.weight)")


def load_moe(path: str | Path) -> nn.Module:
    """Rebuild a model saved in final_moe/: dense model from its config, converted with the saved
    splits, weights loaded. Ready for sparse inference. (`ssdfx.load_converted` reads the same
    directory; this also reads final_moe/ directories written before it existed.)"""
    from safetensors import safe_open
    from safetensors.torch import load_model

    from ssdfx.saving import META, TensorsOnDemand, load_converted

    path = Path(path)
    if (path / META).is_file():
        return load_converted(path)
    meta = json.loads((path / "moe.json").read_text())
    # the recorded settings as they are: a TrainConfig would re-check the run's options, and the
    # model's architecture is all that is needed here
    cfg = meta["config"]
    # as in load_converted: the few tensors that shape the model first, the weights once
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        state = TensorsOnDemand(f)
        model = build_model(cfg["model"], vocab_size=_vocab_from_state(state), n_layer=cfg["n_layer"],
                            n_embd=cfg["n_embd"], n_head=cfg["n_head"], ctx=cfg["ctx"],
                            d_ff=cfg.get("d_ff") or 4 * cfg["n_embd"], activation=cfg["activation"],
                            seed=cfg["seed"])
        sites = ssdfx.find_ffns(model)
        paths = {s.name: _legacy_perm_path(s) for s in sites}
        parts = {site: state[key] for site, key in paths.items()}
        routers = shell_routers(state, paths)
    ssdfx.convert(model, meta["num_experts"], meta["top_k"], sites=sites, partition=parts,
                  router=routers, dynamic_k=cfg.get("dynamic_k"))
    load_model(model, str(path / "model.safetensors"))
    return model.eval()


def _check_resumable(out: Path) -> None:
    """Raise CheckpointError, saying what to do instead, unless `out` holds a run that --resume
    can continue. Reads only."""
    if run_settings(out) is None:
        raise CheckpointError(f"{out} holds no ssdfx run to resume (no config.json written by one); start "
                              "a new run without --resume")
    done = finished_record(out)
    if done is not None:
        raise CheckpointError(f"the run in {out} finished at step {done.get('steps')}; there is nothing to "
                              "resume (--overwrite starts it over)")
    if not (out / "checkpoint.pt").is_file():
        raise CheckpointError(
            f"the run in {out} stopped before its first checkpoint (written every checkpoint_every steps and "
            "at every switch), so it cannot be resumed; start it over with --overwrite instead of --resume, "
            "or choose another --out-dir")


def resume_options() -> str:
    """The options a resumed run may give with other values, for messages and help."""
    kinds = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    options = [f"--[no-]{n.replace('_', '-')}" if kinds[n] == "bool" else _flag(n)
               for n in RESUME_CHANGEABLE if n != "out_dir"]  # --out-dir says which run
    return ", ".join(options[:-1]) + " and " + options[-1]


def resume_config(out_dir: str | Path, /, **changes) -> TrainConfig:
    """The configuration of the run in `out_dir`, as its config.json records it, with `changes`
    to the settings a resumed run may change (RESUME_CHANGEABLE). Any other setting in `changes`
    must equal the recorded one, or ValueError names it: a run resumed with another LR, schedule
    or model would be neither the run it continues nor a new one."""
    out = Path(out_dir)
    saved = run_settings(out)
    if saved is None:
        _check_resumable(out)  # raises, with what to do instead
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise TypeError(f"resume_config got unknown settings {unknown}; TrainConfig's fields are {sorted(fields)}")
    # a setting the run's version did not have yet takes its default (the behaviour before it)
    recorded = {name: saved.get(name, default) for name, default in fields.items()}
    differ = [n for n, v in changes.items() if n not in RESUME_CHANGEABLE and v != recorded[n]]
    if differ:
        given = ", ".join(f"{_flag(n)} {changes[n]} (the run's: {recorded[n]})" for n in differ)
        free = resume_options()
        raise ValueError(
            f"--resume continues the run in {out} with the settings in its config.json, and these options "
            f"differ from them: {given}; drop them to resume the run as it was, or start a new run with them "
            f"(--overwrite replaces this one, or choose another --out-dir). On --resume only {free} may change")
    try:
        cfg = TrainConfig(**recorded)
    except (ValueError, TypeError) as e:
        raise type(e)(f"the settings in {out / 'config.json'} do not pass this version's checks: {e}") from e
    return dataclasses.replace(cfg, **{**changes, "out_dir": str(out)})


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run (or resume) one training run; returns the final figures. A new run refuses an out_dir
    that holds a run unless overwrite=True (which replaces it). Resuming a run that finished
    changes nothing and returns its final record."""
    done = finished_record(cfg.out_dir) if resume else None
    if done is not None:
        return done
    return Trainer(cfg, resume=resume, overwrite=overwrite).run()
