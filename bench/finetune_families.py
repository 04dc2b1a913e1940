"""The fine-tuning recipes' training step (train_step.py --families): speed, backbone size, step memory, and a
whole 5-fold run extrapolated from the measured rate.

No pretrained weights can be fetched here, and none are needed to time a step: each
family's architecture is built at the size of the checkpoint its experiment names,
with random weights, saved with `save_pretrained` (ResNet50: `model.weights=none`),
and trained through esclab's own learner with the experiment's settings (batch
size, frozen feature encoder, the backbone's parameter group, bf16 autocast on a
GPU as trainer=gpu_fast). Each family runs in a fresh process, so its peak memory
is its own.
"""

import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
FAMILIES = {"wav2vec2": "wav2vec2_finetune", "whisper": "whisper_finetune", "ast": "ast_finetune",
            "resnet50": "resnet50"}
CLIP_SECONDS = 5.0  # ESC-50's clips
# ESC-50 per fold: 1600 clips of the other folds, 20 % of them carved out for validation (train.val_fraction), and
# the 400 of the test fold; an evaluation step is taken to cost a third of a training step (forward only).
TRAIN_CLIPS, VAL_CLIPS, TEST_CLIPS, FOLDS, EVAL_COST = 1280, 320, 400, 5, 1 / 3


def hub_architectures() -> dict:
    """(config, feature extractor) of each Hugging Face family at its experiment's checkpoint's size."""
    import transformers as T

    return {
        "wav2vec2": (T.Wav2Vec2Config(), T.Wav2Vec2FeatureExtractor()),  # the defaults are facebook/wav2vec2-base's
        "whisper": (T.WhisperConfig(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048,
                                    decoder_layers=6, decoder_attention_heads=8, decoder_ffn_dim=2048,
                                    num_mel_bins=80), T.WhisperFeatureExtractor()),  # openai/whisper-base
        "ast": (T.ASTConfig(), T.ASTFeatureExtractor()),  # MIT/ast-finetuned-audioset-10-10-0.4593's: the defaults
    }


def experiment_config(family: str, folder: Path):
    checkpoint = ["model.weights=none"] if family == "resnet50" else [f"model.checkpoint={folder}"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"experiment={FAMILIES[family]}", *checkpoint])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(family: str, args) -> dict:
    """One family's row, in a process of its own."""
    from esclab.training.module import Classifier

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        if family in hub_architectures():
            import transformers

            config, extractor = hub_architectures()[family]
            transformers.AutoModelForAudioClassification.from_config(config).save_pretrained(folder)
            extractor.save_pretrained(folder)
        cfg = experiment_config(family, Path(folder))
        c = OmegaConf.to_container(cfg, resolve=True)
        representation, samples = cfg.features.representation, round(CLIP_SECONDS * cfg.features.sample_rate)
        if representation == "waveform":
            shape = (1, samples)
        else:  # the log-mel of a 5-s clip as the features stage makes it
            shape = (1, cfg.features.n_mels, 1 + samples // cfg.features.hop_length)
        torch.manual_seed(0)
        module = Classifier(model=c["model"], n_classes=50, input_shape=shape[1:], optimizer=c["optimizer"],
                            scheduler=c["scheduler"] or None,
                            preprocessing={"representation": representation}).to(device)
    optimizers = module.configure_optimizers()
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
    batch = cfg.train.batch_size
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    y = torch.randint(0, 50, (batch,), generator=torch.Generator().manual_seed(1)).to(device)
    params = list(module.model.parameters())
    module.train()
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(module(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    samples_per_s = args.steps * batch / (time.perf_counter() - start)
    epochs = cfg.trainer.max_epochs
    fold_s = (epochs * (TRAIN_CLIPS + EVAL_COST * VAL_CLIPS) + EVAL_COST * TEST_CLIPS) / samples_per_s
    return {"family": family, "experiment": FAMILIES[family], "batch_size": batch,
            "precision": "bf16-mixed" if device.type == "cuda" else "fp32",
            "parameters_M": round(sum(p.numel() for p in params) / 1e6, 1),
            "trained_M": round(sum(p.numel() for p in params if p.requires_grad) / 1e6, 1),
            "weights_MB": round(sum(p.numel() * p.element_size() for p in params) / 2**20),
            "samples_per_s": round(samples_per_s, 2),
            "step_memory_GB": round((peak - before) / 2**30, 2),
            "epochs": epochs, "five_fold_hours": round(FOLDS * fold_s / 3600, 2)}


def finetune_families(args) -> dict:
    """Every family of `args.families`, each in a fresh process."""
    names = args.families.split(",")
    if unknown := set(names) - set(FAMILIES):
        raise SystemExit(f"--families: unknown {', '.join(sorted(unknown))}; choose from {', '.join(FAMILIES)}")
    rows = []
    for name in names:
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            rows.append(pool.submit(measure, name, args).result())
    device = torch.device(args.device)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
        "clip_seconds": CLIP_SECONDS, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "memory": "GPU: peak allocated during the steps less before them; CPU: peak RSS less RSS before them",
        "five_fold": f"{FOLDS} folds x epochs x ({TRAIN_CLIPS} training + {VAL_CLIPS} validation clips at "
                     f"{EVAL_COST:.2f} of a training step's cost) + {TEST_CLIPS} test clips, at samples_per_s",
        "families": rows,
    }
