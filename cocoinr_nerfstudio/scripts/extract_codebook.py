"""``cocoinr-extract-codebook``: keep only the 16 MiB codebook of a ~1 GB VQGAN checkpoint."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import tyro
from nerfstudio.utils.rich_utils import CONSOLE

from cocoinr_nerfstudio.codebook import CODEBOOK_FILENAME, CodebookError, load_codebook, save_codebook, user_cache_dir


@dataclass
class ExtractCodebook:
    """Extract the quantizer embedding from a taming-transformers VQGAN checkpoint.

    The result is the compact file the original project shipped; by default it goes to the user cache,
    where ``ns-train coco-inr`` finds it without --pipeline.model.codebook-path.
    """

    vqgan_checkpoint: Path
    """Full VQGAN checkpoint (e.g. taming's ImageNet f16-16384 last.ckpt), or any supported codebook file."""
    output: Path | None = None
    """Where to write the codebook (default: the user cache, ~/.cache/cocoinr/model_16384x256_codebook.ckpt)."""
    overwrite: bool = False
    """Replace an existing output file."""

    def main(self) -> Path:
        output = self.output if self.output is not None else user_cache_dir() / CODEBOOK_FILENAME
        if output.exists() and not self.overwrite:
            raise CodebookError(f"{output} already exists; pass --overwrite to replace it.")
        codebook = load_codebook(self.vqgan_checkpoint)
        save_codebook(codebook, output)
        CONSOLE.print(f"Saved codebook {tuple(codebook.shape)} from {self.vqgan_checkpoint} to {output}")
        return output


def entrypoint() -> None:
    try:
        tyro.cli(ExtractCodebook).main()
    except CodebookError as error:
        CONSOLE.print(f"[bold red]Error: {error}")
        sys.exit(1)


if __name__ == "__main__":
    entrypoint()
