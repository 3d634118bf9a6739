"""The caption-quality guard: hand-made degenerate outputs are caught, 50 varied good captions pass."""

import numpy as np
import pytest

from captioning.batch import caption_batch
from captioning.guard import Guard
from shards import reasons

GOOD = [
    # long, dense PixArt-style captions
    "A red fox stands in deep snow at the edge of a pine forest, its thick orange coat dusted with white "
    "flakes. The fox looks to the left with amber eyes, ears pricked, while soft morning light falls from "
    "the right and casts long blue shadows across the snow. The background is a blur of dark green trees.",
    "An elderly man with a white beard sits on a wooden bench in a sunlit park, reading a folded newspaper. "
    "He wears a brown tweed jacket, a flat cap and round glasses. Behind him, autumn trees with yellow and "
    "orange leaves line a gravel path, and a bicycle leans against a lamp post on the right.",
    "A bowl of ramen on a dark wooden table, viewed from above: slices of chashu pork, a halved soft-boiled "
    "egg with a jammy yolk, green onions, nori sheets and bamboo shoots float in a cloudy tonkotsu broth. "
    "Chopsticks rest on a ceramic holder beside the bowl, and steam rises in the warm light.",
    "A futuristic city skyline at night, with glass skyscrapers lit in neon pink, cyan and violet. Flying "
    "cars leave light trails between the towers, holographic billboards show Japanese characters, and rain "
    "reflects the lights on the wet street below. Digital art in a cyberpunk style.",
    "An oil painting of a stormy sea: a small sailing boat with a torn white sail tilts on a towering green "
    "wave, while dark clouds gather overhead and a thin band of golden light breaks through near the "
    "horizon. Thick impasto brushstrokes give the water texture and motion.",
    "A close-up portrait of a young woman with curly dark hair and freckles, looking straight at the "
    "camera with a faint smile. She wears small gold hoop earrings and a mustard-yellow sweater. The "
    "background is a soft, out-of-focus green, and the light is diffuse, as on an overcast day.",
    "A watercolor illustration of a cozy reading nook: an armchair with a knitted blanket, a stack of "
    "books on a small round table, a steaming mug of tea and a sleeping tabby cat curled on a cushion. A "
    "window behind shows falling snow, and warm lamplight fills the room.",
    "Aerial view of a winding river cutting through a dense tropical rainforest, the brown water curving "
    "in wide loops between bright green canopies. Low mist hangs over the trees, and a small sandbar with "
    "a few fallen logs appears near the bottom of the frame.",
    "A vintage red convertible from the 1960s parked on a coastal road, its chrome bumpers gleaming in "
    "the sun. The turquoise ocean stretches behind a low stone wall, palm trees sway on the left, and the "
    "sky is a clear, pale blue with a few wispy clouds.",
    "A minimalist product photo of a white ceramic coffee cup on a light grey background, with a thin "
    "shadow to the right. The cup has a matte finish and a small handle; a single coffee bean lies beside "
    "its saucer. The composition is centered and the lighting soft and even.",
    # numbers, quotes, signs
    'A storefront with a green awning that reads "Joe\'s Bakery - Est. 1952" in white letters, and a '
    'chalkboard sign on the sidewalk listing "Croissants $2.50" and "Coffee $1.75".',
    "A digital clock on a bedside table showing 07:45 in red segments, next to a glass of water and a "
    "pair of folded reading glasses.",
    "A marathon runner wearing bib number 2047 crosses the finish line with both arms raised; the race "
    "clock above reads 3:12:08.",
    'A vintage poster with the words "Visit Paris" above an illustration of the Eiffel Tower at sunset, '
    "printed in 1931 according to the small text at the bottom.",
    "A scoreboard at a baseball stadium showing the home team leading 5 to 3 in the bottom of the 9th "
    "inning, with a crowd of fans in blue jerseys below.",
    "Three identical yellow rubber ducks in a row on the edge of a bathtub, the middle one slightly "
    "larger than the others.",
    'A street sign at an intersection reading "Main St" and "5th Ave", with a red traffic light '
    "above and yellow taxis waiting below.",
    'A birthday cake with 30 lit candles and the words "Happy Birthday, Maria!" piped in pink icing on white frosting.',
    'A handwritten note on lined paper that says "Back in 10 minutes" taped to a glass door.',
    "A bar chart on a laptop screen comparing quarterly sales for 2021, 2022 and 2023, with the tallest "
    "bar in Q4 2023.",
    # non-ASCII names and places, foreign words in quotes
    "The old town square of Kraków on a winter evening, with the Cloth Hall lit in warm yellow and "
    "horse-drawn carriages waiting on the cobblestones.",
    "A street café in São Paulo with colourful tiles on the wall, small round tables and people drinking "
    "cafezinho under a striped umbrella.",
    "A portrait of the footballer Zlatan Ibrahimović in a black jersey, mid-shout, with stadium lights "
    "blurred behind him.",
    'A bakery window in Zürich displaying rows of Gipfeli and a handwritten sign that reads "Frisch '
    'gebacken", with snow on the window ledge.',
    'A shop sign in Tokyo showing the characters "東京ラーメン" above a red lantern, with a man in a '
    "white apron standing in the doorway.",
    "A museum label next to a painting by Renée Sintenis, describing a small bronze sculpture of a foal "
    "on a marble plinth.",
    "A bowl of crème brûlée with a caramelized sugar crust cracked by a spoon, on a blue linen napkin.",
    "A Moroccan riad courtyard with a tiled fountain, orange trees in terracotta pots and carved cedar "
    "doors, in soft afternoon light.",
    "A mural in Mexico City of Frida Kahlo surrounded by marigolds, monkeys and parrots in bright saturated colours.",
    "A red phone box in a village near Llandudno, with a green hill and grazing sheep behind it.",
    # short and medium captions, varied structure
    "A black cat sleeping on a sunny windowsill.",
    "Two children flying a kite on a windy beach.",
    "A snowy mountain peak under a starry sky.",
    "Close-up of dew drops on a spider web at dawn.",
    "A bowl of fresh strawberries and blueberries.",
    "An empty subway car with orange seats, lit by fluorescent lights.",
    "A golden retriever catching a frisbee mid-air in a park.",
    "A lighthouse on a rocky cliff during a thunderstorm, lightning striking the sea.",
    "Sunflowers in a field, facing the camera, with a farmhouse in the distance.",
    "A pencil sketch of a woman's hands holding a teacup.",
    "A pixel-art game scene with a knight, a dragon and a castle on a hill.",
    "A macro photograph of a honeybee collecting pollen from a purple lavender flower; the bee's wings "
    "are sharp and the background is a creamy blur",
    "A 3D render of a glossy blue sphere resting on a checkerboard floor, with soft shadows.",
    "A crowded night market with food stalls, paper lanterns and people queuing for skewers.",
    "Very old, very worn leather boots standing by a fireplace.",
    "A herd of zebras drinking at a waterhole, their stripes reflected in the still water, while two "
    "giraffes browse on acacia trees in the background.",
    "A wedding couple walking down the aisle under a shower of rose petals, guests clapping on both sides.",
    "An architectural drawing of a modern house with a flat roof, large glass windows and a cantilevered "
    "balcony, shown in elevation and plan.",
    "A plate of spaghetti carbonara with black pepper and grated pecorino, a fork twirled in the pasta.",
    "A foggy harbor at dawn: fishing boats moored side by side, gulls on the posts, and the silhouette "
    "of a church tower across the water.",
]

LOOP = (
    "A red car parked on the street. A red car parked on the street. A red car parked on the street. "
    "A red car parked on the street."
)
BAD = [
    ("", None, reasons.EMPTY_CAPTION),
    ("   ", None, reasons.EMPTY_CAPTION),
    ("A cat", None, reasons.EMPTY_CAPTION),
    ("!!!", None, reasons.EMPTY_CAPTION),
    ("I'm sorry, but I can't help with identifying people in images.", None, reasons.REFUSED_CAPTION),
    ("I cannot describe this image because it may contain sensitive content.", False, reasons.REFUSED_CAPTION),
    ("As an AI language model, I do not have the ability to see images.", None, reasons.REFUSED_CAPTION),
    ("Unfortunately, I am not able to view the picture you provided.", None, reasons.REFUSED_CAPTION),
    ("A dog on a beach. As an AI model I may be wrong about the breed.", None, reasons.REFUSED_CAPTION),
    ("一只红色的狐狸站在雪地里，背景是松树林，阳光从右边照过来。", False, reasons.WRONG_LANGUAGE),
    ("Красная лиса стоит в глубоком снегу на краю соснового леса.", False, reasons.WRONG_LANGUAGE),
    (
        "Un renard roux se tient dans la neige au bord de la forêt, avec des arbres et une lumière douce sur "
        "les branches.",
        False,
        reasons.WRONG_LANGUAGE,
    ),
    (
        "Ein roter Fuchs steht im Schnee am Rand des Waldes, und die Sonne scheint auf die Bäume.",
        False,
        reasons.WRONG_LANGUAGE,
    ),
    (LOOP, False, reasons.DEGENERATE_CAPTION),
    ("A garden with flowers flowers flowers flowers flowers flowers", True, reasons.DEGENERATE_CAPTION),
    ("A table with a cup of tea and a cup of tea and a cup of tea and a cup of tea", True, reasons.DEGENERATE_CAPTION),
    ("A sign that reads hahahahahahahahahahahaha in red paint.", False, reasons.DEGENERATE_CAPTION),
    ("A mountain lake at sunset.................................", False, reasons.DEGENERATE_CAPTION),
    (" ".join(["the blue sky and the sea and the blue sea and the sky"] * 5), None, reasons.DEGENERATE_CAPTION),
    (
        "A woman in a red dress walks along a beach at sunset, holding her sandals in one hand while",
        True,
        reasons.TRUNCATED_CAPTION,
    ),
    (
        "A woman in a red dress walks along a beach at sunset, holding her sandals in one hand.",
        True,
        reasons.TRUNCATED_CAPTION,
    ),  # the engine says it hit the limit: trusted even at a full stop
    (
        "A woman in a red dress walks along a beach at sunset, holding her sandals in one hand and",
        None,
        reasons.TRUNCATED_CAPTION,
    ),  # engine cannot say: the unfinished sentence tells
    (
        "A busy kitchen with chefs preparing dishes, steam rising from pots, and a row of plates on the",
        None,
        reasons.TRUNCATED_CAPTION,
    ),
    ("A busy kitchen with chefs preparing dishes, steam rising from pots,", None, reasons.TRUNCATED_CAPTION),
]


@pytest.mark.parametrize("text,hit_limit,reason", BAD, ids=[f"{r}-{i}" for i, (_, _, r) in enumerate(BAD)])
def test_degenerate_outputs_are_caught(text, hit_limit, reason):
    verdict = Guard().check(text, hit_limit)

    assert verdict.reason == reason, (text, verdict)
    assert verdict.detail


def test_fifty_good_captions_pass():
    assert len(GOOD) == 50 and len(set(GOOD)) == 50
    guard = Guard()
    verdicts = {text: guard.check(text, hit_limit) for text in GOOD for hit_limit in (False, None)}
    assert {t: v for t, v in verdicts.items() if v.reason} == {}


def test_rules_can_be_switched_off():
    assert Guard(enabled=False).check("", True).reason == ""
    assert Guard(language=None).check(BAD[9][0]).reason == ""
    assert Guard(truncation=False).check(BAD[19][0], True).reason == ""
    assert Guard(min_words=1).check("A cat").reason == ""


def _batch(n):
    return {"key": np.array([f"k{i}" for i in range(n)], dtype=object), "image": np.array([b"img"] * n, dtype=object)}


def test_failed_rows_are_retried_once_with_the_retry_generator():
    firsts = [("A quiet harbour at dawn with fishing boats.", False), (LOOP, True), ("I'm sorry, I can't.", False)]
    seconds = [("A red car parked on a narrow street in the rain.", False), ("I cannot help with that.", False)]
    calls = []

    def retry(inputs):
        calls.append(len(inputs))
        return seconds

    out = caption_batch(_batch(3), lambda b: b, lambda inputs: firsts, Guard(), retry)

    assert calls == [2]  # only the two failures, once
    assert list(out["status"]) == [reasons.KEPT, reasons.KEPT, reasons.FAILED]
    assert list(out["reason"]) == ["", "", reasons.REFUSED_CAPTION]
    assert list(out["caption"]) == [firsts[0][0], seconds[0][0], ""]
    assert list(out["rejected"]) == ["", "", "I cannot help with that."]  # what the model wrote, for the report
    assert list(out["retried"]) == [False, True, True]


def test_without_retry_the_guard_verdicts_stand_and_errors_are_not_retried():
    out = caption_batch(_batch(2), lambda b: b, lambda inputs: [(LOOP, True), ("", False)], Guard())
    assert list(out["reason"]) == [reasons.DEGENERATE_CAPTION, reasons.EMPTY_CAPTION]
    assert list(out["caption"]) == ["", ""] and list(out["rejected"]) == [LOOP, ""]

    def broken(inputs):
        raise RuntimeError("out of memory")

    retried = []
    out = caption_batch(_batch(2), lambda b: b, broken, Guard(), lambda inputs: retried.append(inputs))
    assert list(out["reason"]) == [reasons.CAPTION_ERROR] * 2 and retried == []


def test_guard_in_the_pipeline_fails_rows_retries_them_and_reports_them(ray_local, make_cfg, make_shards, tmp_path):
    """The tiny random LLaVA writes noise cut at max_new_tokens: with the guard on, its rows fail with
    guard reasons, each is retried once (sampling), and the report shows counts and what was written."""
    import pyarrow.parquet as pq

    from captioning import recaption, report
    from shards import format as fmt

    shards = make_shards(tmp_path / "cur", 2, 4, corrupt={"000010001"})
    capdir = tmp_path / "caps"
    cfg = make_cfg(
        "captioning.guard.enabled=true",
        "captioning.captioners.hf.max_new_tokens=6",
        "captioning.captioners.hf.retry={do_sample: true, temperature: 1.5}",
    )
    summary = recaption.run(cfg, str(tmp_path / "cur" / "shards"), str(capdir))

    rows = [r for s in shards for r in pq.read_table(fmt.caption_file(capdir, s)).to_pylist()]
    guarded = [r for r in rows if r["reason"] in recaption.GUARD_REASONS]
    assert len(rows) == 8 and summary["failed"].get(reasons.NOT_AN_IMAGE) == 1
    assert guarded and all(r["status"] == reasons.FAILED and r["caption"] == "" for r in guarded)
    assert sum(summary["failed"].get(r, 0) for r in recaption.GUARD_REASONS) == len(guarded)
    assert summary["retried"] >= len(guarded) and summary["retried"] - summary["recovered"] == len(guarded)
    examples = report.read_guard_examples(capdir)
    assert sorted(e["key"] for e in examples) == sorted(r["key"] for r in guarded)
    assert all(e["text"] for e in examples if e["reason"] == reasons.TRUNCATED_CAPTION)
    html = (capdir / "report.html").read_text()
    assert 'data-table="guard-counts"' in html and 'data-table="guard-examples"' in html
    first = examples[0]
    assert first["reason"] in html and report.pages.esc(first["text"][:20]) in html
