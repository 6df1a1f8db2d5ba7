"""FacePipeline: text-to-face generation, visual question answering and captioning with a trained UniF2ace.

A pipeline directory holds three subfolders (what `unif2ace train` and `unif2ace demo` write):

    model/              UniF2aceModel.save_pretrained (config.json + model.safetensors)
    image_tokenizer/    ImageTokenizer.save_pretrained
    text_tokenizer/     TextTokenizer.save_pretrained

    pipe = FacePipeline.from_pretrained("artifacts/demo/pipeline")
    images = pipe.generate(["happy face, tan skin, short black hair, blue background"], num_images_per_prompt=4)
    pipe.answer(images[0], "What colour is the background?")     # -> "blue"
    pipe.caption(images[0])                                        # -> "happy face, tan skin, ..."
"""
from __future__ import annotations

import os
from typing import Sequence, Union

import torch
from PIL import Image

from unif2ace.data.dataset import image_to_tensor
from unif2ace.model import UniF2aceModel
from unif2ace.training.data import CAPTION_QUESTION, question_prompt


class FacePipeline:
    def __init__(self, model: UniF2aceModel, image_tokenizer, text_tokenizer, device: Union[str, torch.device] = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.image_tokenizer = image_tokenizer.to(self.device).eval()
        self.text_tokenizer = text_tokenizer

    @classmethod
    def from_pretrained(cls, directory: str, *, device: Union[str, torch.device] = "cpu",
                        backend: str = None) -> "FacePipeline":
        from unif2ace.tokenizers import ImageTokenizer, TextTokenizer

        for sub in ("model", "image_tokenizer", "text_tokenizer"):
            if not os.path.isdir(os.path.join(directory, sub)):
                raise FileNotFoundError(f"{directory!r} is not a pipeline directory: {sub}/ is missing")
        model = UniF2aceModel.from_pretrained(os.path.join(directory, "model"), backend=backend)
        image_tok = ImageTokenizer.from_pretrained(os.path.join(directory, "image_tokenizer"))
        text_tok = TextTokenizer.from_pretrained(os.path.join(directory, "text_tokenizer"))
        return cls(model, image_tok, text_tok, device)

    def save_pretrained(self, directory: str) -> None:
        self.model.save_pretrained(os.path.join(directory, "model"))
        self.image_tokenizer.save_pretrained(os.path.join(directory, "image_tokenizer"))
        self.text_tokenizer.save_pretrained(os.path.join(directory, "text_tokenizer"))

    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_codes(self, prompts: Sequence[str], *, num_images_per_prompt: int = 1, steps: int = 12,
                       guidance_scale: float = 2.0, seed: int = 0, temperature: float = 1.0) -> torch.Tensor:
        ids = [self.text_tokenizer.encode(p) for p in prompts for _ in range(num_images_per_prompt)]
        return self.model.generate_images(ids, steps=steps, guidance_scale=guidance_scale, seed=seed,
                                          temperature=temperature)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, N] → images [B, 3, S, S] in [-1, 1]."""
        return self.image_tokenizer.decode(codes.to(self.device)).clamp(-1, 1)

    def generate(self, prompts: Union[str, Sequence[str]], *, num_images_per_prompt: int = 1, steps: int = 12,
                 guidance_scale: float = 2.0, seed: int = 0, temperature: float = 1.0) -> list[Image.Image]:
        """Faces for each prompt (prompt-major order: all images of prompt 0, then prompt 1, ...)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        codes = self.generate_codes(prompts, num_images_per_prompt=num_images_per_prompt, steps=steps,
                                    guidance_scale=guidance_scale, seed=seed, temperature=temperature)
        return tensor_to_pil(self.decode_codes(codes))

    # ------------------------------------------------------------------------------------------------------
    def _image_tensor(self, image) -> torch.Tensor:
        if isinstance(image, str):
            with Image.open(image) as im:
                image = im.convert("RGB")
        if isinstance(image, Image.Image):
            image = image_to_tensor(image, self.model.config.image_size)
        image = image if image.dim() == 4 else image[None]
        return image.to(self.device)

    @torch.no_grad()
    def answer_batch(self, images, questions: Sequence[str], *, max_new_tokens: int = 48) -> list[str]:
        """Greedy answers; `images` is a list of PIL images / paths or a tensor [B, 3, S, S] in [-1, 1]."""
        if torch.is_tensor(images):
            x = images.to(self.device)
        else:
            x = torch.cat([self._image_tensor(im) for im in images])
        codes = self.image_tokenizer.encode(x)
        prefixes = [self.text_tokenizer.encode(question_prompt(q)) for q in questions]
        out = self.model.generate_text(prefixes, image_codes=codes, images=x, max_new_tokens=max_new_tokens,
                                       top_k=1)
        return [self.text_tokenizer.decode(o).strip() for o in out]

    def answer(self, image, question: str, *, max_new_tokens: int = 48) -> str:
        return self.answer_batch([image] if not torch.is_tensor(image) else image, [question],
                                 max_new_tokens=max_new_tokens)[0]

    def caption(self, image, *, max_new_tokens: int = 64) -> str:
        return self.answer(image, CAPTION_QUESTION, max_new_tokens=max_new_tokens)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(images: Sequence[Image.Image], *, columns: int = 4, captions: Sequence[str] = (), scale: int = 2,
               caption_lines: int = 4) -> Image.Image:
    """A PNG-ready grid; with `captions` the text is wrapped and drawn under each image."""
    from PIL import ImageDraw, ImageFont

    import textwrap

    w, h = images[0].size
    w, h = w * scale, h * scale
    font = ImageFont.load_default()
    line_h = 11
    text_h = caption_lines * line_h + 4 if captions else 0
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (w + 4) + 4, rows * (h + text_h + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(10, w // 6)
    for i, im in enumerate(images):
        x, y = 4 + (i % columns) * (w + 4), 4 + (i // columns) * (h + text_h + 4)
        grid.paste(im.resize((w, h), Image.NEAREST), (x, y))
        if captions:
            lines = textwrap.wrap(captions[i], chars)[:caption_lines]
            for k, line in enumerate(lines):
                draw.text((x, y + h + 2 + k * line_h), line, fill="black", font=font)
    return grid
