"""Runs and steps: controllers are told which run and which step sampling is at, on every scheduler."""

import pytest
import torch

from diffxattn import SCHEDULERS, DiffXAttnPipeline, make_scheduler
from diffxattn.control import AttentionStore, AttnCall, ControllerContext, StepRange
from diffxattn.control.edits import AttentionReweight
from conftest import seeded


def pipe_with(tiny_pipe, sampler: str) -> DiffXAttnPipeline:
    """The tiny pipeline's models with another scheduler (the session fixture keeps its own)."""
    pipe = DiffXAttnPipeline(tiny_pipe.unet, tiny_pipe.text_encoder, tiny_pipe.tokenizer,
                             make_scheduler(sampler, config=tiny_pipe.scheduler.config), default_steps=4)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_store_sees_each_requested_step_once_on_every_scheduler(tiny_pipe, sampler):
    """Heun calls the UNet twice per step (7 calls for 4 steps): it still has 4 steps, numbered 0-3."""
    pipe = pipe_with(tiny_pipe, sampler)
    with AttentionStore(pipe, step_bins=4) as store:
        pipe("a red circle", num_inference_steps=4, generator=seeded(0), output_type="pt")
    assert store.num_steps == 4 and store.steps_seen == {0, 1, 2, 3}
    assert sorted(b for b, _ in store.bin_sums) == [0, 0, 1, 1, 2, 2, 3, 3]  # one bin per step, 2 resolutions


@pytest.mark.parametrize("steps", [1, 4])
def test_a_second_run_in_one_store_has_its_own_prompt_and_maps(tiny_pipe, steps):
    with AttentionStore(tiny_pipe) as store:
        tiny_pipe("a red circle", num_inference_steps=steps, generator=seeded(0))
        assert store.prompts == ["a red circle"]
        tiny_pipe("a blue square at the left", num_inference_steps=steps, generator=seeded(0))
    with AttentionStore(tiny_pipe) as alone:
        tiny_pipe("a blue square at the left", num_inference_steps=steps, generator=seeded(0))
    assert store.prompts == ["a blue square at the left"]
    assert [w for w, _ in store.words()] == ["a", "blue", "square", "at", "the", "left"]
    assert store.counts == alone.counts and store.steps_seen == alone.steps_seen == set(range(steps))
    assert torch.equal(store.token_maps(), alone.token_maps())


def call_at(step: int, num_steps: int) -> AttnCall:
    return AttnCall(layer="up_blocks.1.attentions.0.transformer_blocks.0.attn2", block="up", cross=True, height=16,
                    width=16, step=step, num_steps=num_steps, heads=2, batch=1, cond_start=0)


@pytest.mark.parametrize("steps", [(0.9, 1.0), (0, 1), (0, 1.0), (0.25, 0.75), (1, 3), (0, 0.8), (0.5, 1.0)])
def test_the_store_and_the_edits_agree_on_every_step_range(tiny_pipe, steps):
    store = AttentionStore(tiny_pipe, steps=steps)  # constructed only: `wants` needs no installation
    reweight = AttentionReweight(tiny_pipe, torch.ones(1, 16), steps=steps)
    for n in (1, 3, 4, 10):
        chosen = [s for s in range(n) if store.wants(call_at(s, n))]
        assert chosen == [s for s in range(n) if reweight.wants(call_at(s, n))], (steps, n)
    assert not store.wants(call_at(3, 4)) if steps == (0.9, 1.0) else True  # 3/4 = 0.75 is not in [0.9, 1.0)


class Recorder(ControllerContext):
    """Records what a controller hears: runs, step ends, and the step of each cross-attention call."""

    def __init__(self, pipe):
        super().__init__(pipe)
        self.events = []

    def wants(self, call):
        return call.cross and call.layer.startswith("down_blocks.0")  # one layer: one entry per UNet call

    def observe(self, call, probs):
        self.events.append(("call", call.step, call.num_steps))

    def on_run_start(self, run):
        self.events.append(("run", run.num_steps, run.prompts))

    def on_step_end(self, step):
        self.events.append(("end", step))


@pytest.mark.parametrize("sampler,calls_per_step", [("heun", [2, 2, 2, 1]), ("dpm-solver++", [1, 1, 1, 1]),
                                                    ("ddim", [1, 1, 1, 1])])
def test_controllers_hear_the_run_and_each_step_end(tiny_pipe, sampler, calls_per_step):
    pipe = pipe_with(tiny_pipe, sampler)
    with Recorder(pipe) as rec:
        pipe("a red circle", num_inference_steps=4, generator=seeded(0), output_type="pt")
    expected = [("run", 4, ["a red circle"])]
    for step, n in enumerate(calls_per_step):
        expected += [("call", step, 4)] * n + [("end", step)]
    assert rec.events == expected
    assert "set_timesteps" not in pipe.scheduler.__dict__ and "step" not in pipe.scheduler.__dict__  # unhooked
    assert "encode_prompt" not in pipe.__dict__


def test_replacing_the_scheduler_inside_the_block_is_an_error(tiny_pipe):
    pipe = pipe_with(tiny_pipe, "ddim")
    with pytest.raises(RuntimeError, match="pipe.scheduler was replaced while attention controllers were installed"):
        with AttentionStore(pipe):
            pipe.scheduler = make_scheduler("euler", config=pipe.scheduler.config)
            pipe("a red circle", num_inference_steps=2)


def test_step_range_is_steps_or_fractions_and_reads_the_old_forms():
    assert StepRange.parse("0:10") == StepRange.steps(0, 10) == StepRange.of((0, 10))
    assert StepRange.parse("0.2:1.0") == StepRange.fraction(0.2, 1) == StepRange.of((0.2, 1)) == StepRange.of("0.2:1")
    assert StepRange.parse("0.8") == StepRange.of(0.8) == StepRange.fraction(0, 0.8) == StepRange.parse("0:0.8")
    assert StepRange.of((0, 1)) == StepRange.steps(0, 1) and StepRange.of((0, 1.0)) == StepRange.fraction(0, 1)
    assert [s for s in range(4) if StepRange.steps(1, 3).contains(s, 4)] == [1, 2]
    assert [s for s in range(10) if StepRange.fraction(0, 0.8).contains(s, 10)] == list(range(8))
    assert [s for s in range(4) if StepRange.fraction(0.5, 1).contains(s, 4)] == [2, 3]
    assert not StepRange.fraction(0.9, 1.0).contains(3, 4)  # 3/4 = 0.75
    for bad, message in (("1:x", "expected START:END"), ("0:1:2", "expected START:END"), ("3:1", "start <= end")):
        with pytest.raises(ValueError, match=message):
            StepRange.parse(bad)
