"""Tool-call parsers shipped with core: the JSON-call machinery every JSON format shares,
and the Hermes format, which several families use (Qwen 2/2.5/3 and QwQ, NousResearch's
Hermes fine-tunes of Llama and Mistral). Family-specific formats live in their family's
plugin (``llama3_json`` in tessellm-llama, ``mistral`` in tessellm-mistral)."""
