from tessellm import hookimpl

# The plugin API versions this package is written for (tessellm refuses it outside them).
TESSELLM_PLUGIN_API = ">=1.0,<2"


@hookimpl
def register_models(register):
    register("Gemma2ForCausalLM", "tessellm_gemma.model:Gemma2ForCausalLM")
    register("Gemma3ForCausalLM", "tessellm_gemma.model:Gemma3ForCausalLM")


@hookimpl
def register_model_sources(register):
    register("gemma-pypi", "tessellm_gemma.sources:GemmaWheelSource")
