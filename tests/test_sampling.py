"""Guidance and sampler settings: what the pipeline computes at each step, and what a switched scheduler keeps."""

import logging

import pytest
import torch

from conftest import seeded
from diffxattn import DiffXAttnPipeline, make_scheduler
from diffxattn.cli import load_pipeline, scheduler_settings


def _pipe(tiny_pipe, scheduler) -> DiffXAttnPipeline:
    pipe = DiffXAttnPipeline(tiny_pipe.unet, tiny_pipe.text_encoder, tiny_pipe.tokenizer, scheduler, default_steps=4)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _CountRows:
    """Records the batch size of every UNet call."""

    def __init__(self, unet):
        self.rows: list[int] = []
        self.handle = unet.register_forward_pre_hook(lambda m, args: self.rows.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_guidance_1_is_the_conditional_prediction(tiny_pipe):
    """At guidance 1 the pipeline denoises with the conditional prediction alone: the same bits as a hand-written
    loop over the conditional UNet output, and no unconditional pass is made."""
    pipe = _pipe(tiny_pipe, make_scheduler("ddim"))
    prompt = "a red circle at the left"
    with _CountRows(pipe.unet) as calls:
        image = pipe(prompt, guidance_scale=1.0, generator=seeded(3), output_type="pt").images
    assert calls.rows == [1] * 4

    emb, mask = pipe.encode_prompt([prompt])
    x = torch.randn((1, 3, 16, 16), generator=seeded(3)[0])
    sched = make_scheduler("ddim")
    sched.set_timesteps(4)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(pipe.unet(x, t, emb, encoder_attention_mask=mask).sample, t, x).prev_sample
    assert torch.equal(image, pipe.postprocess(x, "pt"))

    with _CountRows(pipe.unet) as calls:
        guided = pipe(prompt, guidance_scale=3.0, generator=seeded(3), output_type="pt").images
    assert calls.rows == [2] * 4 and not torch.equal(guided, image)


def test_guidance_rescale_0_changes_nothing_and_0_7_changes_the_image(tiny_pipe):
    pipe = _pipe(tiny_pipe, make_scheduler("ddim"))
    kw = dict(guidance_scale=4.0, output_type="pt", num_inference_steps=3)
    plain = pipe("a blue square", generator=seeded(1), **kw).images
    assert torch.equal(pipe("a blue square", generator=seeded(1), guidance_rescale=0.0, **kw).images, plain)
    assert not torch.equal(pipe("a blue square", generator=seeded(1), guidance_rescale=0.7, **kw).images, plain)


def test_guidance_interval_guides_only_those_steps(tiny_pipe):
    pipe = _pipe(tiny_pipe, make_scheduler("ddim"))
    with _CountRows(pipe.unet) as calls:
        half = pipe("a red circle", guidance_scale=3.0, guidance_interval=(0.0, 0.5), generator=seeded(0),
                    num_inference_steps=4, output_type="pt").images
    assert calls.rows == [2, 2, 1, 1]  # steps 0 and 1 guided, 2 and 3 conditional only
    full = pipe("a red circle", guidance_scale=3.0, generator=seeded(0), num_inference_steps=4, output_type="pt").images
    assert not torch.equal(half, full)


def test_ddim_is_built_without_clipping_and_a_clipping_ddim_steps_consistently(tiny_pipe):
    assert make_scheduler("ddim").config.clip_sample is False
    clipping = make_scheduler("ddim", config={**make_scheduler("ddim").config, "clip_sample": True})
    assert clipping.config.clip_sample is True  # a config's own setting wins over the default
    # one DDIM step with an x0 far outside [-1, 1]: the noise estimate is recomputed from the clipped x0, so the
    # step lands on the line through x_t and the clipped x0 (diffusers' default keeps the unclipped noise)
    pipe = _pipe(tiny_pipe, clipping)
    clipping.set_timesteps(4)
    t = clipping.timesteps[0]
    x = torch.randn(1, 3, 4, 4, generator=seeded(0)[0])
    v = 5 * torch.randn(1, 3, 4, 4, generator=seeded(1)[0])
    out = clipping.step(v, t, x, **pipe._step_kwargs(None)).prev_sample
    a = clipping.alphas_cumprod[t]
    a_prev = clipping.alphas_cumprod[t - 1000 // 4]
    x0 = (a.sqrt() * x - (1 - a).sqrt() * v).clamp(-1, 1)
    eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    torch.testing.assert_close(out, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps)
    assert not torch.allclose(clipping.step(v, t, x).prev_sample, out)


def test_switching_scheduler_keeps_sampler_settings_and_drops_what_the_new_one_lacks(caplog):
    ddim = make_scheduler("ddim", config={**make_scheduler("ddim").config, "clip_sample": True,
                                          "timestep_spacing": "trailing", "steps_offset": 1})
    again = make_scheduler("ddim", config=ddim.config)
    assert (again.config.clip_sample, again.config.timestep_spacing, again.config.steps_offset) == (True, "trailing", 1)
    with caplog.at_level(logging.WARNING):
        dpm = make_scheduler("dpm-solver++", config=ddim.config)
    assert dpm.config.timestep_spacing == "trailing" and "clip_sample" not in dpm.config
    assert dpm.config.algorithm_type == "dpmsolver++"  # the table's variant always applies
    assert "were passed" not in caplog.text
    back = make_scheduler("ddim", config=dpm.config)  # no clip_sample in the config: the table's default
    assert back.config.clip_sample is False and back.config.timestep_spacing == "trailing"


def test_scheduler_options_name_the_unknown_key():
    sched = make_scheduler("ddim")
    assert scheduler_settings(sched, ["clip_sample=true", "timestep_spacing=trailing"]) == {
        "clip_sample": True, "timestep_spacing": "trailing"}
    with pytest.raises(ValueError, match=r"--scheduler-option 'clip=1': expected KEY=VALUE with KEY one of: .*clip_sample"):
        scheduler_settings(sched, ["clip=1"])


def test_load_pipeline_applies_scheduler_options(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "p")
    pipe = load_pipeline(str(tmp_path / "p"), None, scheduler_options=["clip_sample=true"])
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.clip_sample is True
    pipe = load_pipeline(str(tmp_path / "p"), "euler", scheduler_options=["timestep_spacing=trailing"])
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.timestep_spacing == "trailing"


def test_attention_tools_work_when_guidance_stops_part_way(tiny_pipe):
    """With a guidance interval the batch halves after it: capture stays exact and sees every step, and a
    prompt-to-prompt edit's source is the plain image."""
    from diffxattn.control import AttentionStore
    from diffxattn.editing import edit

    pipe = _pipe(tiny_pipe, make_scheduler("ddim"))
    kw = dict(guidance_scale=3.0, guidance_interval=(0.0, 0.5), num_inference_steps=4, output_type="pt")
    plain = pipe("a red circle at the left", generator=seeded(0), **kw).images
    with AttentionStore(pipe, step_bins=4) as store:
        captured = pipe("a red circle at the left", generator=seeded(0), **kw).images
    assert torch.equal(plain, captured)
    maps = store.word_maps()
    assert set(maps) >= {"red", "circle"} and all(torch.isfinite(m).all() for m in maps.values())
    source, edited = edit(pipe, "a red circle at the left", "a blue circle at the left", **kw)
    torch.testing.assert_close(source, plain[0], atol=1e-5, rtol=0)  # a batch of 2: last-bit differences only
    assert (edited - plain[0]).abs().max() > 0.01


def test_the_pipeline_saves_its_guidance_interval(tiny_pipe, tmp_path):
    pipe = DiffXAttnPipeline(tiny_pipe.unet, tiny_pipe.text_encoder, tiny_pipe.tokenizer, make_scheduler("ddim"),
                             default_steps=4, default_guidance_scale=3.0, default_guidance_interval=(0.0, 0.5))
    pipe.save_pretrained(tmp_path / "p")
    loaded = load_pipeline(str(tmp_path / "p"))
    assert loaded.config.default_guidance_interval == [0.0, 0.5] and loaded.config.default_guidance_scale == 3.0
    with _CountRows(loaded.unet) as calls:
        loaded("a red circle", generator=seeded(0))
    assert calls.rows == [2, 2, 1, 1]
