"""Data-parallel training in the style of the PyTorch DDP tutorial: a small model, a synthetic
dataset split across ranks by DistributedSampler, and a Trainer that writes a snapshot of
itself every epoch and resumes from it when restarted. CPU and gloo, so it runs anywhere.

plain.py knows nothing about the supervisor; adopted.py is the same file with the lines that use
``rosetrainer`` (``diff plain.py adopted.py``): the snapshot becomes a verified checkpoint in the
run directory, the one the supervisor chose is resumed, every step beats, the end is marked done.

    torchrun --nproc-per-node 2 plain.py --epochs 30 --snapshot-path snapshot.pt
    python launch.py --nproc 2 --run-dir runs/ddp examples/ddp_tutorial/plain.py \
        --snapshot-path runs/ddp/snapshot.pt    # keep its state in the run directory
    python launch.py --nproc 2 --run-dir runs/ddp2 examples/ddp_tutorial/adopted.py
"""

from __future__ import annotations

import argparse
import hashlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


class SyntheticRegression(Dataset):
    """Random inputs and a noisy nonlinear target, identical on every rank (seeded)."""

    def __init__(self, size: int, dim: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, dim, generator=g)
        w = torch.randn(dim, 1, generator=g)
        self.y = torch.tanh(self.x @ w) + 0.1 * torch.randn(size, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        train_data: DataLoader,
        optimizer: torch.optim.Optimizer,
        save_every: int,
        snapshot_path: str,
    ) -> None:
        self.rank = int(os.environ["RANK"])
        self.model = model
        self.train_data = train_data
        self.optimizer = optimizer
        self.save_every = save_every
        self.snapshot_path = snapshot_path
        self.epochs_run = 0
        self.step = 0
        if os.path.exists(snapshot_path):
            self._load_snapshot(snapshot_path)
        self.model = DDP(model)

    def _load_snapshot(self, path: str) -> None:
        snapshot = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(snapshot["model"])
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self.epochs_run, self.step = snapshot["epochs_run"], snapshot["step"]
        print(f"[rank {self.rank}] resuming from snapshot at epoch {self.epochs_run}", flush=True)

    def _run_batch(self, source: torch.Tensor, targets: torch.Tensor) -> float:
        self.optimizer.zero_grad()
        loss = F.mse_loss(self.model(source), targets)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return loss.item()

    def _run_epoch(self, epoch: int) -> None:
        self.train_data.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        losses = [self._run_batch(source, targets) for source, targets in self.train_data]
        mean = sum(losses) / len(losses)
        print(f"[rank {self.rank}] epoch {epoch} | steps {self.step} | loss {mean:.5f}", flush=True)

    def _save_snapshot(self, epoch: int) -> None:
        extra = {"epochs_run": epoch + 1, "step": self.step}
        state = {"model": self.model.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        torch.save({**state, **extra}, self.snapshot_path)
        print(f"epoch {epoch}: snapshot saved at step {self.step}", flush=True)

    def train(self, max_epochs: int) -> None:
        for epoch in range(self.epochs_run, max_epochs):
            self._run_epoch(epoch)
            if self.rank == 0 and (epoch + 1) % self.save_every == 0:
                self._save_snapshot(epoch)


def params_sha256(model: nn.Module) -> str:
    """sha256 over every parameter's bytes, in order: equal digests, equal weights."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--save-every", type=int, default=1, help="epochs between snapshots")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dataset-size", type=int, default=4096)
    parser.add_argument("--snapshot-path", default="snapshot.pt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    torch.manual_seed(args.seed)
    dataset = SyntheticRegression(args.dataset_size, dim=32, seed=args.seed)
    model = nn.Sequential(
        nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed)
    train_data = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)
    trainer = Trainer(model, train_data, optimizer, args.save_every, args.snapshot_path)
    trainer.train(args.epochs)
    print(f"params_sha256={params_sha256(trainer.model)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
