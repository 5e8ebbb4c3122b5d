import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffxattn.control import AttentionStore, attention_layers
from diffxattn.heatmaps import export
from conftest import seeded


def test_capture_changes_nothing_and_restores_processors(tiny_pipe):
    before = {n: m.processor for n, m in attention_layers(tiny_pipe.unet).items()}
    plain = tiny_pipe("a red circle", generator=seeded(0), output_type="np", guidance_scale=3.0).images
    with AttentionStore(tiny_pipe) as store:
        captured = tiny_pipe("a red circle", generator=seeded(0), output_type="np", guidance_scale=3.0).images
        assert all(type(m.processor).__name__ == "ControlledProcessor" for m in attention_layers(tiny_pipe.unet).values())
    assert np.array_equal(plain, captured)
    assert {n: m.processor for n, m in attention_layers(tiny_pipe.unet).items()} == before
    assert store.counts and store.prompts == ["a red circle"]


def test_processors_are_restored_after_an_exception(tiny_pipe):
    before = {n: m.processor for n, m in attention_layers(tiny_pipe.unet).items()}
    with pytest.raises(ValueError):
        with AttentionStore(tiny_pipe):
            tiny_pipe("a red circle", height=13)
    assert {n: m.processor for n, m in attention_layers(tiny_pipe.unet).items()} == before


def test_word_maps_have_image_size_and_multi_token_word_is_token_mean(tiny_pipe):
    with AttentionStore(tiny_pipe) as store:
        tiny_pipe("a red crimson circle", generator=seeded(0), guidance_scale=2.0)
    words = dict(store.words())
    assert len(words["crimson"]) > 1 and words["red"] == [2]
    tokens = store.token_maps()
    maps = store.word_maps()
    assert all(m.shape == (16, 16) for m in maps.values())
    torch.testing.assert_close(maps["crimson"], tokens[words["crimson"]].mean(0))
    assert not torch.allclose(maps["crimson"], tokens[words["crimson"][0]])
    share = store.word_maps(normalize="share")
    torch.testing.assert_close(sum(share.values()), torch.ones(16, 16))
    mm = store.word_maps(normalize="minmax")
    assert all(float(m.min()) == 0.0 and abs(float(m.max()) - 1) < 1e-6 for m in mm.values())


def test_repeated_words_are_asked_by_occurrence(tiny_pipe):
    with AttentionStore(tiny_pipe) as store:
        tiny_pipe("a red circle left of a blue square", generator=seeded(0))
    maps = store.word_maps()
    assert "a" in maps and "a#2" in maps
    torch.testing.assert_close(store.word_map("a", occurrence=2), maps["a#2"])
    with pytest.raises(KeyError, match="occurrence 3"):
        store.word_map("a", occurrence=3)


def test_selection_by_resolution_block_and_steps(tiny_pipe):
    with AttentionStore(tiny_pipe, resolutions=(8,), blocks=("up",), steps=(1, 3)) as store:
        tiny_pipe("a red circle", generator=seeded(0), num_inference_steps=4)
    assert set(store.sums) == {(8, 8)} and store.steps_seen == {1, 2}
    with AttentionStore(tiny_pipe) as every:
        tiny_pipe("a red circle", generator=seeded(0), num_inference_steps=4)
    with AttentionStore(tiny_pipe, resolutions=(8,)) as only8:
        tiny_pipe("a red circle", generator=seeded(0), num_inference_steps=4)
    assert len(every.captured_resolutions) > 1 and only8.captured_resolutions == [8]
    # reading one resolution back = capturing only that resolution; all together is a different map
    torch.testing.assert_close(every.token_maps(resolution=8), only8.token_maps())
    assert not torch.allclose(every.token_maps(), only8.token_maps())
    assert every.word_maps(resolution=8).keys() == every.word_maps().keys()
    with pytest.raises(ValueError, match="resolution=32 was not captured; captured: "):
        every.token_maps(resolution=32)
    with AttentionStore(tiny_pipe, heads="each") as each:
        tiny_pipe("a red circle", generator=seeded(0))
    assert next(iter(each.sums.values())).shape[1] == 2  # two heads kept


def test_store_memory_does_not_grow_with_steps(tiny_pipe):
    sizes = []
    for steps in (10, 50):
        with AttentionStore(tiny_pipe, per_layer=True) as store:
            tiny_pipe("a red circle", generator=seeded(0), num_inference_steps=steps)
        sizes.append(store.nbytes())
    assert sizes[0] == sizes[1] > 0


def test_export_writes_every_artefact(tiny_pipe, tmp_path):
    with AttentionStore(tiny_pipe, per_layer=True, step_bins=4) as store:
        image = tiny_pipe("a red circle", generator=seeded(0)).images[0]
    meta = export(tmp_path, store, image, "a red circle", seed=0)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"image.png", "prompt.txt", "seed.txt", "grid.png", "maps.safetensors", "maps.json", "index.html"} <= names
    assert {"word-00-a.png", "word-01-red.png", "word-02-circle.png"} <= names
    assert Image.open(tmp_path / "word-01-red.png").size == (128, 128)
    raw = load_file(str(tmp_path / "maps.safetensors"))
    assert raw["tokens"].shape == (16, 16, 16) and raw["steps"].shape[1:] == (16, 16, 16)
    assert raw["layers"].shape[0] == len(meta["layers"])
    saved = json.loads((tmp_path / "maps.json").read_text())
    assert saved["words"] == ["a", "red", "circle"] and saved["word_tokens"]["red"] == [2]
    assert saved["tokens"][0] == "<|startoftext|>" and saved["resolutions"] == [16, 8]
    torch.testing.assert_close(raw["tokens"], store.token_maps())


def test_capture_works_on_stable_diffusion(sd_pipe):
    kw = dict(num_inference_steps=3, guidance_scale=5.0, height=16, width=16, output_type="np")
    plain = sd_pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    with AttentionStore(sd_pipe, per_layer=True) as store:
        captured = sd_pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert np.array_equal(plain, captured)
    assert store.prompts == ["a red circle"] and store.steps_seen == {0, 1, 2}
    assert all(l.endswith("attn2") for l in store.layer_sums)
    maps = store.word_maps()
    assert list(maps) == ["a", "red", "circle"] and all(m.shape == (16, 16) for m in maps.values())
    assert all(type(m.processor).__name__ != "ControlledProcessor" for m in attention_layers(sd_pipe.unet).values())


def test_batched_capture_equals_capture_call_by_call(tiny_pipe):
    """The store computes its probabilities for many calls at once; the maps are those of one call at a time
    (float summation order aside), for every kind of map it keeps."""
    def capture(batched: bool, **kw):
        with AttentionStore(tiny_pipe, per_layer=True, step_bins=3, **kw) as store:
            store.observes_inputs = batched  # False: the processor hands it each call's probabilities
            tiny_pipe(["a red circle", "a blue square at the left"], generator=seeded(0, 2), guidance_scale=3.0,
                      num_inference_steps=7)
        return store

    for heads in ("mean", "each"):
        batched, per_call = capture(True, heads=heads), capture(False, heads=heads)
        assert batched.counts == per_call.counts and batched.bin_counts == per_call.bin_counts
        assert batched.layer_counts == per_call.layer_counts and batched.steps_seen == per_call.steps_seen
        for mine, theirs in ((batched.sums, per_call.sums), (batched.bin_sums, per_call.bin_sums),
                             (batched.layer_sums, per_call.layer_sums)):
            assert list(mine) == list(theirs)  # the same maps, in the same order (per layer: the order they run)
            for key in theirs:
                torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6)


def test_batched_capture_holds_few_steps_and_reads_up_to_date_mid_run(tiny_pipe):
    from diffxattn.control.store import BATCHED_STEPS

    layers = sum(n.endswith("attn2") for n in attention_layers(tiny_pipe.unet))
    waiting, counts = [], []

    def look(pipe, i, t, tensors):
        waiting.append(len({call.step for call, _, _ in store._waiting}))
        return {}

    def read(pipe, i, t, tensors):
        counts.append(sum(store.counts.values()))  # reading the maps computes what waits
        return {}

    for callback in (look, read):
        with AttentionStore(tiny_pipe, step_bins=1) as store:  # one bin: only the step limit makes it compute
            tiny_pipe("a red circle", generator=seeded(0), num_inference_steps=10, callback_on_step_end=callback)
    assert waiting == [1, 2, 3, 4, 1, 2, 3, 4, 1, 2] and BATCHED_STEPS == 4  # memory: a few steps, whatever the run
    assert counts == [layers * (i + 1) for i in range(10)]


def test_batched_capture_waits_for_at_most_its_byte_limit(tiny_pipe, monkeypatch):
    """Large layers (Stable Diffusion's queries are megabytes) are computed before the step limit."""
    from diffxattn.control import store as store_module

    with AttentionStore(tiny_pipe) as reference:
        tiny_pipe("a red circle", generator=seeded(0), num_inference_steps=4)
    sizes = []
    observe = AttentionStore.observe_inputs

    def watched(self, call, inputs, scale):
        observe(self, call, inputs, scale)
        sizes.append(self._waiting_bytes)

    limit = 3 * max(i.q.untyped_storage().nbytes() + i.k.untyped_storage().nbytes()
                    for i in _first_inputs(tiny_pipe))
    monkeypatch.setattr(store_module, "BATCHED_BYTES", limit)
    monkeypatch.setattr(AttentionStore, "observe_inputs", watched)
    with AttentionStore(tiny_pipe) as store:
        tiny_pipe("a red circle", generator=seeded(0), num_inference_steps=4)
    assert 0 < max(sizes) <= limit and len(sizes) == sum(reference.counts.values())
    for key in reference.sums:  # the same maps, computed in smaller batches
        torch.testing.assert_close(store.sums[key], reference.sums[key])


def _first_inputs(pipe) -> list:
    """The attention inputs one capture run hands the store."""
    seen = []
    with AttentionStore(pipe) as store:
        store.observe_inputs = lambda call, inputs, scale: seen.append(inputs)
        pipe("a red circle", generator=seeded(0), num_inference_steps=1)
    return seen
