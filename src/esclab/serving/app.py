"""`esclab serve`: a page to record (or upload) a sound and see the model's top classes, and a JSON endpoint.

FastAPI rather than Gradio, the usual ML demo kit: FastAPI and uvicorn are already
installed with MLflow, while Gradio would add a large dependency tree for a page
that is one small HTML file (page.html: inline JS/CSS, no CDN, it works offline).

The model is loaded once at start, as `esclab predict` loads it, and an upload is
predicted exactly as `predict` predicts a file (serving/predict.py's predict_audio).
An upload is the raw bytes of an audio file as the request body; the page records
with MediaRecorder and sends that recording as a 16-bit WAV it encodes itself
(Chromium records WebM/Opus, which libsndfile cannot read). A bad upload (empty,
too large, not audio, too long) gets a 4xx and {"error": "<problem and fix>"}.
"""

import argparse
import base64
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf

from esclab.data.audio import decode
from esclab.errors import EsclabError
from esclab.serving.predict import add_model_arguments, as_records, predict_audio
from esclab.serving.sources import load_model

PAGE = Path(__file__).with_name("page.html")
UPLOAD_FIX = "send a WAV, FLAC or OGG file, or record one with the page's Record button"


class BadUpload(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def spectrogram_png(mono: np.ndarray, rate: int, preprocessing: dict) -> bytes:
    """The whole recording's log-mel spectrogram in dB (the model's mel settings where it has them), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import torch
    from matplotlib.figure import Figure

    from esclab.data.features import LogMel, LogMelSettings, fit

    settings = LogMelSettings(**preprocessing["settings"]) if preprocessing["representation"] == "logmel" else \
        LogMelSettings(sample_rate=16000, n_fft=1024, hop_length=256, n_mels=64)
    settings = replace(settings, normalize="none", top_db=80.0)
    seconds = len(mono) / rate
    clip = fit(mono, rate, sample_rate=settings.sample_rate, n_samples=max(1, round(seconds * settings.sample_rate)))
    with torch.inference_mode():
        db = LogMel(settings)(torch.from_numpy(clip)[None, None])[0, 0].numpy()
    figure = Figure(figsize=(7, 2.4), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(db, origin="lower", aspect="auto", cmap="magma", extent=(0, seconds, 0, settings.n_mels))
    axes.set_xlabel("seconds")
    axes.set_ylabel("mel band")
    figure.colorbar(image, ax=axes, label="dB", pad=0.01)
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


class Service:
    """The loaded model and the limits an upload must keep; body bytes -> the JSON answer."""

    def __init__(self, model, *, top_k: int, hop: float, max_bytes: int, max_seconds: float):
        self.model, self.hop = model, hop
        self.top_k = min(top_k, len(model.classes))
        self.max_bytes, self.max_seconds = max_bytes, max_seconds

    def too_large(self, size: int | None) -> BadUpload:
        said = f"{size / 1e6:.1f} MB" if size else "larger"
        return BadUpload(413, f"the upload is {said}, over this server's limit of {self.max_bytes / 1e6:g} MB: send a "
                              "shorter clip, or restart esclab serve with a larger --max-upload-mb")

    def answer(self, body: bytes, name: str, spectrogram: bool) -> dict:
        if not body:
            raise BadUpload(400, "the request body is empty: send the audio file's bytes as the body, e.g. "
                                 "curl --data-binary @clip.wav")
        if len(body) > self.max_bytes:
            raise self.too_large(len(body))
        try:  # the length from the header first: a long recording is refused before it is decoded
            info = sf.info(io.BytesIO(body))
        except (sf.LibsndfileError, RuntimeError) as err:
            raise BadUpload(415, f"the upload is not audio that esclab can read ({getattr(err, 'error_string', err)}); "
                                 f"{UPLOAD_FIX}") from None
        if info.frames / info.samplerate > self.max_seconds:
            raise BadUpload(413, f"the recording is {info.frames / info.samplerate:.1f} s long, over this server's "
                                 f"limit of {self.max_seconds:g} s: send a shorter clip, or restart esclab serve with "
                                 "a larger --max-seconds")
        try:
            mono, rate = decode(io.BytesIO(body), UPLOAD_FIX, name="the upload")
        except EsclabError as err:
            raise BadUpload(422, str(err)) from None
        result = predict_audio(mono, rate, self.model, self.hop, name=name)
        (record,) = as_records([result], self.model.classes, self.top_k)
        record["classes"] = self.model.classes
        if spectrogram:
            png = spectrogram_png(mono, rate, self.model.preprocessing)
            record["spectrogram"] = "data:image/png;base64," + base64.b64encode(png).decode()
        return record


def create_app(service: Service):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="esclab", docs_url=None, redoc_url=None)
    page = PAGE.read_text()

    @app.exception_handler(BadUpload)
    async def bad_upload(request: Request, err: BadUpload) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.post("/api/predict")
    async def predict(request: Request, name: str = "upload", spectrogram: bool = False) -> dict:
        """The raw audio file as the body; ?spectrogram=true adds the clip's spectrogram as a PNG data URL."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > service.max_bytes:
            raise service.too_large(int(length))  # refused before it is read
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > service.max_bytes:
                raise service.too_large(None)
        return await run_in_threadpool(service.answer, bytes(body), name, spectrogram)

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="esclab serve", description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("-k", "--top-k", type=int, default=2, help="classes shown per recording (default 2)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                            "only; 0.0.0.0 for every network)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--hop", type=float, help="seconds between windows of a long recording (default: half the "
                                                  "model's clip length)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted, in MB (default 20)")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="longest recording accepted, in seconds (default 60)")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    if args.hop is not None and args.hop <= 0:
        parser.error("--hop must be a positive number of seconds")
    if args.max_upload_mb <= 0 or args.max_seconds <= 0:
        parser.error("--max-upload-mb and --max-seconds must be positive")

    import uvicorn

    model = load_model(args.models, args.fold, args.tracking_uri)
    service = Service(model, top_k=args.top_k, hop=args.hop or model.duration / 2,
                      max_bytes=round(args.max_upload_mb * 1e6), max_seconds=args.max_seconds)
    print(f"esclab serve: {len(model.classes)} classes, {model.description} ({args.models})", flush=True)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:  # listening now; with --port 0, on the port the system chose
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"esclab serve: open http://{f'[{host}]' if ':' in host else host}:{port}/ (Ctrl+C stops)",
                      flush=True)

    server = Server(uvicorn.Config(create_app(service), host=args.host, port=args.port, log_level="warning"))
    server.run()
    return 0 if server.started else 1
