"""Training checkpoints: atomic folders (complete or absent), and the trainer's files inside them.

    output_dir/checkpoints/
        checkpoint-500/            complete: has the COMPLETE marker (written last, fsynced)
            model.safetensors      accelerate's save_state: UNet (model_1: text encoder, if trained),
            optimizer.bin ...      optimizer, LR scheduler, random_states_<rank>.pkl (torch files)
            trainer_state.json     step, data position, EMA scalars; ema.safetensors: EMA weights
            config.yaml, tokenizer/
        .tmp-checkpoint-1000/      being written (or left by a killed save; cleaned up on the next start)

Every process writes its part into `.tmp-checkpoint-N`; the main process fsyncs the files, writes the marker
and renames the folder to `checkpoint-N`. A rename within one file system is atomic, so a save killed at any
point leaves the previous checkpoints untouched. Nothing here is unpickled: accelerate loads its torch files
with weights_only=True; the EMA is safetensors + JSON rather than accelerate's custom-object pickle (which
accelerate loads with weights_only=False).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from . import atomic
from .build import build_models, make_pipeline
from .config import load_config
from .errors import UserError
from .pipeline import DiffXAttnPipeline

MARKER, STATE, CONFIG = "COMPLETE", "trainer_state.json", "config.yaml"
EMA, TOKENIZER = "ema.safetensors", "tokenizer"
_NAME = re.compile(r"checkpoint-(\d+)")
_TMP = ".tmp-"


class CheckpointError(UserError):
    """A checkpoint folder is incomplete or cannot be read; the message names it."""


class OutputExistsError(UserError):
    """An output folder holds files this project did not write; replacing it needs --overwrite."""


@contextlib.contextmanager
def reading(folder: Path):
    """Whatever reading a checkpoint's files raises (a damaged config, weights of another shape) is the
    checkpoint's fault: a CheckpointError naming the folder."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read the checkpoint {folder}: {type(e).__name__}: {e}") from e


def incomplete_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-N folder without the marker: not a finished save (nor anything a killed
    save leaves: that is a .tmp- folder), so something a user put there."""
    root = Path(root)
    return sorted((int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else ())
                  if (m := _NAME.fullmatch(p.name)) and not is_complete(p))


def complete_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under root, oldest first."""
    root = Path(root)
    found = [(int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else ())
             if (m := _NAME.fullmatch(p.name)) and is_complete(p)]
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under root, or None."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def remove_stale(root: str | os.PathLike) -> None:
    """Finish or delete what killed saves left behind (main process only, before anyone reads root).

    A `.tmp-checkpoint-N` with its marker was killed between marker and rename: it is complete and is renamed
    into place (unless `checkpoint-N` exists). Every other `.tmp-*` folder is deleted.
    """
    root = Path(root)
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.name.startswith(_TMP):
            final = root / path.name[len(_TMP):]
            if _NAME.fullmatch(final.name) and is_complete(path) and not final.exists():
                os.replace(path, final)
            else:
                shutil.rmtree(path, ignore_errors=True)
    _fsync_dir(root)


def save_checkpoint(accelerator, root: str | os.PathLike, step: int, write_extra: Callable[[Path], None],
                    total_limit: int | None = None) -> Path:
    """accelerate's `save_state` + `write_extra(folder)` (main process) as root/checkpoint-{step}, atomically.

    All processes must call this. Keeps only the newest `total_limit` complete checkpoints.
    """
    root = Path(root)
    final, tmp = root / f"checkpoint-{step}", root / f"{_TMP}checkpoint-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        write_extra(tmp)
    accelerator.wait_for_everyone()  # every rank's random_states_<rank>.pkl is on disk
    if accelerator.is_main_process:
        _commit(tmp, final)
        if total_limit is not None:
            prune(root, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune(root: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (renamed to .tmp-* first: never half-deleted)."""
    found = complete_checkpoints(root)
    for _, path in found[:max(len(found) - max(keep, 0), 0)]:
        doomed = path.with_name(f"{_TMP}delete-{path.name}")
        os.replace(path, doomed)
        shutil.rmtree(doomed)


# -- the trainer's files --
def write_trainer_files(folder: Path, state: dict, config_yaml: str, tokenizer=None,
                        ema_weights: dict[str, torch.Tensor] | None = None) -> None:
    (folder / STATE).write_text(json.dumps(state, indent=1))
    (folder / CONFIG).write_text(config_yaml)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder / TOKENIZER)
    if ema_weights is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema_weights.items()}, folder / EMA)


def read_state(folder: Path) -> dict:
    return json.loads((Path(folder) / STATE).read_text())


def read_ema(folder: Path, device: str = "cpu") -> dict[str, torch.Tensor] | None:
    path = Path(folder) / EMA
    return {k: v.to(device) for k, v in load_file(path).items()} if path.is_file() else None


def read_model_weights(folder: Path, index: int) -> dict[str, torch.Tensor]:
    """The weights of the index-th prepared model (0: UNet, 1: text encoder), without any DDP prefix."""
    weights = load_file(Path(folder) / f"model{f'_{index}' if index else ''}.safetensors")
    return {k.removeprefix("module."): v for k, v in weights.items()}


def _commit(tmp: Path, final: Path) -> None:
    _fsync_tree(tmp)
    marker = tmp / MARKER
    marker.write_text(f"{final.name}\n")
    _fsync_file(marker)
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (resumed from an older checkpoint): the new one wins
        old = final.with_name(f"{_TMP}delete-{final.name}")
        os.replace(final, old)  # a crash here leaves tmp complete: remove_stale renames it into place
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(folder) / name)
        _fsync_dir(Path(folder))


def named_trained_params(modules: list) -> dict[str, torch.nn.Parameter]:
    """'0.conv_in.weight' (UNet), '1.text_model...' (text encoder): also the EMA file's keys."""
    return {f"{i}.{n}": p for i, m in enumerate(modules) for n, p in m.named_parameters() if p.requires_grad}


def is_own_pipeline(folder: Path) -> bool:
    """A pipeline folder this project wrote: model_index.json names DiffXAttnPipeline and the folder holds
    nothing but it and the components it lists (no model card, no file of the user's)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        entries = [p.name for p in folder.iterdir()]
    except (OSError, ValueError):
        return False
    if not isinstance(index, dict) or index.get("_class_name") != DiffXAttnPipeline.__name__:
        return False
    parts = {"model_index.json"} | {k for k, v in index.items() if isinstance(v, list)}
    return all(name in parts for name in entries)


def check_replaceable(out: Path, is_own=None, what: str = "a pipeline folder") -> None:
    """The overwrite policy: `out` may be replaced without --overwrite only if it does not exist, is an empty
    folder, or is `what` this project wrote (`is_own(out)`; default: `is_own_pipeline`)."""
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise OutputExistsError(f"{out} is a file, not a folder; choose another path, or pass --overwrite to "
                                "replace it")
    entries = sorted(p.name for p in out.iterdir())
    if entries and not (is_own or is_own_pipeline)(out):
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise OutputExistsError(f"{out} is not empty and is not {what} written by diffxattn (it holds "
                                f"{shown}); choose a new folder, or pass --overwrite to replace it and everything "
                                "in it")


def save_pipeline(pipe: DiffXAttnPipeline, out: str | os.PathLike, *, overwrite: bool = False,
                  keep: tuple[Path, ...] = ()) -> Path:
    """Save `pipe` as the folder `out`, replacing it atomically (the old folder stays until the new one is
    complete). Without `overwrite`, `out` must pass `check_replaceable`; never the working directory, home, a
    parent of them, or a folder holding a path in `keep`."""
    if not overwrite:
        check_replaceable(Path(out))
    return atomic.replace_folder(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True), keep)


def export_checkpoint(folder: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A complete checkpoint as a pipeline folder (EMA weights if the run had EMA); reads no pickles."""
    folder, out = Path(folder), Path(out)
    if not is_complete(folder):
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {MARKER} marker)")
    atomic.protect(out, keep=(folder,))
    if not overwrite:  # before the slow part
        check_replaceable(out)
    with reading(folder):
        cfg = load_config(folder / CONFIG)
        tokenizer = None if cfg.text.pretrained else CLIPTokenizer.from_pretrained(str(folder / TOKENIZER))
        tokenizer, text_encoder, unet = build_models(cfg, tokenizer)
        trained = [unet] + ([text_encoder] if cfg.text.train else [])
        for i, module in enumerate(trained):
            module.load_state_dict(read_model_weights(folder, i))
        if (ema := read_ema(folder)) is not None:
            with torch.no_grad():
                for name, p in named_trained_params(trained).items():
                    p.copy_(ema[name])
    return save_pipeline(make_pipeline(cfg, unet, text_encoder, tokenizer), out, overwrite=overwrite, keep=(folder,))
