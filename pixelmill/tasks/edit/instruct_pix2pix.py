"""InstructPix2Pix: edit each image by a written instruction."""

from __future__ import annotations

from pixelmill.models.family import ALL_FAMILIES
from pixelmill.registry import register
from pixelmill.tasks.edit.base import BulkEditor


@register("edit", "instruct_pix2pix", text="instruction", needs_model=True, adapters=True, families=ALL_FAMILIES)
class InstructPix2PixEditor(BulkEditor):
    """InstructPix2Pix: edit each image by a written instruction (text and image guidance).

    SD 1.x/2.x checkpoints load as ``StableDiffusionInstructPix2PixPipeline``, SDXL ones as
    ``StableDiffusionXLInstructPix2PixPipeline`` (named by the checkpoint; diffusers' Auto
    pipelines reach neither).
    """

    method = "instruct_pix2pix"
    text_key = "instruction"

    def load_pipeline(self):
        from pixelmill.models.loading import load_instruct_pix2pix_pipeline

        return load_instruct_pix2pix_pipeline(self.config["model"], **self.load_options())

    def unet_rows_per_image(self) -> int:
        """3 with guidance (unconditional, image-only, text and image), as the pipeline batches them; else 1."""
        c = self.config
        return 3 if c["guidance_scale"] > 1 and c["image_guidance_scale"] >= 1 else 1

    def pipe_call(self, images, texts, seeds):
        c = self.config
        negative = [c["negative_prompt"]] * len(texts) if c.get("negative_prompt") else None
        kwargs = dict(
            prompt=texts,
            image=images,
            num_inference_steps=c["steps"],
            guidance_scale=c["guidance_scale"],
            image_guidance_scale=c["image_guidance_scale"],
            negative_prompt=negative,
            generator=self.generators(seeds),
        )
        return kwargs, [{"image_guidance_scale": c["image_guidance_scale"]} for _ in images]
