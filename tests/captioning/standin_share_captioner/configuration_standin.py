"""STAND-IN for Share-Captioner's remote code (InternLM-XComposer v1): NOT the real model.

The real weights (`Lin-Chen/ShareCaptioner`) are not reachable offline. This config and
`modeling_standin.py` expose the same remote-code interface the official batch script uses
(`vis_processor`, `encode_img`, `encode_text`, `eoh`/`eoa`, `internlm_model.generate`,
`decode_text`, a `tokenizer` attribute), so the backend's prompt assembly and generate() arguments
can be checked against the recipe, loaded the same way: `trust_remote_code=True` from a folder.
"""

from transformers import PretrainedConfig


class StandInShareCaptionerConfig(PretrainedConfig):
    model_type = "standin_share_captioner"

    def __init__(self, text_config=None, **kwargs):
        self.text_config = dict(text_config or {})
        super().__init__(**kwargs)
