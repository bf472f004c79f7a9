"""Train the T-REX compiler and executor on generated addition problems.

    trex-train --out models/trex.pt --steps 8000            # one process, CPU or CUDA
    trex-train --out models/trex.pt --resume                 # go on from the checkpoint
    trex-train --model baseline --out models/baseline.pt     # the token-by-token baseline
    torchrun --nproc-per-node 4 -m training.train --steps 8000   # several GPUs (DDP)

Training is seeded; every ``--eval-every`` steps it scores held-out problems
and writes the checkpoint (weights, config, optimizer and data-generator state),
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from training import checkpoint, data, vocab
from training.baseline import Baseline, BaselineConfig, reversed_answer
from training.evaluate import evaluate
from training.model import ModelConfig, TRex


def get_batch(rng: random.Random, batch_size: int, cfg, device, p_all_carry: float = 0.0):
    """Problems, the model's teacher-forced inputs and its targets.

    T-REX: the executor's inputs start with <start>. The baseline reads the
    answer so far (reversed digits, no <start>: it predicts the first digit at
    the '=') and predicts one more token than it reads.
    """
    problems = data.training_problems(rng, batch_size, cfg.max_digits, p_all_carry)
    ids = data.encode_problems([p.text for p in problems])
    if isinstance(cfg, BaselineConfig):
        answers = [reversed_answer(p.answer) for p in problems]
        _, targets = data.encode_answers(answers, cfg.max_steps)
        inputs = targets[:, :-1].masked_fill(targets[:, :-1] == vocab.END_ID, vocab.PAD_ID)
    else:
        inputs, targets = data.encode_answers([p.answer for p in problems], cfg.max_steps)
    return ids.to(device), inputs.to(device), targets.to(device)


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=vocab.PAD_ID
    )


def parse_args(argv=None):
    d = ModelConfig()
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", choices=("trex", "baseline"), default="trex")
    ap.add_argument("--out", default="models/trex.pt", help="checkpoint path")
    ap.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--p-all-carry",
        type=float,
        default=0.0,
        help="share of problems whose every place carries (digits 5-9), e.g. 9999+9999",
    )
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-problems", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name in ("d_model", "n_layers", "n_heads", "d_ff", "n_slots", "hidden", "embed"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_grad_enabled(True)  # a caller in the same process may have turned it off
    if args.threads:
        torch.set_num_threads(args.threads)

    # torchrun sets these; a plain run is one process of rank 0
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    device = torch.device(args.device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    master = rank == 0

    # model, optimizer and data stream, fresh or from the checkpoint
    torch.manual_seed(args.seed)
    shape = ("d_model", "n_layers", "n_heads", "d_ff")
    if args.model == "baseline":
        cfg = BaselineConfig(**{k: getattr(args, k) for k in shape})
    else:
        cfg = ModelConfig(**{k: getattr(args, k) for k in (*shape, "n_slots", "hidden", "embed")})
    state = None
    if args.resume and os.path.exists(args.out):
        model, state = checkpoint.load(args.out, map_location="cpu")
        cfg = model.cfg
        model.train()
    else:
        model = Baseline(cfg) if args.model == "baseline" else TRex(cfg)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step = 0
    rng = random.Random(f"{args.seed}:{rank}")
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        if state.get("rng") and rank < len(state["rng"]):
            rng.setstate(state["rng"][rank])
    train_model = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    held_out = (
        data.held_out_set(args.eval_problems, seed=99, max_digits=cfg.max_digits)
        if master
        else None
    )
    if master:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{args.model}: {n_params:,} parameters, device {device}")

    bar = tqdm(total=args.steps, initial=step, disable=not master, dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    while step < args.steps:
        # one optimisation step
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        ids, inputs, targets = get_batch(rng, args.batch_size, cfg, device, args.p_all_carry)
        loss = loss_fn(train_model(ids, inputs), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        seen += args.batch_size * world
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_at(step, args):.1e}")

        # periodic held-out accuracy and checkpoint
        if step % args.eval_every == 0 or step == args.steps:
            rngs = [None] * world
            if distributed:
                dist.all_gather_object(rngs, rng.getstate())
            else:
                rngs = [rng.getstate()]
            if master:
                model.eval()
                report = evaluate(model, held_out)
                model.train()
                elapsed = time.perf_counter() - t0
                worst = min(v["accuracy"] for v in report["accuracy_by_operand_length"].values())
                bar.write(
                    f"step {step}: loss {loss.item():.4f}  held-out {100 * report['accuracy']:.2f}%"
                    f"  worst length {100 * worst:.2f}%  {seen / elapsed:.0f} problems/s"
                )
                checkpoint.save(
                    args.out,
                    model,
                    optimizer=opt.state_dict(),
                    step=step,
                    rng=rngs,
                    args=vars(args),
                    held_out_accuracy=report["accuracy"],
                )
    bar.close()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
