"""`ssdfx train` and `ssdfx plot`: the training driver and its plots on the command line."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

__all__ = ["add_train", "add_plot"]

_HELP = {
    "model": "HF model type to pre-train from a config: gpt2 (causal LM) or bert (masked LM)",
    "n_layer": "transformer layers", "n_embd": "model width d_model", "n_head": "attention heads",
    "ctx": "context length in tokens", "d_ff": "FFN width (default: 4 * n_embd)",
    "activation": "FFN activation (relu makes activations exactly sparse)",
    "mode": "dense | ssd (sparse when the pattern is stable) | ssd-fixed (fixed schedule) | "
            "sparse (sparse for good after the first switch)",
    "steps": "optimizer steps", "batch_size": "sequences per step (per process)", "lr": "peak learning rate",
    "min_lr_ratio": "final LR as a fraction of the peak (cosine)", "warmup": "linear warmup steps",
    "weight_decay": "AdamW weight decay", "grad_clip": "gradient norm clip (0: off)", "seed": "random seed",
    "num_experts": "experts per FFN (E)", "top_k": "experts per token (k); the cap with --dynamic-k",
    "partition": "neuron split: kmeans | coactivation | random",
    "router": "router: centroid | mlp",
    "dynamic_k": "per-token expert count covering this mass share (e.g. 0.9; default: off, a fixed top-k)",
    "check_every": "steps between stability checks in dense phases (0: none)",
    "stability_tol": "stable when the previous split covers within this of a fresh one",
    "patience": "consecutive stable checks before going sparse",
    "probe_batches": "validation batches used by each stability check",
    "sparse_steps": "length of a sparse phase (the last may be cut short, to a quarter, to end before the final dense steps)", "final_dense_steps": "the run ends with this many dense steps",
    "fixed_start": "ssd-fixed: step of the first switch", "fixed_dense_steps": "ssd-fixed: dense steps between sparse phases",
    "eval_every": "steps between validation evaluations", "eval_batches": "validation batches per evaluation",
    "checkpoint_every": "steps between checkpoints (also saved at every switch and at the end)",
    "out_dir": "run directory, new or empty (or holding a run, with --resume or --overwrite): "
               "config.json, log.jsonl, checkpoint.pt, plots/, final_dense/, final_moe/",
    "corpus": "your own text: a .txt file or a directory of them (default: Shakespeare)",
    "tokenizer": "bytes | bpe (byte-level BPE trained on the training split)",
    "bpe_vocab": "BPE vocabulary size", "threads": "torch (and numba) threads (default: all cores)",
    "backend": "sparse kernel: auto | reference | numba | torch",
    "progress": "show a progress bar", "save_final": "save final_dense/ and final_moe/",
}


def _choices() -> dict:
    from ssdfx.hf import MODEL_TYPES
    from ssdfx.ops.dispatch import BACKENDS
    from ssdfx.train import ACTIVATIONS, MODES, PARTITIONS, ROUTERS

    # grouped_mm is a CUDA backend; training here runs on CPU
    backends = [b for b in BACKENDS if b != "grouped_mm"]
    return {"model": MODEL_TYPES, "mode": MODES, "activation": ACTIVATIONS, "partition": PARTITIONS,
            "router": ROUTERS, "tokenizer": ["bytes", "bpe"], "backend": backends}


def _field_type(f: dataclasses.Field):
    hint = typing.get_type_hints(__import__("ssdfx.train", fromlist=["TrainConfig"]).TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _help(f: dataclasses.Field) -> str:
    text = _HELP.get(f.name, "")
    if "(default" in text or f.default is None:  # the text says what the default is, or it has none
        return text
    shown = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
    return f"{text} (default: {shown})"


def add_train(sub) -> None:
    from ssdfx.train import TrainConfig, resume_options

    p = sub.add_parser(
        "train", help="SSD pre-training of an HF model built from a config (the main job)",
        description="Pre-train a model from a config on a text corpus, switching FFNs between dense "
                    "and sparse (mixture-of-experts) phases. Runs under torchrun for data parallelism "
                    "(gloo on CPU). With --resume the run's own settings (its config.json) apply; of "
                    f"the options below only {resume_options()} may be given with other values.")
    choices = _choices()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = _field_type(f)
        # SUPPRESS: only the options given on the command line land in the namespace, so that
        # --resume can tell them from defaults (TrainConfig's defaults fill in a new run)
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=_help(f))
        else:
            p.add_argument(flag, type=typ, default=argparse.SUPPRESS, help=_help(f), choices=choices.get(f.name))
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out-dir from its checkpoint, with its own settings")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out-dir (without it, a new run refuses a directory holding one)")
    p.add_argument("--no-plots", action="store_true", help="do not write plots at the end")
    p.set_defaults(func=_train)


def _seconds(t: float) -> str:
    return f"{t:.1f} s" if t < 10 else f"{t:.0f} s"


def _config(args: argparse.Namespace):
    """The run's TrainConfig: the options given (TrainConfig's defaults for the rest), or on
    --resume the run's config.json with the changes it allows. Bad values are usage errors."""
    from ssdfx.cli import UsageError
    from ssdfx.train import TrainConfig, resume_config

    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out-dir and --overwrite replaces it: pass one of them")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    try:
        if args.resume:
            return resume_config(given.get("out_dir", TrainConfig.out_dir), **given)
        return TrainConfig(**given)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from e


def _train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ssdfx.checkpoint import finished_record
    from ssdfx.plot import plot_run
    from ssdfx.train import Trainer

    cfg = _config(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    done = finished_record(cfg.out_dir) if args.resume else None
    if done is not None:  # nothing to do, and nothing is touched: a rerun of a finished job succeeds
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"ssdfx train: the run in {cfg.out_dir} finished at step {done.get('steps')}; nothing to "
                  f"resume, its files are left as they are (--overwrite starts it over; `ssdfx plot "
                  f"{cfg.out_dir}` redraws its plots)", file=sys.stderr)
        return 0
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    log = (lambda *a: print(*a, file=sys.stderr)) if rank == 0 else (lambda *a: None)
    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite, log=log)
    experts = "" if cfg.mode == "dense" else f"E={cfg.num_experts} k={cfg.top_k}, "
    log(f"ssdfx train: {cfg.model} {cfg.n_layer}x{cfg.n_embd}, {trainer.corpus_desc}, mode={cfg.mode}, "
        f"{experts}{world} process(es)")
    result = trainer.run()
    if rank == 0:
        plots = [] if args.no_plots else plot_run(cfg.out_dir)
        out = Path(cfg.out_dir)
        print(f"\nfinished {result['steps']} steps in {_seconds(result['time'])} of training time")
        for k, v in result.items():
            if k.startswith("val_loss"):
                print(f"  {k.replace('_', ' ')}: {v:.4f}")
        # only what this run left on disk: no final_moe/ in a dense run, no final models with
        # --no-save-final
        print(f"log:          {out}/log.jsonl")
        if (out / "checkpoint.pt").is_file():
            print(f"checkpoint:   {out}/checkpoint.pt (the final state)")
        if plots:
            print(f"plots:        {out}/plots/ ({', '.join(p.name for p in plots)})")
        if (out / "final_dense").is_dir():
            print(f"dense model:  {out}/final_dense/ (transformers from_pretrained)")
        if (out / "final_moe").is_dir():
            print(f"MoE model:    {out}/final_moe/ (ssdfx.load_converted)")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def add_plot(sub) -> None:
    p = sub.add_parser("plot", help="write PNG plots of a training run",
                       description="Loss against step and wall time (sparse phases shaded), and sparsity, "
                                   "coverage and the stability metric per layer over training.")
    p.add_argument("run_dir", help="a directory written by `ssdfx train`")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: RUN_DIR/plots)")
    p.set_defaults(func=_plot)


def _plot(args: argparse.Namespace) -> int:
    from ssdfx.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
