"""Caption clean-up: boilerplate openings, whitespace, empty captions, T5 token counts."""

import pytest

from captioning import postprocess
from shards import reasons


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("The image shows a red fox in the snow.", "A red fox in the snow."),
        ("This image depicts two boats on a lake.", "Two boats on a lake."),
        ("In this image, a woman stands by a window.", "A woman stands by a window."),
        ("This is a photo of a wooden table.", "A wooden table."),
        ("The painting depicts a lighthouse at sunset.", "The painting depicts a lighthouse at sunset."),  # style kept
        ("The photograph captures a city at night.", "A city at night."),
        ("In the picture, there are three cats on a sofa.", "Three cats on a sofa."),
        ("A red fox in the snow. The image shows it clearly.", "A red fox in the snow. The image shows it clearly."),
        ("The imagery of the city at night is striking.", "The imagery of the city at night is striking."),
        ("The image shows", "The image shows"),  # nothing would be left: keep it rather than empty it
    ],
)
def test_strip_opening(raw, clean):
    assert postprocess.strip_opening(raw) == clean


def test_clean_collapses_whitespace_and_strips_only_when_asked():
    raw = "  The image shows a fox\n\n in   the\tsnow. "
    assert postprocess.clean(raw, strip_openings=True) == "A fox in the snow."
    assert postprocess.clean(raw, strip_openings=False) == "The image shows a fox in the snow."


def test_finish_rows_fails_empty_and_counts_t5_tokens(cap_models):
    from encoders import t5

    tok = t5.load_tokenizer(str(cap_models["t5"]))
    rows = [
        {"caption": "The image shows a red fox.", "status": reasons.KEPT, "reason": ""},
        {"caption": " \n ", "status": reasons.KEPT, "reason": ""},
        {"caption": "", "status": reasons.FAILED, "reason": reasons.NOT_AN_IMAGE},
        {"caption": "a small wooden house " * 100, "status": reasons.KEPT, "reason": ""},
    ]
    postprocess.finish_rows(rows, tok, strip_openings=True)
    assert rows[0]["caption"] == "A red fox."
    assert (
        rows[0]["num_tokens"] == len(tok("A red fox.").input_ids) and tok("A red fox.").input_ids[-1] == 1
    )  # </s> counted
    assert (rows[1]["status"], rows[1]["reason"], rows[1]["num_tokens"]) == (reasons.FAILED, reasons.EMPTY_CAPTION, 0)
    assert (rows[2]["reason"], rows[2]["num_tokens"]) == (reasons.NOT_AN_IMAGE, 0)
    assert rows[3]["num_tokens"] > 300  # untruncated: the over-budget count must see it
