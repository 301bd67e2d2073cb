"""LLaVA (``LlavaForConditionalGeneration``) for tessellm: image input on the multimodal seam."""
