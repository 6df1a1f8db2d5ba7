"""Tokenizers: the LFQ image tokenizer (and Show-o MAGVIT-v2 loader), the byte-level BPE text tokenizer,
and prompt builders for the understanding (mmu) and generation (t2i) sequence formats."""
from unif2ace.tokenizers.image import (  # noqa: F401
    ImageTokenizer, ImageTokenizerConfig, ImageTokenizerTrainConfig, TrainConfig, load_magvit2, psnr, save_magvit2,
    train_image_tokenizer,
)
from unif2ace.tokenizers.prompts import VocabLayout, mmu_batch, mmu_prompt, t2i_batch, t2i_prompt  # noqa: F401
from unif2ace.tokenizers.text import TextTokenizer  # noqa: F401
