"""FacePipeline: text-to-face generation, visual question answering and captioning with a trained UniF2ace.

A pipeline directory holds three subfolders (what `unif2ace train` and `unif2ace demo` write), optionally a
trained Face encoder and the sampling settings the model was evaluated with:

    model/                    UniF2aceModel.save_pretrained (config.json + model.safetensors)
    image_tokenizer/          ImageTokenizer.save_pretrained
    text_tokenizer/           TextTokenizer.save_pretrained
    face_encoder/             FaceAttributeEncoder.save_pretrained, when the model was trained with one (the demo)
    generation_config.json    {"num_inference_steps": 12, "guidance_scale": 3.0, "temperature": 1.0} (the defaults of __call__)

It follows the diffusers / transformers conventions:

    pipe = FacePipeline.from_pretrained("artifacts/demo/pipeline", torch_dtype=torch.bfloat16).to("cpu")
    images = pipe("happy face, tan skin, short black hair, blue background", num_inference_steps=12,
                  generator=torch.Generator().manual_seed(0)).images          # list of PIL images
    pipe.answer(images[0], "What colour is the background?")                  # greedy; do_sample=True samples
    pipe.caption(images[0])

Randomness: `seed=` keys the Philox sampler directly (the same draws on CPU and CUDA, for any thread count);
`generator=` draws that seed from a torch.Generator (advancing it), for code written against diffusers.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from unif2ace.data.dataset import image_to_tensor
from unif2ace.model import UniF2aceModel
from unif2ace.model.encoders import FaceAttributeEncoder
from unif2ace.training.data import CAPTION_QUESTION, question_prompt

DEFAULT_GENERATION_CONFIG = {"num_inference_steps": 12, "guidance_scale": 3.0, "temperature": 1.0}
GENERATION_CONFIG_NAME = "generation_config.json"
OUTPUT_TYPES = ("pil", "pt", "np")

Prompts = Union[str, Sequence[str]]


@dataclass
class FacePipelineOutput:
    """`images`: PIL images, or a float tensor [B, 3, H, W] ("pt") / array [B, H, W, 3] ("np") in [0, 1];
    `codes`: the image codes [B, N] they were decoded from."""
    images: Union[list, torch.Tensor, np.ndarray]
    codes: torch.Tensor


def _dtype(value) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value == "auto":
        return None
    dtype = getattr(torch, str(value).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"torch_dtype: expected a torch.dtype or a name like 'bfloat16', got {value!r}")
    return dtype


def _philox_seed(seed: Optional[int], generator: Optional[torch.Generator]) -> int:
    """The sampler's Philox seed: `seed` itself, or one drawn from `generator` (advancing it); 0 by default."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed (the Philox seed) or generator, not both")
    if generator is not None:
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return 0 if seed is None else seed


def _prompt_list(name: str, prompts: Prompts) -> list[str]:
    items = [prompts] if isinstance(prompts, str) else list(prompts) if prompts is not None else []
    if not items:
        raise ValueError(f"{name}: expected a caption or a non-empty list of captions, got {prompts!r}")
    bad = [p for p in items if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{name}: every caption must be a str, got {type(bad[0]).__name__}")
    return items


class FacePipeline:
    def __init__(self, model: UniF2aceModel, image_tokenizer, text_tokenizer,
                 device: Union[str, torch.device, None] = None, *, generation_config: Optional[dict] = None):
        self.model = model.eval()
        self.image_tokenizer = image_tokenizer.eval()
        self.text_tokenizer = text_tokenizer
        self.generation_config = {**DEFAULT_GENERATION_CONFIG, **(generation_config or {})}
        self._progress_config: dict = {}
        if device is not None:
            self.to(device)

    # ------------------------------------------------------------------------------------------------------
    # Loading, saving, device and dtype
    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str, *, torch_dtype=None, device: Union[str, torch.device, None] = None,
                        backend: Optional[str] = None) -> "FacePipeline":
        """Loads a pipeline directory. `torch_dtype` (a torch.dtype or its name; "auto" keeps the saved fp32) is
        the transformer's dtype; the image tokenizer stays fp32 (it is small, and its code arithmetic is exact
        only there). `backend` overrides the model's ("kernels" or "reference")."""
        from unif2ace.tokenizers import ImageTokenizer, TextTokenizer

        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory!r}: no such pipeline directory")
        for sub in ("model", "image_tokenizer", "text_tokenizer"):
            if not os.path.isdir(os.path.join(directory, sub)):
                raise FileNotFoundError(f"{directory!r} is not a pipeline directory: {sub}/ is missing")
        dtype = _dtype(torch_dtype)
        face_dir = os.path.join(directory, "face_encoder")
        face_encoder = FaceAttributeEncoder.from_pretrained(face_dir) if os.path.isdir(face_dir) else None
        model = UniF2aceModel.from_pretrained(os.path.join(directory, "model"), backend=backend, torch_dtype=dtype,
                                              face_encoder=face_encoder)
        image_tok = ImageTokenizer.from_pretrained(os.path.join(directory, "image_tokenizer"))
        text_tok = TextTokenizer.from_pretrained(os.path.join(directory, "text_tokenizer"))
        gen_path = os.path.join(directory, GENERATION_CONFIG_NAME)
        gen = json.load(open(gen_path)) if os.path.isfile(gen_path) else None
        return cls(model, image_tok, text_tok, device, generation_config=gen)

    def save_pretrained(self, directory: str) -> None:
        self.model.save_pretrained(os.path.join(directory, "model"))
        self.image_tokenizer.save_pretrained(os.path.join(directory, "image_tokenizer"))
        self.text_tokenizer.save_pretrained(os.path.join(directory, "text_tokenizer"))
        if isinstance(self.model.face_encoder, FaceAttributeEncoder):
            self.model.face_encoder.save_pretrained(os.path.join(directory, "face_encoder"))
        save_generation_config(directory, **self.generation_config)

    def to(self, *args, **kwargs) -> "FacePipeline":
        """`pipe.to("cuda")`, `pipe.to(torch.bfloat16)`, `pipe.to("cuda", torch.bfloat16)`,
        `pipe.to(device=..., dtype=...)`. The dtype applies to the transformer; the image tokenizer moves but
        stays fp32. Returns the pipeline."""
        device, dtype = kwargs.pop("device", None), _dtype(kwargs.pop("dtype", None))
        if kwargs:
            raise TypeError(f"to(): unexpected keyword arguments {sorted(kwargs)}")
        for a in args:
            if isinstance(a, torch.dtype) or (isinstance(a, str) and isinstance(getattr(torch, a, None), torch.dtype)):
                dtype = _dtype(a)
            else:
                device = a
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating-point dtype, got {dtype}")
        device = torch.device(device) if device is not None else None
        self.model.to(device=device, dtype=dtype)
        if device is not None:
            self.image_tokenizer.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options of the progress bar over the MaskGIT steps (`disable=True` turns it off; `desc`, `leave`,
        and on a terminal any tqdm option)."""
        self._progress_config = dict(kwargs)

    # ------------------------------------------------------------------------------------------------------
    # Text-to-face
    # ------------------------------------------------------------------------------------------------------
    def _sampling_settings(self, num_inference_steps, guidance_scale, temperature, steps, seed,
                           generator) -> tuple[int, float, float, int]:
        """(steps, guidance, temperature, Philox seed) from the arguments, the older alias `steps` and the
        generation config."""
        if steps is not None:
            if num_inference_steps is not None and num_inference_steps != steps:
                raise ValueError(f"steps={steps} and num_inference_steps={num_inference_steps} disagree; "
                                 "pass one (steps is the older name)")
            num_inference_steps = steps
        if num_inference_steps is None:
            num_inference_steps = self.generation_config["num_inference_steps"]
        if guidance_scale is None:
            guidance_scale = self.generation_config["guidance_scale"]
        if temperature is None:
            temperature = self.generation_config["temperature"]
        return int(num_inference_steps), float(guidance_scale), float(temperature), _philox_seed(seed, generator)

    @torch.no_grad()
    def generate_codes(self, prompts: Prompts, *, negative_prompt: Optional[Prompts] = None,
                       num_images_per_prompt: int = 1, num_inference_steps: Optional[int] = None,
                       guidance_scale: Optional[float] = None, seed: Optional[int] = None,
                       generator: Optional[torch.Generator] = None, temperature: Optional[float] = None,
                       steps: Optional[int] = None, progress: Union[bool, dict] = False) -> torch.Tensor:
        """Image codes [len(prompts) · num_images_per_prompt, N] (prompt-major order)."""
        prompts = _prompt_list("prompt", prompts)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt: must be a positive int, got {num_images_per_prompt!r}")
        steps, guidance_scale, temperature, seed = self._sampling_settings(num_inference_steps, guidance_scale,
                                                                           temperature, steps, seed, generator)
        ids = [self.text_tokenizer.encode(p) for p in prompts for _ in range(num_images_per_prompt)]
        negative_ids = None
        if negative_prompt is not None:
            negatives = _prompt_list("negative_prompt", negative_prompt)
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt: {len(negatives)} captions for {len(prompts)} prompts")
            negative_ids = [self.text_tokenizer.encode(n) for n in negatives for _ in range(num_images_per_prompt)]
        return self.model.generate_images(ids, steps=steps, guidance_scale=guidance_scale, seed=seed,
                                          temperature=temperature, negative_prompt_ids=negative_ids,
                                          progress=progress)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, N] → images [B, 3, S, S] in [-1, 1]."""
        return self.image_tokenizer.decode(codes.to(self.image_tokenizer_device)).clamp(-1, 1)

    @property
    def image_tokenizer_device(self) -> torch.device:
        return next(self.image_tokenizer.parameters()).device

    def __call__(self, prompt: Prompts, negative_prompt: Optional[Prompts] = None, *, num_images_per_prompt: int = 1,
                 num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                 temperature: Optional[float] = None,
                 output_type: str = "pil", return_dict: bool = True, steps: Optional[int] = None):
        """Faces for each prompt (prompt-major: all images of prompt 0, then prompt 1, ...).

        `num_inference_steps`, `guidance_scale` and `temperature` (of the code sampling) default to the pipeline's
        generation_config.json (else 12, 3.0 and 1.0); `negative_prompt` (one caption, or one per prompt) replaces
        the empty caption of classifier-free guidance; `seed` (default 0) or `generator` choose the randomness; `output_type` "pil" (a list of
        images), "pt" (tensor [B, 3, H, W]) or "np" (array [B, H, W, 3]), both in [0, 1]. Returns a
        FacePipelineOutput, or the tuple (images,) with return_dict=False. `steps` is the older name of
        num_inference_steps."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
        progress = False if self._progress_config.get("disable") else {"desc": "generate", **self._progress_config}
        codes = self.generate_codes(prompt, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
                                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                                    generator=generator, temperature=temperature, steps=steps, progress=progress)
        images = (self.decode_codes(codes).float() + 1) / 2
        if output_type == "pil":
            images = tensor_to_pil(images * 2 - 1)
        elif output_type == "np":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        if not return_dict:
            return (images,)
        return FacePipelineOutput(images=images, codes=codes)

    def generate(self, prompts: Prompts, **kwargs) -> list[Image.Image]:
        """`pipe(prompts, **kwargs).images` as a list of PIL images (the older spelling; takes the same
        arguments as __call__ except output_type and return_dict)."""
        return self(prompts, **kwargs).images

    # ------------------------------------------------------------------------------------------------------
    # Understanding
    # ------------------------------------------------------------------------------------------------------
    def _image_tensor(self, image) -> torch.Tensor:
        if isinstance(image, (str, os.PathLike)):
            if not os.path.isfile(image):
                raise FileNotFoundError(f"image: no such file {str(image)!r}")
            with Image.open(image) as im:
                image = im.convert("RGB")
        if isinstance(image, Image.Image):
            image = image_to_tensor(image, self.model.config.image_size)
        if not torch.is_tensor(image):
            raise ValueError(f"image: expected a PIL image, a path or a tensor [3, S, S], got {type(image).__name__}")
        image = image if image.dim() == 4 else image[None]
        return image.to(self.image_tokenizer_device, torch.float32)

    @torch.no_grad()
    def answer_batch(self, images, questions: Sequence[str], *, max_new_tokens: int = 48, do_sample: bool = False,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
                     generator: Optional[torch.Generator] = None) -> list[str]:
        """Answers to `questions` about `images` (a list of PIL images / paths, or a tensor [B, 3, S, S] in
        [-1, 1]). Each question is put in the model's prompt form "USER: <question> ASSISTANT:". Greedy unless
        do_sample=True (then temperature / top_k / top_p, with `seed` or `generator` as in __call__)."""
        questions = list(questions)
        if not questions or not all(isinstance(q, str) for q in questions):
            raise ValueError("questions: expected a non-empty list of str")
        x = images.to(self.image_tokenizer_device, torch.float32) if torch.is_tensor(images) \
            else torch.cat([self._image_tensor(im) for im in images])
        if x.shape[0] != len(questions):
            raise ValueError(f"{x.shape[0]} images for {len(questions)} questions")
        codes = self.image_tokenizer.encode(x)
        prefixes = [self.text_tokenizer.encode(question_prompt(q)) for q in questions]
        if not do_sample:
            top_k, temperature = 1, 1.0
        out = self.model.generate_text(prefixes, image_codes=codes.to(self.device),
                                       images=x.to(self.device, self.dtype), max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_k=top_k, top_p=top_p,
                                       seed=_philox_seed(seed, generator))
        return [self.text_tokenizer.decode(o).strip() for o in out]

    def answer(self, image, question: str, **kwargs) -> str:
        """The answer to one question about one face (a PIL image, a path or a tensor); keyword arguments as in
        answer_batch."""
        if not isinstance(question, str):
            raise ValueError(f"question: expected a str, got {type(question).__name__}")
        return self.answer_batch(image if torch.is_tensor(image) else [image], [question], **kwargs)[0]

    def caption(self, image, *, max_new_tokens: int = 64, **kwargs) -> str:
        """A description of one face (the question "Describe the face.")."""
        return self.answer(image, CAPTION_QUESTION, max_new_tokens=max_new_tokens, **kwargs)


def save_generation_config(directory: str, **values) -> None:
    """Writes the sampling defaults of a pipeline directory (num_inference_steps, guidance_scale, temperature)."""
    unknown = sorted(set(values) - set(DEFAULT_GENERATION_CONFIG))
    if unknown:
        raise ValueError(f"generation config: unknown keys {unknown}")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, GENERATION_CONFIG_NAME), "w") as f:
        json.dump({**DEFAULT_GENERATION_CONFIG, **values}, f, indent=1)
        f.write("\n")


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images [B, 3, H, W] in [-1, 1] → PIL images."""
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(images: Sequence[Image.Image], *, columns: int = 4, captions: Sequence[str] = (), scale: int = 2,
               caption_lines: int = 4) -> Image.Image:
    """A PNG-ready grid; with `captions` the text is wrapped and drawn under each image."""
    from PIL import ImageDraw, ImageFont

    import textwrap

    if not images:
        raise ValueError("image_grid: no images")
    if columns < 1 or scale < 1:
        raise ValueError(f"image_grid: columns and scale must be >= 1, got {columns} and {scale}")
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
