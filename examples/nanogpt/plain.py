"""A single-file GPT trainer in the style of nanoGPT: a tiny byte-level GPT learns a short
embedded text; an iteration loop evaluates every ``--eval-interval`` iterations and then writes
``ckpt.pt`` to ``--out-dir``, which ``--init-from resume`` continues from. CPU and gloo.

plain.py knows nothing about the supervisor; adopted.py is the same file with the lines that use
``rosetrainer`` (``diff plain.py adopted.py``): the checkpoint becomes a verified one in the run
directory, the one the supervisor chose is resumed, every iteration beats, the end is marked done.

    torchrun --nproc-per-node 2 plain.py --out-dir out --init-from resume
    python launch.py --nproc 2 --run-dir runs/gpt examples/nanogpt/plain.py \\
        --out-dir runs/gpt/out --init-from resume    # keep its state in the run directory
    python launch.py --nproc 2 --run-dir runs/gpt2 examples/nanogpt/adopted.py
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

TEXT = """\
A lighthouse keeper kept two logbooks. In the first she wrote the weather every hour: wind,
swell, the colour of the sky at dusk. In the second she wrote only what she had finished: the
lamp trimmed, the stairs swept, the brass polished, the boat bailed. When a storm tore the roof
off the store room and soaked the first book, she lost a week of weather and minded very little.
When a gull knocked the ink over the second, she lost an afternoon, because she could not recall
whether the lamp had been trimmed, and so she trimmed it again, and swept the stairs again, and
polished the brass that was already bright. After that she copied the second book every evening
and kept the copy in a tin box in the cellar, and she never again did a day's work twice.
"""


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        heads = [z.view(b, t, self.n_head, -1).transpose(1, 2) for z in self.qkv(x).split(c, 2)]
        y = F.scaled_dot_product_attention(*heads, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, block_size: int, n_layer: int, n_head: int, n_embd: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(256, n_embd)  # bytes are the vocabulary
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*(Block(n_embd, n_head) for _ in range(n_layer)))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, 256, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1))
        logits = self.lm_head(self.ln_f(self.blocks(self.wte(idx) + self.wpe(pos))))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def get_batch(data: torch.Tensor, args: argparse.Namespace, seed: int) -> tuple[torch.Tensor, ...]:
    """A batch drawn from its own seed: the same iteration reads the same batch after a resume."""
    g = torch.Generator().manual_seed(seed)
    ix = torch.randint(len(data) - args.block_size, (args.batch_size,), generator=g)
    x = torch.stack([data[i : i + args.block_size] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + args.block_size] for i in ix])
    return x, y


@torch.no_grad()
def estimate_loss(
    model: nn.Module, splits: dict[str, torch.Tensor], args: argparse.Namespace
) -> dict[str, float]:
    model.eval()
    out = {}
    for name, data in splits.items():
        losses = [model(*get_batch(data, args, seed=-1 - k)) for k in range(args.eval_iters)]
        out[name] = torch.stack(losses).mean().item()
    model.train()
    return out


def get_lr(it: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if it < args.warmup_iters:
        return args.learning_rate * (it + 1) / args.warmup_iters
    progress = (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    return args.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def params_sha256(model: nn.Module) -> str:
    """sha256 over every parameter's bytes, in order: equal digests, equal weights."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="out")
    parser.add_argument("--init-from", choices=["scratch", "resume"], default="scratch")
    parser.add_argument("--max-iters", type=int, default=300)
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--eval-iters", type=int, default=4)
    parser.add_argument("--log-interval", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--warmup-iters", type=int, default=20)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    master_process = rank == 0
    data = torch.tensor(list(TEXT.encode()), dtype=torch.long)
    n = int(0.9 * len(data))
    splits = {"train": data[:n], "val": data[n:]}

    torch.manual_seed(args.seed)
    model = GPT(args.block_size, args.n_layer, args.n_head, args.n_embd)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.1)
    iter_num, best_val_loss = 0, 1e9
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if args.init_from == "resume" and os.path.exists(ckpt_path):
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        print(f"[rank {rank}] resuming from iter {iter_num}", flush=True)
    raw_model = model
    model = DDP(model)

    while True:
        for group in optimizer.param_groups:
            group["lr"] = get_lr(iter_num, args)
        if (iter_num % args.eval_interval == 0 or iter_num == args.max_iters) and master_process:
            losses = estimate_loss(raw_model, splits, args)
            print(
                f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            )
            if iter_num > 0:
                best_val_loss = min(best_val_loss, losses["val"])
                extra = {"iter_num": iter_num, "best_val_loss": best_val_loss}
                state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict()}
                os.makedirs(args.out_dir, exist_ok=True)
                torch.save({**state, **extra}, ckpt_path)
                print(f"saved checkpoint at iter {iter_num}", flush=True)
        if iter_num >= args.max_iters:
            break
        loss = model(*get_batch(splits["train"], args, seed=args.seed + iter_num * world + rank))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        iter_num += 1
        if iter_num % args.log_interval == 0 and master_process:
            print(f"iter {iter_num}: loss {loss.item():.4f}", flush=True)

    print(f"params_sha256={params_sha256(raw_model)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
