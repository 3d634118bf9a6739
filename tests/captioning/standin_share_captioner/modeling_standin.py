"""STAND-IN for Share-Captioner's remote code (InternLM-XComposer v1): NOT the real model.

Same interface as the real `InternLMXComposerForCausalLM` where the official batch script touches
it; the parts are tiny and random: the vision tower is a 56-px average pool + Linear in place of
EVA-ViT-g + Q-Former, and `internlm_model` is a tiny Llama in place of InternLM-7B. It records every
`internlm_model.generate` call (kwargs and inputs_embeds) so tests can check them, and marks padding
of finished sequences as -1, the value the official script maps back to `</s>` (2) before decoding.
With STANDIN_SHARE_CAPTIONER_REPORT set (a folder), loading writes the process's transformers version
there, so a test can see which environment the Ray actor ran in.
"""

import json
import os

import torch
import transformers
from torch import nn
from torchvision import transforms
from torchvision.transforms.functional import InterpolationMode
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from .configuration_standin import StandInShareCaptionerConfig


class RecordingInternLM(LlamaForCausalLM):
    """A tiny Llama standing in for InternLM; `calls` holds what generate() was given."""

    def __init__(self, config):
        super().__init__(config)
        self.calls = []

    def generate(self, *args, **kwargs):
        self.calls.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})
        out = super().generate(*args, **kwargs)  # [b, T_new]: inputs_embeds only, so new tokens only
        pad = torch.full_like(out[:, :1], -1)  # [b, 1]: the -1 padding the official script maps to </s>
        return torch.cat([out.masked_fill(out == self.config.pad_token_id, -1), pad], dim=1)  # [b, T_new + 1]


class StandInShareCaptioner(PreTrainedModel):
    config_class = StandInShareCaptionerConfig
    _no_split_modules = []

    def __init__(self, config):
        super().__init__(config)
        text = LlamaConfig(**config.text_config)
        hidden = text.hidden_size
        self.internlm_model = RecordingInternLM(text)
        self.visual_proj = nn.Linear(3, hidden)  # stands in for EVA-ViT-g + Q-Former + internlm_proj
        self.flag_image_start = nn.Parameter(torch.zeros([1, 1, hidden]))
        self.flag_image_end = nn.Parameter(torch.zeros([1, 1, hidden]))
        # The real vis_processor, verbatim in behaviour: bicubic 224 x 224, CLIP mean/std.
        self.vis_processor = transforms.Compose(
            [
                transforms.Resize((224, 224), interpolation=InterpolationMode.BICUBIC),
                transforms.ToTensor(),
                transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
            ]
        )
        self.tokenizer = None
        self.eoh = "<TOKENS_UNUSED_0>"  # end of human
        self.eoa = "<TOKENS_UNUSED_1>"  # end of assistant
        self.post_init()
        _report_environment()

    def encode_img(self, image):
        x = nn.functional.avg_pool2d(image.to(self.visual_proj.weight.dtype), 56)  # [b, 3, 4, 4]
        x = self.visual_proj(x.flatten(2).transpose(1, 2))  # [b, 16, hidden]
        b = x.shape[0]
        return torch.cat([self.flag_image_start.expand(b, -1, -1), x, self.flag_image_end.expand(b, -1, -1)], dim=1)

    def encode_text(self, text, add_special_tokens=False):
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens).input_ids.to(self.device)
        return self.internlm_model.model.embed_tokens(ids)

    def decode_text(self, out_embeds):
        out_text = self.tokenizer.batch_decode(out_embeds, skip_special_tokens=True)[0]
        return out_text.split(self.eoa)[0]


def _report_environment():
    folder = os.environ.get("STANDIN_SHARE_CAPTIONER_REPORT")
    if folder:
        path = os.path.join(folder, f"{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump({"transformers": transformers.__version__, "torch": torch.__version__}, f)
