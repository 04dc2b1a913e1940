"""Training throughput: the Lightning loop against a plain PyTorch loop, same model, data and batch.

Both loops train the same freshly initialised network on the same in-memory
batches (random log-mels of the configured shape) with Adam and cross-entropy;
each is warmed up first, then timed over the same number of steps. Prints a
table and writes JSON.

    python bench/train_step.py [--n-mels 128 --frames 431 --batch-size 16 --steps 20]
"""

import argparse
import platform
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from report import report
from torch.utils.data import DataLoader, TensorDataset

from esclab.models import build_model
from esclab.training.module import Classifier

MODEL = {"name": "cnn4"}
OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-4}


def batches(args, device) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = args.batch_size * (args.warmup + args.steps)
    x = torch.randn(n, 1, args.n_mels, args.frames, generator=g)
    y = torch.randint(0, args.classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=args.batch_size)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(args, device) -> float:
    """Samples/s of the textbook loop: forward, loss, backward, step."""
    torch.manual_seed(0)
    model = build_model("cnn4", n_classes=args.classes, input_shape=(args.n_mels, args.frames)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    for step, (x, y, _) in enumerate(batches(args, device)):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        sync(pl_module.device)
        self.end = time.perf_counter()


def lightning_loop(args, device) -> float:
    """Samples/s of esclab's Classifier under lightning.Trainer, logging and metrics included."""
    torch.manual_seed(0)
    module = Classifier(model=MODEL, n_classes=args.classes, input_shape=(args.n_mels, args.frames),
                        optimizer=OPTIMIZER)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(max_epochs=1, accelerator=device.type, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=batches(args, device))
    return args.steps * args.batch_size / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-mels", type=int, default=128)
    parser.add_argument("--frames", type=int, default=431, help="431 = 5 s at 44.1 kHz, hop 512")
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/train_step.json"))
    args = parser.parse_args()
    device = torch.device(args.device)

    plain = plain_loop(args, device)
    lightning = lightning_loop(args, device)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()}, "
                  f"{torch.get_num_threads()} threads)",
        "input": [1, args.n_mels, args.frames], "batch_size": args.batch_size, "timed_steps": args.steps,
        "plain_samples_per_s": round(plain, 2), "lightning_samples_per_s": round(lightning, 2),
        "lightning_over_plain": round(lightning / plain, 3),
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
