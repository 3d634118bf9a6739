"""The `hf` backend on the real tiny LLaVA: loading, chat template, left padding, failure rows."""

import io

import numpy as np
import pytest
from PIL import Image

from captioning import hf
from captioning.batch import CaptionerArgs
from encoders import vlm
from shards import reasons

NOT_AN_IMAGE = b"<html><body>404 served as a jpg</body></html>"


def _batch(*images):
    return {
        "key": np.array([f"k{i}" for i in range(len(images))], dtype=object),
        "image": np.array(list(images), dtype=object),
    }


@pytest.fixture(scope="module")
def captioner(cap_models):
    return hf.HFCaptioner(
        CaptionerArgs(
            str(cap_models["captioner"]), "Describe this image in detail.", dtype="float32", max_new_tokens=12
        )
    )


def test_tiny_model_is_a_real_llava_with_a_working_processor(cap_models):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(cap_models["captioner"])
    model = AutoModelForImageTextToText.from_pretrained(cap_models["captioner"])
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert proc.tokenizer.padding_side == "left" and proc.chat_template
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], add_generation_prompt=True
    )
    assert text == "USER: <image>\nHi ASSISTANT:"
    inputs = proc(images=[Image.new("RGB", (50, 20))], text=[text], return_tensors="pt")
    # 32 px / patch 8 = 16 patch tokens; the CLS the "default" strategy drops must not be counted.
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 16
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)


def test_build_tiny_is_deterministic(cap_models, tmp_path):
    again = vlm.build_tiny(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (cap_models["captioner"] / name).read_bytes(), name


def test_captions_a_batch_of_mixed_sizes_and_formats(captioner, make_image):
    image_bytes = make_image
    out = captioner(_batch(image_bytes(40, 30, 1), image_bytes(300, 90, 2, "png"), image_bytes(64, 64, 3, "webp")))
    assert "image" not in out  # bytes never travel back to the driver
    assert list(out["status"]) == [reasons.KEPT] * 3 and list(out["reason"]) == [""] * 3
    assert all(isinstance(c, str) and c for c in out["caption"])


def test_batched_generation_matches_one_at_a_time(captioner, make_image):
    image_bytes = make_image
    images = [image_bytes(40, 30, 4), image_bytes(90, 200, 5, "png")]
    together = captioner(_batch(*images))["caption"]
    alone = [captioner(_batch(img))["caption"][0] for img in images]
    assert list(together) == alone


def test_failure_rows_keep_the_batch(captioner, cap_models, make_image):
    image_bytes = make_image
    out = captioner(_batch(image_bytes(40, 30, 1), NOT_AN_IMAGE, image_bytes(40, 30, 1)[:200]))
    assert list(out["status"]) == [reasons.KEPT, reasons.FAILED, reasons.FAILED]
    assert list(out["reason"]) == ["", reasons.NOT_AN_IMAGE, reasons.NOT_AN_IMAGE]  # truncated JPEG too
    broken = hf.HFCaptioner(
        CaptionerArgs(
            str(cap_models["captioner"]), "Describe.", dtype="float32", max_new_tokens=4, generate={"num_beams": 0}
        )
    )  # generate() raises: a generation error
    out = broken(_batch(image_bytes(40, 30, 1), NOT_AN_IMAGE))
    assert list(out["reason"]) == [reasons.CAPTION_ERROR, reasons.NOT_AN_IMAGE]


def test_images_are_downscaled_in_the_worker(make_image):
    image_bytes = make_image
    big = io.BytesIO()
    Image.new("RGB", (4000, 3000), "red").save(big, "JPEG")
    img = vlm.decode_image(big.getvalue(), target=(32, 32))
    assert min(img.size) == 32 and img.size[0] > img.size[1]  # covers the 32 px crop, aspect kept
    img = vlm.decode_image(big.getvalue(), max_pixels=1280 * 28 * 28)
    assert img.width * img.height <= 1280 * 28 * 28 and img.width * img.height > 0.9 * 1280 * 28 * 28
    small = vlm.decode_image(image_bytes(20, 10, 0, "png"), target=(32, 32))
    assert small.size == (20, 10)  # never upscaled here: the processor does what it must


def test_processor_input_size():
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    assert vlm.processor_input_size(CLIPImageProcessor(size={"shortest_edge": 336})) == (336, 336)
    assert vlm.processor_input_size(SiglipImageProcessor(size={"height": 384, "width": 384})) == (384, 384)


def test_qwen2vl_processor_budget_is_an_area_cap(tmp_path):
    """transformers 5 keeps Qwen2-VL's pixel budget as size={shortest_edge: min_pixels, longest_edge:
    max_pixels}: read as an area cap for decoding, not as a 3136-px target edge."""
    import io

    from PIL import Image

    from demo import tiny_qwen2vl
    from encoders import vlm

    model = tiny_qwen2vl.build(tmp_path / "qwen2vl")
    cap = vlm.VLM(str(model), dtype="float32", max_new_tokens=4, device="cpu")
    assert cap.target is None and cap.max_pixels == tiny_qwen2vl.MAX_PIXELS
    buf = io.BytesIO()
    Image.new("RGB", (1600, 900), "red").save(buf, "JPEG")
    img = cap.decode(buf.getvalue())
    assert img.width * img.height <= tiny_qwen2vl.MAX_PIXELS and abs(img.width / img.height - 16 / 9) < 0.05
    texts = cap.generate_with_limit(
        [cap.chat_text([{"type": "image"}, {"type": "text", "text": "Describe."}], "")], [img]
    )
    assert len(texts) == 1 and isinstance(texts[0][1], bool)
