"""Training throughput: the Lightning loop against a plain PyTorch loop, and what each fast-path switch adds.

Both loops train the same freshly initialised cnn4 on the same batches (random
log-mels of the configured shape) with Adam and cross-entropy, once per variant:

    fp32           the default: float32, each batch copied from host memory
    resident       batches sliced from a tensor already on the device (train.resident)
    bf16-mixed     bf16 autocast (trainer.precision=bf16-mixed)
    channels_last  NHWC weights (train.channels_last)
    compiled       torch.compile (train.compile)
    fast           all of the above at once (trainer=gpu_fast train.channels_last=true train.compile=true)

Each (variant, loop) pair is built and warmed up once (compilation included).
Then --repeats rounds each time every pair over the same number of steps, the
pairs interleaved (fp32 plain, fp32 Lightning, resident plain, ...) and in
reverse order every other round, so that a slow spell on a shared machine lands
on all of them alike and a drift within a round cancels out. Reported per pair:
the median samples/s and its interquartile range over the rounds; per
comparison (Lightning over plain, each variant's Lightning over fp32's) the
median and interquartile range of the ratios taken within the same rounds, and
a verdict: "inconclusive" when that range contains 1.0, is wider than
report.SPREAD_LIMIT (20 %) of the median, or rests on fewer than 3 rounds;
otherwise ">1" or "<1". Prints a table and writes JSON.

    python bench/train_step.py [--n-mels 128 --frames 431 --steps 20 --repeats 5 --variants fp32,bf16-mixed]

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
from itertools import islice

import lightning as L
import torch
import torch.nn.functional as F
from finetune_families import FAMILIES, finetune_families
from report import SPREAD_LIMIT, paired_ratio, parse_args, report, spread
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
    n = args.batch_size * max(args.warmup, args.steps)
    x = torch.randn(n, 1, args.n_mels, args.frames, generator=g)
    y = torch.randint(0, args.classes, (n,), generator=g)
    if resident:
        return ResidentBatches(x.to(device), y.to(device), torch.arange(n), args.batch_size)
    return DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=args.batch_size)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class PlainLoop:
    """The textbook loop: forward, loss, backward, step. Called with a number of steps, it returns their samples/s,
    timed from the start of the first batch (once fetched) to the end of the last, as StepTimer times Lightning's."""

    def __init__(self, args, device, v: Variant):
        torch.manual_seed(0)
        self.model = build_model("cnn4", n_classes=args.classes, input_shape=(args.n_mels, args.frames)).to(device)
        speed_up(self.model, channels_last=v.channels_last, compile=v.compile)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.data, self.device, self.v, self.batch_size = batches(args, device, v.resident), device, v, args.batch_size

    def __call__(self, steps: int) -> float:
        self.model.train()
        for step, (x, y, _) in enumerate(islice(self.data, steps)):
            if step == 0:
                sync(self.device)
                start = time.perf_counter()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.v.precision == "bf16-mixed"):
                loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        sync(self.device)
        return steps * self.batch_size / (time.perf_counter() - start)


class StepTimer(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync(pl_module.device)
        self.end = time.perf_counter()


class LightningLoop:
    """esclab's Classifier under lightning.Trainer, logging and metrics included; a fresh Trainer per call, the
    module (and its compiled network) kept, the Trainer's start-up outside the timed span."""

    def __init__(self, args, device, v: Variant):
        torch.manual_seed(0)
        self.module = Classifier(model=MODEL, n_classes=args.classes, input_shape=(args.n_mels, args.frames),
                                 optimizer=OPTIMIZER)
        speed_up(self.module.model, channels_last=v.channels_last, compile=v.compile)
        self.data, self.device, self.v, self.batch_size = batches(args, device, v.resident), device, v, args.batch_size

    def __call__(self, steps: int) -> float:
        timer = StepTimer()
        trainer = L.Trainer(max_epochs=1, limit_train_batches=steps, accelerator=self.device.type, devices=1,
                            precision=self.v.precision, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                            num_sanity_val_steps=0)
        trainer.fit(self.module, train_dataloaders=self.data)
        return steps * self.batch_size / (timer.end - timer.start)


LOOPS = {"plain": PlainLoop, "lightning": LightningLoop}


def interleaved_rounds(args, device, names: list[str]) -> dict[tuple[str, str], list[float]]:
    """Samples/s of every (variant, loop) pair in each of --repeats rounds, after one warm-up call per pair."""
    loops = {(name, kind): LOOPS[kind](args, device, VARIANTS[name]) for name in names for kind in LOOPS}
    for loop in loops.values():
        loop(args.warmup)
    measured = {pair: [] for pair in loops}
    for round_ in range(args.repeats):
        for pair in list(loops)[:: -1 if round_ % 2 else 1]:
            measured[pair].append(loops[pair](args.steps))
    return measured


def comparison(prefix: str, numerators: list[float], denominators: list[float]) -> dict:
    ratio = paired_ratio(numerators, denominators)
    return {prefix: ratio["median"], f"{prefix}_iqr": ratio["iqr"], f"{prefix}_verdict": ratio["verdict"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-mels", type=int, default=128)
    parser.add_argument("--frames", type=int, default=431, help="431 = 5 s at 44.1 kHz, hop 512")
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (a compiled variant compiles here)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, every variant and loop in each")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--families", default=None,
                        help=f"time these fine-tuning recipes instead, comma-separated, of: {', '.join(FAMILIES)}")
    args = parse_args(parser, "train_step")
    if args.families:
        result = finetune_families(args)
        return report(result, args.out, title=f"one training step of each fine-tuning recipe on {result['device']}, "
                      f"at its experiment's batch size, {result['timed_steps']} timed steps",
                      headline="; ".join(f"{r['family']} {r['samples_per_s']} samples/s ({r['precision']}, "
                                         f"{r['trained_M']} M trained), step memory {r['step_memory_GB']} GB, 5 folds "
                                         f"~{r['five_fold_hours']} h" for r in result["families"]))
    names = args.variants.split(",")
    if unknown := set(names) - set(VARIANTS):
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    device = torch.device(args.device)

    measured = interleaved_rounds(args, device, names)
    rows = []
    for name in names:
        plain, lightning = measured[name, "plain"], measured[name, "lightning"]
        row = {"variant": name}
        for kind, values in (("plain", plain), ("lightning", lightning)):
            summary = spread(values)
            row |= {f"{kind}_samples_per_s": summary["median"], f"{kind}_iqr": summary["iqr"]}
        row |= comparison("lightning_over_plain", lightning, plain)
        if "fp32" in names:
            row |= comparison("lightning_over_fp32", lightning, measured["fp32", "lightning"])
        rows.append(row)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()}, "
                  f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "input": [1, args.n_mels, args.frames], "batch_size": args.batch_size,
        "warmup_steps": args.warmup, "timed_steps": args.steps, "rounds": args.repeats,
        "spread": "IQR over rounds, ratios paired per round",
        "inconclusive_when": f"ratio IQR holds 1.0 or > {SPREAD_LIMIT:.0%} of median, or < 3 rounds",
        "variants": rows,
    }
    report(result, args.out, title=f"cnn4 training step, Lightning vs a plain loop per fast-path variant, input "
           f"1x{args.n_mels}x{args.frames}, batch {args.batch_size}, {result['device']}, {args.repeats} interleaved "
           f"rounds of {args.steps} steps", headline="; ".join(
               f"{r['variant']} {r['lightning_samples_per_s']:g} samples/s (Lightning/plain "
               f"{r['lightning_over_plain']:g} `{r['lightning_over_plain_verdict']}`"
               + (f", over fp32 {r['lightning_over_fp32']:g} `{r['lightning_over_fp32_verdict']}`"
                  if r["variant"] != "fp32" and "lightning_over_fp32" in r else "") + ")" for r in rows))


if __name__ == "__main__":
    main()
