"""The miniature world's alignment pieces: exact hallucination, automatic corrections, the world-truth labeler."""

from mpm.align.claims import Claim
from mpm.demo.align import WorldLabeler, correct, hallucinates, results_table, write_scenes
from mpm.demo.world import Scene, SceneObject, load_world

WORLD = load_world(["en", "de", "zh"])
SCENE = Scene((SceneObject("red", "circle", "big", "left"), SceneObject("blue", "square", "small", "right")))


def test_an_answer_hallucinates_when_what_it_names_fits_no_object():
    assert hallucinates(WORLD, SCENE, "a big red circle on the left", "en") is False
    assert hallucinates(WORLD, SCENE, "a small blue square", "en") is False  # unnamed attributes are not claims
    assert hallucinates(WORLD, SCENE, "a big blue circle on the left", "en") is True  # one's colour, other's shape
    assert hallucinates(WORLD, SCENE, "ein kleines blaues Quadrat rechts", "de") is False
    assert hallucinates(WORLD, SCENE, "ein großer blauer Kreis links", "de") is True
    assert hallucinates(WORLD, SCENE, "hello there", "en") is None  # names nothing: silent, not false
    assert hallucinates(WORLD, SCENE, "a big red circle on the left", "de") is None  # English words name nothing in de


def test_a_correction_replaces_only_the_wrong_words_by_the_best_matching_object():
    assert correct(WORLD, SCENE, "there is a big blue circle on the left") == "there is a big red circle on the left"
    assert correct(WORLD, SCENE, "a small blue square at the top") == "a small blue square on the right"
    assert correct(WORLD, SCENE, "a big red circle on the left") is None  # nothing to correct
    assert correct(WORLD, SCENE, "nothing here") is None


def test_the_world_labeler_accepts_true_claims_and_rejects_invented_ones(tmp_path):
    scenes = write_scenes(WORLD, tmp_path, 3, 11, ["en", "zh"], 32)
    assert len(scenes) == 3 and len((tmp_path / "instructions.jsonl").read_text().splitlines()) == 6
    image, scene = next(iter(scenes.items()))
    true = scene.objects[0]
    wrong = next(c for c in ("red", "blue", "green") if all(o.colour != c for o in scene.objects))
    labeler = WorldLabeler(WORLD, scenes)
    items = [(image, Claim(f"a {true.size} {true.colour} {true.shape}", "?", "en")),
             (image, Claim(f"a {wrong} {true.shape}", "?", "en")),
             (image, Claim("there is something", "?", "en"))]  # fmt: skip
    assert labeler.score(items) == [1.0, 0.0, 1.0]


def test_the_results_table_has_a_row_per_language_and_a_column_per_variant():
    rates = {"en": {"rate": 0.5, "fidelity": 1.0}, "zh": {"rate": None, "fidelity": 0.9}}
    seed = {v: rates for v in ("before", "ddpo", "ddpo_lora", "rlaifv")}
    seed["counts"] = {
        "feedback_scenes": 4,
        "corrections": 2,
        "rlaifv_pairs": 1,
        "rlaifv_claims": 3,
        "heldout_scenes": 2,
    }
    table = results_table([seed, seed], ["en", "zh"])
    assert "| en | 50.0 ± 0.0 (100) | 50.0 ± 0.0 (100) |" in table and "| zh | - (90) | - (90) |" in table
