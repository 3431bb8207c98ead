"""eval.py: the job plan, the composition scene, the metrics and the results section of docs/results.md (no training here)."""
import pytest

import eval as evaluation
from toy import oracle, world
from toy.concepts import CONCEPTS


def test_jobs_cover_every_variant_once_per_concept_and_seed():
    jobs = evaluation.make_jobs(list(CONCEPTS), list(evaluation.VARIANTS), seeds=2, composition=True)
    sampled = [(job.concepts, job.seed, variant) for job in jobs if len(job.concepts) == 1
               for variant, _ in job.samples]
    single = [v for v in evaluation.VARIANTS if v != "no_pairs"]     # no_pairs only changes composition
    assert len(sampled) == len(set(sampled)) == len(CONCEPTS) * len(single) * 2
    # "set" is the first half of "ours": sampled from that run, not trained again
    ours = [job for job in jobs if job.name.endswith("ours/seed0") and len(job.concepts) == 1]
    assert all({v for v, _ in job.samples} == {"ours", "set"} for job in ours)
    # per seed, one composition run with the stitched pairs and one without
    pairs = [job for job in jobs if len(job.concepts) == 2]
    assert sorted((job.seed, job.samples[0][0]) for job in pairs) == [(0, "no_pairs"), (0, "ours"),
                                                                      (1, "no_pairs"), (1, "ours")]
    no_pairs = next(job for job in pairs if job.samples[0][0] == "no_pairs")
    assert no_pairs.stages[1] == ("sequence", ("--composition-weight", "0"))
    assert all(job.stages == () for job in jobs if "/base/" in job.name or "/vae/" in job.name)


def test_composition_scene_is_clean_and_its_prompt_names_both_tokens():
    pair = evaluation.composition_pair()
    scene = evaluation.composition_scene(pair)
    assert world.layout_problem(scene.sprites, scene.background) is None
    prompt = evaluation.composition_prompt(pair, scene)
    for name in pair:
        assert CONCEPTS[name].identity_token in prompt.split() and CONCEPTS[name].motion_token in prompt.split()


def rows_for(scene_of: dict, render: bool) -> list[dict]:
    """Oracle rows of the four prompts of the first concept: true renders, or all-black clips."""
    rows = []
    for kind, prompt, scene in scene_of:
        clip = world.render(scene) if render else world.render(scene) * 0
        result = oracle.score(clip, scene, world.render(scene) if kind == "motion_prompt" else None)
        result["first_frame_identity"] = [s["identity_score"] for s in oracle.score(clip[:1], scene)["sprites"]]
        rows.append({"kind": kind, "prompt": prompt, "concepts": ["c"], "seed": 0, "variant": "v", **result})
    return rows


def test_metrics_are_perfect_on_true_renders_and_poor_on_black_clips():
    job = evaluation.Job("x", (next(iter(CONCEPTS)),), 0, (), ())
    prompts = evaluation.prompts_of(job)
    perfect = evaluation.metrics_of(rows_for(prompts, render=True))
    assert perfect["mse"] == 0 and perfect["id"] > 0.95 and perfect["motion"] > 0.95 and perfect["edit"] == 1.0
    blank = evaluation.metrics_of(rows_for(prompts, render=False))
    assert blank["id"] < 0.1 and blank["motion"] < 0.1 and blank["mse"] > 0.01


def test_table_and_results_section(tmp_path, monkeypatch):
    job = evaluation.Job("x", (next(iter(CONCEPTS)),), 0, (), ())
    rows = rows_for(evaluation.prompts_of(job), render=True)
    results = [{"rows": [{**r, "variant": "ours", "seed": seed} for r in rows]} for seed in (0, 1)]
    table, summary = evaluation.tabulate(results, ["ours", "single"])
    assert list(summary) == ["ours"] and "`ours`" in table and "| 1.000 ± 0.000 |" in table
    readme = tmp_path / "results.md"
    readme.write_text(f"intro\n{evaluation.BEGIN}\nold\n{evaluation.END}\nrest\n")
    monkeypatch.setattr(evaluation, "RESULTS", str(readme))
    evaluation.write_results("new table")
    assert readme.read_text() == f"intro\n{evaluation.BEGIN}\nnew table\n{evaluation.END}\nrest\n"
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- eval:begin -->"):
        evaluation.write_results("x")
    evaluation.plot_svg(summary, str(tmp_path / "plot.svg"))
    assert (tmp_path / "plot.svg").read_text().startswith("<svg")


def test_bad_flags_fail_before_any_work():
    with pytest.raises(ValueError, match="unknown concept"):
        evaluation.main(evaluation.parse_args(["--concept", "nope"]))
    with pytest.raises(ValueError, match="--seeds"):
        evaluation.main(evaluation.parse_args(["--seeds", "0"]))


def test_vae_ceiling_rows_score_the_true_clips_through_the_vae():
    """The `vae` row: each prompt's true clip encoded and decoded by the toy VAE, scored like a sample."""
    job = evaluation.Job("x", (next(iter(CONCEPTS)),), 0, (), ())
    prompts = evaluation.prompts_of(job)
    rows = evaluation.sample_and_score("toy/checkpoint", "<vae>", prompts, seed=0, steps=None)
    assert [r["kind"] for r in rows] == ["motion_prompt", "background", "composition", "motion"]
    metrics = evaluation.metrics_of([{**r, "concepts": ["c"]} for r in rows])
    assert metrics["mse"] < 0.03 and metrics["edit_background"] == 1.0   # a reconstruction, not noise
    # Frame 0 comes back recognisable. A bound on the shipped VAE's quality: it scores about 0.45 on
    # this concept; the base model's samples score about 0.01.
    assert metrics["id"] > 0.2


def test_per_concept_table_reads_the_true_renders_as_perfect():
    concept = next(iter(CONCEPTS))
    rows = rows_for(evaluation.prompts_of(evaluation.Job("x", (concept,), 0, (), ())), render=True)
    results = [{"rows": [{**r, "concepts": [concept], "variant": "ours", "seed": s} for r in rows]} for s in (0, 1)]
    line = evaluation.per_concept_table(results, "ours").splitlines()[-1]
    motion = CONCEPTS[concept].sprite.motion
    assert line.startswith(f"| {concept} | 0.0000 | 1.000 |") and f"{motion}, {motion}" in line and "100%" in line
