"""What one run of the live app computes with the pipeline: the image(s), the words' maps for the viewer,
and the files its download buttons give (image.png, maps.safetensors + maps.json, command.txt).

The image is the one `diffxattn generate` / `diffxattn edit` writes for the same request: the same generators,
sampler and defaults, and attention capture is exact.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from ..conditioning import TokenizedPrompt, with_word_weights
from ..control import AttentionStore, StepRange
from ..control.edits import FEATURE_LAYERS
from ..generation import edit, generate
from ..heatmaps import map_tensors, maps_meta, viewer_data
from ..images import labelled_grid
from ..prompt_syntax import parse_schedule
from ..schedulers import make_scheduler
from .queue import Run
from .request import FEATURE_REPLACE, RunRequest, command_line

VIEWER_MAP_SIDE = 16  # the maps sent to the page: captured at 16x16 at most on 32x32 images; the canvas upsamples


def resolve_weights(pipe, request: RunRequest) -> RunRequest:
    """The request with its slider weights written into the prompt (what the page's prompt box then shows)."""
    if not request.weights:
        return request
    return replace(request, prompt=with_word_weights(pipe.tokenizer, request.prompt, request.weights), weights={})


def execute(pipe, scheduler_config: dict, request: RunRequest, run: Run, pipeline: str | None) -> dict:
    """Run `request` on `pipe` (its scheduler rebuilt from `scheduler_config` as `request.sampler`), reporting
    each step to `run`; returns {"client": what the page gets, "files": {download name: (bytes, media type)}}."""
    request = resolve_weights(pipe, request)
    pipe.scheduler = make_scheduler(request.sampler, config=scheduler_config)

    def on_step(pipe_, i, t, tensors):
        run.step(i + 1, request.steps)
        return {}

    common = dict(num_inference_steps=request.steps, guidance_scale=request.guidance, callback_on_step_end=on_step)
    with torch.no_grad(), AttentionStore(pipe, per_layer=True) as store:
        if request.kind == "generate":
            image = generate(pipe, request.prompt, weight_mode=request.weight_mode,
                             generator=[torch.Generator().manual_seed(request.seed)], **common).images[0]
            source, index, shown_prompt = None, 0, parse_schedule(request.prompt, request.steps)[-1][1]
            download = image
        else:
            result = edit(pipe, request.prompt, request.to, seed=request.seed, local_blend=list(request.local_blend) or None,
                          cross_replace=StepRange.fraction(0, request.cross_replace),
                          feature_replace=StepRange.fraction(0, FEATURE_REPLACE if request.feature_injection else 0),
                          feature_layers=FEATURE_LAYERS, **common)
            source, image, index, shown_prompt = result.source, result.edited, 1, request.to
            download = labelled_grid([("", source), ("", image)], columns=2, cell=source.width)  # as `edit` saves
        text = TokenizedPrompt.of(pipe.tokenizer, shown_prompt)
        words = store.words(index, text)
        if not words:
            raise ValueError("the prompt has no word inside the text encoder's window to map")
        tensors, steps, layers = map_tensors(store, index)
        meta = maps_meta(store, text, words, shown_prompt, request.seed, steps, layers)
    view = viewer_data(shown_prompt, words, tensors, steps, layers)
    command = command_line(request, pipeline)
    client = {
        "run": run.id, "kind": request.kind, "prompt": request.prompt, "to": request.to, "seed": request.seed,
        "image": data_uri(image), "source": data_uri(source) if source is not None else None,
        "viewer": {**view, "maps": _small(view["maps"]),
                   "layer_maps": None if view["layer_maps"] is None else _small(view["layer_maps"])},
        "weights": [text.weights[pos[0]] for _, pos in words],
        "weightable": request.kind == "generate" and len(parse_schedule(request.prompt, request.steps)) == 1,
        "command": command,
    }
    files = {"image.png": (png_bytes(download), "image/png"),
             "maps.safetensors": (safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}),
                                  "application/octet-stream"),
             "maps.json": (json.dumps(meta, indent=2, ensure_ascii=False).encode(), "application/json"),
             "command.txt": ((command + "\n").encode(), "text/plain; charset=utf-8")}
    return {"client": client, "files": files}


def _small(maps: np.ndarray) -> list:
    """(n, words, h, w) -> nested lists at most VIEWER_MAP_SIDE a side (area-averaged), 4 decimals."""
    t = torch.from_numpy(np.ascontiguousarray(maps)).float()
    if max(t.shape[-2:]) > VIEWER_MAP_SIDE:
        t = torch.nn.functional.adaptive_avg_pool2d(t, (min(t.shape[-2], VIEWER_MAP_SIDE),
                                                        min(t.shape[-1], VIEWER_MAP_SIDE)))
    return np.round(t.numpy().astype(np.float64), 4).tolist()


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")
