from tessellm import hookimpl


@hookimpl
def register_models(register):
    register("Gemma2ForCausalLM", "tessellm_gemma.model:Gemma2ForCausalLM")
    register("Gemma3ForCausalLM", "tessellm_gemma.model:Gemma3ForCausalLM")


@hookimpl
def register_model_sources(register):
    register("gemma-pypi", "tessellm_gemma.sources:GemmaWheelSource")
