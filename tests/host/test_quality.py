"""Does VCT translate? The paper's claims, asserted on the trained toy world (tests/quality).

A few tasks of the task set run through the real nodes in ComfyUI's executor with the paper's
defaults (tests/quality/harness.py), beside the ablations and baselines. The thresholds come from
the benchmark's measurements (`tests/benchmarks/bench_quality.py`, README "Does it work?"), each
with its margin stated where it is asserted. The toy model's weights are committed
(tools/demo/, beside the runner's demo); without them this module fails rather than train for 15 minutes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

_QUALITY = Path(__file__).resolve().parents[1] / "quality"
if str(_QUALITY) not in sys.path:
    sys.path.insert(0, str(_QUALITY))

import harness  # noqa: E402
import running  # noqa: E402
import scoring  # noqa: E402
import toy_model  # noqa: E402

TASKS = (0, 1, 2, 3, 4, 5)
RECONSTRUCTION_TASKS = (0,)

def test_the_demo_ships_the_recipes_trained_weights():
    """The runner's demo (tools/vct_demo.py) loads the file the recipe names, where weights_path finds it."""
    demo = running.comfy_runner.run_workflow.showing
    assert demo.WEIGHTS.name == toy_model.weights_name()
    assert toy_model.weights_path(train_if_missing=False) == demo.WEIGHTS


# Thresholds: measured on TASKS with concept-learning seeds 0 and 1 (bench_quality.py --tasks 6
# [--seed 1]); each assertion states the two measurements and leaves about half the smaller gap,
# since another machine's rounding sends a chaotic CFG-7.5 sampler elsewhere in the details.


@pytest.fixture(scope="module")
def quality(comfy_session, vct_pack):
    """Scores of every method on the test tasks."""
    try:
        weights = toy_model.weights_path(train_if_missing=False)
    except FileNotFoundError as e:
        pytest.fail(f"{e}: run `python tests/quality/toy_model.py` and commit the file it prints")
    counter = running.PassCounter()
    tasks = harness.task_set()
    clip = toy_model.build()[1]  # only to count caption tokens
    scores = []
    with running.toy_checkpoint(comfy_session, counter, weights):
        runner = running.Runner(comfy_session.input_dir, counter)
        for index in TASKS:
            task = tasks[index]
            groups = ("main", "blend", "fast_preset") + (("reconstruction",) if index in RECONSTRUCTION_TASKS else ())
            outcome = runner.run(task, harness.Settings(), groups,
                                 text_tokens=harness.caption_tokens(clip, task.reference.caption()))
            scores.append(scoring.score(outcome))
    return scores


mean = scoring.method_mean


def test_vct_beats_every_image_only_baseline_on_structure_times_concept(quality):
    # IoU x concept, seed 0 / seed 1, measured without local blend: VCT 0.689 / 0.700; plain CFG from
    # z*_T 0.512 / 0.519, SDEdit 0.5 0.484 / 0.539, SDEdit 0.75 0.414 / 0.457. Smallest gap 0.161;
    # margin 0.08. With local blend (the default now), seed 0: VCT 0.696. (The caption given as text,
    # an oracle VCT's one-shot setting does not have, scores 0.771 / 0.771: not asserted.)
    vct = mean(quality, "vct", "score")
    for baseline in ("plain CFG from z*_T", "SDEdit 0.5", "SDEdit 0.75"):
        assert vct > mean(quality, baseline, "score") + 0.08, baseline


def test_vct_keeps_the_structure_and_takes_the_concept(quality):
    # Seed 0 / seed 1, without local blend: IoU with the source's mask 0.878 / 0.892; reference colour
    # and texture recognised 0.750 / 0.750 (9 of 12 attributes). With it, seed 0: 0.882 and 0.750.
    assert mean(quality, "vct", "structure") >= 0.75
    assert mean(quality, "vct", "concept") >= 0.6


def test_structure_rises_with_self_injection(quality):
    # IoU at tau_self 0, 0.3, 0.6, 0.9 without local blend: seed 0 0.394, 0.471, 0.704, 0.878; seed 1
    # 0.438, 0.504, 0.771, 0.892. With it, seed 0: 0.407, 0.472, 0.662, 0.882.
    names = ("no self-injection", "tau_self 0.3", "tau_self 0.6", "vct")
    ious = [mean(quality, name, "structure") for name in names]
    print(dict(zip(names, ious)))
    assert ious[-1] > ious[0] + 0.25
    assert all(b > a - 0.05 for a, b in zip(ious, ious[1:])), ious


def test_null_text_rebuilds_the_source_far_better_than_untuned_nulls(quality):
    # The null-text inversion paper's setting (the source's caption as source prompt, "" as the
    # null): B* PSNR 42.0 dB tuned against 18.1 dB untuned. The paper's empty source prompt: 45.1 dB.
    tuned = mean(quality, "caption prompt, null-text", "psnr")
    untuned = mean(quality, "caption prompt, untuned null", "psnr")
    assert tuned > untuned + 12.0
    assert mean(quality, "vct", "psnr") > 38.0


def test_learned_concept_generates_the_reference_attributes(quality):
    # Of 8 plain CFG samples of the learned concept per task, seed 0 / seed 1: 0.583 / 0.812 carry
    # both the reference's colour and texture; attribute accuracy 0.688 / 0.896.
    assert mean(quality, "concept samples", "both") >= 0.4
    assert mean(quality, "concept samples", "concept") >= 0.55


def test_local_blend_keeps_the_background_without_losing_structure_or_concept(quality):
    # Background PSNR (outside both objects) with local blend 0.3 (the default) against without
    # (the paper's VCT), seed 0: 31.1 dB against 20.3 dB; IoU 0.882 against 0.878, concept 0.750 both.
    # Margins: 5 dB of the 10.8 dB gain; one attribute in 12 (0.083) for the concept.
    paper = "VCT without local blend (the paper's)"
    assert mean(quality, "vct", "background") > mean(quality, paper, "background") + 5.0
    assert mean(quality, "vct", "structure") > mean(quality, paper, "structure") - 0.03
    assert mean(quality, "vct", "concept") > mean(quality, paper, "concept") - 0.09


def test_the_fast_preset_scores_like_vct_at_a_fraction_of_the_passes(quality):
    # IoU x concept, seed 0: fast preset 0.700, VCT's defaults 0.696, the best image-only baseline 0.512
    # (on all 24 tasks 0.656 against 0.688: README).
    # UNet rows with gradients: 60 against 2049 (concept learning); forward rows 120 against 343.
    preset = harness.FAST_PRESET.label
    assert mean(quality, preset, "score") > mean(quality, "vct", "score") - 0.06
    for baseline in ("plain CFG from z*_T", "SDEdit 0.5", "SDEdit 0.75"):
        assert mean(quality, preset, "score") > mean(quality, baseline, "score") + 0.08, baseline
    assert mean(quality, preset, "train") <= 0.05 * mean(quality, "vct", "train")
    assert mean(quality, preset, "forward") <= 0.5 * mean(quality, "vct", "forward")


def test_appearance_attention_alone_takes_the_reference_colour(quality):
    # No learned concept: the sampler's concept is the source's empty prompt, so without appearance
    # attention B rebuilds the source (concept 0.167: only the references whose texture is the
    # source's). With appearance 0.5: concept 0.500, IoU 0.850 (seed 0). Margins: one attribute in 12.
    name = harness.APPEARANCE_FAST.label
    assert mean(quality, name, "concept") > 0.4
    assert mean(quality, name, "structure") > 0.75


def test_the_shipped_fast_template_is_the_measured_preset(vct_pack):
    """The preset the tests above measure is the one the template 'VCT fast translation' ships."""
    from support import comfy_runner

    path = Path(__file__).resolve().parents[2] / "example_workflows" / "VCT fast translation.json"
    nodes = {n["class_type"]: n["inputs"] for n in comfy_runner.api_prompt_from_file(path).values()}
    preset = harness.FAST_PRESET
    learn, sampler = nodes["VCTConceptLearn"], nodes["VCTDualBranchSampler"]
    assert (learn["steps"], learn["learning_rate"], learn["grad_accum"]) == (
        preset.concept_steps, preset.learning_rate, preset.grad_accum)
    assert nodes["VCTDDIMInvert"]["steps"] == preset.steps and nodes["VCTNullTextInvert"]["method"] == "direct"
    assert sampler["local_blend"] == preset.local_blend and sampler["appearance_strength"] == preset.appearance
