"""Training throughput: the Lightning loop against a plain PyTorch loop, and what each fast-path switch adds.

Both loops train the same freshly initialised cnn4 on the same batches (random
log-mels of the configured shape) with Adam and cross-entropy, once per variant:

    fp32           the default: float32, each batch copied from host memory
    resident       batches sliced from a tensor already on the device (train.resident)
    bf16-mixed     bf16 autocast (trainer.precision=bf16-mixed)
    channels_last  NHWC weights (train.channels_last)
    compiled       torch.compile (train.compile)
    fast           all of the above at once (trainer=gpu_fast train.channels_last=true train.compile=true)

Each (variant, loop) pair is warmed up first (compilation included), then timed
over the same number of steps. Prints a table and writes JSON.

    python bench/train_step.py [--n-mels 128 --frames 431 --batch-size 16 --steps 20 --variants fp32,bf16-mixed]

With `--families`, it times the fine-tuning recipes instead (finetune_families.py):
each family's full-size architecture, at its named experiment's batch size, on 5-s
clips, each in a fresh process; then the size of the backbone, the memory a training
step adds, and what a 5-fold run of the experiment would take at the measured rate.

    python bench/train_step.py --families wav2vec2,whisper,ast,resnet50 [--steps 3 --warmup 1]
"""

import argparse
import platform
import time
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from finetune_families import FAMILIES, finetune_families
from report import parse_args, report
from torch.utils.data import DataLoader, TensorDataset

from esclab.models import build_model
from esclab.training.data import ResidentBatches
from esclab.training.module import Classifier
from esclab.training.run import speed_up

MODEL = {"name": "cnn4"}
OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-4}


@dataclass(frozen=True)
class Variant:
    resident: bool = False
    precision: str = "32-true"  # a lightning.Trainer precision
    channels_last: bool = False
    compile: bool = False


VARIANTS = {
    "fp32": Variant(),
    "resident": Variant(resident=True),
    "bf16-mixed": Variant(precision="bf16-mixed"),
    "channels_last": Variant(channels_last=True),
    "compiled": Variant(compile=True),
    "fast": Variant(resident=True, precision="bf16-mixed", channels_last=True, compile=True),
}


def batches(args, device, resident: bool) -> DataLoader | ResidentBatches:
    g = torch.Generator().manual_seed(0)
    n = args.batch_size * (args.warmup + args.steps)
    x = torch.randn(n, 1, args.n_mels, args.frames, generator=g)
    y = torch.randint(0, args.classes, (n,), generator=g)
    if resident:
        return ResidentBatches(x.to(device), y.to(device), torch.arange(n), args.batch_size)
    return DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=args.batch_size)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(args, device, v: Variant) -> float:
    """Samples/s of the textbook loop: forward, loss, backward, step."""
    torch.manual_seed(0)
    model = build_model("cnn4", n_classes=args.classes, input_shape=(args.n_mels, args.frames)).to(device)
    speed_up(model, channels_last=v.channels_last, compile=v.compile)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    for step, (x, y, _) in enumerate(batches(args, device, v.resident)):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=v.precision == "bf16-mixed"):
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


def lightning_loop(args, device, v: Variant) -> float:
    """Samples/s of esclab's Classifier under lightning.Trainer, logging and metrics included."""
    torch.manual_seed(0)
    module = Classifier(model=MODEL, n_classes=args.classes, input_shape=(args.n_mels, args.frames),
                        optimizer=OPTIMIZER)
    speed_up(module.model, channels_last=v.channels_last, compile=v.compile)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(max_epochs=1, accelerator=device.type, devices=1, precision=v.precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=batches(args, device, v.resident))
    return args.steps * args.batch_size / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-mels", type=int, default=128)
    parser.add_argument("--frames", type=int, default=431, help="431 = 5 s at 44.1 kHz, hop 512")
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (a compiled variant compiles here)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--families", default=None,
                        help=f"time these fine-tuning recipes instead, comma-separated, of: {', '.join(FAMILIES)}")
    args = parse_args(parser, "train_step")
    if args.families:
        return report(finetune_families(args), args.out)
    names = args.variants.split(",")
    if unknown := set(names) - set(VARIANTS):
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    device = torch.device(args.device)

    rows = []
    for name in names:
        plain, lightning = plain_loop(args, device, VARIANTS[name]), lightning_loop(args, device, VARIANTS[name])
        rows.append({"variant": name, "plain_samples_per_s": round(plain, 2),
                     "lightning_samples_per_s": round(lightning, 2),
                     "lightning_over_plain": round(lightning / plain, 3)})
    if "fp32" in names:
        base = rows[names.index("fp32")]
        for row in rows:
            row["lightning_over_fp32"] = round(row["lightning_samples_per_s"] / base["lightning_samples_per_s"], 3)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()}, "
                  f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "input": [1, args.n_mels, args.frames], "batch_size": args.batch_size,
        "warmup_steps": args.warmup, "timed_steps": args.steps,
        "variants": rows,
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
