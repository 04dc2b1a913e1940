"""`esclab export`: a trained model as one ONNX file, a window of waveform in, class probabilities out.

The file holds the model's whole preprocessing (the front end it was trained on, the
feature cache's float16 rounding, the training rows' normalisation) and every fold's
network, their probabilities averaged (or one fold's), so that a device needs
onnxruntime and numpy only (serving/runtime.py). Its input is one window of the
training length per sample rate the model reads (`waveform_44100` for a log-mel
cnn4, `waveform_16000` for YAMNet, both for YAMNet + aiSFX); its output is
`probabilities`. The metadata entry `esclab` (JSON) names the classes, the window
length, the inputs' rates and the settings.

The graph is built from up to three parts joined with onnx.compose: the front end
(torch, exported with torch.onnx), YAMNet's own quantised graph when the model uses
it (made to take all of a window's patches at once), and the head (torch: the fold
networks). Before anything is written the file is checked against the torch model,
the path `esclab predict` takes, on test clips of the model's length. The int8 copy
beside it has the networks' dense layers quantised by onnxruntime's dynamic
quantisation (the front ends, the convolutions and YAMNet's already 8-bit graph as
they were), and its largest difference from the float file is recorded.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

from esclab.atomic import atomic_dir
from esclab.data.embeddings import grid_indices
from esclab.data.features import LogMel, LogMelSettings, fit
from esclab.errors import EsclabError
from esclab.models.backbones import aisfx, yamnet
from esclab.models.ffn import pool_windows
from esclab.serving.models import FoldEnsemble, load_cross_validation
from esclab.serving.runtime import FORMAT

OPSET = 20  # YAMNet's graph's
TOLERANCE = 1e-3  # the largest |ONNX - torch| class probability the float file may show on the check clips
EXPORTABLE = ("yamnet", "aisfx")  # the backbones whose front ends this file rebuilds for ONNX


def input_name(rate: int) -> str:
    return f"waveform_{rate}"


class LogMelRows(nn.Module):
    """One window (samples,) -> its log-mel row (1, n_mels, frames), as the features stage computes it."""

    def __init__(self, settings: dict):
        super().__init__()
        self.logmel = LogMel(LogMelSettings(**settings))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.logmel(waveform[None, None])[:, 0]


class YamnetPatches(nn.Module):
    """One 16 kHz window -> YAMNet's input, quantised as its graph wants: (patches, 1, 96, 64) uint8.

    The numpy front end of models/backbones/yamnet.py with the same constants, in
    operations ONNX has: the Hann-windowed 512-point DFT of each 400-sample frame is a
    product with the DFT's cosines and sines. It computes in float64 as numpy does: YAMNet
    rounds its input to 8 bits, and float32 arithmetic moved ~0.1 % of a chirp's values
    to the next step, enough to change the probabilities by 2 %.
    """

    def __init__(self, n_samples: int, scale: float, zero_point: int):
        super().__init__()
        self.padding = len(yamnet.pad_for_patches(np.zeros(n_samples))) - n_samples
        n = np.arange(yamnet.WINDOW)
        hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / yamnet.WINDOW)
        angles = 2 * np.pi * np.outer(n, np.arange(yamnet.N_FFT // 2 + 1)) / yamnet.N_FFT
        self.register_buffer("dft", torch.tensor(np.concatenate([np.cos(angles), -np.sin(angles)], axis=1)
                                                 * hann[:, None]))  # (400, 2 x 257): real parts, then imaginary
        self.register_buffer("mel", torch.tensor(yamnet.mel_matrix()))
        n_frames = 1 + (n_samples + self.padding - yamnet.WINDOW) // yamnet.HOP
        self.register_buffer("samples", torch.arange(n_frames)[:, None] * yamnet.HOP + torch.arange(yamnet.WINDOW))
        starts = torch.arange(0, n_frames - yamnet.PATCH + 1, yamnet.PATCH_HOP)
        self.register_buffer("frames", starts[:, None] + torch.arange(yamnet.PATCH))
        self.scale, self.zero_point = scale, zero_point

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = F.pad(waveform.double(), (0, self.padding))
        real, imaginary = (x[self.samples] @ self.dft).chunk(2, dim=1)
        log_mel = torch.log(torch.sqrt(real ** 2 + imaginary ** 2) @ self.mel + yamnet.LOG_OFFSET).float()
        quantised = torch.round(log_mel[self.frames] / self.scale) + self.zero_point
        return quantised.clamp(0, 255).to(torch.uint8)[:, None]


class AisfxEmbeddings(nn.Module):
    """One 44.1 kHz window -> aiSFX's block embeddings (blocks, 512)."""

    def __init__(self, backbone: aisfx.AiSfx):
        super().__init__()
        self.network = backbone.network
        self.register_buffer("filters", backbone.filters)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.network(aisfx.blocks(waveform, self.filters))


class FrontEnd(nn.Module):
    """The model's inputs (one window per rate) -> one output per part, each part reading the input of its rate."""

    def __init__(self, parts: list[nn.Module], reads: list[int]):
        super().__init__()
        self.parts, self.reads = nn.ModuleList(parts), reads

    def forward(self, *waveforms: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(part(waveforms[i]) for part, i in zip(self.parts, self.reads))


class Head(nn.Module):
    """The front end's outputs -> the fold networks' mean probabilities (classes,).

    Embeddings of several backbones are first put on one grid of windows (`grid`:
    for each backbone, which of its windows each grid window takes), side by side,
    as the embedding cache holds them; every row is rounded through float16 as the
    cache stores it.
    """

    def __init__(self, networks: list[nn.Module], grid: list[np.ndarray] | None = None):
        super().__init__()
        self.networks = nn.ModuleList(networks)
        self.grid = [torch.as_tensor(index) for index in grid] if grid else None

    def forward(self, *parts: torch.Tensor) -> torch.Tensor:
        rows = torch.cat([p[i] for p, i in zip(parts, self.grid)], dim=1)[None] if self.grid else parts[0]
        rows = rows.half().float()
        return torch.stack([network(rows) for network in self.networks]).mean(dim=0)[0]


class LinearHead(nn.Module):
    """A fitted scikit-learn head (models/heads.py: pool the windows, standardise, then logistic regression or the
    calibrated linear SVM) as the same arithmetic in torch: rows (1, windows, dim) -> probabilities (1, classes),
    with a zero for each class its training rows lacked, as `class_probabilities` gives them."""

    def __init__(self, pipeline, n_classes: int, path: Path):
        super().__init__()
        pooling, scaler, classifier = (step for _, step in pipeline.steps)
        self.how = pooling.func.keywords["how"]
        if len(pipeline.classes_) < 3:
            raise EsclabError(f"{path} is a scikit-learn head trained on {len(pipeline.classes_)} classes; esclab "
                              "export takes heads of three or more: train model=ffn for this data")
        if hasattr(classifier, "calibrated_classifiers_"):  # the SVM: one-against-rest margins, each Platt-scaled
            (calibrated,) = classifier.calibrated_classifiers_
            linear, calibrators = calibrated.estimator, calibrated.calibrators
            platt = np.array([[c.a_, c.b_] for c in calibrators], dtype=np.float32).T
        else:
            linear, platt = classifier, None
        self.platt = None if platt is None else torch.from_numpy(platt)
        self.mean = torch.tensor(scaler.mean_, dtype=torch.float32)
        self.scale = torch.tensor(scaler.scale_, dtype=torch.float32)
        self.weight = torch.tensor(linear.coef_.T, dtype=torch.float32)
        self.bias = torch.tensor(linear.intercept_, dtype=torch.float32)
        spread = np.zeros((len(pipeline.classes_), n_classes), dtype=np.float32)
        spread[np.arange(len(pipeline.classes_)), pipeline.classes_] = 1
        self.spread = torch.from_numpy(spread)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        pooled = pool_windows(rows, self.how)[0]
        scores = ((pooled - self.mean) / self.scale) @ self.weight + self.bias
        if self.platt is None:
            probabilities = torch.softmax(scores, dim=0)
        else:
            probabilities = torch.sigmoid(-(self.platt[0] * scores + self.platt[1]))
        full = probabilities @ self.spread
        return (full / full.sum())[None]


def networks_of(ensemble: FoldEnsemble) -> list[nn.Module]:
    """Each fold model as a torch module, raw rows (1, ...) -> probabilities (1, classes)."""
    n_classes = len(ensemble.classes)
    return [model.network if model.network is not None else LinearHead(model.pipeline, n_classes, model.path)
            for model in ensemble.models]


def to_onnx(module: nn.Module, example: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str]
            ) -> onnx.ModelProto:
    program = torch.onnx.export(module.eval(), example, input_names=inputs, output_names=outputs,
                                opset_version=OPSET, dynamo=True, verbose=False)
    return program.model_proto


def joined(first: onnx.ModelProto, second: onnx.ModelProto, io_map: list[tuple[str, str]], prefix: str
           ) -> onnx.ModelProto:
    """`second` fed by `first` along `io_map` (output, input), `second`'s inner names prefixed (its outputs keep
    theirs)."""
    ir_version = max(first.ir_version, second.ir_version)
    first.ir_version = second.ir_version = ir_version
    second = onnx.compose.add_prefix(second, prefix, rename_outputs=False)
    model = onnx.compose.merge_models(first, second, [(out, prefix + name) for out, name in io_map])
    unique = {(opset.domain, opset.version): opset for opset in model.opset_import}  # merging lists each twice
    del model.opset_import[:]
    model.opset_import.extend(unique.values())
    return model


def yamnet_body(backbone: yamnet.YamNet, n_patches: int) -> onnx.ModelProto:
    """YAMNet's quantised graph taking a window's `n_patches` patches at once and giving their embeddings
    (`yamnet`, n_patches x 1024); the class-score layer it no longer needs is dropped."""
    model = yamnet.load_graph(backbone.weights)
    graph = model.graph
    graph.input[0].type.tensor_type.shape.dim[0].dim_value = n_patches
    del graph.value_info[:]  # the inner tensors' shapes, recorded for a batch of one patch
    reshape = next(node for node in graph.node if node.output == [yamnet.EMBEDDING])
    shape = next(t for t in graph.initializer if t.name == reshape.input[1])
    shape.CopyFrom(onnx.numpy_helper.from_array(np.array([n_patches, -1], dtype=np.int64), shape.name))
    graph.node.append(onnx.helper.make_node("Identity", [yamnet.EMBEDDING], ["yamnet"]))
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info("yamnet", onnx.TensorProto.FLOAT,
                                                                 [n_patches, yamnet.EMBEDDING_DIM]))
    needed, kept = {"yamnet"}, []
    for node in reversed(graph.node):  # the graph is in topological order: keep what the new output needs
        if needed & set(node.output):
            kept.append(node)
            needed |= set(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    unused = [t for t in graph.initializer if t.name not in needed]
    for tensor in unused:
        graph.initializer.remove(tensor)
    return model


def logmel_graph(ensemble: FoldEnsemble, networks: list[nn.Module]) -> tuple[onnx.ModelProto, list[int]]:
    settings = ensemble.preprocessing["settings"]
    rate = settings["sample_rate"]
    window = torch.zeros(round(settings["duration"] * rate))
    front = LogMelRows(settings)
    graph = to_onnx(front, (window,), [input_name(rate)], ["rows"])
    with torch.inference_mode():
        rows = front(window)
    head = to_onnx(Head(networks), (rows,), ["rows"], ["probabilities"])
    return joined(graph, head, [("rows", "rows")], prefix="head/"), [rate]


def embedding_graph(ensemble: FoldEnsemble, networks: list[nn.Module]) -> tuple[onnx.ModelProto, list[int]]:
    settings = ensemble.preprocessing["settings"]
    backbones = ensemble.frontend.backbones
    rates = list(dict.fromkeys(b.sample_rate for b in backbones))
    windows = tuple(torch.zeros(round(settings["duration"] * rate)) for rate in rates)
    reads = [rates.index(b.sample_rate) for b in backbones]
    parts = [YamnetPatches(len(windows[i]), b.in_scale, b.in_zero) if b.name == "yamnet" else AisfxEmbeddings(b)
             for b, i in zip(backbones, reads)]
    front = FrontEnd(parts, reads)
    names = [b.name for b in backbones]
    produced = ["yamnet_patches" if name == "yamnet" else name for name in names]
    graph = to_onnx(front, windows, [input_name(rate) for rate in rates], produced)
    with torch.inference_mode():
        embeddings = list(front(*windows))
    if "yamnet" in names:
        i = names.index("yamnet")
        graph = joined(graph, yamnet_body(backbones[i], len(embeddings[i])), [("yamnet_patches", "audio")],
                       prefix="yamnet/")
        embeddings[i], produced[i] = torch.zeros(len(embeddings[i]), yamnet.EMBEDDING_DIM), "yamnet"
    head = Head(networks, grid_indices([len(e) for e in embeddings], backbones))
    head_graph = to_onnx(head, tuple(embeddings), names, ["probabilities"])
    return joined(graph, head_graph, list(zip(produced, names)), prefix="head/"), rates


def check_clips(rate: int, n_samples: int, seed: int = 0) -> list[np.ndarray]:
    """Clips of the model's length with what real recordings have: noise, a tone, a chirp, bursts between
    silences, silence, a clipped loud sound."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_samples) / rate
    bursts = rng.normal(0, 0.3, n_samples) * (np.sin(2 * np.pi * 0.8 * t) > 0.6)
    chirp = 0.5 * np.sin(2 * np.pi * (200 + 1500 * t) * t)
    clipped = np.clip(3 * rng.normal(0, 0.5, n_samples) * np.hanning(n_samples), -1, 1)
    clips = [rng.normal(0, 0.1, n_samples), 0.3 * np.sin(2 * np.pi * 440 * t), chirp, bursts,
             np.zeros(n_samples), clipped]
    return [clip.astype(np.float32) for clip in clips]


def graph_inputs(clip: np.ndarray, rates: list[int], duration: float) -> dict[str, np.ndarray]:
    """A check clip (at rates[0]) as the graph's inputs, resampled to each rate as the torch path resamples it."""
    return {input_name(r): fit(clip, rates[0], sample_rate=r, n_samples=round(duration * r)) for r in rates}


def onnx_probabilities(session, windows: dict[str, np.ndarray]) -> np.ndarray:
    return session.run(["probabilities"], windows)[0]


def verified(model_bytes: bytes, ensemble: FoldEnsemble, rates: list[int]) -> float:
    """The largest |ONNX - torch| probability over the check clips; refused above TOLERANCE."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    duration, worst = ensemble.duration, 0.0
    for clip in check_clips(rates[0], round(duration * rates[0])):
        expected = ensemble.predict_windows([clip], rates[0])[0]
        worst = max(worst, float(np.abs(onnx_probabilities(session, graph_inputs(clip, rates, duration))
                                        - expected).max()))
    if worst > TOLERANCE:
        raise EsclabError(f"the exported graph's probabilities differ from the torch model's by {worst:.2g} "
                          f"(> {TOLERANCE}): this is a bug in esclab export, please report it")
    return worst


def check_exportable(ensemble: FoldEnsemble, models_dir: Path) -> None:
    """Refuse models whose front end cannot become ONNX: fine-tuned Hugging Face models (features=waveform) and
    heads on Hugging Face encoders, whose feature extractors run in numpy."""
    p = ensemble.preprocessing
    others = [name for name in p["settings"].get("backbones", []) if name not in EXPORTABLE]
    if p["representation"] == "waveform" or others:
        what = "+".join(others) or "fine-tuned Hugging Face"
        raise EsclabError(f"{models_dir} holds {what} models, whose feature extractor esclab export cannot turn into "
                          "ONNX (it exports log-mel models and heads on yamnet/aisfx embeddings): use esclab predict "
                          "or esclab serve with these checkpoints")


def export(models_dir: Path, out_dir: Path, fold: int | None = None, int8: bool = True) -> dict:
    """Write `model.onnx` (and `model.int8.onnx`) and `export.json` into `out_dir`, all or nothing; the record."""
    ensemble = load_cross_validation(models_dir, fold)
    check_exportable(ensemble, models_dir)
    networks = networks_of(ensemble)
    weights = sum(t.numel() * t.element_size() for network in networks for t in network.state_dict().values())
    if weights >= 2**31 - 2**27:  # what ONNX keeps in one file, less room for the front end
        raise EsclabError(f"the {len(networks)} fold networks' weights are {weights / 1e9:.1f} GB, over ONNX's 2 GB "
                          "limit for one file: export one fold's model with --fold <k>")
    build = logmel_graph if ensemble.preprocessing["representation"] == "logmel" else embedding_graph
    model, rates = build(ensemble, networks)
    p = ensemble.preprocessing
    meta = {"format": FORMAT, "classes": p["classes"], "duration": float(p["settings"]["duration"]),
            "inputs": {input_name(rate): rate for rate in rates}, "representation": p["representation"],
            "settings": p["settings"], "folds": [m.path.name for m in ensemble.models]}
    onnx.helper.set_model_props(model, {"esclab": json.dumps(meta)})
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    record = {**meta, "verified_max_abs_difference": verified(data, ensemble, rates), "tolerance": TOLERANCE}
    with atomic_dir(out_dir) as tmp:
        (tmp / "model.onnx").write_bytes(data)
        record["bytes"] = {"model.onnx": len(data)}
        if int8:
            record |= quantised(tmp / "model.onnx", tmp / "model.int8.onnx", rates, p)
            record["bytes"]["model.int8.onnx"] = (tmp / "model.int8.onnx").stat().st_size
        (tmp / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def is_network_weight(name: str) -> bool:
    """A trained model's weight (the head's `networks.<k>.*`, aiSFX's `parts.<k>.network.*`), unlike the front ends'
    fixed transforms (DFT, mel filters), which make the features and stay in float."""
    return "networks." in name or ".network." in name


def with_gemm_as_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each network Gemm (a Linear layer) as MatMul + Add: onnxruntime's dynamic int8 quantises MatMul, not Gemm."""
    weights = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or not is_network_weight(node.input[1]) or attributes.get("transA", 0)
                or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = onnx.numpy_helper.to_array(weights[node.input[1]])
        weights[node.input[1]].CopyFrom(onnx.numpy_helper.from_array(
            np.ascontiguousarray(weight.T if attributes.get("transB", 0) else weight), node.input[1]))
        product = node.output[0] + "_product"
        nodes.append(onnx.helper.make_node("MatMul", node.input[:2], [product], name=node.name))
        nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], node.output, name=node.name + "_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]  # shapes recorded for the weights as they were; inferred again when quantising
    return model


def quantised(source: Path, target: Path, rates: list[int], preprocessing: dict) -> dict:
    """The int8 copy: the networks' dense layers quantised (the front ends as they were, YAMNet's graph already is);
    its difference from the float file on the check clips."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = with_gemm_as_matmul(onnx.load(str(source)))
    # Dense layers only: they hold most of the weights (cnn4's first one 110 M of its 111 M), and onnxruntime's
    # int8 convolution (ConvInteger) ran aiSFX 4.9x slower than float here (471 vs 97 ms per clip, bench/predict.py).
    layers = [n.name for n in model.graph.node if n.op_type == "MatMul" and is_network_weight(n.input[1])]
    onnx.save(model, str(target))
    quantize_dynamic(target, target, weight_type=QuantType.QInt8, nodes_to_quantize=layers)
    sessions = [onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                for path in (source, target)]
    duration, worst, agree, clips = float(preprocessing["settings"]["duration"]), 0.0, 0, 0
    for clip in check_clips(rates[0], round(duration * rates[0]), seed=1):
        windows = graph_inputs(clip, rates, duration)
        full, small = (onnx_probabilities(s, windows) for s in sessions)
        worst = max(worst, float(np.abs(full - small).max()))
        agree, clips = agree + int(full.argmax() == small.argmax()), clips + 1
    return {"int8_max_abs_difference": worst, "int8_same_top_class": f"{agree}/{clips}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="esclab export", description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models"),
                        help="folder of the cross-validation's fold_<k>.ckpt (default: the workspace's models/)")
    parser.add_argument("--fold", type=int, help="export this fold's model only (default: all folds, averaged)")
    parser.add_argument("--out", type=Path, default=Path("exported"), help="folder to write (default: exported/)")
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 copy")
    args = parser.parse_args(argv)
    record = export(args.models, args.out, args.fold, args.int8)
    sizes = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in record["bytes"].items())
    print(f"esclab export: {args.out}/ ({sizes}); matches the torch model within "
          f"{record['verified_max_abs_difference']:.1e} (tolerance {TOLERANCE})")
    return 0
